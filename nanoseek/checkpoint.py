"""Checkpoints in the published DeepseekV3ForCausalLM layout (safetensors), interchangeable with DeepSeek-V3/R1,
Moonlight, Kimi-K2, DeepSeek-V2(-Lite) and `transformers`' `save_pretrained`.

Layout (HF names): `model.embed_tokens.weight`, `model.layers.{i}.{input_layernorm,self_attn.*,post_attention_layernorm,
mlp.*}`, per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`, `mlp.gate.{weight,e_score_correction_bias}`,
`model.norm.weight`, `lm_head.weight`; MTP module k at `model.layers.{num_hidden_layers + k}` with `enorm`, `hnorm`,
`eh_proj`, `shared_head.norm`, and copies of the shared `embed_tokens` / `shared_head.head`. Above `max_shard_size`
the weights are split into `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.

FP8 checkpoints (V3/R1 as published) store e4m3 weights with an fp32 `weight_scale_inv` per 128x128 block (edge blocks
padded); they are dequantised on load (w · scale, despite the name). Saving is atomic: everything is written to a
temporary directory, fsynced, then renamed into place. Nothing is ever unpickled: only safetensors and JSON are read.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from nanoseek.config import ModelArgs
from nanoseek.errors import NanoseekError

EXPERT_RE = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
IGNORED_RE = re.compile(r"rotary_emb\.inv_freq$")  # older transformers saved this buffer


# ---------------------------------------------------------------------------------------------------------------------
# name maps

def to_hf(model, sd: dict | None = None) -> dict[str, torch.Tensor]:
    """nanoseek state dict -> {HF name: tensor}, experts split per expert, MTP moved to layer num_hidden_layers + k."""
    sd = model.state_dict() if sd is None else sd
    return {k: v for name, t in sd.items() for k, v in hf_tensors(model.args, len(model.mtp), name, t)}


def hf_tensors(args: ModelArgs, n_mtp: int, name: str, t: torch.Tensor, experts=None):
    """One nanoseek tensor -> its (HF name, tensor) pairs: the stacked experts one tensor per expert and projection
    (`experts`: the expert ids of t's rows when it holds only some of them, as an expert-parallel rank does), MTP
    module k at layer num_hidden_layers + k, and the copies of the shared embedding and head that the published MTP
    layers carry (with the embedding and the head)."""
    L = args.num_hidden_layers
    if name == "lm_head.weight":
        if not args.tie_word_embeddings:
            yield name, t
        for k in range(n_mtp):
            yield f"model.layers.{L + k}.shared_head.head.weight", t
        return
    if name == "embed_tokens.weight":
        for k in range(n_mtp):
            yield f"model.layers.{L + k}.embed_tokens.weight", t
    if m := re.match(r"^mtp\.(\d+)\.(block\.)?(.*)$", name):  # MTP module k -> layer L + k
        name = f"layers.{L + int(m[1])}.{m[3]}"
    if m := EXPERT_RE.match(name):  # stacked experts -> one tensor per expert and projection
        prefix = f"model.layers.{m[1]}.mlp.experts"
        for e, w in zip(range(t.shape[0]) if experts is None else experts, t):
            if m[2] == "down_proj":
                yield f"{prefix}.{e}.down_proj.weight", w
            else:
                gate, up = w.chunk(2, dim=0)
                yield f"{prefix}.{e}.gate_proj.weight", gate
                yield f"{prefix}.{e}.up_proj.weight", up
        return
    yield "model." + name, t


def hf_to_internal(name: str, L: int) -> tuple[str, int | None] | None:
    """HF name -> (nanoseek name, expert index or None); None for tensors nanoseek does not keep (MTP copies)."""
    if name == "lm_head.weight":
        return name, None
    if not name.startswith("model."):
        return "?" + name, None  # "?": never a nanoseek name, so it is reported as unexpected
    name = name[len("model."):]
    expert = None
    if m := re.match(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name):
        name, expert = f"{m[1]}.{m[3]}", int(m[2])
    if m := re.match(r"^layers\.(\d+)\.(.*)$", name):
        i, rest = int(m[1]), m[2]
        if i >= L:  # an MTP module
            k = i - L
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                return None
            if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head"):
                return f"mtp.{k}.{rest}", expert
            return f"mtp.{k}.block.{rest}", expert
    return name, expert


# ---------------------------------------------------------------------------------------------------------------------
# FP8

def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                  dtype=torch.float32) -> torch.Tensor:
    """e4m3 weight [..., M, N] with fp32 scales [..., ceil(M/bm), ceil(N/bn)] -> weight in `dtype`; w · scale per
    block (leading dimensions: a stack of weights, e.g. the routed experts')."""
    *lead, M, N = w.shape
    bm, bn = block
    mb, nb = scale_inv.shape[-2:]
    # padded to whole blocks and broadcast against the scales (not scales repeated to w's shape: inductor's CPU code
    # for an e4m3 load times an indexed scale computes garbage in torch 2.13)
    padded = torch.nn.functional.pad(w.float(), (0, nb * bn - N, 0, mb * bm - M)).view(*lead, mb, bm, nb, bn)
    return (padded * scale_inv.float()[..., :, None, :, None]).view(*lead, mb * bm, nb * bn)[..., :M, :N].to(dtype)


def check_scale(name: str, scale: torch.Tensor, shape, block) -> torch.Tensor:
    """A weight's block scales must be [ceil(M/bm), ceil(N/bn)], finite and positive: else one line naming it."""
    want = tuple(-(-d // b) for d, b in zip(shape, block))
    if tuple(scale.shape) != want:
        raise NanoseekError(f"{name} has shape {list(scale.shape)}; a {list(shape)} weight in {list(block)} blocks "
                            f"needs {list(want)}: the checkpoint is corrupt")
    if not torch.isfinite(scale.float()).all() or (scale.float() <= 0).any():
        raise NanoseekError(f"{name} holds non-finite or non-positive scales: the checkpoint is corrupt")
    return scale


def fp8_scale(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """The e4m3 scale of a tile or block from its max |value|: amax / 448 (448: the largest finite e4m3), or the power
    of 2 above it (V3.1's ue8m0 "round" scales)."""
    s = amax.float().clamp(min=1e-12) / 448.0
    return torch.exp2(torch.ceil(torch.log2(s))) if pow2 else s


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128),
                 pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, as DeepSeek stores weights: per block, scale = amax/448, stored e4m3 = w / scale; edge blocks
    where a dimension is not a multiple of the block (their scale over the part that exists, as zero padding gives)."""
    M, N = w.shape
    bm, bn = block
    Mp, Np = -(-M // bm) * bm, -(-N // bn) * bn
    blocks = torch.nn.functional.pad(w.float(), (0, Np - N, 0, Mp - M)).view(Mp // bm, bm, Np // bn, bn)
    scale = fp8_scale(blocks.abs().amax(dim=(1, 3)), pow2)
    q = (blocks / scale[:, None, :, None]).view(Mp, Np)[:M, :N].to(torch.float8_e4m3fn)
    return q, scale


# ---------------------------------------------------------------------------------------------------------------------
# save

def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size).upper())
    if not m:
        raise NanoseekError(f"cannot read the shard size {size!r} (use e.g. '5GB' or a number of bytes)")
    return int(float(m[1]) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m[2]])


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def generation_config(args: ModelArgs) -> dict:
    return {"_from_model_config": True, "bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id,
            "do_sample": True, "temperature": 0.6, "top_p": 0.95}  # R1's recommended sampling


# the weights DeepSeek publishes in FP8 (e4m3, 128x128 blocks): MLA's projections, the dense, shared and routed
# experts' MLPs; the embedding, head, norms, router gate and bias, and the MTP layer's eh_proj stay high precision
FP8_EXPORT_RE = re.compile(r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                           r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def write_model_files(model, out: Path, tokenizer=None, max_shard_size: int | str = "5GB", state_dict=None,
                      fp8: bool = False) -> None:
    """Write the weights (sharded above max_shard_size), config.json, generation_config.json and the tokenizer into
    the directory `out` (not atomic by itself: callers write into a temporary directory and rename it).
    `state_dict`: a full state dict to write instead of model.state_dict().
    fp8: the layout DeepSeek publishes: the FP8_EXPORT_RE weights as float8_e4m3fn with a float32 `weight_scale_inv`
    per 128x128 block ([ceil(out/128), ceil(in/128)]), and `quantization_config` in config.json."""
    tensors = export_tensors(to_hf(model, state_dict), fp8)
    shards = shard_names(tensors, _parse_size(max_shard_size))
    files = shard_files([len(shards)])[0]
    for fname, shard in zip(tqdm(files, desc="saving shards", unit="file", disable=len(shards) < 2), shards):
        save_file({n: tensors[n] for n in shard}, out / fname, metadata={"format": "pt"})
    write_model_meta(model.args, out, tokenizer, dtype_name(tensors), fp8,
                     {n: f for f, shard in zip(files, shards) for n in shard},
                     sum(t.numel() * t.element_size() for t in tensors.values()))


def export_tensors(hf: dict[str, torch.Tensor], fp8: bool = False) -> dict[str, torch.Tensor]:
    """HF-named tensors -> independent contiguous CPU tensors as the published files hold them (views of experts and
    MTP copies cloned), with fp8 the FP8_EXPORT_RE weights quantised (+ their weight_scale_inv)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in hf.items()}
    if fp8:
        for name in [n for n in tensors if FP8_EXPORT_RE.search(n)]:
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(tensors[name])
    return tensors


def dtype_name(tensors: dict[str, torch.Tensor]) -> str | None:
    """The high-precision dtype of the weights (config.json's torch_dtype)."""
    high = [t.dtype for t in tensors.values() if t.dtype != torch.float8_e4m3fn and t.is_floating_point()]
    return str(high[0]).removeprefix("torch.") if high else None


def shard_names(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """The tensors' names in the natural order, cut into files of at most `limit` bytes (one tensor per file above)."""
    shards, cur, size = [], [], 0
    for n in sorted(tensors, key=_natural_key):
        nbytes = tensors[n].numel() * tensors[n].element_size()
        if cur and size + nbytes > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def shard_files(counts: list[int]) -> list[list[str]]:
    """File names for writers that hold counts[i] shards each: model.safetensors for a single file, else
    model-0000i-of-0000n.safetensors numbered across the writers in order."""
    total = sum(counts)
    if total == 1:
        return [["model.safetensors"] if c else [] for c in counts]
    first = [sum(counts[:i]) for i in range(len(counts))]
    return [[f"model-{first[i] + j + 1:05d}-of-{total:05d}.safetensors" for j in range(c)]
            for i, c in enumerate(counts)]


def write_model_meta(args: ModelArgs, out: Path, tokenizer, dtype: str | None, fp8: bool, weight_map: dict,
                     total_size: int) -> None:
    """Everything of a published checkpoint but the weight files: the index (when they are several), config.json
    (torch_dtype, quantization_config with fp8), generation_config.json and the tokenizer."""
    if len(set(weight_map.values())) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(
                weight_map.items(), key=lambda kv: _natural_key(kv[0])))}, indent=2) + "\n")
    old = args.torch_dtype, args.quantization_config
    args.torch_dtype = dtype or args.torch_dtype
    args.quantization_config = dict(FP8_CONFIG) if fp8 else None
    try:
        args.to_json(out / "config.json")
    finally:
        args.torch_dtype, args.quantization_config = old
    (out / "generation_config.json").write_text(json.dumps(generation_config(args), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out)


def atomic_write(path, data: str | bytes) -> Path:
    """Write a file whole or not at all: a temporary beside it, fsynced, then renamed over it. A process killed
    half-way leaves the old file (or none), never a truncated one that looks finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_dir(path: Path, write, replace: bool = True) -> Path:
    """Run write(tmp) on a fresh temporary directory beside `path`, fsync everything, then rename it to `path`
    (an existing `path` is swapped out and removed when `replace`). On any failure the temporary is removed and
    `path` is left exactly as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        commit_dir(tmp, path, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def commit_dir(tmp: Path, path: Path, replace: bool = True) -> Path:
    """A directory written whole at `tmp` (beside `path`) put in place: everything fsynced, then renamed to `path`
    (an existing `path` swapped out and removed when `replace`)."""
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if path.exists():
        if not replace:
            raise NanoseekError(f"{path} already exists")
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rename(path, old / "ckpt")  # swap: old aside, new in, old removed
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    _fsync(path.parent)
    return path


def save_pretrained(model, path, tokenizer=None, max_shard_size: int | str = "5GB", state_dict=None,
                    fp8: bool = False) -> Path:
    """Write model (+ tokenizer) to directory `path` atomically. An existing checkpoint there is replaced as a whole;
    a non-empty directory that is not a checkpoint is refused, so nothing of the user's is ever overwritten."""
    path = Path(path)
    _parse_size(max_shard_size)  # a bad size is reported before anything is written
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / "config.json").exists())):
        raise NanoseekError(f"refusing to overwrite {path}: it exists and is not a checkpoint directory")
    return atomic_dir(path, lambda tmp: write_model_files(model, tmp, tokenizer, max_shard_size, state_dict, fp8))


