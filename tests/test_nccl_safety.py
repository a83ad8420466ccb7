"""No collective of the training step takes a tensor off the training device (nccl has no CPU backend): the step's
collectives under a process group whose only backend is for the accelerator (tests/nccl_rules.py; on this CPU the
meta device stands in for CUDA)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "nccl_rules.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_step_collectives_stay_on_the_training_device():
    r = run()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok: every collective" in r.stdout


def test_the_rule_is_enforced():
    """The control: one all_reduce of a CPU tensor under the same process group fails, as under nccl."""
    r = run("--control")
    assert r.returncode != 0 and "No backend type associated with device type cpu" in r.stderr
