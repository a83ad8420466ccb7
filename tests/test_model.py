"""The model as a whole: causality (also of the MTP chain), MTP kept out of the plain forward but trained, the loss
terms, the router-bias hook, generation, presets and parameter counts against DeepSeek's published figures."""

import pytest
import torch

from nanoseek import ModelArgs, build_model, get_preset
from nanoseek.cost import count_params, flops_per_token, kv_cache_elements_per_token

CFG = dict(vocab_size=200, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
           num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
           qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, max_position_embeddings=256,
           num_nextn_predict_layers=2, torch_dtype="float32")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(ModelArgs.from_dict(CFG).validate())


def tokens(T=24, seed=0):
    return torch.randint(0, 200, (2, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_causal_main_and_mtp(model):
    model.eval()
    a, b = tokens(), tokens(seed=1)
    b[:, :10] = a[:, :10]  # same first 10 tokens
    assert torch.allclose(model(a)[:, :10], model(b)[:, :10], atol=1e-6)
    assert not torch.allclose(model(a)[:, 10:], model(b)[:, 10:])
    # MTP depth k at position t sees tokens up to t+k: the first 10-k positions agree
    for k, (la, lb) in enumerate(zip(model.mtp_logits(a), model.mtp_logits(b)), start=1):
        assert la.shape == (2, 24 - k, 200)
        assert torch.allclose(la[:, : 10 - k], lb[:, : 10 - k], atol=1e-6)
        assert not torch.allclose(la[:, 10 - k], lb[:, 10 - k])


@torch.no_grad()
def test_mtp_not_in_plain_forward(model):
    model.eval()
    x = tokens()
    before = model(x)
    for p in model.mtp.parameters():
        p.add_(1.0)
    assert torch.equal(before, model(x))


def test_loss_terms_and_gradients(model):
    model.train()
    x = tokens(T=25)
    inp, labels = x[:, :-1], x[:, 1:].clone()
    labels[0, :5] = -100  # ignored positions
    out = model(inp, labels=labels)
    assert out.logits.shape == (2, 24, 200)
    assert out.mtp_loss is not None and out.balance_loss is not None
    lam = model.args.mtp_loss_weight
    assert torch.allclose(out.loss, out.lm_loss + lam * out.mtp_loss + out.balance_loss)
    # near log(V) at init
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(200.0)).item()) < 0.5
    out.loss.backward()
    assert model.mtp[1].eh_proj.weight.grad.abs().sum() > 0
    assert model.layers[2].mlp.gate.weight.grad.abs().sum() > 0
    assert model.layers[2].mlp.experts.down_proj.grad.abs().sum() > 0
    # eval: no balance loss
    model.eval()
    with torch.no_grad():
        assert model(inp, labels=labels).balance_loss is None


def test_update_bias_hook(model):
    model.train()
    model(tokens(), labels=tokens(seed=1))
    loads = [m.tokens_per_expert.clone() for m in model.moe_layers()]
    assert all(l.sum() > 0 for l in loads)
    model.update_bias(0.01)
    for m, load in zip(model.moe_layers(), loads):
        b = m.gate.e_score_correction_bias
        assert torch.allclose(b, 0.01 * torch.sign(load.mean() - load))
        assert m.tokens_per_expert.sum() == 0


@torch.no_grad()
def test_generate_greedy_matches_argmax(model):
    model.eval()
    x = tokens(T=5)[:1]
    out = model.generate(x, 6)
    seq = x
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_bf16_forward_close_to_fp32(model):
    model.eval()
    x = tokens()
    with torch.no_grad():
        a = model(x)
        b = model.to(torch.bfloat16)(x).float()
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_presets_and_counts():
    v3 = get_preset("v3")
    p = count_params(v3)
    assert abs(p["total"] / 671e9 - 1) < 0.005  # DeepSeek: 671B
    assert abs(p["active"] / 37e9 - 1) < 0.03  # DeepSeek: 37B activated
    assert abs(p["active_no_embedding"] / 36.6e9 - 1) < 0.01  # README_WEIGHTS: 36.6-36.7B
    assert abs(p["mtp"] / 11.5e9 - 1) < 0.02  # README_WEIGHTS: MTP 11.5B unique
    assert count_params(get_preset("v2-lite"))["total"] == 15_706_484_224  # the published checkpoint, exactly
    small = count_params(get_preset("small"))
    assert 0.5e9 <= small["total"] <= 2e9
    tiny = count_params(get_preset("tiny"))
    assert 1e6 <= tiny["total_with_mtp"] <= 10e6
    assert kv_cache_elements_per_token(v3)["mla"] == 61 * 576
    f = flops_per_token(v3, 4096, mtp=False, params=p)
    assert 6 * 36e9 < f["training"] < 6 * 45e9


def test_v3_builds_on_meta_only():
    m = build_model(get_preset("v3"), device="meta")
    assert next(m.parameters()).is_meta
    assert len(m.layers) == 61 and len(m.mtp) == 1 and m.layers[3].mlp.experts.gate_up_proj.shape == (256, 4096, 7168)
