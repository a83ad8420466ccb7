"""`nanoseek <subcommand>`: one CLI. Each subcommand is argparse with help on every flag and a main(args) tests call.
User mistakes (NanoseekError) print one line and exit 1; no traceback."""

import argparse
import json
import sys
import time
from pathlib import Path

from nanoseek.errors import NanoseekError


def _model_args(args):
    """--preset / --config / --checkpoint -> ModelArgs."""
    from nanoseek.config import ModelArgs, get_preset
    if getattr(args, "checkpoint", None):
        p = Path(args.checkpoint)
        if not p.is_dir():
            raise NanoseekError(f"checkpoint directory {p} does not exist")
        return ModelArgs.from_json(p / "config.json")
    if getattr(args, "config", None):
        return ModelArgs.from_json(args.config)
    return get_preset(args.preset)


# ---- info ----------------------------------------------------------------------------------------------------------

def cmd_info(args):
    from nanoseek.cost import report
    margs = _model_args(args)
    print(report(margs, seq_len=args.seq_len))


# ---- tokenizer -----------------------------------------------------------------------------------------------------

def train_tokenizer(text_files=(), docs: int = 4000, vocab_size: int = 4096, seed: int = 0):
    from nanoseek.data.corpus import read_user_documents, reasoning_texts
    from nanoseek.tokenizer import Tokenizer
    texts = read_user_documents(text_files) if text_files else reasoning_texts(docs, seed=seed)
    return Tokenizer.train(texts, vocab_size=vocab_size)


def cmd_tokenizer(args):
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "tokenizer.json").exists():
        raise NanoseekError(f"refusing to write into {out}: it exists and holds something else")
    tok = train_tokenizer(args.text, args.docs, args.vocab_size, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"tokenizer: {tok.vocab_size} tokens -> {out}")


# ---- init / generate / convert -------------------------------------------------------------------------------------

def cmd_init(args):
    import torch
    from nanoseek.model import build_model
    from nanoseek.tokenizer import Tokenizer
    margs = _model_args(args)
    tok = Tokenizer.from_dir(args.tokenizer) if args.tokenizer else None
    if tok is not None and tok.vocab_size > margs.vocab_size:
        raise NanoseekError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                            f"{margs.vocab_size}")
    torch.manual_seed(args.seed)
    model = build_model(margs)
    model.save_pretrained(args.out, tokenizer=tok)
    print(f"initialised {args.preset if not args.config else args.config} -> {args.out}")


def cmd_generate(args):
    import torch
    from nanoseek import from_pretrained
    model = from_pretrained(args.checkpoint)
    tok = model.tokenizer
    if tok is None:
        raise NanoseekError(f"{args.checkpoint} has no tokenizer.json; nanoseek generate needs one")
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat \
        else tok.encode(args.prompt, bos=True)
    if len(ids) + args.max_new_tokens > model.args.max_position_embeddings:
        raise NanoseekError(f"prompt + --max-new-tokens exceed the context of {model.args.max_position_embeddings}")
    g = torch.Generator().manual_seed(args.seed)
    out = model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, eos_token_id=tok.eos_id, generator=g)
    print(tok.decode(out[0, len(ids):].tolist()))


def cmd_chat(args):
    from nanoseek.chat import main as chat
    chat(args)


