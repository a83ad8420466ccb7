"""Every config nanoseek writes loads in `transformers`: each preset, dense ones included, and configs a user passes.

For the presets whose weights fit here (`tiny`, `cpu`, `tiny-dense`): save_pretrained, then transformers'
`AutoModelForCausalLM.from_pretrained` as a user would call it, then the same logits. For `small`, `v2-lite` and `v3`
the config alone: it validates in transformers (its strict dataclass checks), and transformers builds on the meta
device a model with the same parameter count and the same dense/MoE layer plan as nanoseek's. Every config reads back
into nanoseek identically."""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanoseek import ModelArgs, build_model, from_pretrained, get_preset  # noqa: E402
from nanoseek.config import PRESETS  # noqa: E402
from nanoseek.cost import count_params  # noqa: E402

TOL = 1e-4  # fp32; we reach ~1e-6
WEIGHTS_FIT = ("tiny", "cpu", "tiny-dense")


def hf_layer_plan(hf) -> list[bool]:
    """True for each decoder layer transformers built with a MoE feed-forward."""
    return [type(layer.mlp).__name__.lower().endswith("moe") for layer in hf.model.layers]


def nanoseek_layer_plan(args: ModelArgs) -> list[bool]:
    return [args.is_moe_layer(i) for i in range(args.num_hidden_layers)]


def test_every_preset_is_covered():
    assert set(PRESETS) == set(WEIGHTS_FIT) | {"small", "v2-lite", "v3"}


@pytest.mark.parametrize("preset", WEIGHTS_FIT)
def test_preset_loads_in_transformers_with_the_same_logits(preset, tmp_path):
    torch.manual_seed(0)
    model = build_model(get_preset(preset)).eval()
    with torch.no_grad():  # a non-zero router bias, so that selection differs from plain top-k
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    assert ModelArgs.from_json(tmp_path / "config.json") == model.args  # nanoseek reads back what it wrote
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf_layer_plan(hf) == nanoseek_layer_plan(model.args)
    ids = torch.randint(0, model.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    print(f"{preset}: nanoseek -> transformers max abs diff {diff:.2e}")
    assert diff <= TOL
    again = from_pretrained(tmp_path)  # and nanoseek loads its own checkpoint to the same model
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize("preset", ["small", "v2-lite", "v3"])
def test_large_preset_config_validates_in_transformers(preset, tmp_path):
    args = get_preset(preset)
    build_model(args, device="meta")  # nanoseek builds it
    args.to_json(tmp_path / "config.json")
    assert ModelArgs.from_json(tmp_path / "config.json") == args
    cfg = transformers.AutoConfig.from_pretrained(tmp_path)  # transformers' strict validation
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
    assert type(hf).__name__ == args.architectures[0]
    assert hf_layer_plan(hf) == nanoseek_layer_plan(args)
    assert sum(p.numel() for p in hf.parameters()) == count_params(args)["total"]


# Configs a user could pass with --config: dense models written the ways people write them, MTP on a dense model,
# integers where transformers wants floats, V2-style dense.
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
             qk_rope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1, max_position_embeddings=256,
             torch_dtype="float32")
USER_CONFIGS = {
    "dense-null-experts": dict(n_routed_experts=None, n_shared_experts=None, num_nextn_predict_layers=0),
    "dense-null-experts-mtp": dict(n_routed_experts=None, n_shared_experts=None, num_nextn_predict_layers=1),
    "dense-zero-experts": dict(n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=None,
                               first_k_dense_replace=0, num_nextn_predict_layers=1),
    "dense-by-first-k": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=3,
                             num_nextn_predict_layers=0),
    "moe-integer-floats": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                               routed_scaling_factor=2, rms_norm_eps=1, initializer_range=0, attention_dropout=0,
                               rope_theta=10000),
    "v2-dense": dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], q_lora_rank=None,
                     n_routed_experts=None, n_shared_experts=None, num_nextn_predict_layers=0),
}


@pytest.mark.parametrize("case", list(USER_CONFIGS))
def test_user_config_loads_in_transformers(case, tmp_path):
    src = tmp_path / "user.json"
    src.write_text(json.dumps({**SMALL, **USER_CONFIGS[case]}))
    r = subprocess.run([sys.executable, "-m", "nanoseek", "init", "--config", str(src), "--out", str(tmp_path / "m"),
                        "--seed", "0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ours = from_pretrained(tmp_path / "m").eval()
    assert ModelArgs.from_json(tmp_path / "m" / "config.json") == ours.args
    ours.save_pretrained(tmp_path / "m2")  # written again: the same config.json, byte for byte
    assert (tmp_path / "m2" / "config.json").read_text() == (tmp_path / "m" / "config.json").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert hf_layer_plan(hf) == nanoseek_layer_plan(ours.args)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("bad,msg", [
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings"),
    (dict(n_shared_experts=1.5, n_routed_experts=4, num_experts_per_tok=2), "n_shared_experts"),
    (dict(moe_layer_freq=2, n_routed_experts=4, num_experts_per_tok=2), "moe_layer_freq"),
])
def test_config_transformers_would_refuse_is_refused_in_one_line(bad, msg, tmp_path):
    src = tmp_path / "user.json"
    src.write_text(json.dumps({**SMALL, **bad}))
    r = subprocess.run([sys.executable, "-m", "nanoseek", "init", "--config", str(src), "--out", str(tmp_path / "m")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert msg in r.stderr
    assert not (tmp_path / "m").exists()


def test_one_parameter_figure(tmp_path):
    """info, pretraining's first line and the report print the same figure: the main model's total (MTP apart)."""
    from nanoseek.cost import param_summary
    from nanoseek.report import param_count
    args = get_preset("cpu")
    build_model(args).save_pretrained(tmp_path)
    assert param_count(tmp_path) == param_summary(args) == "1.74M (859.65K active; 2.25M with MTP)"
    assert param_summary(get_preset("tiny-dense")) == "414.86K (414.86K active)"
    r = subprocess.run([sys.executable, "-m", "nanoseek", "info", "--preset", "cpu"], capture_output=True, text=True)
    assert "total 1.74M" in r.stdout and "total with MTP 2.25M" in r.stdout
