"""`nanoseek sft`: supervised fine-tuning on chat data, loss on the assistant's tokens only (R1's cold start).

Starts from a checkpoint (`--init`), reads JSONL rows of OpenAI-style `messages` (`--data`; see `data/chat.py`) or,
by default, makes cold-start traces for reasoning-gym families with the step-by-step solvers of `data/tasks.py`.
Whole examples are packed into windows; the last `--val-frac` of the rows are held out for a validation loss. The loop
is pretraining's: AdamW, warmup + schedule, clipping, MTP loss, router-bias update, a skipped step on a non-finite
loss, atomic checkpoints with `--resume auto`, metrics.jsonl / eval.jsonl / ledger.json; under torchrun, DDP.
"""

import json
import math
import time
from pathlib import Path

import torch

from nanoseek.errors import NanoseekError


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
    g.add_argument("--save-every", type=int, default=100, help="write a checkpoint every K steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    g.add_argument("--resume", choices=["auto", "never"], default="never",
                   help="auto: continue from the newest complete checkpoint in OUT (or start if there is none)")
    g.add_argument("--eval-every", type=int, default=50, help="validation loss every K steps")
    g.add_argument("--log-every", type=int, default=10, help="plain progress lines every K steps when not a TTY")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--usd-per-hour", type=float, default=2.0, help="price of one device-hour for the ledger")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")


