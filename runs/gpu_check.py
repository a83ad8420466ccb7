"""The GPU path, checked and measured in one prepared run (runs/gpu_check.sh calls this; see its header).

Each step is a subprocess with a time limit; its output goes to OUT/logs.txt and its last lines into OUT/summary.json
and OUT/summary.md, whatever happens to the other steps (a failed step is recorded and the run goes on). The
figures are the benches' own printed lines, measured in this run, side by side with their baselines.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def steps(dev: str, quick: bool, work: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in s): quick is the CPU dry run's sizes, the same commands."""
    py = [sys.executable]
    ns = py + ["-m", "nanoseek"]
    preset = "tiny" if quick else "small"
    data = work / "data"  # reused by a rerun
    run = work / f"pretrain-{os.getpid()}"  # a fresh run each time: its ledger is this run's speed
    fp8 = (["--preset", "tiny", "--batch", "2", "--seq-len", "128", "--reps", "2", "--what", "train,memory"] if quick
           else ["--preset", "small", "--batch", "4", "--seq-len", "1024", "--reps", "5", "--what",
                 "train,memory,gemm"])
    return [
        ("gpu tests", py + ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-s",
                            "tests/test_gpu.py", "tests/test_fp8.py"], 240),
        ("moe layer vs transformers", py + ["bench/moe.py", "--device", dev, "--reps", "2" if quick else "5",
                                            "--sizes", *(["tiny"] if quick else ["tiny", "mid"])], 240),
        ("training step vs transformers", py + ["bench/train.py", "--device", dev, "--reps", "2" if quick else "5",
                                                "--sizes", "tiny" if quick else "small"], 300),
        *([] if (data / "meta.json").exists() else [
            ("data for the pretraining", ns + ["data", "--out", str(data), "--docs", "600" if quick else "20000",
                                               "--vocab-size", "512" if quick else "32768"], 300)]),
        ("pretraining", ns + ["pretrain", "--preset", preset, "--data", str(data), "--out", str(run),
                              "--device", dev, "--resume", "auto",
                              "--max-steps", "10" if quick else "300", "--seq-len", "64" if quick else "1024",
                              "--batch-size", "4" if quick else "16", "--eval-every", "10" if quick else "150",
                              "--eval-batches", "2", "--save-every", "1000", "--log-every", "5" if quick else "50",
                              *(["--threads", "2"] if dev == "cpu" else [])], 600),
        ("decode vs transformers, MTP speculative", py + ["bench/decode.py", "--device", dev, "--sizes", "tiny",
                                                          "--new", "32" if quick else "128", "--reps", "1" if quick
                                                          else "3", "--checkpoint", str(run / "model"),
                                                          "--data", str(data)], 300),
        ("fp8", py + ["bench/fp8.py", "--device", dev, *fp8], 300),
    ]


def ledger(run: Path) -> dict:
    try:
        led = json.loads((run / "ledger.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: led.get(k) for k in ("tokens", "wall_seconds", "mfu", "device", "peak_flops_per_s_per_device")}


def main():
    ap = argparse.ArgumentParser(description="check and benchmark every CUDA path in one run (runs/gpu_check.sh)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU dry run)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/gpu_check", help="where the results go")
    ap.add_argument("--only", nargs="*", default=None, help="run only the steps whose names contain these words")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/nanoseek_gpu_check"))
    work.mkdir(parents=True, exist_ok=True)
    import torch
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    info = {"device": args.device, "quick": args.quick, "torch": torch.__version__, "python": sys.version.split()[0],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": []}
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, and torch sees no CUDA device here (try --device cpu --quick)",
              file=sys.stderr)
        sys.exit(1)
    log = open(out / "logs.txt", "a")
    t_all = time.time()
    for name, cmd, limit in steps(args.device, args.quick, work):
        if args.only and not any(w in name for w in args.only):
            continue
        print(f"=== {name}: {' '.join(cmd)}", flush=True)
        log.write(f"\n=== {name}: {' '.join(cmd)}\n")
        t = time.time()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            rc, text = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            out_, err_ = (e.stdout or b""), (e.stderr or b"")
            rc, text = "timeout", (out_.decode(errors="replace") if isinstance(out_, bytes) else out_) + \
                (err_.decode(errors="replace") if isinstance(err_, bytes) else err_)
        took = time.time() - t
        log.write(text)
        log.flush()
        lines = [l for l in text.splitlines()
                 if l.strip() and not re.match(r"^(W\d{4}|\s*warnings?\.warn)", l) and "Loading weights" not in l]
        row = {"name": name, "rc": rc, "seconds": round(took, 1), "tail": lines[-25:]}
        if name == "pretraining":
            row["ledger"] = ledger(Path(cmd[cmd.index("--out") + 1]))
        info["steps"].append(row)
        print("\n".join(row["tail"][-8:]), flush=True)
        print(f"--- {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {took:.0f} s", flush=True)
        (out / "summary.json").write_text(json.dumps(info, indent=1) + "\n")  # after every step: a kill keeps it
    info["seconds"] = round(time.time() - t_all, 1)
    (out / "summary.json").write_text(json.dumps(info, indent=1) + "\n")
    md = [f"# nanoseek GPU check, {info['date']}", "",
          f"{info['gpu'] or 'no GPU'} ({args.device}{', quick' if args.quick else ''}); torch {info['torch']}, "
          f"Python {info['python']}; {info['seconds']:.0f} s in all.", "",
          "| step | result | seconds |", "|---|---|---|"]
    md += [f"| {s['name']} | {'ok' if s['rc'] == 0 else 'FAILED (' + str(s['rc']) + ')'} | {s['seconds']} |"
           for s in info["steps"]]
    for s in info["steps"]:
        md += ["", f"## {s['name']}", "", "```", *s["tail"], "```"]
        if s.get("ledger"):
            md += ["", f"ledger: {json.dumps(s['ledger'])}"]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    failed = [s["name"] for s in info["steps"] if s["rc"] != 0]
    print(f"gpu_check: {len(info['steps']) - len(failed)} of {len(info['steps'])} steps ok in {info['seconds']:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; results in {out}/summary.md and summary.json")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
