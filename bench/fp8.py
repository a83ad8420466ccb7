"""FP8 side by side with high precision, in one run on the same model, batch and seed:
- train: a training step (forward + backward + AdamW) with `fp8.convert` against without (on a CPU: the emulation's
  overhead; on Hopper: the native block-scaled GEMMs' speed-up);
- memory: an FP8 checkpoint served with its weights kept in FP8 against dequantised to bf16 (bytes of weights), and
  the decode speed of the two (bs=1, greedy, eager);
- gemm (GPU only): one block-scaled FP8 GEMM (1×128 activations, 128×128 weights) against bf16 at 4K-16K shapes.

    .venv/bin/python bench/fp8.py                  # the tiny preset, 4,096 tokens per step; train + memory
    .venv/bin/python bench/fp8.py --preset small --batch 4 --seq-len 512 --device cuda --what train,memory,gemm
"""

import argparse
import copy
import json
import statistics
import tempfile
import time

from nanoseek.config import get_preset  # first: nanoseek sets torch's CPU allocator options
from nanoseek import fp8
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import build_model, from_pretrained

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train(args, device, out):
    torch.manual_seed(0)
    base = build_model(get_preset(args.preset), device=device)
    models = {"high precision": base, "fp8": copy.deepcopy(base)}
    fp8.convert(models["fp8"])
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    V = base.args.vocab_size
    g = torch.Generator().manual_seed(1)
    data = torch.randint(3, V, (args.batch, args.seq_len + 1), generator=g).to(device)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step(name):
        with amp:
            loss = models[name](data[:, :-1], labels=data[:, 1:]).loss
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()
        sync(device)
        return loss.item()

    for name in models:  # warm-up
        step(name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {k: [] for k in models}
    for _ in range(args.reps):  # round-robin: both see the same moments of a noisy machine
        for name in models:
            t = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t)
    print(f"train: preset {args.preset}, {args.batch}x{args.seq_len} tokens per step on {device}, "
          f"median of {args.reps}, native FP8 GEMMs run: {fp8.native_calls}")
    hp = statistics.median(times["high precision"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:16s} {1e3 * m:8.1f} ms/step  {args.batch * args.seq_len / m:9.0f} tok/s  "
              f"speed {hp / m:.2f}x of high precision")
        out["train"][name] = {"ms_per_step": 1e3 * m, "tok_per_s": args.batch * args.seq_len / m}
    out["train"]["fp8_speedup"] = hp / statistics.median(times["fp8"])
    out["train"]["native_fp8_gemms"] = fp8.native_calls


def bench_memory(args, device, out):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_model(get_preset(args.preset)).save_pretrained(tmp, fp8=True)  # the published FP8 layout
        dt = torch.bfloat16
        models = {"bf16 (dequantised at load)": from_pretrained(tmp, device=device, dtype=dt),
                  "fp8 kept (the rest bf16)": fp8.from_pretrained(tmp, device=device, dtype=dt)}
        sizes = {k: fp8.weight_bytes(m) for k, m in models.items()}
        base = sizes["bf16 (dequantised at load)"]
        print(f"memory: preset {args.preset}, weights in memory (parameters and buffers)")
        for k, b in sizes.items():
            print(f"  {k:28s} {b / 2**20:9.1f} MiB  {b / base:.3f}x")
        out["memory"] = {"bf16_bytes": base, "fp8_bytes": sizes["fp8 kept (the rest bf16)"],
                         "ratio": sizes["fp8 kept (the rest bf16)"] / base}
        dt = torch.float32 if device.type == "cpu" else torch.bfloat16  # what serve/chat load on this device
        engines = {"dequantised": Engine(from_pretrained(tmp, device=device, dtype=dt), max_batch=1),
                   "fp8 kept": Engine(fp8.from_pretrained(tmp, device=device, dtype=dt), max_batch=1)}
        sp = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)
        times = {k: [] for k in engines}
        for rep in range(args.reps + 1):
            for k, e in engines.items():
                t = time.perf_counter()
                e.generate([[5, 6, 7, 8]], sp)
                sync(device)
                if rep:
                    times[k].append(time.perf_counter() - t)
        base = statistics.median(times["dequantised"])
        print(f"decode: bs=1, {args.decode_tokens} tokens, greedy, eager, {dt}")
        for k, ts in times.items():
            m = statistics.median(ts)
            print(f"  {k:28s} {args.decode_tokens / m:9.0f} tok/s  {base / m:.2f}x")
        out["memory"]["decode_tok_per_s"] = {k: args.decode_tokens / statistics.median(ts) for k, ts in times.items()}


def bench_gemm(args, device, out):
    """y = x·Wᵀ: bf16 against FP8 with 1×128 / 128×128 scales (the operands quantised beforehand, as a step caches
    them), TFLOPS from CUDA-event timing."""
    if device.type != "cuda":
        print("gemm: needs a GPU (skipped)")
        return
    print("gemm: M=N=K, bf16 vs block-scaled FP8 (torch._scaled_mm), TFLOPS")
    out["gemm"] = {}
    for n in args.gemm_sizes:
        x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        xq, xs = fp8.quantize_tiles(x)
        wq, ws = fp8.quantize_blocks(w)
        before = fp8.native_calls
        runs = {"bf16": lambda: x @ w.T, "fp8": lambda: fp8.blockwise_mm(xq, xs, wq, ws, out_dtype=torch.bfloat16)}
        tflops = {}
        for k, f in runs.items():
            for _ in range(3):
                f()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                f()
            end.record()
            torch.cuda.synchronize()
            tflops[k] = 2 * n ** 3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12
        native = fp8.native_calls > before
        print(f"  {n:6d}  bf16 {tflops['bf16']:7.1f}  fp8 {tflops['fp8']:7.1f}  {tflops['fp8'] / tflops['bf16']:.2f}x"
              + ("" if native else "  (emulated: no native kernel ran)"))
        out["gemm"][n] = {**tflops, "ratio": tflops["fp8"] / tflops["bf16"], "native": native}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--what", default="train,memory", help="comma-separated: train, memory, gemm")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--gemm-sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    out = {"train": {}, "device": str(device), "preset": args.preset}
    for what in args.what.split(","):
        {"train": bench_train, "memory": bench_memory, "gemm": bench_gemm}[what.strip()](args, device, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
