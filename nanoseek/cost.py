"""Counting: total and active parameters, training FLOPs per token, KV-cache size, for any ModelArgs.

Parameters are counted on a model built on the meta device (no memory, so the 671B `v3` preset works anywhere).
"Active" follows DeepSeek's convention (README_WEIGHTS: 36.7B incl. 0.9B embedding + 0.9B head): everything a token
touches, i.e. all parameters except the routed experts it is not sent to; MTP modules are reported apart.

Training FLOPs per token = 6 × (active matmul parameters: everything active but the embedding lookup)
                         + 6 × attention (QKᵀ and AV: 2·H·(qk_head_dim + v_head_dim) per query per key,
                           causal, so T/2 keys on average), for the main model and, in training, the MTP modules.
"""

import time

import torch

from nanoseek.config import ModelArgs
from nanoseek.model import build_model


def count_params(args: ModelArgs) -> dict[str, int]:
    model = build_model(args, device="meta")
    total = mtp = routed_inactive = mtp_routed_inactive = 0
    frac_inactive = 1 - (args.num_experts_per_tok or 0) / (args.n_routed_experts or 1)
    for name, p in model.named_parameters():  # tied weights are listed once
        n = p.numel()
        inactive = n * frac_inactive if ".mlp.experts." in name else 0
        if name.startswith("mtp."):
            mtp += n
            mtp_routed_inactive += inactive
        else:
            total += n
            routed_inactive += inactive
    embedding = args.vocab_size * args.hidden_size
    return {
        "total": total,  # main model, without MTP
        "active": round(total - routed_inactive),
        "active_no_embedding": round(total - routed_inactive) - embedding,  # DeepSeek's 36.6B-style figure
        "embedding": embedding,
        "head": 0 if args.tie_word_embeddings else embedding,
        "mtp": mtp,  # MTP modules' own parameters (embedding and head are shared)
        "mtp_active": round(mtp - mtp_routed_inactive),
        "total_with_mtp": total + mtp,
    }


def attention_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Forward FLOPs of QKᵀ and AV for one token of one layer, averaged over a causal sequence of seq_len."""
    return 2 * args.num_attention_heads * (args.qk_head_dim + args.v_head_dim) * seq_len / 2


def flops_per_token(args: ModelArgs, seq_len: int, mtp: bool = True, params: dict | None = None) -> dict[str, float]:
    """Forward and training (3× forward) FLOPs per token; `mtp` adds the MTP modules (trained, not used in serving)."""
    p = params or count_params(args)
    matmul = p["active"] - p["embedding"] + (p["embedding"] if args.tie_word_embeddings else 0)
    fwd = 2 * matmul + args.num_hidden_layers * attention_flops_per_token(args, seq_len)
    if mtp and args.num_nextn_predict_layers:
        D = args.num_nextn_predict_layers
        head = args.vocab_size * args.hidden_size  # the shared head runs again at every depth
        fwd += 2 * (p["mtp_active"] + D * head) + D * attention_flops_per_token(args, seq_len)
    return {"forward": fwd, "training": 3 * fwd}


def kv_cache_elements_per_token(args: ModelArgs) -> dict[str, int]:
    """Cached elements per token over all layers: MLA's latent (kv_lora_rank + rope key) vs the naive k and v."""
    L = args.num_hidden_layers
    return {"mla": L * (args.kv_lora_rank + args.qk_rope_head_dim),
            "naive": L * args.num_attention_heads * (args.qk_head_dim + args.v_head_dim)}


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def param_summary(args: ModelArgs, params: dict | None = None) -> str:
    """The one parameter figure nanoseek prints everywhere (info, pretraining, the report): the main model's total,
    DeepSeek's convention (V3's 671B leaves out its MTP module), with the active share and the MTP module beside it.
    '1.74M (0.86M active; 2.25M with MTP)'."""
    p = params or count_params(args)
    s = f"{human(p['total'])} ({human(p['active'])} active"
    return s + (f"; {human(p['total_with_mtp'])} with MTP)" if p["mtp"] else ")")


