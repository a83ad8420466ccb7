"""The skeleton every trainer shares (after torchtitan's `Trainer` and nanochat's shared helpers), so that each trainer
file (pretrain, sft, rl; distill goes through sft) reads as its own loop and nothing else:

    run = Run(args, "sft")                 threads, process group, device, optional trackers checked
    run.open(identity)                     run directory: new (run.json written first, atomically), resumed, or refused
    state = run.resume(model)              newest complete checkpoint -> RNG, step, loop state ({} if none)
    policy = run.start(model, ...)         parallel.parallelize (EP, FP8, AC, PP | DDP / FSDP2), AdamW, the resumed
                                           weights and AdamW state (each rank its part), metrics, progress, trackers
    while run.step < max_steps:
        ... the trainer's own forward / backward ...
        out = run.optimizer_step(losses)   clip, the non-finite vote over ranks, skip or step, router-bias update
        run.log(row)                       metrics.jsonl (+ TensorBoard, W&B), by name; the progress bar
        if run.due(save_every): run.checkpoint(loop_state)   each rank's part (DCP), then train_state.json
    run.finish(tok)                        ledger.json, OUT/model (the published layout, each rank its part)

A run killed at any moment continues when the same command (with `--resume auto`) is run again: run.json,
checkpoints, the ledger and the final model are written atomically, and metrics past the resumed step are dropped.
"""

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from nanoseek.checkpoint import atomic_write
from nanoseek.errors import NanoseekError
from nanoseek.model import build_model, from_pretrained
from nanoseek.parallel import Layout, all_reduce, barrier, init_distributed, parallelize
from nanoseek.parallel.distributed import broadcast_object
from nanoseek.parallel.activation_checkpoint import MODES as AC_MODES
from nanoseek.train.common import (AdamWBF16Moments, Metrics, Progress, autocast_for, complete_checkpoint,
                                   load_optimizer_groups, new_checkpoint_dir, param_groups, resume_latest, rng_state)


def add_run_args(g, save_every: int, keep: int, eval_every: int, log_every: int) -> None:
    """The flags every trainer has (argparse group g)."""
    g.add_argument("--save-every", type=int, default=save_every, help="write a checkpoint every K steps (and at the end)")
    g.add_argument("--keep", type=int, default=keep, help="checkpoints to keep")
    g.add_argument("--resume", choices=["auto", "never"], default="never",
                   help="auto: continue from the newest complete checkpoint in OUT (or start if there is none), under "
                        "this run's layout whatever layout wrote it (world size, --ep, --pp, --parallel)")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background (DCP async_save): training goes on once the state is "
                        "copied; the checkpoint is complete (renamed into place) at the next save or at the end")
    g.add_argument("--eval-every", type=int, default=eval_every, help="evaluate every K steps (and at the end)")
    g.add_argument("--log-every", type=int, default=log_every, help="plain progress lines every K steps when not a TTY")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--usd-per-hour", type=float, default=2.0, help="price of one device-hour for the ledger")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument("--fp8", action="store_true",
                   help="FP8 training as DeepSeek-V3 (nanoseek/fp8.py: 1x128 activation tiles, 128x128 weight blocks, "
                        "all three GEMMs; emulated exactly on CPU); master weights and optimizer state stay FP32")
    g.add_argument("--fp8-pow2", action="store_true",
                   help="with --fp8: power-of-2 scales (the power of 2 at or above amax/448, as DeepSeek-V3.1's ue8m0 "
                        "scales), so that scaling is exact in the exponent")
    g.add_argument("--save-fp8", action="store_true",
                   help="write OUT/model in DeepSeek's published FP8 layout (e4m3 weights, 128x128 weight_scale_inv, "
                        "quantization_config), as `nanoseek convert --fp8` does")
    g.add_argument("--bf16-moments", action="store_true",
                   help="keep AdamW's first and second moments in bf16, as DeepSeek-V3 (half the optimizer memory)")
    g.add_argument("--ep", type=int, default=1, metavar="N",
                   help="expert parallelism under torchrun: the routed experts sharded over groups of N ranks, tokens "
                        "dispatched and combined by all-to-all (N divides the ranks and n_routed_experts); the rest "
                        "stays data parallel over all ranks, the global batch as without --ep")
    g.add_argument("--ep-overlap", action="store_true",
                   help="with --ep: each MoE layer's tokens in two micro-batches whose all-to-alls run asynchronously, "
                        "one's dispatch and combine overlapping the other's experts, forward and backward")
    g.add_argument("--ep-redundant", type=int, default=0, metavar="R",
                   help="with --ep: R redundant expert slots per MoE layer (E + R divisible by N), replicas of the "
                        "most loaded experts placed by EPLB (nanoseek/parallel/eplb.py), as V3's inference does")
    g.add_argument("--eplb-every", type=int, default=0, metavar="K",
                   help="with --ep-redundant: re-place the experts every K steps from the router's measured load "
                        "(0: keep the first placement)")
    g.add_argument("--ac", choices=AC_MODES, default="none",
                   help="activation checkpointing of every decoder block: full (keep only its input, recompute the "
                        "rest in the backward) or selective (keep the matmul and attention outputs, recompute the "
                        "cheap ops); the router's token counts are not counted twice")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics as TensorBoard events to OUT/tensorboard (extra: nanoseek[tensorboard])")
    g.add_argument("--wandb", action="store_true",
                   help="also log the metrics to Weights & Biases, offline unless WANDB_MODE says otherwise "
                        "(extra: nanoseek[wandb])")