def cmd_serve(args):
    from nanoseek.serve.api import main as serve
    for name in ("port", "max_batch", "max_queue", "threads"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.stream_interval <= 10_000:
        raise NanoseekError("--stream-interval must be in [0, 10000] ms")
    serve(args)


def cmd_convert(args):
    import torch
    from nanoseek import from_pretrained
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    model = from_pretrained(args.src, dtype=dtype)
    model.save_pretrained(args.dst, max_shard_size=args.max_shard_size, fp8=args.fp8)
    what = f"FP8 e4m3 in 128x128 blocks, the rest {args.dtype}" if args.fp8 else args.dtype
    print(f"{args.src} -> {args.dst} ({what}, DeepseekV3ForCausalLM layout)")


# ---- demo: a few-second smoke test of the whole stack -----------------------------------------------------------

def cmd_demo(args):
    """Tokenizer -> tiny model -> save -> load back (checked equal) -> generate a few tokens."""
    import torch
    from nanoseek import from_pretrained
    from nanoseek.config import get_preset
    from nanoseek.cost import report
    from nanoseek.model import build_model
    out = Path(args.out)
    t0 = time.time()
    print(f"[1/4] training a {args.vocab_size}-token byte-level BPE on {args.docs} reasoning-gym documents")
    tok = train_tokenizer(docs=args.docs, vocab_size=args.vocab_size, seed=args.seed)
    print(f"[2/4] building the '{args.preset}' model")
    torch.manual_seed(args.seed)
    model = build_model(get_preset(args.preset, vocab_size=args.vocab_size))
    print(report(model.args, seq_len=model.args.max_position_embeddings))
    print(f"[3/4] saving to {out} and loading it back")
    model.save_pretrained(out, tokenizer=tok)
    loaded = from_pretrained(out)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}])])
    with torch.no_grad():
        diff = (model.eval()(ids) - loaded(ids)).abs().max().item()
    if diff != 0:
        raise RuntimeError(f"reloaded model differs from the saved one (max abs diff {diff})")
    print(f"      reloaded logits identical; files: {', '.join(sorted(p.name for p in out.iterdir()))}")
    print("[4/4] generating (untrained weights: expect noise)")
    new = loaded.generate(ids, args.max_new_tokens, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(0))
    print("      prompt: " + tok.decode(ids[0].tolist()).replace("\n", "\\n"))
    print("      output: " + tok.decode(new[0, ids.shape[1]:].tolist()).replace("\n", "\\n"))
    print(f"done in {time.time() - t0:.1f}s. Load it with: from nanoseek import from_pretrained; "
          f"from_pretrained('{out}')")


# ---- data / pretrain / cost -----------------------------------------------------------------------------------------

def cmd_data(args):
    from nanoseek.data.corpus import perplexity_note, prepare
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(args.tokenizer) if args.tokenizer else None
    meta = prepare(args.out, docs=args.docs, seed=args.seed, files=args.files, text_field=args.text_field,
                   vocab_size=args.vocab_size, tokenizer=tok, families=args.families, heldout=args.heldout,
                   drills=args.drills)
    for split, m in meta["splits"].items():
        print(f"{split:8} {m['documents']:>8,} documents {m['tokens']:>12,} tokens")
    print(f"vocabulary {meta['vocab_size']}; {perplexity_note(meta)} -> {args.out}")


def _distributed(main):
    """Run a trainer's main; the process group (under torchrun) is destroyed however it ends."""
    def run(args):
        from nanoseek.parallel import barrier, shutdown
        try:
            main(args)
            barrier()  # every rank done with its collectives before any tears its groups down
        finally:
            shutdown()
    return run


def cmd_pretrain(args):
    from nanoseek.train.pretrain import main as pretrain
    _distributed(pretrain)(args)


def cmd_sft(args):
    from nanoseek.train.sft import main as sft
    _distributed(sft)(args)


def cmd_rl(args):
    from nanoseek.train.rl import main as rl
    _distributed(rl)(args)


def cmd_distill(args):
    from nanoseek.train import distill, sft
    from nanoseek.train.run import Trackers

    def run(args):  # rejection sampling, then the SFT loop on the verified rows
        sft.check_args(args)  # the student's flags, before the teacher samples anything
        Trackers.require(args)
        return sft.main(args, rows=distill.rejection_sample(args), run_dir=Path(args.out) / "sft")
    _distributed(run)(args)


def cmd_families(args):
    from nanoseek.data.tasks import write_families
    spec = write_families(args.out, args.trained, args.heldout)
    for part, fams in spec.items():
        for f, cfg in fams.items():
            print(f"{part:8} {f:18} {json.dumps(cfg)}")
    print(f"-> {args.out}  (pass it to pretrain / sft / rl / eval / distill as --families {args.out})")


