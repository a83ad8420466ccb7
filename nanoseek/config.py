"""ModelArgs: the model's hyper-parameters, named exactly as the keys of `DeepseekV3Config`.

A `config.json` of a published DeepSeek-V3/R1-format checkpoint (or one written by `transformers`' `save_pretrained`,
or a DeepSeek-V2 one) loads as is: known keys fill the fields, unknown keys are kept in `extra` and written back on save.
"""

import dataclasses
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from nanoseek.errors import NanoseekError


@dataclass
class ModelArgs:
    # sizes (defaults are DeepSeek-V3 671B, as in DeepseekV3Config)
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN inner dim (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # one routed / shared expert's inner dim
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1  # MTP depth D
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # MLA: every head has its own k/v, so == num_attention_heads
    # MLA
    q_lora_rank: int | None = 1536  # None: no query compression (V2-Lite), a single q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE. A dense model has n_routed_experts = n_shared_experts = 0 and first_k_dense_replace covering every
    # layer, MTP modules included: the integers transformers' strict config wants, and its rule (a layer is MoE from
    # first_k_dense_replace on). null in a config.json reads as 0.
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int | None = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    n_group: int | None = 8
    topk_group: int | None = 4
    # node-limited routing (V3 §2.1.2, §3.2.2): the routed experts span n_nodes nodes (expert groups mapped to them
    # contiguously, n_group / n_nodes per node); each token's experts lie on at most topk_nodes (M) of them, the nodes
    # with the highest sums of their num_experts_per_tok / M best affinities. None: no node limit (V3 reaches it
    # through n_group = 8 groups = nodes, topk_group = M = 4). nanoseek's own keys, written only when set.
    n_nodes: int | None = None
    topk_nodes: int | None = None
    topk_method: str = "noaux_tc"  # noaux_tc (V3) | greedy | group_limited_greedy (V2)
    scoring_func: str = "sigmoid"  # sigmoid (V3) | softmax (V2)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    ep_size: int = 1
    aux_loss_alpha: float = 0.0001  # α of the sequence-wise balance loss (V3 paper §4.2)
    seq_aux: bool = True
    # the rest
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    pad_token_id: int | None = None
    use_cache: bool = True
    model_type: str = "deepseek_v3"
    architectures: list = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None
    # nanoseek training knobs (not in DeepseekV3Config; transformers ignores them)
    bias_update_speed: float = 0.001  # γ of the auxiliary-loss-free balancing; 0 disables
    mtp_loss_weight: float = 0.3  # λ of the MTP loss
    extra: dict = field(default_factory=dict)  # unknown config.json keys, kept and written back

    def __post_init__(self):
        """The one in-memory form of what a config.json may write several ways, so that what nanoseek writes reads
        back equal, and validates in transformers: null expert counts are 0, a dense model's first_k_dense_replace
        covers every layer (MTP included), and integers in float fields (`"rms_norm_eps": 1`) are floats."""
        if self.n_routed_experts is None:
            self.n_routed_experts = 0
        if self.n_shared_experts is None:
            self.n_shared_experts = 0
        if self.n_routed_experts == 0 and isinstance(self.num_hidden_layers, int) \
                and isinstance(self.num_nextn_predict_layers, int):
            self.first_k_dense_replace = self.num_hidden_layers + self.num_nextn_predict_layers
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if float in _types(f.type) and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, f.name, float(v))

    # ---- derived ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale² when YaRN sets mscale_all_dim (as DeepSeek and transformers do)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling or {}
        if rope_type(rs) != "default" and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale = scale * m * m
        return scale

    # ---- checks ----
    def validate(self) -> "ModelArgs":
        """Raise NanoseekError naming the first field that is missing, out of range or inconsistent."""
        def need(cond, msg):
            if not cond:
                raise NanoseekError(f"config: {msg}")
        for f in dataclasses.fields(self):  # the types transformers' strict DeepseekV3Config checks too
            v, allowed = getattr(self, f.name), _types(f.type)
            need(isinstance(v, allowed) and not (isinstance(v, bool) and bool not in allowed),
                 f"'{f.name}' must be {' or '.join(_TYPE_NAMES.get(t, t.__name__) for t in allowed)}, got {v!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"'{name}' must be a positive integer, got {v!r}")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             f"'q_lora_rank' must be a positive integer or null, got {self.q_lora_rank!r}")
        need(self.qk_rope_head_dim % 2 == 0, f"'qk_rope_head_dim' must be even, got {self.qk_rope_head_dim}")
        need(self.num_key_value_heads in (None, self.num_attention_heads),
             f"'num_key_value_heads' ({self.num_key_value_heads}) must equal 'num_attention_heads' "
             f"({self.num_attention_heads}) in MLA")
        need(self.hidden_act == "silu", f"'hidden_act' must be 'silu', got {self.hidden_act!r}")
        need(isinstance(self.num_nextn_predict_layers, int) and self.num_nextn_predict_layers >= 0,
             f"'num_nextn_predict_layers' must be >= 0, got {self.num_nextn_predict_layers!r}")
        all_layers = self.num_hidden_layers + self.num_nextn_predict_layers
        need(0 <= self.first_k_dense_replace <= all_layers,
             f"'first_k_dense_replace' ({self.first_k_dense_replace}) must be in [0, {all_layers}] (the layers, MTP "
             f"modules included)")
        need(self.n_routed_experts >= 0 and self.n_shared_experts >= 0,
             f"'n_routed_experts' and 'n_shared_experts' must be >= 0 (0: none), got {self.n_routed_experts} and "
             f"{self.n_shared_experts}")
        need(self.moe_layer_freq == 1 or not self.n_routed_experts,
             f"'moe_layer_freq' must be 1, got {self.moe_layer_freq!r}: transformers' DeepseekV3 puts a MoE in every "
             f"layer from 'first_k_dense_replace' on")
        if self.n_routed_experts:
            E = self.n_routed_experts
            for name in ("moe_intermediate_size", "num_experts_per_tok"):
                v = getattr(self, name)
                need(isinstance(v, int) and v > 0, f"'{name}' must be a positive integer, got {v!r}")
            need(self.num_experts_per_tok <= E,
                 f"'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds 'n_routed_experts' ({E})")
            need(self.scoring_func in ("sigmoid", "softmax"),
                 f"'scoring_func' must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
            need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
                 f"'topk_method' must be noaux_tc, greedy or group_limited_greedy, got {self.topk_method!r}")
            g, kg = self.n_group or 1, self.topk_group or 1
            need(E % g == 0, f"'n_routed_experts' ({E}) must be divisible by 'n_group' ({g})")
            need(1 <= kg <= g, f"'topk_group' ({kg}) must be in [1, n_group={g}]")
            if self.topk_method == "noaux_tc":
                need(E // g >= 2, f"'noaux_tc' scores a group by its top-2 experts: need >= 2 experts per group, "
                                  f"got {E // g}")
            if self.n_nodes is not None or self.topk_nodes is not None:
                nn_, kn = self.n_nodes or 0, self.topk_nodes or 0
                need(nn_ >= 1 and g % nn_ == 0, f"'n_nodes' ({self.n_nodes}) must divide 'n_group' ({g}): the "
                                                f"expert groups are mapped to the nodes")
                need(1 <= kn <= nn_, f"'topk_nodes' ({self.topk_nodes}) must be in [1, n_nodes={self.n_nodes}]")
                need(self.num_experts_per_tok <= kn * (E // nn_),
                     f"'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the experts on 'topk_nodes' "
                     f"nodes ({kn} x {E // nn_})")
            need(self.num_experts_per_tok <= kg * (E // g),
                 f"'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the experts in 'topk_group' groups "
                 f"({kg} x {E // g})")
        rs = self.rope_scaling
        if rs:
            need(isinstance(rs, dict), f"'rope_scaling' must be an object, got {rs!r}")
            t = rope_type(rs)
            need(t in ("default", "yarn"), f"'rope_scaling' type {t!r} is not supported (use 'yarn' or none)")
            if t == "yarn":
                for k in ("factor", "original_max_position_embeddings"):
                    need(isinstance(rs.get(k), (int, float)) and rs[k] > 0,
                         f"'rope_scaling.{k}' must be a positive number, got {rs.get(k)!r}")
        return self

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        d = dict(d)
        if d.get("model_type") == "deepseek_v2":  # V2's defaults differ from V3's where a key is absent
            for k, v in V2_DEFAULTS.items():
                d.setdefault(k, v)
        # transformers >= 5 writes `rope_parameters` (theta inside) instead of `rope_theta` + `rope_scaling`
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict):
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            if rope_type(rp) != "default":
                d.setdefault("rope_scaling", rp)
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        extra.update(d.get("extra", {}) if isinstance(d.get("extra"), dict) else {})
        extra.pop("extra", None)
        args = cls(**known, extra=extra)
        if args.num_key_value_heads is None:
            args.num_key_value_heads = args.num_attention_heads
        return args

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(dataclasses.replace(self)).items() if k != "extra"}
        d = {**self.extra, **d}
        for own in ("n_nodes", "topk_nodes"):  # not DeepseekV3Config's: only when used
            if d.get(own) is None:
                d.pop(own, None)
        # keep transformers >= 5 readers consistent with the published keys we write
        d.pop("rope_parameters", None)
        d.pop("dtype", None)
        return dict(sorted(d.items()))

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        if not path.is_file():
            raise NanoseekError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise NanoseekError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise NanoseekError(f"{path} must hold a JSON object")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise NanoseekError(f"{path}: missing field '{missing[0]}'")
        try:
            return cls.from_dict(d).validate()
        except TypeError as e:
            raise NanoseekError(f"{path}: {e}") from None

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _types(annotation) -> tuple[type, ...]:
    """`int | None` -> (int, NoneType); `list` -> (list,)."""
    if isinstance(annotation, types.UnionType):
        return get_args(annotation)
    return (annotation,)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
               list: "a list", type(None): "null"}