def check_args(args) -> None:
    for name in ("max_steps", "seq_len", "batch_size", "save_every", "eval_every", "log_every", "keep"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if getattr(args, "examples", 1) < 1:
        raise NanoseekError(f"--examples must be >= 1, got {args.examples}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise NanoseekError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.val_frac < 1:
        raise NanoseekError("--val-frac must be in [0, 1)")
    if not 0 <= getattr(args, "partial_thoughts", 0.0) <= 1:
        raise NanoseekError(f"--partial-thoughts must be in [0, 1], got {args.partial_thoughts}")


def load_init(path, device) -> tuple:
    """A checkpoint to train from: the model in fp32 (master weights) and its tokenizer."""
    from nanoseek.checkpoint import from_pretrained
    model = from_pretrained(path, device=device, dtype=torch.float32)
    if model.tokenizer is None:
        raise NanoseekError(f"{path} has no tokenizer.json: training on chat data needs the model's tokenizer")
    return model, model.tokenizer


def load_rows(args) -> list[dict]:
    from nanoseek.data.chat import cold_start_rows, read_rows
    if args.data:
        return read_rows(args.data)
    from nanoseek.data.tasks import check_families
    check_families(args.families or [])
    return cold_start_rows(args.examples, args.seed, args.families, args.partial_thoughts)


def main(args, rows: list[dict] | None = None, run_dir=None) -> dict:
    """Fine-tune; `rows` (chat rows) and the run directory may be given directly (distillation), else they come
    from the flags."""
    from nanoseek import cost
    from nanoseek.checkpoint import save_pretrained
    from nanoseek.data.chat import MaskedLoader, pack
    from nanoseek.parallel import all_reduce, barrier, init_distributed, wrap
    from nanoseek.train.common import (Metrics, Progress, autocast_for, gather_full, load_optimizer_tensors,
                                       lr_factor, param_groups, resume_latest, rng_state, save_training_checkpoint)
    from nanoseek.train.pretrain import prepare_run_dir
    import torch.distributed as dist

    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    d = init_distributed(args.device)
    out = Path(run_dir or args.out)
    init = Path(args.init)
    model, tok = load_init(init, d.device)
    rows = rows if rows is not None else load_rows(args)
    n_val = int(len(rows) * args.val_frac) if len(rows) > 20 else 0
    train_rows, val_rows = rows[:len(rows) - n_val], rows[len(rows) - n_val:]
    identity = {"init": str(init.resolve()), "rows": len(rows), "data": getattr(args, "data", None) or "generated",
                "partial_thoughts": getattr(args, "partial_thoughts", 0.0),
                "seed": args.seed, "seq_len": args.seq_len, "batch": args.batch_size * d.world,
                "max_steps": args.max_steps, "lr": args.lr, "schedule": args.schedule}
    resuming = prepare_run_dir(out, identity, args.resume, d.main)
    barrier()  # every rank has decided before the main one writes run.json
    if tok.vocab_size > model.args.vocab_size:
        raise NanoseekError(f"{init}: the tokenizer has {tok.vocab_size} tokens, the model only {model.args.vocab_size}")
    ids, mask, cut = pack(tok, train_rows, args.seq_len)
    loader = MaskedLoader(ids, mask, args.batch_size, d.rank, d.world, seed=args.seed)
    val = None
    if val_rows:
        v_ids, v_mask, _ = pack(tok, val_rows, args.seq_len)
        if len(v_ids) >= d.world:
            val = MaskedLoader(v_ids, v_mask, max(1, min(args.batch_size, len(v_ids) // d.world)), d.rank, d.world,
                               shuffle=False)
    if d.main and not resuming:
        (out / "run.json").write_text(json.dumps({"identity": identity, "args": vars(args)}, indent=1, default=str))
        if getattr(args, "data", None) is None:  # what was trained on, for the record
            with open(out / "sft_data.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")

    step, state, opt_state = 0, {}, None
    if resuming:
        ck, step, state, opt_state = resume_latest(out, model, d.device)
        if ck is not None:
            loader.load_state_dict(state["loader"])
            if d.main:
                print(f"resumed from {ck} (step {step})", flush=True)
    raw = model.train()
    model = wrap(raw, d, "ddp")
    opt = torch.optim.AdamW(param_groups(raw, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=d.device.type == "cuda")
    if opt_state is not None:
        load_optimizer_tensors(opt, *opt_state)
    autocast = autocast_for(d.device)

    params = cost.count_params(raw.args)
    fpt = cost.flops_per_token(raw.args, args.seq_len, params=params)["training"]
    wall_before, skipped, tokens_seen = (state.get(k, 0) for k in ("wall_seconds", "skipped_steps", "tokens"))
    metrics, eval_log = (Metrics(out / n, resume_step=step if resuming else None, enabled=d.main)
                         for n in ("metrics.jsonl", "eval.jsonl"))
    if d.main:
        print(f"sft: {len(train_rows):,} rows ({len(val_rows)} held out) packed into {len(ids):,} windows of "
              f"{args.seq_len + 1} tokens, {int(mask.sum()):,} target tokens"
              + (f"; {cut} rows longer than a window were cut" if cut else ""), flush=True)

    def ledger(wall: float) -> dict:
        hours = wall * d.world / 3600
        row = {"stage": "sft", "tokens": tokens_seen, "steps": step, "skipped_steps": skipped,
               "training_flops": fpt * tokens_seen, "flops_per_token": fpt, "wall_seconds": wall,
               "device": str(d.device), "device_count": d.world, "device_hours": hours,
               "gpu_hours": hours if d.device.type == "cuda" else 0.0, "usd_per_device_hour": args.usd_per_hour,
               "usd": hours * args.usd_per_hour}
        if d.main:
            (out / "ledger.json").write_text(json.dumps(row, indent=1) + "\n")
        return row

    def val_loss() -> float:
        if val is None:
            return float("nan")
        raw.eval()
        val.rewind()
        losses = []
        with torch.no_grad(), autocast():
            for _ in range(max(1, val.n_windows // (val.batch * val.world))):
                x, y = val.next()
                losses.append(raw(x.to(d.device), labels=y.to(d.device)).lm_loss.float())
        raw.train()
        v = torch.stack(losses).mean().reshape(1)
        return (all_reduce(v) / d.world).item()

    progress = Progress(args.max_steps, step, d.main, args.log_every, desc="sft")
    t_start = time.time()
    while step < args.max_steps:
        t0 = time.time()
        lr = args.lr * lr_factor(step, args.max_steps, args.warmup, args.schedule, args.min_lr_ratio, 0.3)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = loader.next()
        with autocast():
            o = model(x.to(d.device), labels=y.to(d.device))
        o.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.clip if args.clip > 0 else float("inf"))
        losses = torch.stack([o.lm_loss.detach().float(), (o.mtp_loss if o.mtp_loss is not None
                                                           else torch.zeros(())).detach().float()]).to(d.device)
        bad = (~torch.isfinite(losses).all() | ~torch.isfinite(grad_norm)).float().reshape(1)
        all_reduce(bad, dist.ReduceOp.MAX)
        all_reduce(losses)
        losses /= d.world
        loads = [m.tokens_per_expert for m in raw.moe_layers()]
        for load in loads:
            all_reduce(load)
        step += 1
        if bad.item() > 0:
            skipped += 1
            for load in loads:
                load.zero_()
        else:
            opt.step()
            raw.update_bias()
        opt.zero_grad(set_to_none=True)
        n_target = torch.tensor([float((y != -100).sum())], device=d.device)
        tokens_seen += int(all_reduce(n_target).item()) if d.enabled else int(n_target.item())
        dt = time.time() - t0
        row = {"step": step, "loss": losses[0].item(), "mtp_loss": losses[1].item(), "lr": lr,
               "grad_norm": grad_norm.item(), "skipped_steps": skipped, "target_tokens": tokens_seen,
               "step_seconds": dt}
        metrics.write(row)
        progress.update(step, {"loss": f"{row['loss']:.3f}", "lr": f"{lr:.2e}"})
        if step % args.eval_every == 0 or step == args.max_steps:
            ev = {"step": step, "val_loss": val_loss()}
            eval_log.write(ev)
            progress.write(f"step {step}: val loss {ev['val_loss']:.3f}")
        if step % args.save_every == 0 or step == args.max_steps:
            st = {"loader": loader.state_dict(), "rng": rng_state(), "skipped_steps": skipped, "tokens": tokens_seen,
                  "wall_seconds": wall_before + time.time() - t_start}
            full = gather_full(raw, opt)
            if d.main:
                save_training_checkpoint(out, step, raw, full, st, tok, args.keep)
                ledger(st["wall_seconds"])
            barrier()
    progress.close()
    wall = wall_before + time.time() - t_start
    result = ledger(wall)
    if d.main:
        save_pretrained(raw, out / "model", tokenizer=tok, state_dict=gather_full(raw, opt)["model"])
        print(f"model: {out / 'model'}  ({step} steps, {tokens_seen:,} target tokens, {wall / 60:.1f} min)")
    barrier()
    return result
