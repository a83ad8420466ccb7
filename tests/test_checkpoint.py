"""Checkpoints: exact round trip, sharding with an index, FP8 (e4m3 + 128x128 weight_scale_inv, padded edges)
dequantised on load, atomic save (a failure mid-save leaves the previous checkpoint intact), and every bad input
(missing dir, bad config, truncated/corrupt file, wrong shapes, missing tensors, pickles) -> one NanoseekError that
names the field or tensor."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek import ModelArgs, NanoseekError, build_model, from_pretrained
from nanoseek.checkpoint import dequantize_fp8, quantize_fp8

CFG = dict(vocab_size=300, hidden_size=64, intermediate_size=160, moe_intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1,
           num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=40,
           qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, max_position_embeddings=128,
           num_nextn_predict_layers=1, torch_dtype="float32")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(ModelArgs.from_dict(CFG).validate()).eval()


def ids(n=20):
    return torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(0))


def same(m1, m2):
    with torch.no_grad():
        return torch.equal(m1(ids()), m2(ids()))


def test_roundtrip_exact(model, tmp_path):
    model.save_pretrained(tmp_path / "c")
    files = {p.name for p in (tmp_path / "c").iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors"}
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    back = from_pretrained(tmp_path / "c")
    assert same(model, back)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind


def test_sharded_with_index(model, tmp_path):
    model.save_pretrained(tmp_path / "c", max_shard_size="100KB")
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in index["weight_map"]
    assert same(model, from_pretrained(tmp_path / "c"))


def test_unknown_config_keys_kept(model, tmp_path):
    model.save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}
    cfg["some_future_key"] = [1, 2]
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    back = from_pretrained(tmp_path / "c")
    back.save_pretrained(tmp_path / "d")
    again = json.loads((tmp_path / "d" / "config.json").read_text())
    assert again["some_future_key"] == [1, 2] and again["auto_map"] == cfg["auto_map"]


def test_fp8_block_quant_roundtrip_math():
    w = torch.randn(300, 200)
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)  # ceil(300/128), ceil(200/128)
    back = dequantize_fp8(q, s)
    assert ((back - w).abs() / w.abs().max()).max() < 0.07  # e4m3 has 3 mantissa bits
    by_hand = q[130, 140].float() * s[1, 1]
    assert back[130, 140] == by_hand


def test_fp8_checkpoint_dequantised_on_load(model, tmp_path):
    """Rewrite the checkpoint as DeepSeek publishes V3: 2-D projection weights in e4m3 + weight_scale_inv."""
    model.save_pretrained(tmp_path / "bf")
    src = tmp_path / "bf" / "model.safetensors"
    fp8, expected = {}, {}
    with safe_open(str(src), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if t.ndim == 2 and "proj" in k:  # projections and experts; embed, head, gate and norms stay as they are
                q, s = quantize_fp8(t)
                fp8[k], fp8[k + "_scale_inv"] = q, s
                expected[k] = dequantize_fp8(q, s)
            else:
                fp8[k] = t
    shutil.copytree(tmp_path / "bf", tmp_path / "fp8")
    save_file(fp8, str(tmp_path / "fp8" / "model.safetensors"))
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    loaded = from_pretrained(tmp_path / "fp8")
    sd = loaded.state_dict()
    assert torch.equal(sd["layers.0.self_attn.q_b_proj.weight"], expected["model.layers.0.self_attn.q_b_proj.weight"])
    assert torch.equal(sd["layers.1.mlp.experts.gate_up_proj"][2, 48:], expected["model.layers.1.mlp.experts.2.up_proj.weight"])
    with torch.no_grad():
        a, b = model(ids()), loaded(ids())
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert loaded.args.quantization_config is None  # saving it again writes plain weights


def test_atomic_save_keeps_previous_on_failure(model, tmp_path, monkeypatch):
    import nanoseek.checkpoint as ck
    model.save_pretrained(tmp_path / "c")
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    calls = {"n": 0}
    real = ck.save_file

    def failing(*a, **k):  # fail between two shard files
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (injected)")
        return real(*a, **k)
    monkeypatch.setattr(ck, "save_file", failing)
    with torch.no_grad():
        model.embed_tokens.weight.add_(1.0)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "c", max_shard_size="100KB")
    after = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # the temporary directory was removed


def test_refuses_to_overwrite_non_checkpoint(model, tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    with pytest.raises(NanoseekError, match="refusing to overwrite"):
        model.save_pretrained(d)
    assert (d / "notes.txt").read_text() == "precious"


# ---- bad input ------------------------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(model, tmp_path):
    model.save_pretrained(tmp_path / "c")
    return tmp_path / "c"


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,needle", [
    (dict(hidden_size=None), "missing field 'hidden_size'"),
    (dict(n_group=3), "'n_group'"),
    (dict(topk_group=5), "'topk_group'"),
    (dict(num_experts_per_tok=9), "'num_experts_per_tok'"),
    (dict(num_key_value_heads=1), "'num_key_value_heads'"),
    (dict(scoring_func="relu"), "'scoring_func'"),
    (dict(qk_rope_head_dim=7), "'qk_rope_head_dim'"),
    (dict(hidden_size="big"), "'hidden_size'"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
])
def test_bad_config(ckpt, changes, needle):
    edit_config(ckpt, **changes)
    with pytest.raises(NanoseekError, match=needle):
        from_pretrained(ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{oops")
    with pytest.raises(NanoseekError, match="not valid JSON"):
        from_pretrained(ckpt)


def test_missing_dir(tmp_path):
    with pytest.raises(NanoseekError, match="does not exist"):
        from_pretrained(tmp_path / "nope")


def test_no_weights_and_pickles_refused(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(NanoseekError, match="safetensors only"):
        from_pretrained(ckpt)
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(NanoseekError, match="no .safetensors"):
        from_pretrained(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_corrupt_safetensors(ckpt, damage):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        f.write_bytes(b"\x00" * 100)
    else:
        f.write_bytes(data[:9] + b"!!!!" + data[13:])
    with pytest.raises(NanoseekError, match="model.safetensors"):
        from_pretrained(ckpt)


def test_shape_mismatch_names_tensor(ckpt):
    edit_config(ckpt, kv_lora_rank=24)
    with pytest.raises(NanoseekError, match=r"tensor model\.layers\.0\.self_attn\.kv_a.*has shape \[\d+(, \d+)?\], "
                                            r"the config expects"):
        from_pretrained(ckpt)


def test_missing_and_unexpected_tensors(ckpt):
    f = ckpt / "model.safetensors"
    with safe_open(str(f), "pt") as sf:
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    less = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.experts.3.down_proj.weight"}
    save_file(less, str(f))
    with pytest.raises(NanoseekError, match=r"model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight"):
        from_pretrained(ckpt)
    save_file({**tensors, "model.layers.0.mystery.weight": torch.zeros(2)}, str(f))
    with pytest.raises(NanoseekError, match="mystery"):
        from_pretrained(ckpt)
    less = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    save_file(less, str(f))
    with pytest.raises(NanoseekError, match="norm.weight"):
        from_pretrained(ckpt)


def test_index_names_missing_file(ckpt, model):
    model.save_pretrained(ckpt, max_shard_size="100KB")
    victim = sorted(Path(ckpt).glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(NanoseekError, match=victim.name):
        from_pretrained(ckpt)