def report(args: ModelArgs, seq_len: int = 4096) -> str:
    p = count_params(args)
    f = flops_per_token(args, seq_len, params=p)
    kv = kv_cache_elements_per_token(args)
    lines = [
        f"parameters     total {human(p['total'])} ({p['total']:,}), active per token {human(p['active'])} "
        f"({human(p['active_no_embedding'])} without the embedding lookup)",
        f"               embedding {human(p['embedding'])}, head {human(p['head'])}; "
        f"MTP modules {human(p['mtp'])} (active {human(p['mtp_active'])}), total with MTP {human(p['total_with_mtp'])}",
        f"FLOPs/token    forward {human(f['forward'], 'FLOP')}, training {human(f['training'], 'FLOP')} "
        f"(seq {seq_len}, causal attention, MTP included)",
        f"KV cache/token MLA latent {kv['mla']:,} elements vs naive k,v {kv['naive']:,} "
        f"({kv['naive'] / kv['mla']:.1f}x smaller)",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Devices, MFU and dollars

# Dense tensor-core peaks in FLOP/s (no 2:4 sparsity), SXM parts. H800 has H100's compute (only NVLink and FP64 cut).
GPU_PEAKS = {
    "h100": {"bf16": 989e12, "fp8": 1979e12, "name": "NVIDIA H100 SXM"},
    "h800": {"bf16": 989e12, "fp8": 1979e12, "name": "NVIDIA H800 SXM"},
    "h200": {"bf16": 989e12, "fp8": 1979e12, "name": "NVIDIA H200 SXM"},
    "a100": {"bf16": 312e12, "fp8": None, "name": "NVIDIA A100 SXM"},
}
DEFAULT_USD_PER_GPU_HOUR = 2.0  # DeepSeek-V3's own costing of H800 time


def gpu_key(device_name: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'h100' (None when unknown)."""
    low = device_name.lower()
    return next((k for k in GPU_PEAKS if k in low), None)


def synchronize(device) -> None:
    """Wait for a GPU's queued work, so that a wall-clock reading covers it (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device="cpu", dtype=None, n: int = 4096, k: int = 1024, reps: int = 10) -> float:
    """The best dense GEMM rate of this device right now, FLOP/s ([n, k] @ [k, n], output preallocated, the best of
    `reps` after two warm-ups): the denominator of MFU on a CPU, and of '% of peak' in the benchmarks."""
    dtype = dtype or torch.float32
    a, b = torch.randn(n, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n * k * n / best


def estimate(args: ModelArgs, tokens: float, gpu: str, gpus: int, mfu: float, seq_len: int = 4096,
             precision: str = "bf16", usd_per_gpu_hour: float = DEFAULT_USD_PER_GPU_HOUR,
             gpu_hours: float | None = None) -> dict:
    """FLOPs, GPU-hours, days on `gpus` GPUs and dollars to train `args` on `tokens` at `mfu`; with a published
    `gpu_hours`, also the MFU that figure implies."""
    peak = GPU_PEAKS[gpu][precision]
    flops = flops_per_token(args, seq_len)["training"] * tokens
    hours = flops / (peak * mfu) / 3600
    out = {"tokens": tokens, "flops_per_token": flops / tokens, "flops": flops, "gpu": gpu, "gpus": gpus,
           "peak_flops": peak, "precision": precision, "mfu": mfu, "gpu_hours": hours, "days": hours / gpus / 24,
           "usd": hours * usd_per_gpu_hour, "usd_per_gpu_hour": usd_per_gpu_hour}
    if gpu_hours is not None:
        out.update(published_gpu_hours=gpu_hours, implied_mfu=flops / (gpu_hours * 3600 * peak),
                   published_usd=gpu_hours * usd_per_gpu_hour, published_days=gpu_hours / gpus / 24)
    return out
