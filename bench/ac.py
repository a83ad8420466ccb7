"""Activation checkpointing (--ac): the peak memory of a training step and its time, none / selective / full.

    .venv/bin/python bench/ac.py                       # tiny preset, 8 x 512 tokens, CPU
    .venv/bin/python bench/ac.py --device cuda --preset small --batch 4 --seq-len 2048

The peak is what the step allocates above the weights: activations kept for the backward, then the gradients and the
recomputed activations during it. On CUDA it is torch.cuda.max_memory_allocated; on a CPU (no allocator statistics)
a dispatch mode counts the bytes of every tensor storage an op creates until it is freed. Time: the median of --reps
steps (forward, backward, AdamW) after one warm-up.
"""

import argparse
import json
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nanoseek.parallel import activation_checkpoint as ac
from nanoseek import build_model, get_preset


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created by ops while active and not yet freed; `peak` the most at any time."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                key = s.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    n = s.nbytes()
                    self.live += n
                    weakref.finalize(s, self._free, key, n)
        self.peak = max(self.peak, self.live)
        return out


def step(model, opt, ids):
    out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(args, mode: str) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(get_preset(args.preset), device=device).train()
    ac.apply(model, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.args.vocab_size, (args.batch, args.seq_len + 1), device=device)
    step(model, opt, ids)  # warm-up: the optimizer's state exists from here on
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, opt, ids)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with LiveBytes() as tracker:
            step(model, opt, ids)
        peak = tracker.peak
    times = []
    for _ in range(args.reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(model, opt, ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"mode": mode, "peak_mib": peak / 2 ** 20, "step_s": statistics.median(times)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = [measure(args, mode) for mode in ac.MODES]
    base = rows[0]
    print(f"torch {torch.__version__}, {args.device}, preset {args.preset}, {args.batch} x {args.seq_len} tokens, "
          f"{torch.get_num_threads()} threads")
    print("| --ac | peak above the weights (MiB) | ÷ none | step (s) | ÷ none |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['peak_mib']:.1f} | {r['peak_mib'] / base['peak_mib']:.2f} | {r['step_s']:.3f} | "
              f"{r['step_s'] / base['step_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