# ---------------------------------------------------------------------------------------------------------------------
# load

def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise NanoseekError(f"{index} is not a valid safetensors index ({e})") from None
        files = [path / f for f in sorted(set(wm.values()))]
        for f in files:
            if not f.exists():
                raise NanoseekError(f"{index} names {f.name}, which is missing")
        return files
    files = sorted(p for p in path.glob("*.safetensors") if p.name != "optimizer.safetensors")  # (older nanoseek's
    # training checkpoints kept the optimizer beside the model)
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise NanoseekError(f"{path} holds only pickled weights (.bin/.pt); nanoseek loads safetensors only "
                                "(convert them with transformers' save_pretrained(safe_serialization=True))")
        raise NanoseekError(f"no .safetensors weights in {path}")
    return files


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for f in tqdm(files, desc="loading shards", unit="file", disable=len(files) < 2):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    out[name] = sf.get_tensor(name)
        except Exception as e:  # safetensors raises several types for truncated / corrupt files
            raise NanoseekError(f"{f} is not a readable safetensors file (truncated or corrupt?): "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return out


def read_published(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in the published layout, by its HF name (one file or several)."""
    return read_tensors(weight_files(Path(path)))


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def load_state_dict(path, args: ModelArgs, expected: dict[str, torch.Size], dtype=None,
                    keep_fp8: bool = False) -> dict[str, torch.Tensor]:
    """Read every tensor under `path`, dequantise FP8, and map to nanoseek names, checking names and shapes.
    keep_fp8: FP8 weights stay as stored, each with its block scales beside it under `<name>_scale_inv` (the routed
    experts' stacked: gate_up_proj_scale_inv [E, 2, ⌈I/b⌉, ⌈D/b⌉], gate's blocks then up's; down_proj_scale_inv
    [E, ⌈D/b⌉, ⌈I/b⌉]); nanoseek.fp8.keep_fp8_weights takes them into the model."""
    raw = read_tensors(weight_files(Path(path)))
    scales = {k: raw.pop(k) for k in [k for k in raw if k.endswith("_scale_inv")]}
    block = tuple((args.quantization_config or {}).get("weight_block_size", (128, 128)))
    L = args.num_hidden_layers
    sd, experts, scaled = {}, {}, {}
    for name in list(raw):
        t = raw.pop(name)  # converted one by one, so peak memory stays near one copy of the weights
        if IGNORED_RE.search(name):
            continue
        scale = None
        if t.dtype in FP8_DTYPES:
            if name + "_scale_inv" not in scales:
                raise NanoseekError(f"FP8 tensor {name} has no {name}_scale_inv beside it")
            scale = check_scale(name + "_scale_inv", scales[name + "_scale_inv"].float(), t.shape, block)
            if not keep_fp8:
                t, scale = dequantize_fp8(t, scale, block), None
        if dtype is not None and t.is_floating_point() and scale is None and not name.endswith("e_score_correction_bias"):
            t = t.to(dtype)  # the router bias stays fp32
        mapped = hf_to_internal(name, L)
        if mapped is None:
            continue
        iname, e = mapped
        if e is None:
            sd[iname] = (name, t)
            if scale is not None:
                scaled[iname + "_scale_inv"] = scale
        else:
            base, proj = iname.rsplit(".", 1)
            experts.setdefault(base, {}).setdefault(proj, {})[e] = (name, t, scale)
    for base, projs in experts.items():  # per-expert tensors -> stacked gate_up_proj [E, 2I, D], down_proj [E, D, I]
        any_name = next(iter(next(iter(projs.values())).values()))[0]
        if base + ".gate_up_proj" not in expected:
            raise NanoseekError(f"unexpected tensor {any_name}: the config has no routed experts in that layer")
        n, two_i, dim = expected[base + ".gate_up_proj"]
        stacked = {}
        for proj, want in (("gate_proj", (two_i // 2, dim)), ("up_proj", (two_i // 2, dim)),
                           ("down_proj", (dim, two_i // 2))):
            parts = projs.get(proj, {})
            for e in range(n):
                if e not in parts:
                    hf = re.sub(r"experts\.\d+\.\w+\.weight$", f"experts.{e}.{proj}.weight", any_name)
                    raise NanoseekError(f"missing tensor {hf} (expert {e} of {n})")
                name, t, _ = parts[e]
                if tuple(t.shape) != want:
                    raise NanoseekError(f"tensor {name} has shape {list(t.shape)}, the config expects {list(want)}")
            extra = sorted(set(parts) - set(range(n)))
            if extra:
                raise NanoseekError(f"unexpected tensor {parts[extra[0]][0]}: config says n_routed_experts={n}")
            stacked[proj] = [parts[e][1:] for e in range(n)]
        kept = {t.dtype in FP8_DTYPES for proj in stacked.values() for t, _ in proj}
        if len(kept) > 1:
            raise NanoseekError(f"the routed experts of {any_name.split('.experts.')[0]} mix FP8 and other dtypes")
        gate, up, down = ([t for t, _ in stacked[p]] for p in ("gate_proj", "up_proj", "down_proj"))
        sd[base + ".gate_up_proj"] = (any_name, torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)]))
        sd[base + ".down_proj"] = (any_name, torch.stack(down))
        if kept == {True}:
            scaled[base + ".gate_up_proj_scale_inv"] = torch.stack(
                [torch.stack([g[1], u[1]]) for g, u in zip(stacked["gate_proj"], stacked["up_proj"])])
            scaled[base + ".down_proj_scale_inv"] = torch.stack([s for _, s in stacked["down_proj"]])
    out = {}
    for iname, (name, t) in sd.items():
        if iname not in expected:
            raise NanoseekError(f"unexpected tensor {name} (not part of a model with this config.json)")
        if t.shape != expected[iname]:
            raise NanoseekError(f"tensor {name} has shape {list(t.shape)}, the config expects {list(expected[iname])}")
        out[iname] = t
    missing = [k for k in expected if k not in out]
    if missing:
        raise NanoseekError(f"missing tensor for {missing[0]} in {path}")
    return out | scaled


def checkpoint_has_mtp(path: Path, args: ModelArgs) -> bool:
    prefix = f"model.layers.{args.num_hidden_layers}."
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                if any(k.startswith(prefix) for k in sf.keys()):
                    return True
        except Exception:
            return True  # let read_tensors report the broken file
    return False
