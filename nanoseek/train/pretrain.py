"""`nanoseek pretrain`: pretrain from scratch, on one CPU or under `torchrun --nproc_per_node N` (gloo on CPU, nccl
on GPU; DDP or FSDP2 applied from outside the model).

Per optimizer step: `accum` micro-batches (global batch given in tokens), loss = next-token CE + λ·MTP + the
sequence-wise balance loss; gradients clipped; a non-finite loss or gradient on any rank skips the step everywhere
(weights untouched, counted); then the auxiliary-loss-free router-bias update from the expert loads summed over ranks.
Every `--save-every` steps a complete checkpoint (model in the published layout, optimizer, loop state, RNG) is
written atomically; `--resume auto` continues from the newest complete one, bit-identically on CPU. Every run writes
`metrics.jsonl` (one object per step), `eval.jsonl`, `samples.jsonl` and `ledger.json` (its cost).
"""

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from nanoseek.errors import NanoseekError


def add_args(p) -> None:
    from nanoseek.config import PRESETS
    g = p.add_argument_group("model and data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", choices=list(PRESETS)[:3], help="model preset (default tiny)")
    src.add_argument("--config", help="a config.json (DeepseekV3Config format) instead of a preset")
    g.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, ledger.json, model/")
    g.add_argument("--data", help="a data directory from `nanoseek data` (default: the embedded reasoning corpus, "
                                  "generated into OUT/data)")
    g.add_argument("--docs", type=int, default=60000, help="documents of the embedded corpus when --data is not given")
    g.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                   help="reasoning-gym families of the embedded corpus (default: all training families, "
                        "gsm_symbolic included); the held-out family stays basic_arithmetic")
    g = p.add_argument_group("schedule")
    g.add_argument("--max-steps", type=int, default=600, help="optimizer steps")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch per rank")
    g.add_argument("--batch-tokens", type=int, default=None,
                   help="global batch in tokens per optimizer step (default: one micro-batch on every rank); "
                        "gradient accumulation makes up the difference")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    g.add_argument("--schedule", default="wsd", choices=["wsd", "cosine", "constant"], help="LR schedule after warmup")
    g.add_argument("--warmup", type=int, default=30, help="warmup steps")
    g.add_argument("--decay-frac", type=float, default=0.3, help="wsd: share of the steps spent decaying")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--bias-update-speed", type=float, default=None, help="router bias step γ (default: the config's)")
    g.add_argument("--mtp-weight", type=float, default=None, help="MTP loss weight λ (default: the config's)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and corpus")
    g.add_argument("--save-every", type=int, default=200, help="write a checkpoint every K steps (and at the end)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    g.add_argument("--resume", choices=["auto", "never"], default="never",
                   help="auto: continue from the newest complete checkpoint in OUT (or start if there is none)")
    g.add_argument("--eval-every", type=int, default=100, help="held-out loss and sample generations every K steps")
    g.add_argument("--eval-batches", type=int, default=8, help="batches per held-out evaluation")
    g.add_argument("--log-every", type=int, default=10, help="plain progress lines every K steps when not a TTY")
    g.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"], help="data parallelism under torchrun")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model (auto: on for CUDA, off on CPU where it does not pay off)")
    g.add_argument("--usd-per-hour", type=float, default=2.0, help="price of one device-hour for the ledger")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    import argparse
    g.add_argument("--inject-nan-at", type=int, default=None, help=argparse.SUPPRESS)  # tests: NaN gradient at step
    g.add_argument("--fail-save-at", type=int, default=None, help=argparse.SUPPRESS)  # tests: crash inside a save


