"""Forward+backward of one DeepSeekMoE layer: nanoseek's grouped-GEMM path against `transformers`' DeepseekV3MoE on the
same weights and tokens, with both of transformers' expert paths (its default `grouped_mm` and its `eager` per-expert
loop), plus nanoseek's own reference loop; and the dense matmul peak of this machine measured in the same run.

    .venv/bin/python bench/moe.py                 # CPU, tiny and mid sizes
    .venv/bin/python bench/moe.py --device cuda   # on a GPU (bf16)

Prints a table of ms per fwd+bwd, achieved GFLOP/s, share of the measured matmul peak, and speedups. The outputs of
all paths are checked equal before timing.
"""

import argparse
import platform
import statistics
import time

from nanoseek.config import ModelArgs  # first: nanoseek sets torch's CPU allocator options before torch loads
from nanoseek.cost import measure_matmul_peak as matmul_peak, synchronize as sync
from nanoseek.model.moe import MoE

import torch

SIZES = {  # name: (hidden, routed experts, top-k, shared, expert inner dim, tokens)
    "tiny": (128, 16, 4, 1, 64, 2048),
    "mid": (1024, 64, 6, 2, 512, 4096),
    "mid-8k": (1024, 64, 6, 2, 512, 8192),
}


def timeit(fn, device, reps, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def moe_flops(D, E, K, S, I, T):
    """fwd+bwd FLOPs: 3x the forward's matmuls (routed experts, shared experts, router)."""
    fwd = T * K * 3 * 2 * D * I + T * 3 * 2 * D * I * S + 2 * T * D * E
    return 3 * fwd


def build(D, E, K, S, I, device, dtype):
    import transformers
    cfg = dict(vocab_size=256, hidden_size=D, intermediate_size=4 * D, moe_intermediate_size=I, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=32,
               qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=S,
               n_group=8 if E % 8 == 0 and E >= 16 else 1, topk_group=4 if E % 8 == 0 and E >= 16 else 1,
               first_k_dense_replace=1, routed_scaling_factor=2.5)
    torch.manual_seed(0)
    ours = MoE(ModelArgs.from_dict(cfg).validate())
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ours.gate.e_score_correction_bias.normal_(0, 0.01)
    hf_cfg = transformers.DeepseekV3Config(**cfg)
    hf = {}
    for impl in ("grouped_mm", "eager"):
        hf_cfg._experts_implementation = impl
        m = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(hf_cfg)
        with torch.no_grad():
            m.gate.weight.copy_(ours.gate.weight)
            m.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
            m.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)  # same layout: gate rows, then up rows
            m.experts.down_proj.copy_(ours.experts.down_proj)
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(m.shared_experts, n).weight.copy_(getattr(ours.shared_experts, n).weight)
        m.experts.config._experts_implementation = impl
        hf[impl] = m.to(device, dtype)
    ours = ours.to(device, dtype)
    return ours, hf


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--sizes", nargs="*", default=["tiny", "mid"], choices=list(SIZES), help="which sizes to run")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    ap.add_argument("--no-eager", action="store_true", help="skip the slow per-expert loops")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
                                                                      f"{torch.get_num_threads()} threads"
    peak = matmul_peak(device, dtype)
    print(f"device: {name}; torch {torch.__version__}; dtype {dtype}; dense matmul peak at start "
          f"{peak / 1e9:.1f} GFLOP/s")
    print("(% peak: against the best dense GEMM rate measured in this run, re-measured after each size)")
    print(f"{'size':8} {'path':28} {'ms/fwd+bwd':>11} {'GFLOP/s':>9} {'% peak':>7} {'speedup':>8}")
    for size in args.sizes:
        D, E, K, S, I, T = SIZES[size]
        ours, hf = build(D, E, K, S, I, device, dtype)
        x = torch.randn(1, T, D, device=device, dtype=dtype)
        g = torch.randn_like(x)
        # the paths agree before anything is timed
        with torch.no_grad():
            ref = hf["grouped_mm"](x).float()
            ours.impl = "grouped"
            err = (ours(x).float() - ref).abs().max().item() / ref.abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 3e-2), f"outputs differ: rel err {err}"

        def step(module):
            def run():
                xi = x.detach().requires_grad_()
                module(xi).backward(g)
            return run

        paths = [("nanoseek grouped (default)", step(ours), "grouped"),
                 ("transformers grouped_mm", step(hf["grouped_mm"]), None)]
        if not args.no_eager:
            paths += [("transformers eager loop", step(hf["eager"]), None),
                      ("nanoseek reference loop", step(ours), "reference")]
        flops = moe_flops(D, E, K, S, I, T)
        results = {label: [] for label, _, _ in paths}
        for _, fn, impl in paths:  # warm up each path once
            ours.impl = impl or "grouped"
            fn()
        for _ in range(args.reps):  # round-robin, so that drift on a shared machine hits every path alike
            for label, fn, impl in paths:
                ours.impl = impl or "grouped"
                results[label].append(timeit(fn, device, 1, warmup=0))
        ours.impl = "grouped"
        results = {label: statistics.median(ts) for label, ts in results.items()}
        peak = max(peak, matmul_peak(device, dtype))  # re-measured after each size; the best counts
        print(f"{size:8} dense matmul peak so far: {peak / 1e9:.1f} GFLOP/s")
        base = results["nanoseek grouped (default)"]
        for label, t in results.items():
            print(f"{size:8} {label:28} {t * 1e3:11.1f} {flops / t / 1e9:9.1f} {100 * flops / t / peak:6.1f}% "
                  f"{t / base:7.2f}x")
        print(f"{size:8} (D={D}, E={E}, top-{K}, shared={S}, inner={I}, tokens={T}; speedup = that path's time / "
              f"nanoseek grouped)")


if __name__ == "__main__":
    main()
