"""`nanoseek sft`: supervised fine-tuning on chat data, loss on the assistant's tokens only (R1's cold start).

Starts from a checkpoint (`--init`), reads JSONL rows of OpenAI-style `messages` (`--data`; see `data/chat.py`) or,
by default, makes cold-start traces for reasoning-gym families with the step-by-step solvers of `data/tasks.py`.
Whole examples are packed into windows; the last `--val-frac` of the rows are held out for a validation loss. The loop
is pretraining's: AdamW, warmup + schedule, clipping, MTP loss, router-bias update, a skipped step on a non-finite
loss, atomic checkpoints with `--resume auto`, metrics.jsonl / eval.jsonl / ledger.json; under torchrun, DDP.
`nanoseek distill` runs the same loop on the rows its teacher wrote (`main(args, rows=...)`).
"""

import json
import time
from pathlib import Path

import torch

from nanoseek import cost
from nanoseek.checkpoint import atomic_write
from nanoseek.data.chat import MaskedLoader, cold_start_rows, pack, read_rows
from nanoseek.data.tasks import check_families
from nanoseek.errors import NanoseekError
from nanoseek.train.common import lr_factor
from nanoseek.train.run import Run, add_run_args, check_positive, load_init


def add_args(p, distill: bool = False) -> None:
    g = p.add_argument_group("model and data")
    if not distill:
        g.add_argument("--init", required=True, help="checkpoint to start from (a model directory with a tokenizer)")
        g.add_argument("--data", help="JSONL of {'messages': [...]} rows (default: embedded cold-start traces)")
        g.add_argument("--examples", type=int, default=6000, help="cold-start rows to generate when --data is not "
                                                                  "given")
        g.add_argument("--families", nargs="*", default=None,
                       help="reasoning-gym families of the cold-start data (default: the pretraining families)")
        g.add_argument("--partial-thoughts", type=float, default=0.0, metavar="SHARE",
                       help="share of the cold-start traces whose thought stops after a random number of its steps "
                            "(then the right answer): teaches answering under a thinking budget and leaves GRPO the "
                            "choice to think longer")
    g.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, ledger.json, model/")
    g.add_argument("--val-frac", type=float, default=0.05, help="share of the rows held out for the validation loss")
    g = p.add_argument_group("schedule")
    g.add_argument("--max-steps", type=int, default=150, help="optimizer steps")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per packed window")
    g.add_argument("--batch-size", type=int, default=16, help="windows per step per rank")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    g.add_argument("--schedule", default="cosine", choices=["wsd", "cosine", "constant"], help="LR schedule")
    g.add_argument("--warmup", type=int, default=10, help="warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices only)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (0: off)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order (and of the generated rows)")
    add_run_args(g, save_every=100, keep=2, eval_every=50, log_every=10)


def check_args(args) -> None:
    check_positive(args, ("max_steps", "seq_len", "batch_size", "save_every", "eval_every", "log_every", "keep"))
    if getattr(args, "examples", 1) < 1:
        raise NanoseekError(f"--examples must be >= 1, got {args.examples}")
    if not 0 <= args.val_frac < 1:
        raise NanoseekError("--val-frac must be in [0, 1)")
    if not 0 <= getattr(args, "partial_thoughts", 0.0) <= 1:
        raise NanoseekError(f"--partial-thoughts must be in [0, 1], got {args.partial_thoughts}")


def load_rows(args) -> list[dict]:
    if args.data:
        return read_rows(args.data)
    check_families(args.families or [])
    return cold_start_rows(args.examples, args.seed, args.families, args.partial_thoughts)


