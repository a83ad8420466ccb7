"""Each parallel layout against one process with the same global batch, on CPU gloo ranks: the largest relative gap
of the per-step loss and grad norm, and the largest absolute gap of the final weights, over a short pretraining.

    .venv/bin/python bench/parallel_equivalence.py                 # tiny model, 600 documents, seq 64, 6 steps
    .venv/bin/python bench/parallel_equivalence.py --only ep,ac_full

The tests hold these layouts to fixed tolerances (tests/test_expert_parallel.py, test_pipeline.py,
test_activation_checkpoint.py); this prints the measured gaps for bench/RESULTS.md. FP8 layouts are compared with FP8
in one process.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from nanoseek.checkpoint import read_published

# name: (ranks, global-batch share per data-parallel rank, flags, the one-process run it is compared with)
LAYOUTS = {
    "ep": (2, 2, ["--ep", "2"], "one"),
    "ep_overlap": (2, 2, ["--ep", "2", "--ep-overlap"], "one"),
    "ep_fsdp": (2, 2, ["--ep", "2", "--parallel", "fsdp"], "fsdp"),
    "pp_1f1b": (2, 4, ["--pp", "2", "--pp-schedule", "1f1b", "--pp-microbatches", "4"], "one"),
    "pp_interleaved1f1b": (2, 4, ["--pp", "2", "--pp-schedule", "interleaved1f1b", "--pp-microbatches", "4"], "one"),
    "pp_zbv": (2, 4, ["--pp", "2", "--pp-schedule", "zbv", "--pp-microbatches", "4"], "one"),
    "pp_dualpipev": (2, 4, ["--pp", "2", "--pp-schedule", "dualpipev", "--pp-microbatches", "4"], "one"),
    "pp_ep_dp": (4, 2, ["--pp", "2", "--pp-microbatches", "2", "--ep", "2"], "one"),
    "ac_full": (1, 4, ["--ac", "full"], "one"),
    "ac_selective": (1, 4, ["--ac", "selective"], "one"),
    "fp8_ddp": (2, 2, ["--fp8"], "fp8"),
    "fp8_ep": (2, 2, ["--fp8", "--ep", "2"], "fp8"),
}
REFERENCES = {"one": [], "fsdp": None, "fp8": ["--fp8"]}  # fsdp: 2 ranks of FSDP2 (EP + FSDP2's reference)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def launch(ranks: int, args: list[str]) -> None:
    exe = [sys.executable, "-m", "nanoseek"] if ranks == 1 else \
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "-m", "nanoseek"]
    r = subprocess.run([*exe, *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{r.stderr[-2000:]}")


def gaps(a: Path, b: Path) -> dict:
    ma, mb = metrics(a), metrics(b)
    wa, wb = (read_published(p / "model") for p in (a, b))
    return {"steps": len(mb),
            "loss": max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(ma, mb)),
            "grad_norm": max(abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"] for x, y in zip(ma, mb)),
            "weights": max((wa[k] - wb[k]).abs().max().item() for k in wa)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated layouts (default: all)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(LAYOUTS)
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        sys.exit(f"unknown layout {unknown[0]!r}; choose from {', '.join(LAYOUTS)}")
    root = Path(tempfile.mkdtemp(prefix="nanoseek-equiv-"))
    launch(1, ["data", "--out", str(root / "d"), "--docs", "600", "--vocab-size", "512"])
    common = ["pretrain", "--data", str(root / "d"), "--max-steps", str(args.steps), "--seq-len", "64",
              "--eval-every", str(args.steps), "--eval-batches", "2", "--warmup", "2", "--threads", "1"]
    for ref in sorted({LAYOUTS[n][3] for n in names}):
        if ref == "fsdp":
            launch(2, [*common, "--batch-size", "2", "--parallel", "fsdp", "--out", str(root / ref)])
        else:
            launch(1, [*common, "--batch-size", "4", *REFERENCES[ref], "--out", str(root / ref)])
    rows = {}
    print("| layout | ranks | against | loss, max relative gap | grad norm, max relative gap | final weights, max abs "
          "gap |\n|---|---|---|---|---|---|")
    for n in names:
        ranks, batch, flags, ref = LAYOUTS[n]
        launch(ranks, [*common, "--batch-size", str(batch), *flags, "--out", str(root / n)])
        rows[n] = g = gaps(root / ref, root / n)
        print(f"| {n} (`{' '.join(flags)}`) | {ranks} | {ref} | {g['loss']:.1e} | {g['grad_norm']:.1e} | "
              f"{g['weights']:.1e} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
