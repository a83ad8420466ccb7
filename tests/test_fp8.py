"""FP8 as DeepSeek-V3 trains: 1×128 activation tiles and 128×128 weight blocks with edge blocks, the round trip's
error bound, the emulated GEMMs (Fprop, Dgrad, Wgrad) against a float64 computation of the same quantised operands,
`convert` from outside (what goes to FP8 and what does not), `high_precision()`, and a tiny model training in FP8."""

import pytest
import torch
import torch.nn as nn

from nanoseek import ModelArgs, build_model
from nanoseek.errors import NanoseekError
from nanoseek import fp8

E4M3_EPS = 2.0 ** -4  # e4m3 keeps 3 mantissa bits: round to nearest is within half a step, 2^-4 of the value


def test_tile_and_block_shapes_with_edges():
    x = torch.randn(5, 300)
    q, s = fp8.quantize_tiles(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (5, 300) and s.shape == (5, 3)
    w = torch.randn(200, 130)
    q, s = fp8.quantize_blocks(w)
    assert q.shape == (200, 130) and s.shape == (2, 2)  # ceil(200/128) x ceil(130/128), as weight_scale_inv
    # each block's scale is its own amax / 448, edge blocks over the part that exists
    assert torch.allclose(s[1, 1], w[128:, 128:].abs().max() / 448)
    assert torch.allclose(fp8.quantize_tiles(x)[1][2, 2], x[2, 256:].abs().max() / 448)
    assert q.float().abs().max() <= 448


@pytest.mark.parametrize("pow2", [False, True])
def test_round_trip_error_bound(pow2):
    torch.manual_seed(0)
    x = torch.randn(64, 384) * torch.logspace(-3, 3, 384)  # channels of very different sizes
    back = fp8.fake_tiles(x, pow2)
    _, s = fp8.quantize_tiles(x, pow2)
    step = s.repeat_interleave(128, -1)  # the scale of each element's tile
    # normal e4m3 numbers: relative error <= 2^-4; below the smallest normal (2^-6 · scale) absolute <= 2^-10 · scale
    err = (back - x).abs()
    assert (err <= torch.maximum(E4M3_EPS * x.abs(), 2.0 ** -10 * step) * (1 + 1e-6)).all()
    if pow2:
        assert torch.equal(torch.log2(s), torch.log2(s).round())
    w = torch.randn(256, 200)
    assert ((fp8.fake_blocks(w, pow2) - w).abs() <= torch.maximum(E4M3_EPS * w.abs(), torch.full_like(w, 1e-2))).all()


def f64(q, s, tiles):
    """The dequantised operand in float64, computed apart from fp8.py: element times its tile's or block's scale."""
    q, s = q.double(), s.double()
    if tiles:
        return torch.stack([q[:, j] * s[:, j // 128] for j in range(q.shape[1])], 1)
    return torch.tensor([[q[i, j] * s[i // 128, j // 128] for j in range(q.shape[1])] for i in range(q.shape[0])],
                        dtype=torch.float64)


def test_three_gemms_against_float64():
    torch.manual_seed(1)
    M, K, N = 40, 200, 136  # none a multiple of 128: edge tiles and blocks everywhere
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    y = fp8.FP8LinearFn.apply(x, w, False)
    dy = torch.randn(M, N)
    y.backward(dy)
    xq, xs = fp8.quantize_tiles(x.detach())
    wq, ws = fp8.quantize_blocks(w.detach())
    X, W = f64(xq, xs, True), f64(wq, ws, False)
    assert torch.allclose(y.double(), X @ W.T, rtol=1e-5, atol=1e-4)  # Fprop
    dyq, dys = fp8.quantize_tiles(dy)  # Dgrad: dy in 1×128 tiles along N
    assert torch.allclose(x.grad.double(), f64(dyq, dys, True) @ W, rtol=1e-5, atol=1e-4)
    # Wgrad: dyᵀ and the cached FP8 activations re-tiled along the tokens
    gq, gs = fp8.quantize_tiles(dy.T)
    aq, as_ = fp8.quantize_tiles(X.float().T)
    assert torch.allclose(w.grad.double(), f64(gq, gs, True) @ f64(aq, as_, True).T, rtol=1e-5, atol=1e-3)
    # and FP8 is close to, not equal to, full precision
    full = x.detach() @ w.detach().T
    rel = (y.detach() - full).norm() / full.norm()
    assert 1e-4 < rel < 0.05


CFG = dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
           num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
           qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, max_position_embeddings=64,
           num_nextn_predict_layers=1, torch_dtype="float32")


def test_convert_from_outside_and_high_precision():
    torch.manual_seed(0)
    model = build_model(ModelArgs.from_dict(CFG).validate())
    keys = set(model.state_dict())
    ids = torch.randint(3, 300, (2, 16))
    before = model(ids)
    names = fp8.convert(model)
    assert set(model.state_dict()) == keys  # same parameters, same checkpoint names
    kinds = {type(m) for n, m in model.named_modules() if n in names}
    assert kinds == {fp8.FP8Linear, fp8.FP8Experts}
    for n in ("embed_tokens", "lm_head", "gate"):  # V3 §3.3.1: these stay in high precision
        assert not any(x.split(".")[-1] == n for x in names), n
    assert any("q_a_proj" in n for n in names) and any("mtp" in n and "eh_proj" in n for n in names)
    assert any(n.endswith("mlp.experts") for n in names) and any("shared_experts" in n for n in names)
    logits = model(ids)
    with fp8.high_precision():
        ref = model(ids)
    assert torch.equal(ref, before)  # high precision is exactly the unconverted model
    assert not torch.equal(logits, ref) and torch.allclose(logits, ref, atol=0.05)
    with pytest.raises(NanoseekError):
        fp8.convert(nn.Sequential(nn.ReLU()))


def test_tiny_model_trains_in_fp8_close_to_full_precision():
    """Same seed, data and steps in FP8 and in FP32: the losses fall together and end close."""
    losses = {}
    for use_fp8 in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelArgs.from_dict(CFG).validate())
        if use_fp8:
            fp8.convert(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        data = torch.randint(3, 40, (8, 33), generator=g)  # a small vocabulary: learnable in a few steps
        for _ in range(30):
            loss = model(data[:, :-1], labels=data[:, 1:]).loss  # next-token + MTP losses: every FP8 module in use
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[use_fp8] = loss.item()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()
                   if p.requires_grad and p.grad is not None)
    # from ln(300) = 5.7 both fall below 3, and end within 10% of each other (the ≤ 0.25% figure is V3's at scale;
    # bench/RESULTS.md has the speedrun's 600 steps)
    assert max(losses.values()) < 3 and abs(losses[True] - losses[False]) / losses[False] < 0.1, losses


def test_fp8_export_loads_back_and_corrupt_scales_are_one_line(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from nanoseek.model import from_pretrained
    torch.manual_seed(0)
    model = build_model(ModelArgs.from_dict({**CFG, "hidden_size": 160, "moe_intermediate_size": 48}).validate())
    model.save_pretrained(tmp_path / "fp8", fp8=True)
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    t = load_file(tmp_path / "fp8" / "model.safetensors")
    q = "model.layers.1.self_attn.q_a_proj.weight"
    assert t[q].dtype == torch.float8_e4m3fn and t[q + "_scale_inv"].shape == (1, 2)  # [32, 160]: edge blocks
    assert t["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.float8_e4m3fn
    for hp in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight", "model.norm.weight",
               "model.layers.2.eh_proj.weight"):
        assert t[hp].dtype == torch.float32, hp  # kept high precision, as in the published checkpoints
    back = from_pretrained(tmp_path / "fp8")
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.allclose(a, b, rtol=2 ** -4, atol=1e-2 * max(a.abs().max().item(), 1e-6)), name
    ids = torch.randint(3, 300, (1, 12))
    assert torch.allclose(model(ids), back(ids), atol=0.1)
    for bad, needle in ((torch.ones(2, 2), "has shape"), (torch.full((1, 2), float("nan")), "non-finite")):
        broken = dict(t)
        broken[q + "_scale_inv"] = bad
        save_file(broken, tmp_path / "fp8" / "model.safetensors")
        with pytest.raises(NanoseekError, match=needle) as e:
            from_pretrained(tmp_path / "fp8")
        assert q + "_scale_inv" in str(e.value)


def test_adamw_with_bf16_moments_follows_adamw():
    """V3 keeps AdamW's moments in BF16: the same steps as torch's AdamW up to BF16 rounding of the moments."""
    from nanoseek.train.common import AdamWBF16Moments
    torch.manual_seed(0)
    a = nn.Linear(64, 32)
    b = nn.Linear(64, 32)
    b.load_state_dict(a.state_dict())
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ob = AdamWBF16Moments(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randn(16, 64)
    for _ in range(10):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    assert all(s["exp_avg"].dtype == torch.bfloat16 and s["exp_avg_sq"].dtype == torch.bfloat16
               for s in ob.state.values())
    assert torch.allclose(a.weight, b.weight, atol=2e-3) and not torch.equal(a.weight, b.weight)


def test_dequantize_stacked_weights_block_by_block():
    from nanoseek.checkpoint import dequantize_fp8, quantize_fp8
    torch.manual_seed(0)
    w = torch.randn(3, 2, 200, 130)
    pairs = [[quantize_fp8(w[e, h]) for h in range(2)] for e in range(3)]
    q = torch.stack([torch.stack([p[0] for p in row]) for row in pairs])
    s = torch.stack([torch.stack([p[1] for p in row]) for row in pairs])
    assert s.shape == (3, 2, 2, 2)
    stacked = dequantize_fp8(q, s)
    for e in range(3):
        for h in range(2):
            assert torch.equal(stacked[e, h], dequantize_fp8(*pairs[e][h]))
    # compiled as a decode step compiles it (inductor once miscomputed an e4m3 load times a gathered scale)
    assert torch.equal(torch.compile(dequantize_fp8)(q, s), stacked)


def test_fp8_checkpoint_served_with_weights_in_fp8(tmp_path):
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.model import from_pretrained
    torch.manual_seed(0)
    model = build_model(ModelArgs.from_dict({**CFG, "hidden_size": 256, "moe_intermediate_size": 128,
                                             "n_routed_experts": 4, "n_group": 1}).validate())
    model.save_pretrained(tmp_path / "fp8", fp8=True)
    plain = from_pretrained(tmp_path / "fp8")  # dequantised at load
    kept = fp8.from_pretrained(tmp_path / "fp8")
    assert isinstance(kept.layers[1].mlp.experts, fp8.FP8WeightExperts)
    attn = kept.layers[1].self_attn
    assert isinstance(attn.q_a_proj, fp8.FP8WeightLinear) and attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    assert type(attn.kv_b_proj) is nn.Linear and attn.kv_b_proj.weight.dtype == torch.float32  # read as a tensor
    assert kept.layers[1].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert kept.lm_head.weight.dtype == torch.float32 and kept.layers[1].mlp.gate.weight.dtype == torch.float32
    assert type(fp8.from_pretrained(tmp_path / "fp8", dequantize=True).layers[1].self_attn.q_a_proj) is nn.Linear
    bf16 = fp8.weight_bytes(from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16))
    ratio = fp8.weight_bytes(fp8.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)) / bf16
    assert 0.5 < ratio < 0.7, ratio  # the quantised share at 1 byte + its scales; embedding, head, norms in bf16
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(kept(ids), plain(ids), atol=1e-5)
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    want = [r.output for r in Engine(plain, max_batch=2).generate([[5, 6, 7], [9, 10]], sp)]
    for compile in (False, True):
        engine = Engine(kept, max_batch=2, compile=compile)
        assert [r.output for r in engine.generate([[5, 6, 7], [9, 10]], sp)] == want, compile


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernels_match_the_emulation():
    """On Hopper the three GEMMs go through torch._scaled_mm with block scales; elsewhere they fall back (one warning)
    to the emulation. Either way the result must be the emulation's, up to FP32 summation order."""
    torch.manual_seed(0)
    x = torch.randn(300, 1024, device="cuda", requires_grad=True)
    w = torch.randn(512, 1024, device="cuda", requires_grad=True)
    dy_cpu = torch.randn(300, 512, generator=torch.Generator().manual_seed(1))
    y = fp8.fp8_linear(x, w)
    y.backward(dy_cpu.cuda())
    xc, wc = x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_()
    yc = fp8.fp8_linear(xc, wc)
    yc.backward(dy_cpu)  # the same upstream gradient as on the GPU
    rel = lambda a, b: ((a.float().cpu() - b).norm() / b.norm()).item()
    assert rel(y.detach(), yc.detach()) < 1e-5
    assert rel(x.grad, xc.grad) < 1e-5 and rel(w.grad, wc.grad) < 1e-5
    q, s = fp8.quantize_blocks(w.detach())
    assert rel(fp8.fp8_weight_linear(x.detach(), q, s), fp8.fp8_linear(xc.detach(), wc.detach())) < 5e-2
    if torch.cuda.get_device_capability() == (9, 0):
        assert fp8.native_calls >= 4, "on Hopper the block-scaled GEMMs must run natively, not emulated"
    print(f"native block-scaled GEMMs run: {fp8.native_calls}")
