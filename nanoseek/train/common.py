"""What every training loop shares: AdamW parameter groups, the LR schedule, training checkpoints (each rank's part of
the weights and optimizer written by DCP, parallel/state.py, + the loop state; complete only once renamed, last k kept,
newest complete one found on resume), metrics as JSONL, and the progress display."""

import contextlib
import json
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.checkpoint import atomic_write, commit_dir
from nanoseek.errors import NanoseekError

CKPT_RE = re.compile(r"^step_(\d{6,})$")


# ---- optimizer and schedule ----------------------------------------------------------------------------------------

class AdamWBF16Moments(torch.optim.Optimizer):
    """AdamW keeping its first and second moments in bfloat16, as DeepSeek-V3 does (§3.3.3), over FP32 master weights:
    each step reads the moments, updates them in FP32 with the gradient, uses those FP32 values for the update and
    stores them back rounded to BF16 (half the optimizer memory of torch's AdamW)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - b1 ** t))


def param_groups(model: torch.nn.Module, weight_decay: float, keep_empty: bool = False) -> list[dict]:
    """AdamW groups: decay on matrices; none on norms, biases and embeddings (the router bias is a buffer, never
    touched by the optimizer). Each group also lists its parameter names, for checkpoints."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith("norm.weight") or "embed_tokens" in name or name.endswith(".bias"):
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    return [{"params": [p for _, p in g], "names": [n for n, _ in g], "weight_decay": wd}
            for g, wd in ((decay, weight_decay), (no_decay, 0.0)) if g or keep_empty]


def lr_factor(step: int, max_steps: int, warmup: int, schedule: str, min_ratio: float, decay_frac: float) -> float:
    """Linear warmup, then `cosine` to min_ratio, or `wsd` (warmup-stable-decay): constant, then linear to min_ratio
    over the last decay_frac of the steps."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        p = (step - warmup) / max(1, max_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    decay_start = max_steps - int(decay_frac * max_steps)
    if step < decay_start:
        return 1.0
    p = (step - decay_start) / max(1, max_steps - decay_start)
    return 1.0 - (1.0 - min_ratio) * min(1.0, p)


# ---- training checkpoints ------------------------------------------------------------------------------------------

def load_optimizer_groups(opt: torch.optim.Optimizer, groups: list[dict]) -> None:
    """The saved groups' hyper-parameters (lr, betas, ...) into the optimizer's groups, matched by parameter names:
    this rank may hold part of the model (a pipeline stage's), and a layout may split the groups otherwise than the
    one that saved them (parallel.plan.by_kind), so a group takes the settings of the saved groups its parameters
    were in, which must agree."""
    saved_of = {n: s for s in groups for n in s["names"]}
    for g in opt.param_groups:
        found = [saved_of.get(n) for n in g["names"]]
        if any(s is None for s in found):
            raise NanoseekError("the checkpoint's optimizer holds different parameters than this model")
        settings = [{k: v for k, v in s.items() if k != "names"} for s in found]
        if any(x != settings[0] for x in settings[1:]):
            raise NanoseekError("the checkpoint's optimizer groups this model's parameters with other settings")
        if settings:
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in settings[0].items()})


def new_checkpoint_dir(run_dir: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of `step` (the main rank's; the others are told its name)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".step_{step:06d}.tmp-", dir=root))


def complete_checkpoint(run_dir: Path, tmp: Path, step: int, state: dict, keep: int = 3) -> Path:
    """A checkpoint written by every rank into `tmp` (DCP's files, parallel.state) made complete: train_state.json
    (loop state, RNG, counters, the optimizer's groups) written last, everything fsynced, the directory renamed to
    checkpoints/step_{step:06d}; then all but the newest `keep` removed, and what killed saves left behind."""
    (tmp / "train_state.json").write_text(json.dumps({**state, "step": step, "format": "dcp"}, indent=1) + "\n")
    # (a step written again, by a run resumed past a kill after the rename, replaces the old one whole)
    path = commit_dir(tmp, tmp.parent / f"step_{step:06d}")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in path.parent.glob(".step_*.*-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    return path


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first (a directory only gets its step_ name once fully written)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CKPT_RE.match(p.name) and (p / "train_state.json").is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name)[1]))


def resume_latest(run_dir: Path) -> tuple[Path | None, int, dict]:
    """The newest complete checkpoint of a run -> (its path, step, loop state), the RNG restored; (None, 0, {}) when
    there is none. Its tensors are read once the model is laid out on the ranks (parallel.Plan.load)."""
    found = list_checkpoints(run_dir)
    if not found:
        return None, 0, {}
    ck = found[-1]
    state = json.loads((ck / "train_state.json").read_text())
    if state.get("format") != "dcp":
        raise NanoseekError(f"{ck} was written by an older nanoseek (one whole-state file per checkpoint); finish that "
                            f"run with the version that started it, or start a new --out")
    set_rng_state(state["rng"])
    return ck, state["step"], state


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights), nothing on CPU: a context-manager factory."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        s["cuda"] = [t.tolist() for t in torch.cuda.get_rng_state_all()]
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(t, dtype=torch.uint8) for t in s["cuda"]])


# ---- metrics and progress ------------------------------------------------------------------------------------------

def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


class Metrics:
    """Appends one JSON object per line; on resume, lines past the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        if resume_step is None:
            atomic_write(self.path, "")
        elif self.path.exists():  # a process killed mid-append leaves a cut last line: dropped with the rest
            keep = [l for l in self.path.read_text().splitlines()
                    if (step := _step_of(l)) is not None and step <= resume_step]
            atomic_write(self.path, "".join(l + "\n" for l in keep))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


class Progress:
    """A live bar on a terminal; plain lines every `every` steps otherwise (logs, CI)."""

    def __init__(self, total: int, start: int, enabled: bool, every: int = 10, desc: str = "train"):
        self.total, self.enabled, self.every = total, enabled, every
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        if self.tty:
            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)
        self.t0, self.start = time.time(), start

    def update(self, step: int, fields: dict) -> None:
        if not self.enabled:
            return
        text = "  ".join(f"{k} {v}" for k, v in fields.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            done = step - self.start
            eta = (time.time() - self.t0) / max(1, done) * (self.total - step)
            print(f"step {step}/{self.total}  {text}  eta {eta / 60:.1f}m", flush=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