def rss_gib() -> tuple[float, float]:
    """This process's resident memory now and its peak so far (VmRSS, VmHWM), GiB (0s where /proc is missing)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return tuple(int(fields[k].split()[0]) / 2 ** 20 for k in ("VmRSS", "VmHWM"))
    except (OSError, KeyError, ValueError):
        return 0.0, 0.0


def check_positive(args, names) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise NanoseekError(f"--lr must be a positive number, got {args.lr}")


def prepare_run_dir(out: Path, identity: dict, resume: str, is_main: bool) -> bool:
    """Decide whether this is a new run or a resumed one; refuse to touch a directory that holds something else."""
    run_file = out / "run.json"
    if run_file.exists():
        old = json.loads(run_file.read_text())
        if resume != "auto":
            raise NanoseekError(f"{out} already holds a run; pass --resume auto to continue it, or choose another --out")
        if old.get("identity") != identity:
            diff = sorted(k for k in set(old.get("identity", {})) | set(identity)
                          if old.get("identity", {}).get(k) != identity.get(k))
            raise NanoseekError(f"{out} holds a different run (differs in {', '.join(diff)}); choose another --out")
        return True
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".run.json.tmp-")):
        raise NanoseekError(f"{out} is not empty and holds no nanoseek run; choose an empty or new --out")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    return False


def load_init(path, device, meta: bool = False) -> tuple:
    """A checkpoint to train from: the model in fp32 (master weights) and its tokenizer. meta: the model on the meta
    device, its weights read on the host and passed to Run.start (`weights=`), where each rank materialises and loads
    only its part -> (model, tokenizer, weights)."""
    model = from_pretrained(path, device="cpu" if meta else device, dtype=torch.float32)
    if model.tokenizer is None:
        raise NanoseekError(f"{path} has no tokenizer.json: training on chat data needs the model's tokenizer")
    if not meta:
        return model, model.tokenizer
    weights = model.state_dict()
    shell = build_model(model.args, device="meta")
    shell.tokenizer = model.tokenizer
    return shell, model.tokenizer, weights


class Trackers:
    """Where users watch metrics besides metrics.jsonl: TensorBoard event files and Weights & Biases (offline by
    default). Both are optional extras: `require` checks them before anything is written, one clear line if missing."""

    @staticmethod
    def require(args) -> dict:
        libs = {}
        if getattr(args, "tensorboard", False):
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
            except ImportError:
                raise NanoseekError("--tensorboard needs the tensorboard package: pip install 'nanoseek[tensorboard]'") \
                    from None
            libs["tensorboard"] = SummaryWriter
        if getattr(args, "wandb", False):
            try:
                import wandb  # optional, and heavy: only for those who ask
            except ImportError:
                raise NanoseekError("--wandb needs the wandb package: pip install 'nanoseek[wandb]'") from None
            libs["wandb"] = wandb
        return libs

    def __init__(self, libs: dict, args, out: Path, stage: str, purge_step: int | None, enabled: bool):
        self.tb = self.wandb = None
        if not enabled:
            return
        if "tensorboard" in libs:  # purge_step: a resumed run drops what was logged past its checkpoint
            self.tb = libs["tensorboard"](str(out / "tensorboard"), purge_step=purge_step)
        if "wandb" in libs:
            run_id = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]  # the same W&B run when resumed
            self.wandb = libs["wandb"].init(
                project=os.environ.get("WANDB_PROJECT", "nanoseek"), name=f"{out.name}-{stage}", id=run_id,
                resume="allow", dir=str(out), mode=os.environ.get("WANDB_MODE", "offline"),
                config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))})

    def log(self, row: dict, step: int, prefix: str = "") -> None:
        scalars = {prefix + k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Run:
    def __init__(self, args, stage: str, out=None):
        if args.threads:
            torch.set_num_threads(args.threads)
        self.args, self.stage = args, stage
        self.d = init_distributed(args.device)
        self.layout = Layout.from_args(args)
        self.layout.check(self.d.world)  # one line for a layout that cannot be, before anything is written
        self.plan = None  # parallel.parallelize's, from start() on
        self.data_rank, self.data_world = self.layout.data_ranks(self.d)  # the ranks that read distinct data
        self.out = Path(out or args.out)
        self.step, self.skipped, self.wall_before = 0, 0, 0.0
        self.resuming, self.resumed, self._resume_from, self._opt_groups = False, False, None, None
        self._pending = None  # a checkpoint being written in the background (--async-save)
        self.cost = lambda wall: {}  # wall seconds -> the stage's ledger fields (tokens, FLOPs, ...): the trainer's
        self.autocast = autocast_for(self.d.device)
        self.tracker_libs = Trackers.require(args)  # before anything is written
        self.memory = {"rss_before_model_gib": rss_gib()[0]}  # this process's memory, for the ledger

    @property
    def main(self) -> bool:
        return self.d.main

    def print(self, *a) -> None:
        if self.main:
            print(*a, flush=True)

    # ---- directory and resume ----
    def open(self, identity: dict) -> bool:
        """New run (run.json written at once, so a run killed in its first seconds is found again), resumed run, or
        a refusal; every rank decides before the main one writes."""
        self.resuming = prepare_run_dir(self.out, identity, self.args.resume, self.main)
        barrier()
        if self.main and not self.resuming:
            atomic_write(self.out / "run.json", json.dumps({"identity": identity, "args": vars(self.args)}, indent=1,
                                                           default=str))
        barrier()
        return self.resuming

    def resume(self, model) -> dict:
        """Load the newest complete checkpoint into `model` (weights, RNG; the optimizer state waits for start) ->
        the trainer's loop state, {} when starting fresh."""
        if not self.resuming:
            return {}
        ck, self.step, state = resume_latest(self.out)
        if ck is None:
            self.print(f"no complete checkpoint in {self.out}: starting from scratch")
            return {}
        self.resumed, self._resume_from = True, ck
        self._opt_groups = state.pop("optimizer_groups")
        self.skipped, self.wall_before = state.get("skipped_steps", 0), state.get("wall_seconds", 0.0)
        self.print(f"resumed from {ck} (step {self.step})")
        return state

    # ---- the loop ----
    def start(self, model, max_steps: int, lr: float, weight_decay: float, betas=(0.9, 0.95),
              logs=("metrics.jsonl", "eval.jsonl"), weights: dict | None = None):
        """Parallelize the model for the ranks (the run's Layout: parallel.parallelize), build AdamW over its
        trainable parameters (its resumed state loaded), open the metric files, trackers and progress. Returns the
        wrapped model to run forwards through. weights: a meta-device model's starting weights (load_init's), each
        rank loading its part of them."""
        self.model, self.max_steps = model, max_steps
        # EP, FP8, AC, then PP or DDP/FSDP2, in that order; a meta-device model materialised rank by rank
        self.plan = parallelize(model, self.d, self.layout, init=not self.resumed and weights is None)
        if weights is not None and not self.resumed:
            self.plan.load_model_state(weights)
        del weights
        groups, self._all_names = self.plan.param_groups(lambda keep: param_groups(model, weight_decay, keep))
        if getattr(self.args, "bf16_moments", False):
            self.opt = AdamWBF16Moments(groups, lr=lr, betas=betas, eps=1e-8)
        else:
            self.opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8,
                                         fused=self.d.device.type == "cuda")  # after wrapping: FSDP swaps parameters
        if self.resumed:  # the checkpoint's weights and AdamW state, each rank its part (any layout wrote it)
            load_optimizer_groups(self.opt, self._opt_groups)
            self.plan.load(self.opt, self._resume_from)
        self.memory["peak_rss_after_build_gib"] = rss_gib()[1]  # the model built (and loaded), before any step
        # what a killed attempt logged past the checkpoint resumed from (all of it, when there was none) is dropped
        self.logs = {name.split(".")[0]: Metrics(self.out / name, resume_step=self.step if self.resumed else None,
                                                 enabled=self.main) for name in logs}
        self.trackers = Trackers(self.tracker_libs, self.args, self.out, self.stage,
                                 self.step if self.resuming else None, self.main)
        self.progress = Progress(max_steps, self.step, self.main, self.args.log_every, desc=self.stage)
        self.t_start = time.time()
        return self.plan.wrapped

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def optimizer_step(self, losses: dict, clip: float, update_bias: bool = True, count: bool = True) -> dict:
        """Clip the gradients, then vote: a non-finite loss or gradient on any rank skips the step on every rank
        (weights and router bias untouched, counted in skipped_steps); else AdamW steps and, with update_bias, the
        auxiliary-loss-free bias moves by the expert loads summed over ranks. `losses` are this rank's (name ->
        tensor); returned with their mean over ranks, the grad norm, `skipped` and the max/mean load per MoE layer.
        count: this is the loop's step (steps that are several optimizer steps count once, with count on the last);
        skipped_steps counts skipped optimizer steps."""
        grad_norm = self.plan.clip_grads(self.opt, clip)  # the whole model's, not this rank's part
        names = list(losses)
        loads = [m.tokens_per_expert for m in self.model.moe_layers()] if update_bias else []
        vals, bad = self.plan.vote(losses, grad_norm, loads)
        balance = [round((l.max() / l.mean()).item(), 3) if l.sum() > 0 else None for l in loads]
        skipped = bool(bad.item() > 0)
        if skipped:
            self.skipped += 1
            for m in self.model.moe_layers() if update_bias else ():
                m.tokens_per_expert.zero_()
        else:
            self.opt.step()
            if update_bias:
                self.model.update_bias()
        self.opt.zero_grad(set_to_none=True)
        if count:
            self.step += 1
        eplb = self.plan.rebalance(self.opt, self.step) if count else {}
        return {**{k: v for k, v in zip(names, vals.tolist())}, "grad_norm": grad_norm.item(), "skipped": skipped,
                **eplb,
                "expert_load_max_over_mean": balance}

    def all_sum(self, values: dict) -> dict:
        """Sum numbers over ranks by name, in one collective."""
        names = list(values)
        t = all_reduce(torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=self.d.device))
        return dict(zip(names, t.tolist()))

    def all_mean(self, values: dict) -> dict:
        return {k: v / self.d.world for k, v in self.all_sum(values).items()}

    def held_out_loss(self, loader, batches: int) -> float:
        """The next-token loss over the first `batches` batches of a held-out loader, averaged over ranks (nan when
        there are none). In eval mode, so the router's load counts (the bias update's input) stay clean."""
        model = self.model.eval()
        loader.rewind()
        losses = []
        with torch.no_grad(), self.autocast():
            for _ in range(batches):
                x, y = loader.next()
                losses.append(model(x.to(self.d.device), labels=y.to(self.d.device)).lm_loss.float())
        model.train()
        return self.all_mean({"loss": torch.stack(losses).mean().item() if losses else float("nan")})["loss"]

    def log(self, row: dict, show: dict | None = None, log: str = "metrics") -> None:
        """One row of metrics by name (to OUT/{log}.jsonl, TensorBoard and W&B); `show`: the progress bar's fields."""
        row = {"step": self.step, **row}
        self.logs[log].write(row)
        self.trackers.log(row, self.step, "" if log == "metrics" else f"{log}/")
        if show is not None:
            self.progress.update(self.step, show)

    def write(self, line: str) -> None:
        self.progress.write(line)

    def due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.max_steps

    def wall(self) -> float:
        return self.wall_before + time.time() - self.t_start

    # ---- checkpoints, ledger, the end ----
    def checkpoint(self, state: dict) -> None:
        """A complete training checkpoint: each rank's part of the weights and AdamW's state written by DCP (all
        ranks together; in the background with --async-save), then the trainer's loop state, RNG and counters
        (train_state.json, written last) and the rename that makes it complete; then the ledger."""
        self.memory.setdefault("peak_rss_before_save_gib", rss_gib()[1])  # what training held, before any save
        self.memory.setdefault("state_gib", self.state_bytes() / 2 ** 30)
        self.wait_for_save()
        st = {**state, "rng": rng_state(), "skipped_steps": self.skipped, "wall_seconds": self.wall(),
              "optimizer_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]}
        if self.plan.pp is not None:  # every group's names, whatever stages this rank holds
            for g, names in zip(st["optimizer_groups"], self._all_names):
                g["names"] = names
        tmp = Path(broadcast_object(str(new_checkpoint_dir(self.out, self.step)) if self.main else None))
        future = self.plan.save(self.opt, tmp, background=getattr(self.args, "async_save", False))
        self._pending = (future, tmp, self.step, st)
        if future is None:
            self.wait_for_save()

    def wait_for_save(self) -> None:
        """The checkpoint in flight (if any) written by every rank, then made complete by the main rank."""
        if self._pending is None:
            return
        future, tmp, step, st = self._pending
        self._pending = None
        try:
            if future is not None:
                future.result()
            barrier()  # every rank's files written
            if self.main:
                complete_checkpoint(self.out, tmp, step, st, self.args.keep)
        except BaseException:  # not a checkpoint: nothing of it left (a kill leaves it to the next save's sweep)
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.main:
            self.ledger(st["wall_seconds"])
        barrier()

    def state_bytes(self) -> int:
        """The bytes this rank holds of the weights, their gradients and AdamW's state (each storage once; an FSDP2 or
        EP shard by its local part; a pipeline stage held elsewhere not at all)."""
        seen = {}
        tensors = [t for p in self.model.parameters() for t in (p, p.grad) if t is not None]
        tensors += [v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v)]
        for t in tensors:
            t = t.to_local() if hasattr(t, "to_local") else t
            if not t.is_meta:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def sync_stages(self) -> None:
        """Under PP: every rank's model gets the weights of the stages it does not hold (for evaluation and
        sampling through the whole model on one rank)."""
        self.plan.sync_stages()

    def release_stages(self) -> None:
        """After an evaluation under PP: the stages this rank does not hold freed again."""
        self.plan.release_stages()

    def ledger(self, wall: float | None = None) -> dict:
        """ledger.json: what the stage cost. The trainer's `cost()` gives its own fields (tokens, FLOPs, ...)."""
        wall = self.wall() if wall is None else wall
        hours = wall * self.d.world / 3600
        device = torch.cuda.get_device_name(self.d.device) if self.d.device.type == "cuda" else str(self.d.device)
        row = {"stage": self.stage, "steps": self.step, "skipped_steps": self.skipped, "wall_seconds": wall,
               "device": device, "device_count": self.d.world, "device_hours": hours,
               "gpu_hours": hours if self.d.device.type == "cuda" else 0.0,
               "usd_per_device_hour": self.args.usd_per_hour, "usd": hours * self.args.usd_per_hour, **self.cost(wall),
               "memory": {**self.memory, "rss_gib": rss_gib()[0], "peak_rss_gib": rss_gib()[1],
                          **({"peak_cuda_gib": torch.cuda.max_memory_allocated(self.d.device) / 2 ** 30}
                             if self.d.device.type == "cuda" else {})}}
        if self.main:
            atomic_write(self.out / "ledger.json", json.dumps(row, indent=1) + "\n")
        return row

    def finish(self, tok) -> dict:
        """The final ledger and OUT/model (published layout, loadable by from_pretrained and transformers), written by
        the ranks together, each its own part."""
        self.wait_for_save()
        self.progress.close()
        result = self.ledger()
        self.plan.save_published(self.out / "model", tok, fp8=getattr(self.args, "save_fp8", False))
        self.trackers.close()
        barrier()
        return result