def check_args(args) -> None:
    for name in ("max_steps", "seq_len", "batch_size", "save_every", "eval_every", "eval_batches", "log_every",
                 "keep", "docs"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.families:
        from nanoseek.data.tasks import DEFAULT_HELDOUT, check_families
        check_families(args.families)
        for f in args.families:
            if f in DEFAULT_HELDOUT:
                raise NanoseekError(f"{f} is the held-out family (never trained, to measure generalisation); "
                                    f"leave it out of --families")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise NanoseekError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise NanoseekError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.min_lr_ratio <= 1 or not 0 <= args.decay_frac <= 1:
        raise NanoseekError("--min-lr-ratio and --decay-frac must be in [0, 1]")
    if args.warmup < 0 or args.clip < 0 or args.weight_decay < 0:
        raise NanoseekError("--warmup, --clip and --weight-decay must be >= 0")


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
    if out.exists() and any(out.iterdir()):
        raise NanoseekError(f"{out} is not empty and holds no nanoseek run; choose an empty or new --out")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    return False


def evaluate(model, loaders: dict, batches: int, autocast) -> dict:
    model.eval()
    out = {}
    with torch.no_grad(), autocast():
        for name, loader in loaders.items():
            loader.rewind()
            losses = []
            for _ in range(min(batches, loader.n_windows // (loader.batch * loader.world))):
                x, y = loader.next()
                losses.append(model(x.to(model.lm_head.weight.device), labels=y.to(model.lm_head.weight.device))
                              .lm_loss.float())
            out[name] = torch.stack(losses).mean() if losses else torch.tensor(float("nan"))
    model.train()
    return out


def samples(model, tok, problems: list[dict], n_tokens: int = 64) -> list[dict]:
    """Greedy continuations of 'Problem: ...\\nSolution:\\n' for a few held-out problems."""
    rows = []
    device = model.lm_head.weight.device
    model.eval()  # also keeps the router's load counts (the bias update's input) free of these forwards
    for ex in problems:
        prompt = f"Problem: {ex['question'].strip()}\nSolution:\n"
        ids = torch.tensor([tok.encode(prompt, bos=True)], device=device)
        out = model.generate(ids, n_tokens, eos_token_id=tok.eos_id)
        text = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        rows.append({"family": ex["family"], "question": ex["question"], "expected": ex["answer"], "completion": text})
    model.train()
    return rows


def main(args) -> dict:
    from nanoseek import cost
    from nanoseek.config import ModelArgs, get_preset
    from nanoseek.data.corpus import load_meta, prepare
    from nanoseek.data.loader import PackedLoader
    from nanoseek.model import build_model
    from nanoseek.parallel import all_reduce, barrier, init_distributed, unwrap, wrap
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.common import (Metrics, Progress, autocast_for, gather_full, load_optimizer_tensors,
                                       lr_factor, param_groups, resume_latest, rng_state, save_training_checkpoint)
    import torch.distributed as dist

    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    d = init_distributed(args.device)
    out = Path(args.out)
    margs = ModelArgs.from_json(args.config) if args.config else get_preset(args.preset)
    if args.bias_update_speed is not None:
        margs.bias_update_speed = args.bias_update_speed
    if args.mtp_weight is not None:
        margs.mtp_loss_weight = args.mtp_weight
    micro_tokens = args.batch_size * args.seq_len * d.world
    batch_tokens = args.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        raise NanoseekError(f"--batch-tokens {batch_tokens} is not a multiple of batch-size x seq-len x ranks "
                            f"= {micro_tokens}")
    accum = batch_tokens // micro_tokens
    if args.seq_len > margs.max_position_embeddings:
        raise NanoseekError(f"--seq-len {args.seq_len} exceeds the model's context of {margs.max_position_embeddings}")
    identity = {"model": {k: v for k, v in margs.to_dict().items() if k != "vocab_size"}, "seed": args.seed,
                "seq_len": args.seq_len, "batch_tokens": batch_tokens, "data": args.data or "embedded",
                "families": None if args.data else args.families,
                "max_steps": args.max_steps, "lr": args.lr, "schedule": args.schedule}
    resuming = prepare_run_dir(out, identity, args.resume, d.main)

    # ---- data (the main process prepares it once; the others wait) ----
    data_dir = Path(args.data) if args.data else out / "data"
    if not args.data and not (data_dir / "meta.json").exists() and d.main:
        print(f"preparing the embedded reasoning corpus ({args.docs} documents) in {data_dir}", flush=True)
        prepare(data_dir, docs=args.docs, seed=args.seed, vocab_size=margs.vocab_size, families=args.families)
    barrier()
    meta = load_meta(data_dir)
    tok = Tokenizer.from_dir(data_dir)
    if tok.vocab_size > margs.vocab_size:
        raise NanoseekError(f"the data's tokenizer has {tok.vocab_size} tokens; the model's vocab_size is "
                            f"{margs.vocab_size}")
    train = PackedLoader(data_dir, meta, "train", args.seq_len, args.batch_size, d.rank, d.world, seed=args.seed)
    evals = {}
    for s in ("val", "heldout"):  # held-out splits may be small: shrink their batch, skip one too small for any
        windows = (meta["splits"].get(s, {}).get("tokens", 0) - 1) // args.seq_len
        if windows >= d.world:
            evals[s] = PackedLoader(data_dir, meta, s, args.seq_len, min(args.batch_size, windows // d.world),
                                    d.rank, d.world, shuffle=False)
    problems = []
    if (data_dir / "val_problems.jsonl").exists():
        lines = (data_dir / "val_problems.jsonl").read_text().splitlines()
        problems = [json.loads(l) for l in lines[:: max(1, len(lines) // 3)]][:3]
    if d.main and not resuming:
        (out / "run.json").write_text(json.dumps({"identity": identity, "args": vars(args)}, indent=1, default=str))

    # ---- model, optimizer ----
    torch.manual_seed(args.seed)
    model = build_model(margs, device=d.device)
    step, state, opt_state = 0, {}, None
    if resuming:
        ck, step, state, opt_state = resume_latest(out, model, d.device)
        if ck is not None:
            train.load_state_dict(state["loader"])
            if d.main:
                print(f"resumed from {ck} (step {step})", flush=True)
        elif d.main:
            print(f"no complete checkpoint in {out}: starting from scratch", flush=True)
    raw = model
    model = wrap(model, d, args.parallel)
    opt = torch.optim.AdamW(param_groups(raw, args.weight_decay), lr=args.lr, betas=(0.9, args.beta2), eps=1e-8,
                            fused=d.device.type == "cuda")  # after wrapping: FSDP replaces the parameters
    if opt_state is not None:
        load_optimizer_tensors(opt, *opt_state)
    use_compile = args.compile == "on" or (args.compile == "auto" and d.device.type == "cuda")
    fwd = torch.compile(model) if use_compile else model
    autocast = autocast_for(d.device)

    # ---- cost bookkeeping ----
    params = cost.count_params(margs)  # once: it builds the model on the meta device
    fpt = cost.flops_per_token(margs, args.seq_len, params=params)["training"]
    if d.device.type == "cuda":
        dev_name = torch.cuda.get_device_name(d.device)
        key = cost.gpu_key(dev_name)
        peak = cost.GPU_PEAKS[key]["bf16"] if key else None
    else:
        import platform
        dev_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        peak = cost.measure_matmul_peak(n=1024, k=1024, reps=8)
    wall_before = state.get("wall_seconds", 0.0)
    skipped = state.get("skipped_steps", 0)
    tokens_seen = state.get("tokens", 0)
    metrics, eval_log, sample_log = (Metrics(out / name, resume_step=step if resuming else None, enabled=d.main)
                                     for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"))

    def ledger(wall: float) -> dict:
        flops = fpt * tokens_seen
        hours = wall * d.world / 3600
        row = {"tokens": tokens_seen, "steps": step, "skipped_steps": skipped, "training_flops": flops,
               "flops_per_token": fpt, "wall_seconds": wall, "device": dev_name, "device_count": d.world,
               "achieved_flops_per_s": flops / wall if wall else 0.0, "peak_flops_per_s_per_device": peak,
               "mfu": flops / wall / (peak * d.world) if wall and peak else None,
               "device_hours": hours, "gpu_hours": hours if d.device.type == "cuda" else 0.0,
               "usd_per_device_hour": args.usd_per_hour, "usd": hours * args.usd_per_hour,
               "model": {"preset": None if args.config else args.preset, **{k: v for k, v in
                         params.items() if k in ("total", "active", "total_with_mtp")}},
               "unigram_baseline_nats": meta.get("unigram_entropy")}
        if d.main:
            (out / "ledger.json").write_text(json.dumps(row, indent=1) + "\n")
        return row

    def checkpoint(wall: float):
        st = {"loader": train.state_dict(), "rng": rng_state(), "wall_seconds": wall, "skipped_steps": skipped,
              "tokens": tokens_seen}
        full = gather_full(raw, opt)  # every rank takes part (FSDP gathers shards); the main one writes
        if d.main:
            if args.fail_save_at == step:  # tests: die between the two files of this save
                import nanoseek.train.common as common
                common.save_file = lambda *a, **k: (_ for _ in ()).throw(OSError("injected failure mid-save"))
            save_training_checkpoint(out, step, raw, full, st, tok, args.keep)
            ledger(wall)
        barrier()

    # ---- the loop ----
    if d.main:
        print(f"model: {cost.human(params['total'])} parameters ({cost.human(params['active'])} active), "
              f"{d.world} x {d.device.type}, global batch {batch_tokens} tokens ({accum} micro-step(s)), "
              f"{meta['splits']['train']['tokens']:,} training tokens; "
              f"unigram baseline {meta.get('unigram_entropy', float('nan')):.3f}", flush=True)
    progress = Progress(args.max_steps, step, d.main, args.log_every)
    last_eval = {}
    model.train()
    t_start = time.time()
    sync = (lambda: torch.cuda.synchronize()) if d.device.type == "cuda" else (lambda: None)
    while step < args.max_steps:
        t0 = time.time()
        lr = args.lr * lr_factor(step, args.max_steps, args.warmup, args.schedule, args.min_lr_ratio, args.decay_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        sums = torch.zeros(4, device=d.device)  # lm, mtp, balance, total (summed over micro-steps)
        for micro in range(accum):
            x, y = train.next()
            x, y = x.to(d.device), y.to(d.device)
            no_sync = model.no_sync if (d.enabled and args.parallel == "ddp" and micro < accum - 1) \
                else contextlib.nullcontext
            with no_sync():
                with autocast():
                    o = fwd(x, labels=y)
                (o.loss / accum).backward()
            sums += torch.stack([o.lm_loss.detach().float(),
                                 (o.mtp_loss if o.mtp_loss is not None else torch.zeros(())).detach().float(),
                                 (o.balance_loss if o.balance_loss is not None else torch.zeros(())).detach().float(),
                                 o.loss.detach().float()]).to(d.device)
        if args.inject_nan_at == step + 1 and d.main:  # tests: a NaN gradient on one rank
            next(raw.parameters()).grad.fill_(float("nan"))
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.clip if args.clip > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        bad = (~torch.isfinite(sums).all() | ~torch.isfinite(grad_norm)).float().reshape(1)
        all_reduce(bad, dist.ReduceOp.MAX)  # a NaN on any rank skips the step on all
        all_reduce(sums)
        sums /= accum * d.world
        loads = [m.tokens_per_expert for m in raw.moe_layers()]
        for load in loads:
            all_reduce(load)
        balance = [round((l.max() / l.mean()).item(), 3) if l.sum() > 0 else None for l in loads]
        step += 1
        if bad.item() > 0:  # skip: weights untouched on every rank
            skipped += 1
            opt.zero_grad(set_to_none=True)
            for load in loads:
                load.zero_()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
            raw.update_bias()
        tokens_seen += batch_tokens
        sync()
        dt = time.time() - t0
        tps = batch_tokens / dt
        mfu = fpt * tps / (peak * d.world) if peak else None
        row = {"step": step, "loss": sums[0].item(), "mtp_loss": sums[1].item(), "balance_loss": sums[2].item(),
               "total_loss": sums[3].item(), "lr": lr, "grad_norm": grad_norm.item(), "skipped": bool(bad.item()),
               "skipped_steps": skipped, "tokens": tokens_seen, "tokens_per_s": tps, "mfu": mfu,
               "expert_load_max_over_mean": balance, "step_seconds": dt}
        metrics.write(row)
        progress.update(step, {"loss": f"{row['loss']:.3f}", "tok/s": f"{tps:,.0f}",
                               "mfu": f"{100 * mfu:.1f}%" if mfu else "-"} | ({"skipped": skipped} if skipped else {}))
        if bad.item() > 0:
            progress.write(f"step {step}: non-finite loss or gradient; step skipped ({skipped} so far)")
        if step % args.eval_every == 0 or step == args.max_steps:
            losses = evaluate(raw, evals, args.eval_batches, autocast)
            for k in losses:
                all_reduce(losses[k])
                losses[k] /= d.world
            ev = last_eval = {"step": step, **{f"{k}_loss": v.item() for k, v in losses.items()}}
            # under FSDP every rank must run the forwards; otherwise the main rank alone generates
            rows = samples(raw, tok, problems) if problems and (d.main or args.parallel == "fsdp") else []
            eval_log.write(ev)
            for r in rows:
                sample_log.write({"step": step, **r})
            if d.main:
                progress.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if k != "step"))
                for r in rows[:2]:
                    progress.write(f"  {r['question'][:60]!r} -> {r['completion'][:80]!r}")
        if step % args.save_every == 0 or step == args.max_steps:
            checkpoint(wall_before + time.time() - t_start)
    progress.close()
    wall = wall_before + time.time() - t_start
    result = ledger(wall)
    final = gather_full(raw, opt)["model"]  # collective under FSDP
    if d.main:
        from nanoseek.checkpoint import save_pretrained
        save_pretrained(raw, out / "model", tokenizer=tok, state_dict=final)
        if last_eval:
            print("held-out loss " + ", ".join(f"{k.removesuffix('_loss')} {v:.3f}" for k, v in last_eval.items()
                                               if k != "step")
                  + f" vs the unigram baseline {meta.get('unigram_entropy', float('nan')):.3f} nats/token")
        print(f"model: {out / 'model'}  (from_pretrained('{out / 'model'}'))")
        print(f"cost: {result['tokens']:,} tokens, {result['training_flops']:.3g} FLOPs, {wall / 60:.1f} min on "
              f"{d.world} x {dev_name}, MFU {100 * (result['mfu'] or 0):.1f}%, {result['device_hours']:.3f} "
              f"device-hours = ${result['usd']:.2f} at ${args.usd_per_hour}/h  (ledger: {out / 'ledger.json'})")
    barrier()
    return result