def cmd_eval(args):
    from nanoseek.evaluate import main as evaluate
    evaluate(args)


def cmd_report(args):
    from nanoseek.report import main as report
    report(args)


CLUSTER_FLAGS = ("gpus_per_node", "nvlink_gbps", "ib_gbps", "sms", "tflops", "sm_gbps", "tokens_per_microbatch",
                 "node_limit", "comm_sms", "plot")


def cmd_cost(args):
    if args.cluster is not None:
        return cmd_cost_cluster(args)
    if args.tokens is None:
        raise NanoseekError("give --tokens (the cost of a training run) or --cluster (the communication budget of "
                            "expert parallelism)")
    given = [f"--{n.replace('_', '-')}" for n in CLUSTER_FLAGS if getattr(args, n) is not None]
    if given:
        raise NanoseekError(f"{', '.join(given)}: only with --cluster (the communication budget)")
    args.preset = args.preset or "tiny"
    args.gpus = 1 if args.gpus is None else args.gpus
    from nanoseek.cost import GPU_PEAKS, estimate, human
    margs = _model_args(args)
    if args.gpu not in GPU_PEAKS:
        raise NanoseekError(f"unknown --gpu {args.gpu!r}; choose from {', '.join(GPU_PEAKS)}")
    if GPU_PEAKS[args.gpu][args.precision] is None:
        raise NanoseekError(f"{args.gpu} has no {args.precision} tensor cores")
    for name in ("tokens", "gpus", "mfu"):
        if not getattr(args, name) > 0:
            raise NanoseekError(f"--{name} must be > 0")
    if args.mfu > 1:
        raise NanoseekError(f"--mfu is a fraction in (0, 1], got {args.mfu}")
    if args.gpu_hours is not None and not args.gpu_hours > 0:
        raise NanoseekError("--gpu-hours must be > 0")
    e = estimate(margs, args.tokens, args.gpu, args.gpus, args.mfu, args.seq_len, args.precision,
                 args.usd_per_gpu_hour, args.gpu_hours)
    if args.json:
        print(json.dumps(e))
        return
    print(f"{human(args.tokens)} tokens x {human(e['flops_per_token'], 'FLOP')}/token = {e['flops']:.3e} FLOPs "
          f"(6 x active params + attention, seq {args.seq_len}, MTP included)")
    print(f"on {args.gpus} x {GPU_PEAKS[args.gpu]['name']} at {100 * args.mfu:.0f}% MFU of the {args.precision} peak "
          f"({e['peak_flops'] / 1e12:.0f} TFLOP/s): {e['gpu_hours']:,.0f} GPU-hours, {e['days']:.1f} days, "
          f"${e['usd']:,.0f} at ${args.usd_per_gpu_hour}/GPU-hour")
    if args.gpu_hours is not None:
        print(f"published {args.gpu_hours:,.0f} GPU-hours (${e['published_usd']:,.0f}, {e['published_days']:.1f} days "
              f"on {args.gpus}) implies an MFU of {100 * e['implied_mfu']:.1f}% of the {args.precision} peak")


def cmd_cost_cluster(args):
    """`nanoseek cost --cluster`: the communication budget of one MoE layer per micro-batch (nanoseek/comm_model.py)."""
    from nanoseek import comm_model
    if args.tokens is not None:
        raise NanoseekError("--tokens (a training run's cost) and --cluster (the communication budget) are separate "
                            "modes; give one")
    c = comm_model.cluster(args.cluster, **{n: getattr(args, n) for n in
                                            ("gpus_per_node", "nvlink_gbps", "ib_gbps", "sms", "tflops", "sm_gbps")})
    args.preset = args.preset or "v3"
    margs = _model_args(args)
    given = {"gpus": args.gpus, "tokens": args.tokens_per_microbatch, "sm_counts": args.comm_sms}
    b = comm_model.budget(margs, c, mfu=args.mfu, seq_len=args.seq_len, node_limit=args.node_limit,
                          **{k: v for k, v in given.items() if v is not None})  # else budget's defaults (V3's)
    b["model"] = args.checkpoint or args.config or args.preset
    if args.plot:
        try:
            comm_model.plot(b, args.plot)
        except OSError as e:
            raise NanoseekError(f"cannot write --plot {args.plot}: {e.strerror or e}") from None
        b["plot"] = args.plot
    if args.json:
        print(json.dumps(b))
        return
    print(comm_model.format_budget(b, b["model"]))
    if args.plot:
        print(f"plot -> {args.plot}")