# A config.json must name the model's shape; everything else has DeepseekV3Config's default.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                 "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

V2_DEFAULTS = dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                   n_group=1, topk_group=1, first_k_dense_replace=0, n_shared_experts=2,
                   num_nextn_predict_layers=0, aux_loss_alpha=0.001, architectures=["DeepseekV2ForCausalLM"])


def rope_type(rs: dict | None) -> str:
    if not rs:
        return "default"
    return rs.get("rope_type", rs.get("type", "default"))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1·mscale·ln(s) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Presets. `tiny` is the CPU default; `tiny-dense` a smaller dense student for distillation (R1 distils into dense
# models); `small` a GPU-sized MoE; `v2-lite` and `v3` the published shapes.

_YARN_V3 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(  # 2.66M parameters (3.17M with MTP): still MoE (group-limited sigmoid routing), MLA, MTP
        vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4,
        num_nextn_predict_layers=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_shared_experts=1, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        max_position_embeddings=1024, rope_scaling=None, torch_dtype="float32"),
    "cpu": dict(  # the CPU main job's model: tiny with a 512-token vocabulary. The reasoning corpus needs no more
        # (4% more tokens per document than at 4,096, bench/RESULTS.md), and the output head, half of tiny's FLOPs
        # at 4,096 with MTP's second pass, shrinks 8x: the time goes to the body and to more tokens
        vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4,
        num_nextn_predict_layers=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_shared_experts=1, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        max_position_embeddings=1024, rope_scaling=None, torch_dtype="float32"),
    "tiny-dense": dict(  # 0.41M parameters, dense (no routed experts), MLA, no MTP: the CPU distillation student
        vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_nextn_predict_layers=0,
        num_attention_heads=3, num_key_value_heads=3, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_shared_experts=0, n_routed_experts=0, num_experts_per_tok=None,
        n_group=1, topk_group=1, max_position_embeddings=1024, rope_scaling=None, torch_dtype="float32"),
    "small": dict(  # ~1.2B total / ~0.25B active, for one GPU
        vocab_size=32768, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=384, num_hidden_layers=16,
        num_nextn_predict_layers=1, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_shared_experts=2,
        n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, first_k_dense_replace=1,
        routed_scaling_factor=2.5, max_position_embeddings=4096, rope_scaling=None),
    "v2-lite": dict(  # DeepSeek-V2-Lite, 15.7B / 2.4B
        model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=2048,
        intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, num_nextn_predict_layers=0,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=1.0, first_k_dense_replace=1, aux_loss_alpha=0.001, bos_token_id=100000,
        eos_token_id=100001, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "v3": dict(rope_scaling=_YARN_V3),  # DeepSeek-V3/R1 671B: DeepseekV3Config's defaults. Build on meta only.
}


def get_preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise NanoseekError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelArgs.from_dict({**PRESETS[name], **overrides}).validate()
