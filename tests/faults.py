"""Run the nanoseek CLI with a fault injected from outside (tests only; nothing in nanoseek knows of it):

    python tests/faults.py FAULT [FAULT ...] -- <nanoseek arguments>        (also as a torchrun script)

  fail-save:N    the checkpoint save at step N raises after every rank wrote its DCP files, before train_state.json
  kill-save:N    SIGKILL at that same point of the step-N save
  kill-step:N    SIGKILL right after optimizer step N
  kill-corpus    SIGKILL while the embedded corpus is being written (after its first split's shards)
  kill-engine:N  SIGKILL at the N-th engine step (rollouts, eval, distillation)
"""

import os
import signal
import sys

import nanoseek.train.run as run
from nanoseek.cli import main
from nanoseek.data import corpus
from nanoseek.engine import Engine


def die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)


def raise_oserror(*_, **__):
    raise OSError("injected failure mid-save")


def in_save(step: int, fault) -> None:
    """Run `fault` in place of the write of the step-`step` checkpoint's train_state.json (its tensors are already
    in the temporary directory then, written by every rank)."""
    complete = run.complete_checkpoint

    def patched(run_dir, tmp, at, *a, **k):
        if at == step:
            fault()
        return complete(run_dir, tmp, at, *a, **k)
    run.complete_checkpoint = patched


def after_step(step: int) -> None:
    optimizer_step = run.Run.optimizer_step

    def patched(self, *a, **k):
        out = optimizer_step(self, *a, **k)
        if self.step == step and k.get("count", True):  # the loop's step N, not an earlier update within it
            die()
        return out
    run.Run.optimizer_step = patched


def during_corpus() -> None:
    write_shards = corpus.write_shards

    def patched(*a, **k):
        out = write_shards(*a, **k)
        die()
        return out
    corpus.write_shards = patched


def at_engine_step(n: int) -> None:
    step, count = Engine.step, [0]

    def patched(self):
        count[0] += 1
        if count[0] == n:
            die()
        return step(self)
    Engine.step = patched


if __name__ == "__main__":
    split = sys.argv.index("--")
    for fault in sys.argv[1:split]:
        name, _, arg = fault.partition(":")
        {"fail-save": lambda: in_save(int(arg), raise_oserror), "kill-save": lambda: in_save(int(arg), die),
         "kill-step": lambda: after_step(int(arg)), "kill-corpus": during_corpus,
         "kill-engine": lambda: at_engine_step(int(arg))}[name]()
    sys.exit(main(sys.argv[split + 1:]))