def cmd_plan(args):
    """`nanoseek plan`: one rank's training steps under a layout, on fake tensors (nanoseek/simulate.py); the figures
    either way, and exit status 3 with the verdict on stderr when the layout does not fit (1: a mistake in the
    flags, 2: argparse's usage errors)."""
    from nanoseek import simulate
    margs = _model_args(args)
    setup = simulate.Setup(**{k: getattr(args, k) for k in simulate.Setup.__dataclass_fields__})
    r = simulate.simulate(margs, setup)
    r["model"] = args.config or args.preset
    print(json.dumps(r) if args.json else simulate.format_report(r, r["model"]))
    if not r["fits"]:
        print(f"nanoseek plan: {simulate.verdict(r)}", file=sys.stderr)
        sys.exit(3)


# ---- parser --------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from nanoseek.config import PRESETS
    p = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3/R1 as one small, hackable PyTorch codebase.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def model_source(sp, checkpoint=True):
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--preset", default="tiny", choices=list(PRESETS), help="a built-in model shape (default tiny)")
        g.add_argument("--config", help="a config.json in the DeepseekV3Config format")
        if checkpoint:
            g.add_argument("--checkpoint", help="a checkpoint directory (its config.json is read)")

    sp = sub.add_parser("demo", help="a few-second smoke test: tokenizer, tiny model, save, load, generate")
    sp.add_argument("--out", default="out/demo", help="checkpoint directory to write (default out/demo)")
    sp.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="model preset (default tiny)")
    sp.add_argument("--docs", type=int, default=4000, help="reasoning-gym documents to train the tokenizer on")
    sp.add_argument("--vocab-size", type=int, default=4096, help="tokenizer and model vocabulary size")
    sp.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate at the end")
    sp.add_argument("--seed", type=int, default=0, help="random seed")
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("info", help="parameters (total/active), FLOPs per token and KV-cache size of a model")
    model_source(sp)
    sp.add_argument("--seq-len", type=int, default=4096, help="sequence length for the attention FLOPs")
    sp.set_defaults(fn=cmd_info)

    sp = sub.add_parser("tokenizer", help="train the byte-level BPE with DeepSeek's special tokens and R1 template")
    sp.add_argument("--out", required=True, help="directory to write tokenizer.json and tokenizer_config.json to")
    sp.add_argument("--text", nargs="*", default=[], help="files to train on, read as `nanoseek data --files` reads "
                                                          "them: .txt, .jsonl (field text), .parquet (default: "
                                                          "reasoning-gym)")
    sp.add_argument("--docs", type=int, default=4000, help="reasoning-gym documents when no --text is given")
    sp.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size, special tokens included")
    sp.add_argument("--seed", type=int, default=0, help="seed of the generated corpus")
    sp.set_defaults(fn=cmd_tokenizer)

    sp = sub.add_parser("init", help="write a randomly initialised model in the DeepseekV3ForCausalLM layout")
    model_source(sp, checkpoint=False)
    sp.add_argument("--out", required=True, help="checkpoint directory to write")
    sp.add_argument("--tokenizer", help="a tokenizer directory to save beside the weights")
    sp.add_argument("--seed", type=int, default=0, help="initialisation seed")
    sp.set_defaults(fn=cmd_init)

    sp = sub.add_parser("generate", help="sample a continuation by plain full forwards, no KV cache: the "
                                         "reference the engine (chat, serve) is tested against")
    sp.add_argument("--checkpoint", required=True, help="checkpoint directory (with tokenizer files)")
    sp.add_argument("--prompt", required=True, help="text to continue")
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the R1 chat template")
    sp.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    sp.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (default 0.6, R1's setting)")
    sp.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    sp.add_argument("--seed", type=int, default=0, help="sampling seed")
    sp.set_defaults(fn=cmd_generate)

    sp = sub.add_parser("data", help="prepare a data directory: the embedded reasoning corpus or your files -> "
                                     "tokenizer + token shards")
    sp.add_argument("--out", required=True, help="directory to create (must be new or empty)")
    sp.add_argument("--files", nargs="*", default=[], help="your data: .txt (a document per file), .jsonl, .parquet")
    sp.add_argument("--text-field", default="text", help="the JSONL field / parquet column holding the text")
    sp.add_argument("--docs", type=int, default=60000, help="documents of the embedded corpus (without --files)")
    sp.add_argument("--families", nargs="*", default=None, help="reasoning-gym families to train on")
    sp.add_argument("--heldout", nargs="*", default=None, help="families kept out of training, for evaluation")
    sp.add_argument("--drills", type=float, default=0.0, metavar="SHARE",
                    help="drill documents (the facts the worked steps use) added, as a share of the documents")
    sp.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary when training one")
    sp.add_argument("--tokenizer", help="use this tokenizer directory instead of training one")
    sp.add_argument("--seed", type=int, default=0, help="seed of the corpus and the split")
    sp.set_defaults(fn=cmd_data)

    sp = sub.add_parser("pretrain", help="pretrain a model (also under torchrun --nproc_per_node N)")
    from nanoseek.train.pretrain import add_args
    add_args(sp)
    sp.set_defaults(fn=cmd_pretrain)

    sp = sub.add_parser("sft", help="supervised fine-tuning on chat data, loss on the assistant's tokens (default: "
                                    "cold-start <think> traces of reasoning-gym tasks)")
    from nanoseek.train.sft import add_args as sft_args
    sft_args(sp)
    sp.set_defaults(fn=cmd_sft)

    sp = sub.add_parser("rl", help="GRPO with verifiable rewards (reasoning-gym score_answer, math-verify, format, "
                                   "or yours)")
    from nanoseek.train.rl import add_args as rl_args
    rl_args(sp)
    sp.set_defaults(fn=cmd_rl)

    sp = sub.add_parser("distill", help="rejection sampling from a teacher (keep verified-correct answers), then SFT "
                                        "of a student")
    from nanoseek.train.distill import add_args as distill_args
    from nanoseek.train.sft import add_args as sft_args
    distill_args(sp)
    sft_args(sp, distill=True)
    sp.set_defaults(fn=cmd_distill)

    sp = sub.add_parser("families", help="write a families.json: the trained and held-out reasoning-gym families "
                                         "with their exact configs, for every stage's --families")
    from nanoseek.data.tasks import DEFAULT_HELDOUT, FAMILIES, RL_FAMILIES
    sp.add_argument("--out", required=True, help="the file to write (e.g. OUT/families.json)")
    sp.add_argument("--trained", nargs="+", default=list(RL_FAMILIES), choices=list(FAMILIES), metavar="FAMILY",
                    help=f"trained families (default: {' '.join(RL_FAMILIES)})")
    sp.add_argument("--heldout", nargs="*", default=list(DEFAULT_HELDOUT), choices=list(FAMILIES), metavar="FAMILY",
                    help=f"families never trained, only scored (default: {' '.join(DEFAULT_HELDOUT)})")
    sp.set_defaults(fn=cmd_families)

    sp = sub.add_parser("eval", help="pass@1 over k samples, pass@k, majority vote and accuracy against the thinking "
                                     "budget on held-out reasoning-gym tasks")
    from nanoseek.evaluate import add_args as eval_args
    eval_args(sp)
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("report", help="report.md and PNG plots of a speedrun directory (pretrain, sft, rl, eval)")
    sp.add_argument("run", help="the speedrun directory (holding pretrain/, sft/, rl/, eval/)")
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("cost", help="estimate FLOPs, GPU-hours, days and dollars of a training run, or the MFU a "
                                     "published GPU-hour figure implies; with --cluster, the communication budget of "
                                     "expert parallelism (V3 §3.2)")
    model_source(sp)
    sp.set_defaults(preset=None)  # tiny for a training-run estimate, v3 with --cluster
    sp.add_argument("--tokens", type=float, default=None,
                    help="training tokens, e.g. 14.8e12 (needed without --cluster)")
    sp.add_argument("--gpu", default="h100", help="h100, h800, h200 or a100")
    sp.add_argument("--gpus", type=int, default=None,
                    help="number of GPUs (default 1; with --cluster the expert-parallel GPUs, default 64 as V3's EP64)")
    sp.add_argument("--mfu", type=float, default=0.4,
                    help="assumed model FLOPs utilisation, a fraction of the --precision peak (or of --tflops)")
    sp.add_argument("--precision", default="bf16", choices=["bf16", "fp8"], help="the peak the MFU refers to")
    sp.add_argument("--seq-len", type=int, default=4096, help="sequence length (attention FLOPs)")
    sp.add_argument("--gpu-hours", type=float, default=None, help="a published GPU-hour figure: report its MFU")
    sp.add_argument("--usd-per-gpu-hour", type=float, default=2.0, help="price (default $2, DeepSeek's H800 rate)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    g = sp.add_argument_group("the communication budget (--cluster): one MoE layer per micro-batch, model default v3")
    g.add_argument("--cluster", default=None,
                   help="a built-in cluster: h800 (V3's: 8 GPUs/node, NVLink 160 GB/s, IB 50 GB/s, 132 SMs) or h100")
    g.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node on NVLink (h800: 8)")
    g.add_argument("--nvlink-gbps", type=float, default=None, help="NVLink GB/s per GPU, one direction (h800: 160)")
    g.add_argument("--ib-gbps", type=float, default=None, help="InfiniBand GB/s per GPU, one direction (h800: 50)")
    g.add_argument("--sms", type=int, default=None, help="SMs per GPU (h800: 132)")
    g.add_argument("--tflops", type=float, default=None,
                   help="dense FP8 peak TFLOP/s per GPU that --mfu refers to (h800: 1979; V3's GEMMs run in FP8)")
    g.add_argument("--sm-gbps", type=float, default=None,
                   help="GB/s one SM moves when communicating (default 10.5: 20 SMs saturate IB + NVLink, V3 §3.2.2)")
    g.add_argument("--tokens-per-microbatch", type=int, default=None,
                   help="tokens per GPU per micro-batch (default 4096, DeepEP's V3 training setting)")
    g.add_argument("--node-limit", type=int, default=None,
                   help="M: each token's experts on at most M nodes (default the model's: V3 4)")
    g.add_argument("--comm-sms", type=int, nargs="+", default=None,
                   help="rows of the step-time table: SMs reserved for communication (default 4..48 and the model's)")
    g.add_argument("--plot", default=None, help="write step time against the SMs for communication as a PNG here")
    sp.set_defaults(fn=cmd_cost)

    sp = sub.add_parser("plan", help="does a training layout fit in GPU memory? one rank's training steps simulated "
                                     "on fake tensors: parameters, gradients, optimizer states, activations; exit "
                                     "status 3 when it does not fit")
    model_source(sp, checkpoint=False)
    from nanoseek.parallel.activation_checkpoint import MODES as AC_MODES
    from nanoseek.parallel.pipeline import SCHEDULES
    sp.add_argument("--gpus", type=int, default=8, help="GPUs (ranks) of the run (default 8)")
    sp.add_argument("--ep", type=int, default=1, help="expert-parallel degree, within the data-parallel ranks")
    sp.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    sp.add_argument("--pp-schedule", default="1f1b", choices=list(SCHEDULES),
                    help="pipeline schedule (its in-flight micro-batches come from torch's own order)")
    sp.add_argument("--pp-microbatches", type=int, default=0,
                    help="micro-batches per step under PP (default: twice the pipeline's stages)")
    sp.add_argument("--zero", type=int, default=1, choices=[0, 1, 3],
                    help="data-parallel sharding: 0 none (DDP), 1 optimizer states (V3's), 3 FSDP2 (default 1)")
    sp.add_argument("--ac", default="none", choices=list(AC_MODES), help="activation checkpointing (default none)")
    sp.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    sp.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    sp.add_argument("--fp8", action="store_true", help="FP8 GEMMs as V3 (activations cached in FP8)")
    sp.add_argument("--bf16-moments", action="store_true", help="AdamW moments in bf16, as V3")
    sp.add_argument("--gpu-memory-gib", type=float, default=80.0, help="one GPU's memory (default 80: H800/H100)")
    sp.add_argument("--rank", type=int, default=0,
                    help="the rank to simulate (default 0: the first pipeline stage, and under the V schedules the "
                         "last too)")
    sp.add_argument("--steps", type=int, default=2,
                    help="training steps simulated (default 2: the first allocates the optimizer state)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("chat", help="chat with a checkpoint: streamed, thinking shown apart (one-shot or interactive)")
    from nanoseek.chat import add_args as chat_args
    chat_args(sp)
    sp.set_defaults(fn=cmd_chat)

    sp = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with reasoning_content, and a chat page at /")
    from nanoseek.serve.api import add_args as serve_args
    serve_args(sp)
    sp.set_defaults(fn=cmd_serve)

    sp = sub.add_parser("convert", help="load any supported checkpoint (FP8, V2, transformers) and write nanoseek's "
                                        "DeepseekV3ForCausalLM layout (FP8 dequantised)")
    sp.add_argument("src", help="source checkpoint directory")
    sp.add_argument("dst", help="destination directory (must not hold anything but a checkpoint)")
    sp.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="dtype to write")
    sp.add_argument("--max-shard-size", default="5GB", help="split files above this size (default 5GB)")
    sp.add_argument("--fp8", action="store_true",
                    help="write DeepSeek's published FP8 layout: MLA and MLP/expert weights as float8_e4m3fn with a "
                         "float32 weight_scale_inv per 128x128 block, quantization_config in config.json")
    sp.set_defaults(fn=cmd_convert)
    return p


def _check_ranges(args):
    for name in ("docs", "vocab_size", "max_new_tokens", "seq_len", "max_tokens"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if getattr(args, "top_k", None) is not None and args.top_k < 0:
        raise NanoseekError(f"--top-k must be >= 0, got {args.top_k}")
    if getattr(args, "think_budget", None) is not None and args.think_budget < 0:
        raise NanoseekError(f"--think-budget must be >= 0, got {args.think_budget}")
    if getattr(args, "top_p", None) is not None and not 0 < args.top_p <= 1:
        raise NanoseekError(f"--top-p must be in (0, 1], got {args.top_p}")
    t = getattr(args, "temperature", None)
    if t is not None and t < 0:
        raise NanoseekError(f"--temperature must be >= 0, got {t}")


def _resolve_families(args):
    """`--families FILE.json` (a run's families.json) stands for its trained families with their configs, and for
    its held-out ones where the command has `--heldout` and it was not given."""
    fams = getattr(args, "families", None)
    if isinstance(fams, list) and len(fams) == 1 and str(fams[0]).endswith(".json"):
        from nanoseek.data.tasks import read_families
        spec = read_families(fams[0])
        args.families = spec["trained"]
        if hasattr(args, "heldout") and args.heldout is None:
            args.heldout = spec["heldout"]
    held = getattr(args, "heldout", None)
    if isinstance(held, list) and len(held) == 1 and str(held[0]).endswith(".json"):
        from nanoseek.data.tasks import read_families
        args.heldout = read_families(held[0])["heldout"]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        _check_ranges(args)
        _resolve_families(args)
        args.fn(args)
    except NanoseekError as e:
        print(f"nanoseek {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
