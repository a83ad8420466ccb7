"""The FP8 emulation's cost per training step (forward + backward + AdamW) against the same step in high precision,
side by side in one run on the same model, batch and seed; on a GPU the same comparison is the one to run with native
kernels (see bench/RESULTS.md for what still needs a Hopper machine).

    .venv/bin/python bench/fp8.py                  # the tiny preset, 4,096 tokens per step
    .venv/bin/python bench/fp8.py --preset small --batch 4 --seq-len 512
"""

import argparse
import copy
import statistics
import time

from nanoseek.config import get_preset  # first: nanoseek sets torch's CPU allocator options
from nanoseek import fp8
from nanoseek.model import build_model

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = build_model(get_preset(args.preset))
    models = {"high precision": base, "fp8 (emulated)": copy.deepcopy(base)}
    fp8.convert(models["fp8 (emulated)"])
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    V = base.args.vocab_size
    g = torch.Generator().manual_seed(1)
    data = torch.randint(3, V, (args.batch, args.seq_len + 1), generator=g)

    def step(name):
        loss = models[name](data[:, :-1], labels=data[:, 1:]).loss
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()
        return loss.item()

    for name in models:  # warm-up
        step(name)
    times = {k: [] for k in models}
    for _ in range(args.reps):  # round-robin: both see the same moments of a noisy machine
        for name in models:
            t = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; preset {args.preset}, "
          f"{args.batch}x{args.seq_len} tokens per step, median of {args.reps}")
    hp = statistics.median(times["high precision"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:16s} {1e3 * m:8.1f} ms/step  {args.batch * args.seq_len / m:9.0f} tok/s  {m / hp:.2f}x")


if __name__ == "__main__":
    main()