def loaders(run: Run, tok, train_rows, val_rows, seq_len: int, batch: int):
    """Whole examples packed into windows -> the training loader, the validation loader (None without rows), and
    the packing's counts for the opening line."""
    d = run.d
    ids, mask, cut = pack(tok, train_rows, seq_len)
    loader = MaskedLoader(ids, mask, batch, d.rank, d.world, seed=run.args.seed)
    val = None
    if val_rows:
        v_ids, v_mask, _ = pack(tok, val_rows, seq_len)
        if len(v_ids) >= d.world:
            val = MaskedLoader(v_ids, v_mask, max(1, min(batch, len(v_ids) // d.world)), d.rank, d.world,
                               shuffle=False)
    return loader, val, (len(ids), int(mask.sum()), cut)


def main(args, rows: list[dict] | None = None, run_dir=None) -> dict:
    """Fine-tune; `rows` (chat rows) and the run directory may be given directly (distillation), else they come
    from the flags."""
    check_args(args)
    run = Run(args, "sft", out=run_dir)
    d = run.d
    init = Path(args.init)
    model, tok, weights = load_init(init, d.device, meta=True)  # each rank loads its part in run.start
    rows = rows if rows is not None else load_rows(args)
    n_val = int(len(rows) * args.val_frac) if len(rows) > 20 else 0
    train_rows, val_rows = rows[:len(rows) - n_val], rows[len(rows) - n_val:]
    if tok.vocab_size > model.args.vocab_size:
        raise NanoseekError(f"{init}: the tokenizer has {tok.vocab_size} tokens, the model only {model.args.vocab_size}")
    loader, val, (n_windows, n_targets, cut) = loaders(run, tok, train_rows, val_rows, args.seq_len, args.batch_size)
    run.open({"init": str(init.resolve()), "rows": len(rows), "data": getattr(args, "data", None) or "generated",
              "partial_thoughts": getattr(args, "partial_thoughts", 0.0),
              "seed": args.seed, "seq_len": args.seq_len, "batch": args.batch_size * d.world,
              "max_steps": args.max_steps, "lr": args.lr, "schedule": args.schedule})
    if run.main and getattr(args, "data", None) is None and not (run.out / "sft_data.jsonl").exists():
        atomic_write(run.out / "sft_data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))  # for the record

    state = run.resume(model)
    if state:
        loader.load_state_dict(state["loader"])
    policy = run.start(model.train(), args.max_steps, args.lr, args.weight_decay, weights=weights)
    del weights
    fpt = cost.flops_per_token(model.args, args.seq_len)["training"]
    tokens = state.get("tokens", 0)
    run.cost = lambda wall: {"tokens": tokens, "training_flops": fpt * tokens, "flops_per_token": fpt}
    run.print(f"sft: {len(train_rows):,} rows ({len(val_rows)} held out) packed into {n_windows:,} windows of "
              f"{args.seq_len + 1} tokens, {n_targets:,} target tokens"
              + (f"; {cut} rows longer than a window were cut" if cut else ""))
    while run.step < args.max_steps:
        t0 = time.time()
        lr = args.lr * lr_factor(run.step, args.max_steps, args.warmup, args.schedule, args.min_lr_ratio, 0.3)
        run.set_lr(lr)
        x, y = loader.next()
        with run.autocast():
            o = policy(x.to(d.device), labels=y.to(d.device))
        o.loss.backward()
        out = run.optimizer_step({"loss": o.lm_loss, "mtp_loss": o.mtp_loss if o.mtp_loss is not None
                                  else torch.zeros((), device=d.device)}, args.clip)
        tokens += int(run.all_sum({"n": float((y != -100).sum())})["n"])
        run.log({"loss": out["loss"], "mtp_loss": out["mtp_loss"], "lr": lr, "grad_norm": out["grad_norm"],
                 "skipped_steps": run.skipped, "target_tokens": tokens, "step_seconds": time.time() - t0},
                show={"loss": f"{out['loss']:.3f}", "lr": f"{lr:.2e}"})
        if run.due(args.eval_every):
            v = run.held_out_loss(val, max(1, val.n_windows // (val.batch * val.world))) \
                if val is not None else float("nan")
            run.log({"val_loss": v}, log="eval")
            run.write(f"step {run.step}: val loss {v:.3f}")
        if run.due(args.save_every):
            run.checkpoint({"loader": loader.state_dict(), "tokens": tokens})
    result = run.finish(tok)
    run.print(f"model: {run.out / 'model'}  ({run.step} steps, {tokens:,} target tokens, "
              f"{result['wall_seconds'] / 60:.1f} min)")
    return result
