"""`nanoseek distill`: rejection sampling from a teacher, then SFT of a student (R1's stage 3 and its distillation).

The teacher samples `--samples` completions of each of `--prompts-per-family` problems per family (seeds of their own);
completions the verifier scores correct (reasoning-gym's `score_answer`, or math-verify) and well formed are kept —
at most `--keep-per-prompt` per problem — and written as chat rows (`OUT/distill_data.jsonl`, the thought in
`reasoning_content`). The student is then fine-tuned on them with `nanoseek sft`'s loop: the teacher itself (R1's
second round), another checkpoint, or a fresh model of a preset (`--student-preset`, with the teacher's tokenizer).
The student must use the teacher's tokenizer: the data are text, but a mismatch is almost always a mistake.
This file is the rejection sampling; `nanoseek distill` then hands its rows to the SFT loop (cli.cmd_distill).
"""

import json
from pathlib import Path

import torch

from nanoseek.checkpoint import atomic_write, save_pretrained
from nanoseek.config import PRESETS, get_preset
from nanoseek.data.chat import SEED_DISTILL, read_rows, trace_row
from nanoseek.data.tasks import RL_FAMILIES, problem_pool
from nanoseek.engine import SamplingParams, generate_all, sample_seed
from nanoseek.errors import NanoseekError
from nanoseek.model import build_model, from_pretrained
from nanoseek.parallel import barrier, init_distributed
from nanoseek.rl import rewards as R
from nanoseek.tokenizer import Tokenizer


def add_args(p) -> None:
    """The teacher's flags (the student's training flags are SFT's: train/sft.add_args(p, distill=True))."""
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", required=True, help="checkpoint that writes the answers")
    s = g.add_mutually_exclusive_group()
    s.add_argument("--student", help="checkpoint to fine-tune (default: the teacher itself)")
    s.add_argument("--student-preset", choices=[p for p in PRESETS if p != "v3"],
                   help="a fresh model of this preset instead (tiny-dense: a smaller dense student)")
    g.add_argument("--families", nargs="*", default=list(RL_FAMILIES), help="reasoning-gym families to sample")
    g.add_argument("--prompts-per-family", type=int, default=300, help="problems per family")
    g.add_argument("--samples", type=int, default=4, help="teacher samples per problem")
    g.add_argument("--keep-per-prompt", type=int, default=2, help="verified answers kept per problem")
    g.add_argument("--temperature", type=float, default=0.6, help="teacher temperature")
    g.add_argument("--top-p", type=float, default=0.95, help="teacher top-p")
    g.add_argument("--max-new-tokens", type=int, default=128, help="longest teacher completion")


def same_tokenizer(a, b) -> bool:
    return a.tok.get_vocab() == b.tok.get_vocab()


def verified_rows(teacher, tok, problems, args) -> tuple[list[dict], int]:
    """The teacher's samples that the verifier scores correct and that are well formed, at most `keep_per_prompt`
    per problem, as chat rows (the thought in reasoning_content) -> (rows, problems with one)."""
    k = args.samples
    params = dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    prompts = [tok.prompt_ids(pr) for pr in problems for _ in range(k)]
    reqs = generate_all(teacher, tok, prompts, [SamplingParams(seed=sample_seed(args.seed, 30_000, i), **params)
                                                for i in range(len(prompts))], max_batch=256)
    rows, kept = [], 0
    for i, pr in enumerate(problems):
        good = [r for r in reqs[i * k:(i + 1) * k]
                if R.format_reward(r.text, pr) and R.accuracy_reward(r.text, pr) >= 1][:args.keep_per_prompt]
        kept += bool(good)
        for r in good:
            thought = r.text.rsplit("</think>", 1)[0].strip()
            rows.append(trace_row(pr["question"], thought.splitlines(), R.extract_answer(r.text), family=pr["family"]))
    return rows, kept


def rejection_sample(args) -> list[dict]:
    """Sample and verify once (OUT/distill_data.jsonl; a resumed run reuses it), make the fresh student if asked,
    and point args.init at the student -> the chat rows to fine-tune on."""
    for name in ("prompts_per_family", "samples", "keep_per_prompt", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    d = init_distributed(args.device)
    out = Path(args.out)
    data_file = out / "distill_data.jsonl"
    teacher = from_pretrained(args.teacher, device=d.device)
    if teacher.tokenizer is None:
        raise NanoseekError(f"teacher {args.teacher} has no tokenizer.json")
    tok = teacher.tokenizer
    student_dir = Path(args.student) if args.student else None
    if student_dir is not None:
        if not (student_dir / "tokenizer.json").is_file():
            raise NanoseekError(f"student {student_dir} has no tokenizer.json")
        if not same_tokenizer(tok, Tokenizer.from_dir(student_dir)):
            raise NanoseekError(f"the teacher ({args.teacher}) and the student ({student_dir}) have different "
                                f"tokenizers; distil into a student that shares the teacher's tokenizer")
    if out.exists() and any(out.iterdir()) and not data_file.exists() and args.resume != "auto":
        raise NanoseekError(f"{out} is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    if not data_file.exists():
        if d.main:
            problems = problem_pool(args.families, args.prompts_per_family, args.seed, SEED_DISTILL)
            print(f"distill: {len(problems)} problems x {args.samples} teacher samples", flush=True)
            rows, kept = verified_rows(teacher, tok, problems, args)
            atomic_write(data_file, "".join(json.dumps(r) + "\n" for r in rows))
            print(f"kept {len(rows)} verified answers of {len(problems) * args.samples} samples ({kept}/"
                  f"{len(problems)} problems have one) -> {data_file}", flush=True)
        barrier()
    n_rows = sum(1 for l in data_file.read_text().splitlines() if l.strip())
    rows = read_rows(data_file) if n_rows else []
    if len(rows) < 2:
        raise NanoseekError(f"the teacher wrote only {len(rows)} verified answer(s): too few to train on (a better "
                            f"teacher, more --samples or more --prompts-per-family)")

    if student_dir is None and args.student_preset:
        student_dir = out / "student_init"
        if d.main and not (student_dir / "config.json").exists():
            margs = get_preset(args.student_preset)
            margs.vocab_size = max(margs.vocab_size, tok.vocab_size)
            torch.manual_seed(args.seed)
            save_pretrained(build_model(margs), student_dir, tokenizer=tok)
        barrier()
    args.init = str(student_dir or args.teacher)
    return rows
