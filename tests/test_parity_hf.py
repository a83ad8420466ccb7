"""Parity with `transformers` in both directions, on random tiny configs in fp32:
nanoseek -> save_pretrained -> transformers loads and gives the same logits; transformers save_pretrained ->
nanoseek from_pretrained gives the same logits. Covers V3 sigmoid group-limited routing with and without q_lora_rank,
V2 softmax routing (greedy and group-limited, against DeepseekV2ForCausalLM), MTP weights present or not, YaRN."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanoseek import ModelArgs, build_model, from_pretrained  # noqa: E402

TOL = 1e-4  # we reach ~1e-6 (see the printed max abs diff)

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
            v_head_dim=12, qk_nope_head_dim=16, max_position_embeddings=512, torch_dtype="float32")
YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8}

CASES = {
    "v3-group-limited-qlora-mtp": dict(n_group=4, topk_group=2, num_nextn_predict_layers=1),
    "v3-no-qlora-no-mtp": dict(q_lora_rank=None, n_group=2, topk_group=1, num_nextn_predict_layers=0),
    "v3-yarn-mtp2": dict(n_group=4, topk_group=3, rope_scaling=YARN, num_nextn_predict_layers=2,
                         routed_scaling_factor=1.7),
    "v2-softmax-greedy": dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], q_lora_rank=None,
                              scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, n_group=1,
                              topk_group=1, routed_scaling_factor=1.0, n_shared_experts=2, num_nextn_predict_layers=0,
                              rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "v2-group-limited": dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"],
                             scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
                             n_group=4, topk_group=2, routed_scaling_factor=16.0, num_nextn_predict_layers=0),
}


def hf_class(args):
    return transformers.DeepseekV2ForCausalLM if args.model_type == "deepseek_v2" else transformers.DeepseekV3ForCausalLM


def make(case) -> "torch.nn.Module":
    torch.manual_seed(0)
    args = ModelArgs.from_dict({**BASE, **CASES[case]}).validate()
    model = build_model(args).eval()
    with torch.no_grad():  # a non-zero router bias, so that selection differs from plain top-k
        for m in model.moe_layers():
            if m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_nanoseek_to_transformers(case, tmp_path):
    model = make(case)
    model.save_pretrained(tmp_path / "ns")
    hf = hf_class(model.args).from_pretrained(tmp_path / "ns").eval()
    ids = torch.randint(0, model.args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids), hf(ids).logits
    diff = (a - b).abs().max().item()
    print(f"{case}: nanoseek -> transformers max abs diff {diff:.2e}")
    assert a.shape == (2, 48, model.args.vocab_size)
    assert diff <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_to_nanoseek(case, tmp_path):
    model = make(case)
    model.save_pretrained(tmp_path / "ns")
    hf = hf_class(model.args).from_pretrained(tmp_path / "ns").eval()
    with torch.no_grad():  # perturb in transformers, so nanoseek must read what transformers wrote
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    hf.save_pretrained(tmp_path / "hf")
    loaded = from_pretrained(tmp_path / "hf")
    assert loaded.args.num_nextn_predict_layers == 0  # transformers drops the MTP layers
    ids = torch.randint(0, model.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = loaded(ids), hf(ids).logits
    diff = (a - b).abs().max().item()
    print(f"{case}: transformers -> nanoseek max abs diff {diff:.2e}")
    assert diff <= TOL


def test_mtp_weights_in_published_layout(tmp_path):
    """MTP module k sits at model.layers.{num_hidden_layers + k} with copies of the shared embedding and head."""
    from safetensors import safe_open
    model = make("v3-yarn-mtp2")
    model.save_pretrained(tmp_path / "ns")
    with safe_open(str(tmp_path / "ns" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for k in (3, 4):
            for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                         "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                         "mlp.experts.7.down_proj.weight", "mlp.gate.e_score_correction_bias"):
                assert f"model.layers.{k}.{name}" in keys
        assert f.get_tensor("model.layers.3.eh_proj.weight").shape == (64, 128)
    reloaded = from_pretrained(tmp_path / "ns")
    assert reloaded.args.num_nextn_predict_layers == 2
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
