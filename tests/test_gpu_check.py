"""runs/gpu_check.sh's CPU dry run (--device cpu --quick): the script the GPU machine runs, end to end at tiny sizes,
so it is known to work before GPU time is spent; every step ok and the summary written."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work")}
    r = subprocess.run(["bash", str(ROOT / "runs" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    names = [s["name"] for s in summary["steps"]]
    assert {"gpu tests", "pretraining", "fp8"} <= set(names) and all(s["rc"] == 0 for s in summary["steps"])
    assert summary["steps"][names.index("pretraining")]["ledger"]["tokens"] > 0
    assert "| pretraining | ok |" in (tmp_path / "out" / "summary.md").read_text()
