"""The CUDA paths (marker `gpu`; skipped without a GPU; runs/gpu_check.sh runs them on one): a bf16 training step of
the `small` preset against fp32, the grouped expert GEMM against the reference loop, the engine (greedy = full
forwards, the compiled decode step, no host sync inside it, so it can be captured as a CUDA graph), the trainer's
process group (cuda:nccl,cpu:gloo) with one rank, activation checkpointing under bf16. The FP8 kernels' check is
tests/test_fp8.py::test_gpu_kernels_match_the_emulation."""

import os
import socket

import pytest
import torch

from nanoseek import ModelArgs, build_model
from nanoseek.config import get_preset
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model.moe import MoE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
            q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, max_position_embeddings=128,
            num_nextn_predict_layers=1, torch_dtype="float32")


def test_small_preset_bf16_step_matches_fp32():
    torch.manual_seed(0)
    model = build_model(get_preset("small"), device="cuda")
    x = torch.randint(3, model.args.vocab_size, (2, 257), device="cuda")
    with torch.no_grad():
        fp32 = model(x[:, :-1], labels=x[:, 1:]).lm_loss.item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x[:, :-1], labels=x[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss) and abs(out.lm_loss.item() - fp32) < 2e-2 * fp32, (out.lm_loss.item(), fp32)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert torch.isfinite(norm)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_expert_gemm_matches_the_loop(dtype):
    torch.manual_seed(0)
    args = get_preset("small")
    moe = MoE(args).cuda()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(512, args.hidden_size, device="cuda", requires_grad=True)
    outs = []
    for impl in ("reference", "grouped"):
        moe.impl = impl
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = moe(x[None])
        (g,) = torch.autograd.grad(y.float().square().mean(), x)
        outs.append((y.float(), g))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    (ya, ga), (yb, gb) = outs
    assert (ya - yb).norm() <= tol * ya.norm() and (ga - gb).norm() <= tol * ga.norm()


def test_engine_on_cuda_greedy_compiled_and_sync_free():
    torch.manual_seed(0)
    model = build_model(ModelArgs.from_dict(TINY).validate(), device="cuda").eval()
    prompt = [5, 6, 7, 8]
    want = model.generate(torch.tensor([prompt], device="cuda"), 16)[0, len(prompt):].tolist()
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for compile in (False, True):
        engine = Engine(model, max_batch=2, compile=compile)
        engine.warm_up()
        assert [r.output for r in engine.generate([prompt], sp)][0] == want, compile
    assert engine.compile, engine.compile_error  # the compiled decode step ran
    # one compiled decode step with CUDA's sync check raising: nothing in it waits on the host
    ids = torch.tensor([[9]], device="cuda")
    slots, start = torch.tensor([0], device="cuda"), torch.tensor([4], device="cuda")
    engine._forward_step(ids, slots, start)  # compiled for this shape (outside the check)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits, _ = engine._forward_step(ids, slots, start)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits).all()


def test_nccl_with_one_rank():
    """The trainer's process group on GPUs (cuda:nccl,cpu:gloo): CUDA tensors through nccl, and a CPU tensor through
    gloo rather than the "No backend type associated with device type cpu" of nccl alone."""
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("cuda:nccl,cpu:gloo", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        t = torch.ones(4, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [1.0] * 4
        c = torch.ones(2)
        dist.all_reduce(c)
        assert c.tolist() == [1.0] * 2
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_on_cuda_under_bf16(mode):
    """--ac on CUDA under bf16 autocast (the trainer's mode there): the same loss and gradients as without, the
    router's counts once, and less peak memory (the `small` preset, 2 x 1024 tokens)."""
    import copy
    from nanoseek.parallel import activation_checkpoint as ac
    torch.manual_seed(0)
    base = build_model(get_preset("small"), device="cuda").train()
    x = torch.randint(3, base.args.vocab_size, (2, 1025), device="cuda")
    got = {}
    for m in ("none", mode):
        model = copy.deepcopy(base)
        ac.apply(model, m)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x[:, :-1], labels=x[:, 1:])
        out.loss.backward()
        torch.cuda.synchronize()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        got[m] = (out.loss.item(), grads, [l.tokens_per_expert.clone() for l in model.moe_layers()],
                  torch.cuda.max_memory_allocated() - before)
        del model
    (la, ga, ca, pa), (lb, gb, cb, pb) = got["none"], got[mode]
    assert abs(la - lb) <= 1e-3 * la and (ga - gb).norm() <= 1e-2 * ga.norm()
    assert all(torch.equal(a, b) for a, b in zip(ca, cb))
    assert pb < pa, (pa, pb)
