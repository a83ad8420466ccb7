"""DeepSeekMoE: the grouped-GEMM fast path equals the paper-like reference loop in values and gradients; the router
semantics (bias for selection only, group limits, renormalisation, scaling factor); the auxiliary-loss-free bias
update; the sequence-wise balance loss against a hand computation."""

import pytest
import torch

from nanoseek.config import ModelArgs
from nanoseek.errors import NanoseekError
from nanoseek.model.moe import Gate, MoE

V3 = dict(vocab_size=64, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
          num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
          v_head_dim=8, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=2,
          routed_scaling_factor=2.5, first_k_dense_replace=1)
V2 = dict(V3, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, n_group=1, topk_group=1,
          routed_scaling_factor=1.0)


def moe(cfg, seed=0):
    torch.manual_seed(seed)
    m = MoE(ModelArgs.from_dict(cfg).validate())
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    if m.gate.e_score_correction_bias is not None:
        m.gate.e_score_correction_bias.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("cfg", [V3, V2], ids=["v3-sigmoid", "v2-softmax"])
@pytest.mark.parametrize("tokens", [1, 7, 96])
def test_grouped_equals_reference(cfg, tokens):
    m = moe(cfg)
    x = torch.randn(1, tokens, cfg["hidden_size"], requires_grad=True)
    g = torch.randn(1, tokens, cfg["hidden_size"])
    outs, grads = {}, {}
    for impl in ("reference", "grouped"):
        m.impl = impl
        m.zero_grad()
        x.grad = None
        y = m(x)
        y.backward(g)
        outs[impl] = y.detach()
        grads[impl] = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    assert torch.allclose(outs["reference"], outs["grouped"], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads["reference"], grads["grouped"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_grouped_equals_reference_scalar_loss_bf16():
    """A .sum() loss (expanded, stride-0 gradient) and bf16 weights also work and agree."""
    m = moe(V3).to(torch.bfloat16)
    x = torch.randn(2, 16, V3["hidden_size"], dtype=torch.bfloat16)
    ys = []
    for impl in ("reference", "grouped"):
        m.impl = impl
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.float().sum().backward()
        ys.append((y.detach().float(), xi.grad.float()))
    for a, b in zip(ys[0], ys[1]):  # bf16: a few roundings apart, relative to the scale of the values
        assert (a - b).abs().max() / a.abs().max() < 2e-2


def gate(cfg, seed=0):
    torch.manual_seed(seed)
    g = Gate(ModelArgs.from_dict(cfg).validate())
    torch.nn.init.normal_(g.weight, std=1.0)
    return g


def test_bias_changes_selection_not_weights():
    g = gate(dict(V3, n_group=1, topk_group=1))
    x = torch.randn(32, V3["hidden_size"])
    w0, i0, s = g(x)
    g.e_score_correction_bias[5] = 10.0  # expert 5 now always wins selection
    w1, i1, s1 = g(x)
    assert torch.equal(s, s1)  # scores themselves unbiased
    assert (i1 == 5).any(-1).all()
    # the gate values are the unbiased sigmoid scores of the chosen experts, renormalised, times the scaling factor
    expect = s.gather(1, i1)
    expect = expect / expect.sum(-1, keepdim=True) * V3["routed_scaling_factor"]
    assert torch.allclose(w1, expect, atol=1e-6)
    assert torch.allclose(w1.sum(-1), torch.full((32,), 2.5), atol=1e-5)
    assert not torch.equal(i0, i1)


def test_groups_outside_topk_group_never_chosen():
    g = gate(V3)
    g.e_score_correction_bias.normal_(0, 0.5)
    x = torch.randn(200, V3["hidden_size"])
    _, idx, s = g(x)
    biased = (s + g.e_score_correction_bias).view(200, 4, 4)
    group_score = biased.topk(2, dim=-1).values.sum(-1)  # a group's score: sum of its top-2 biased scores
    kept = group_score.topk(2, dim=-1).indices  # topk_group = 2
    chosen_groups = idx // 4
    for t in range(200):
        assert set(chosen_groups[t].tolist()) <= set(kept[t].tolist())
    # within the kept groups, the chosen experts are the top-4 by biased score
    masked = biased.clone()
    for t in range(200):
        for grp in range(4):
            if grp not in kept[t]:
                masked[t, grp] = float("-inf")
    assert torch.equal(idx.sort(-1).values, masked.flatten(1).topk(4, -1).indices.sort(-1).values)


def test_routed_scaling_and_v2_no_renorm():
    g = gate(V2)
    x = torch.randn(10, V2["hidden_size"])
    w, idx, s = g(x)
    assert torch.allclose(s.sum(-1), torch.ones(10), atol=1e-6)  # softmax scores
    assert torch.allclose(w, s.topk(4, -1).values, atol=1e-7)  # no renormalisation, scale 1.0
    g.routed_scaling_factor = 3.0
    assert torch.allclose(g(x)[0], 3.0 * w, atol=1e-6)


def test_bias_update_moves_toward_underloaded():
    m = moe(dict(V3, n_group=1, topk_group=1))
    m.gate.e_score_correction_bias.zero_()
    m.train()
    with torch.no_grad():
        m.gate.weight[3] += 2.0 * m.gate.weight[0]  # make expert 3 popular
    x = torch.randn(1, 256, V3["hidden_size"])
    m(x)
    load = m.tokens_per_expert.clone()
    assert load.sum() == 256 * 4
    m.update_bias(0.01)
    bias = m.gate.e_score_correction_bias
    over, under = load > load.mean(), load < load.mean()
    assert torch.allclose(bias[over], torch.full_like(bias[over], -0.01))
    assert torch.allclose(bias[under], torch.full_like(bias[under], 0.01))
    assert m.tokens_per_expert.sum() == 0  # counts reset for the next step
    m(x)
    m.update_bias(0.0)  # γ = 0 disables
    assert torch.allclose(m.gate.e_score_correction_bias, bias)


def test_sequence_balance_loss_by_hand():
    m = moe(dict(V3, aux_loss_alpha=0.5))
    m.train()
    B, T, E, K = 2, 5, 16, 4
    x = torch.randn(B, T, V3["hidden_size"])
    m(x)
    _, idx, s = m.gate(x.view(-1, V3["hidden_size"]))
    total = 0.0
    for b in range(B):
        sb, ib = s[b * T:(b + 1) * T], idx[b * T:(b + 1) * T]
        for i in range(E):
            f = E / (K * T) * sum(int(i in ib[t].tolist()) for t in range(T))
            p = sum((sb[t, i] / sb[t].sum()).item() for t in range(T)) / T
            total += f * p
    assert abs(m.balance_loss.item() - 0.5 * total / B) < 1e-5


@pytest.mark.parametrize("tokens", [1, 3])
def test_few_tokens_decode_path_equals_reference(tokens):
    """With few tokens and no autograd (decoding on a CPU) the grouped path runs only the chosen pairs."""
    m = moe(V3).eval()
    x = torch.randn(1, tokens, V3["hidden_size"])
    with torch.no_grad():
        m.impl = "reference"
        ref = m(x)
        m.impl = "grouped"
        fast = m(x)
    assert tokens * V3["num_experts_per_tok"] < V3["n_routed_experts"]  # the few-tokens branch is the one taken
    assert torch.allclose(ref, fast, atol=1e-5)


def test_grouped_under_autocast_bf16():
    """Under autocast (bf16 on GPU; here the CPU's) the grouped GEMMs run in the autocast dtype, like F.linear."""
    m = moe(V3)
    x = torch.randn(1, 40, V3["hidden_size"], requires_grad=True)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    y.float().sum().backward()
    assert x.grad is not None and m.experts.gate_up_proj.grad.dtype == torch.float32
    assert (y.float() - ref).abs().max() / ref.abs().max() < 3e-2


def test_node_limited_routing_matches_a_per_token_reference():
    """V3's node-limited routing (config n_nodes, topk_nodes = M): the vectorised gate picks, for every token, the
    experts a plain per-token reading of the rule picks, and they lie on at most M nodes."""
    from nanoseek.model.moe import Gate
    args = ModelArgs.from_dict(dict(hidden_size=32, n_routed_experts=32, num_experts_per_tok=6, n_group=8,
                                    topk_group=4, n_nodes=4, topk_nodes=2)).validate()
    torch.manual_seed(0)
    gate = Gate(args)
    torch.nn.init.normal_(gate.weight, std=0.5)
    gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(200, 32)
    _, indices, scores = gate(x)
    choice = scores + gate.e_score_correction_bias
    per_node, per_group = 32 // 4, 32 // 8
    for t in range(x.shape[0]):
        c = choice[t].tolist()
        node_score = [sum(sorted(c[n * per_node:(n + 1) * per_node], reverse=True)[:6 // 2]) for n in range(4)]
        nodes = sorted(range(4), key=lambda n: -node_score[n])[:2]
        ok = [e // per_node in nodes for e in range(32)]
        group_score = [sum(sorted([c[e] if ok[e] else float("-inf") for e in range(g * per_group, (g + 1) * per_group)],
                                  reverse=True)[:2]) for g in range(8)]
        groups = sorted(range(8), key=lambda g: -group_score[g])[:4]
        eligible = [e for e in range(32) if ok[e] and e // per_group in groups]
        want = set(sorted(eligible, key=lambda e: -c[e])[:6])
        assert set(indices[t].tolist()) == want, t
        assert len({e // per_node for e in want}) <= 2
    with pytest.raises(NanoseekError, match="n_nodes"):
        ModelArgs.from_dict(dict(n_routed_experts=32, n_group=8, n_nodes=3, topk_nodes=2)).validate()
    assert "n_nodes" not in ModelArgs.from_dict(dict(n_group=8)).to_dict()  # written only when used
