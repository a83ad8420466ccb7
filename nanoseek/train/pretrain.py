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
import platform
import time
from pathlib import Path

import torch

from nanoseek import cost
from nanoseek.config import PRESETS, ModelArgs, get_preset
from nanoseek.data.corpus import load_meta, prepare
from nanoseek.data.loader import PackedLoader
from nanoseek.data.tasks import DEFAULT_HELDOUT, check_families
from nanoseek.errors import NanoseekError
from nanoseek.model import build_model
from nanoseek.parallel import barrier
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.common import lr_factor
from nanoseek.train.run import Run, add_run_args, check_positive


def add_args(p) -> None:
    g = p.add_argument_group("model and data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", choices=[p for p in PRESETS if p != "v3"],
                     help="model preset (default tiny; the CPU main job uses cpu)")
    src.add_argument("--config", help="a config.json (DeepseekV3Config format) instead of a preset")
    g.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, ledger.json, model/")
    g.add_argument("--data", help="a data directory from `nanoseek data` (default: the embedded reasoning corpus, "
                                  "generated into OUT/data)")
    g.add_argument("--docs", type=int, default=60000, help="documents of the embedded corpus when --data is not given")
    g.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                   help="reasoning-gym families of the embedded corpus (default: all training families, "
                        "gsm_symbolic included), or a families.json (its trained and held-out families and configs)")
    g.add_argument("--drills", type=float, default=0.0, metavar="SHARE",
                   help="drill documents (the single facts the worked steps use: '13 + 7 = 20', '75 in binary is "
                        "1001011', 'the is spelled t h e') added to the embedded corpus, as a share of its documents")
    g.add_argument("--heldout", nargs="+", default=None, metavar="FAMILY",
                   help="families never trained, for the held-out loss (default basic_arithmetic)")
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
    g.add_argument("--eval-batches", type=int, default=8, help="batches per held-out evaluation")
    g.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"], help="data parallelism under torchrun")
    g.add_argument("--pp", type=int, default=1, metavar="N",
                   help="pipeline parallelism under torchrun: the layers cut into stages over N ranks "
                        "(torch.distributed.pipelining); the rest of the ranks data parallel")
    g.add_argument("--pp-schedule", default="1f1b", choices=["1f1b", "interleaved1f1b", "zbv", "dualpipev"],
                   help="the pipeline schedule (interleaved1f1b, zbv, dualpipev: two stages per rank)")
    g.add_argument("--pp-microbatches", type=int, default=4,
                   help="microbatches the pipeline splits each --batch-size micro-batch into")
    g.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model (auto: on for CUDA, off on CPU where it does not pay off)")
    add_run_args(g, save_every=200, keep=3, eval_every=100, log_every=10)


def check_args(args) -> None:
    check_positive(args, ("max_steps", "seq_len", "batch_size", "save_every", "eval_every", "eval_batches",
                          "log_every", "keep", "docs", "pp", "pp_microbatches"))
    if args.families:
        check_families(args.families)
        for f in args.families:
            if f in (args.heldout or DEFAULT_HELDOUT):
                raise NanoseekError(f"{f} is a held-out family (never trained, to measure generalisation); "
                                    f"leave it out of --families")
    if args.drills < 0:
        raise NanoseekError(f"--drills must be >= 0, got {args.drills}")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise NanoseekError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    if not 0 <= args.min_lr_ratio <= 1 or not 0 <= args.decay_frac <= 1:
        raise NanoseekError("--min-lr-ratio and --decay-frac must be in [0, 1]")
    if args.warmup < 0 or args.clip < 0 or args.weight_decay < 0:
        raise NanoseekError("--warmup, --clip and --weight-decay must be >= 0")


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


def load_data(run: Run, args, margs: ModelArgs):
    """The data directory (the embedded corpus is prepared into OUT/data once, by the main rank) -> tokenizer, meta,
    the training loader, the held-out loaders and a few held-out problems to sample."""
    data_dir = Path(args.data) if args.data else run.out / "data"
    if not args.data and not (data_dir / "meta.json").exists() and run.main:
        print(f"preparing the embedded reasoning corpus ({args.docs} documents) in {data_dir}", flush=True)
        prepare(data_dir, docs=args.docs, seed=args.seed, vocab_size=margs.vocab_size, families=args.families,
                heldout=args.heldout, drills=args.drills)
    barrier()
    meta = load_meta(data_dir)
    tok = Tokenizer.from_dir(data_dir)
    if tok.vocab_size > margs.vocab_size:
        raise NanoseekError(f"the data's tokenizer has {tok.vocab_size} tokens; the model's vocab_size is "
                            f"{margs.vocab_size}")
    d = run.d
    rank, world = run.data_rank, run.data_world  # under PP one reader per pipeline
    train = PackedLoader(data_dir, meta, "train", args.seq_len, args.batch_size, rank, world, seed=args.seed)
    evals = {}
    for s in ("val", "heldout"):  # held-out splits may be small: shrink their batch, skip one too small for any
        windows = (meta["splits"].get(s, {}).get("tokens", 0) - 1) // args.seq_len
        if windows >= world:
            evals[s] = PackedLoader(data_dir, meta, s, args.seq_len, min(args.batch_size, windows // world),
                                    rank, world, shuffle=False)
    problems = []
    if (data_dir / "val_problems.jsonl").exists():
        lines = (data_dir / "val_problems.jsonl").read_text().splitlines()
        problems = [json.loads(l) for l in lines[:: max(1, len(lines) // 3)]][:3]
    return tok, meta, train, evals, problems


def device_peak(d) -> tuple[str, float | None]:
    """The device's name and its peak FLOP/s for MFU: the dense bf16 figure of a known GPU, a matmul measured here
    on a CPU."""
    if d.device.type == "cuda":
        name = torch.cuda.get_device_name(d.device)
        key = cost.gpu_key(name)
        return name, cost.GPU_PEAKS[key]["bf16"] if key else None
    name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return name, cost.measure_matmul_peak(n=1024, k=1024, reps=8)


def main(args) -> dict:
    check_args(args)
    run = Run(args, "pretrain")
    d = run.d
    margs = ModelArgs.from_json(args.config) if args.config else get_preset(args.preset)
    if args.bias_update_speed is not None:
        margs.bias_update_speed = args.bias_update_speed
    if args.mtp_weight is not None:
        margs.mtp_loss_weight = args.mtp_weight
    micro_tokens = args.batch_size * args.seq_len * run.data_world
    batch_tokens = args.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        raise NanoseekError(f"--batch-tokens {batch_tokens} is not a multiple of batch-size x seq-len x ranks "
                            f"= {micro_tokens}")
    accum = batch_tokens // micro_tokens
    if args.pp > 1 and accum > 1:
        raise NanoseekError("--pp splits each micro-batch into --pp-microbatches itself: leave --batch-tokens out")
    if args.pp > 1 and args.batch_size % args.pp_microbatches:
        raise NanoseekError(f"--batch-size {args.batch_size} must be a multiple of --pp-microbatches "
                            f"{args.pp_microbatches}")
    if args.seq_len > margs.max_position_embeddings:
        raise NanoseekError(f"--seq-len {args.seq_len} exceeds the model's context of {margs.max_position_embeddings}")
    identity = {"model": {k: v for k, v in margs.to_dict().items() if k != "vocab_size"}, "seed": args.seed,
                "seq_len": args.seq_len, "batch_tokens": batch_tokens, "data": args.data or "embedded",
                "families": None if args.data else args.families, "heldout": None if args.data else args.heldout,
                "drills": None if args.data else args.drills,
                "max_steps": args.max_steps, "lr": args.lr, "schedule": args.schedule}
    # the user's data is checked before the run directory is touched; the embedded corpus is made inside it
    data = load_data(run, args, margs) if args.data else None
    run.open(identity)
    tok, meta, train, evals, problems = data or load_data(run, args, margs)

    torch.manual_seed(args.seed)
    model = build_model(margs, device="meta")  # each rank materialises its own part in run.start (parallelize)
    state = run.resume(model)
    if state:
        train.load_state_dict(state["loader"])
    wrapped = run.start(model, args.max_steps, args.lr, args.weight_decay, (0.9, args.beta2),
                        logs=("metrics.jsonl", "eval.jsonl", "samples.jsonl"))
    use_compile = args.compile == "on" or (args.compile == "auto" and d.device.type == "cuda")
    fwd = torch.compile(wrapped) if use_compile and wrapped is not None else wrapped

    params = cost.count_params(margs)  # once: it builds the model on the meta device
    fpt = cost.flops_per_token(margs, args.seq_len, params=params)["training"]
    dev_name, peak = device_peak(d)
    tokens = state.get("tokens", 0)
    run.cost = lambda wall: {
        "tokens": tokens, "training_flops": fpt * tokens, "flops_per_token": fpt, "device": dev_name,
        "achieved_flops_per_s": fpt * tokens / wall if wall else 0.0, "peak_flops_per_s_per_device": peak,
        "mfu": fpt * tokens / wall / (peak * d.world) if wall and peak else None,
        "model": {"preset": None if args.config else args.preset,
                  **{k: v for k, v in params.items() if k in ("total", "active", "total_with_mtp")}},
        "unigram_baseline_nats": meta.get("unigram_entropy")}
    run.print(f"model: {cost.param_summary(margs, params)} parameters, "
              f"{d.world} x {d.device.type}, global batch {batch_tokens} tokens ({accum} micro-step(s)), "
              f"{meta['splits']['train']['tokens']:,} training tokens; "
              f"unigram baseline {meta.get('unigram_entropy', float('nan')):.3f}")
    last_eval = {}
    sync = (lambda: torch.cuda.synchronize()) if d.device.type == "cuda" else (lambda: None)
    while run.step < args.max_steps:
        t0 = time.time()
        lr = args.lr * lr_factor(run.step, args.max_steps, args.warmup, args.schedule, args.min_lr_ratio,
                                 args.decay_frac)
        run.set_lr(lr)
        losses = forward_backward(run, fwd, wrapped, train, accum)
        out = run.optimizer_step(losses, args.clip)
        tokens += batch_tokens
        sync()
        dt = time.time() - t0
        mfu = fpt * batch_tokens / dt / (peak * d.world) if peak else None
        run.log({"loss": out["loss"], "mtp_loss": out["mtp_loss"], "balance_loss": out["balance_loss"],
                 "total_loss": out["total_loss"], "lr": lr, "grad_norm": out["grad_norm"], "skipped": out["skipped"],
                 "skipped_steps": run.skipped, "tokens": tokens, "tokens_per_s": batch_tokens / dt, "mfu": mfu,
                 "expert_load_max_over_mean": out["expert_load_max_over_mean"], "step_seconds": dt,
                 **{k: out[k] for k in ("eplb_rank_load_max_over_mean",) if k in out},
                 **({"peak_memory_gib": torch.cuda.max_memory_allocated(d.device) / 2 ** 30}
                    if d.device.type == "cuda" else {})},
                show={"loss": f"{out['loss']:.3f}", "tok/s": f"{batch_tokens / dt:,.0f}",
                      "mfu": f"{100 * mfu:.1f}%" if mfu else "-"} | ({"skipped": run.skipped} if run.skipped else {}))
        if out["skipped"]:
            run.write(f"step {run.step}: non-finite loss or gradient; step skipped ({run.skipped} so far)")
        if run.due(args.eval_every):
            last_eval = eval_and_sample(run, evals, tok, problems)
        if run.due(args.save_every):
            run.checkpoint({"loader": train.state_dict(), "tokens": tokens})
    result = run.finish(tok)
    if run.main:
        summary(run, result, last_eval, meta)
    return result


def summary(run: Run, result: dict, last_eval: dict, meta: dict) -> None:
    if last_eval:
        print("held-out loss " + ", ".join(f"{k.removesuffix('_loss')} {v:.3f}" for k, v in last_eval.items()
                                           if k != "step")
              + f" vs the unigram baseline {meta.get('unigram_entropy', float('nan')):.3f} nats/token")
    print(f"model: {run.out / 'model'}  (from_pretrained('{run.out / 'model'}'))")
    print(f"cost: {result['tokens']:,} tokens, {result['training_flops']:.3g} FLOPs, "
          f"{result['wall_seconds'] / 60:.1f} min on {run.d.world} x {result['device']}, MFU "
          f"{100 * (result['mfu'] or 0):.1f}%, {result['device_hours']:.3f} device-hours = ${result['usd']:.2f} at "
          f"${run.args.usd_per_hour}/h  (ledger: {run.out / 'ledger.json'})")


def forward_backward(run: Run, fwd, wrapped, train: PackedLoader, accum: int) -> dict:
    """`accum` micro-batches, gradients accumulated (DDP syncs on the last only) -> this rank's mean losses."""
    d = run.d
    if run.plan.pp is not None:  # the pipeline's schedule runs the forwards and backwards of its microbatches
        x, y = train.next()
        with run.autocast():  # (bf16 on CUDA, as the forwards below; backward ops keep their forward's dtypes)
            return run.plan.pp.step(x.to(d.device), y.to(d.device))
    sums = torch.zeros(4, device=d.device)  # lm, mtp, balance, total
    for micro in range(accum):
        x, y = train.next()
        x, y = x.to(d.device), y.to(d.device)
        no_sync = wrapped.no_sync if (d.enabled and run.args.parallel == "ddp" and micro < accum - 1) \
            else contextlib.nullcontext
        with no_sync():
            with run.autocast():
                o = fwd(x, labels=y)
            (o.loss / accum).backward()
        zero = torch.zeros((), device=d.device)
        sums += torch.stack([o.lm_loss.detach().float(), (o.mtp_loss if o.mtp_loss is not None else zero).detach()
                             .float(), (o.balance_loss if o.balance_loss is not None else zero).detach().float(),
                             o.loss.detach().float()]).to(d.device)
    sums /= accum
    return dict(zip(("loss", "mtp_loss", "balance_loss", "total_loss"), sums))


def eval_and_sample(run: Run, evals: dict, tok, problems: list[dict]) -> dict:
    """Held-out losses (averaged over ranks) to eval.jsonl, greedy samples to samples.jsonl."""
    run.sync_stages()  # under PP every rank evaluates the whole model
    ev = {f"{name}_loss": run.held_out_loss(loader, min(run.args.eval_batches,
                                                        loader.n_windows // (loader.batch * loader.world)))
          for name, loader in evals.items()}
    # under FSDP or EP every rank must run the forwards (collectives inside); otherwise the main rank alone generates
    every = run.args.parallel == "fsdp" or run.plan.ep is not None
    rows = samples(run.model, tok, problems) if problems and (run.main or every) else []
    run.log(ev, log="eval")
    for r in rows:
        run.logs["samples"].write({"step": run.step, **r})
    if run.main:
        run.write(f"step {run.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items()))
        for r in rows[:2]:
            run.write(f"  {r['question'][:60]!r} -> {r['completion'][:80]!r}")
    run.release_stages()  # under PP the stages this rank does not hold are freed again
    return {"step": run.step, **ev}
