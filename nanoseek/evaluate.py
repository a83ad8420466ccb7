"""`nanoseek eval`: reasoning accuracy on held-out reasoning-gym problems, R1's way, and test-time scaling.

Problems come from seeds never used in pretraining, SFT or RL (`data/chat.py` SEED_EVAL), for the trained families
and at least one family never trained on (basic_arithmetic by default). For each problem k completions are sampled at
R1's settings (temperature 0.6, top-p 0.95) with the R1 template (the answer after `</think>`), scored by the
family's own `score_answer`:
  pass@1   the mean over the k samples (then over problems), with a 95% interval over problems
  pass@k   the unbiased estimator 1 − C(n−c, k)/C(n, k)
  maj@k    the majority answer of the k samples (cons@k)
Test-time scaling: the same problems with the thought capped at each of `--budgets` tokens (`--budget-samples` samples
each) by the engine's `thinking_budget`, the cut `nanoseek chat` and `serve` apply (a thought still open at the budget
is cut back to its last whole line, then closed, and the model answers); accuracy against the budget, tabulated and
plotted (tts.png); the unlimited point is the k samples above.
Writes OUT/tts.png, OUT/eval.md, then OUT/eval.json (with the per-problem counts, for paired comparisons), each
atomically: eval.json, written last, marks a finished evaluation.
"""

import io
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch

from nanoseek.checkpoint import atomic_write
from nanoseek.data.chat import SEED_EVAL
from nanoseek.data.tasks import RL_FAMILIES, family_configs, problem_pool
from nanoseek.engine import SamplingParams, generate_all, sample_seed
from nanoseek.errors import NanoseekError
from nanoseek.model import from_pretrained
from nanoseek.rl.grpo import pass_at_k
from nanoseek.rl.rewards import accuracy_reward, extract_answer

EVAL_HELDOUT = ("basic_arithmetic",)


def add_args(p) -> None:
    p.add_argument("--checkpoint", required=True, help="model directory (with its tokenizer)")
    p.add_argument("--out", required=True, help="directory for eval.json, eval.md and tts.png")
    p.add_argument("--families", nargs="*", default=list(RL_FAMILIES),
                   help="trained families to evaluate, or a run's families.json (its trained and held-out families "
                        "with their exact configs)")
    p.add_argument("--heldout", nargs="*", default=None,
                   help=f"families never trained on (default: {' '.join(EVAL_HELDOUT)}, or the families.json's)")
    p.add_argument("--problems", type=int, default=50, help="problems per family")
    p.add_argument("-k", "--samples", type=int, default=8, help="samples per problem (pass@1 is their mean)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (R1: 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p (R1: 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest completion")
    p.add_argument("--budgets", default="0,2,4,8,16,32,none",
                   help="thinking budgets (tokens) for the test-time scaling curve; 'none' is unlimited; '' skips it")
    p.add_argument("--budget-samples", type=int, default=2,
                   help="samples per problem at each finite budget (unlimited: the k samples)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problems and the samples")
    p.add_argument("--max-batch", type=int, default=256, help="sequences decoded together")
    p.add_argument("--label", default=None, help="name of this model in tables and plots (default: the directory)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")


def parse_budgets(s: str) -> list[int | None]:
    out = []
    for part in filter(None, (x.strip() for x in s.split(","))):
        if part.lower() == "none":
            out.append(None)
            continue
        try:
            b = int(part)
        except ValueError:
            raise NanoseekError(f"--budgets: {part!r} is not a number of tokens or 'none'") from None
        if b < 0:
            raise NanoseekError(f"--budgets: {b} is negative")
        out.append(b)
    return out


def majority(answers: list[str | None]) -> int | None:
    """Index of a sample carrying the most common answer (None when no sample answered)."""
    norm = [" ".join(a.split()).lower() if a else None for a in answers]
    counts = Counter(a for a in norm if a)
    if not counts:
        return None
    best = counts.most_common(1)[0][0]
    return norm.index(best)


def interval(xs: list[float]) -> float:
    """Half-width of the normal 95% interval of the mean of xs."""
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return 1.96 * math.sqrt(var / len(xs))


def sample(model, tok, problems, k: int, params: dict, seed: int, tag: int, max_batch: int):
    """k samples of each problem (R1's template), in problem order; sample i is seeded by (seed, tag, i)."""
    prompts = [tok.prompt_ids(pr) for pr in problems for _ in range(k)]
    return generate_all(model, tok, prompts, [SamplingParams(seed=sample_seed(seed, tag, i), **params)
                                              for i in range(len(prompts))], max_batch)


def evaluate(model, tok, problems, k: int, temperature: float, top_p: float, max_new_tokens: int, seed: int,
             budgets=(), budget_samples: int = 2, max_batch: int = 256, progress=print) -> dict:
    params = dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    t0 = time.time()
    reqs = sample(model, tok, problems, k, params, seed, 10_000, max_batch)
    per_problem = []
    for i, pr in enumerate(problems):
        rs = reqs[i * k:(i + 1) * k]
        scores = [accuracy_reward(r.text, pr) >= 1 for r in rs]
        maj = majority([extract_answer(r.text) for r in rs])
        per_problem.append({"family": pr["family"], "question": pr["question"], "answer": pr["answer"],
                            "correct": sum(scores), "k": k, "maj": bool(maj is not None and scores[maj]),
                            "tokens": sum(len(r.output) for r in rs) / k, "example": rs[0].text})
    gen_tokens = sum(len(r.output) for r in reqs)
    progress(f"  {len(reqs)} samples, {gen_tokens:,} tokens in {time.time() - t0:.0f}s")

    def summary(rows) -> dict:
        p1 = [r["correct"] / r["k"] for r in rows]
        return {"problems": len(rows), "pass@1": sum(p1) / len(p1), "pass@1_ci95": interval(p1),
                f"pass@{k}": sum(pass_at_k(r["k"], r["correct"], k) for r in rows) / len(rows),
                f"maj@{k}": sum(r["maj"] for r in rows) / len(rows),
                "response_tokens": sum(r["tokens"] for r in rows) / len(rows)}

    families = list(dict.fromkeys(r["family"] for r in per_problem))
    result = {"k": k, "temperature": temperature, "top_p": top_p, "seed": seed,
              "families": {f: summary([r for r in per_problem if r["family"] == f]) for f in families},
              "per_problem": per_problem, "tts": []}
    for b in budgets:
        t0 = time.time()
        if b is None:  # unlimited: the k samples above are already that, at the same settings
            rs, n = reqs, k
        else:  # the engine's thinking budget, as chat and serve apply it
            rs, n = sample(model, tok, problems, budget_samples, dict(params, thinking_budget=b), seed,
                           20_000 + 2 * b, max_batch), budget_samples  # (the tag kept from the two-pass cut)
        rows = []
        for i, pr in enumerate(problems):
            chunk = rs[i * n:(i + 1) * n]
            rows.append({"family": pr["family"], "acc": sum(accuracy_reward(r.text, pr) >= 1 for r in chunk) / n,
                         "thinking": sum(r.thinking_tokens for r in chunk) / n})
        entry = {"budget": b, "families": {}}
        for f in families:
            fr = [r for r in rows if r["family"] == f]
            entry["families"][f] = {"accuracy": sum(r["acc"] for r in fr) / len(fr),
                                    "thinking_tokens": sum(r["thinking"] for r in fr) / len(fr)}
        result["tts"].append(entry)
        progress(f"  budget {b if b is not None else 'none':>4}: " + "  ".join(
            f"{f} {v['accuracy']:.2f}" for f, v in entry["families"].items()) + f"  ({time.time() - t0:.0f}s)")
    return result


def group_mean(result: dict, families, key: str = "pass@1") -> float:
    vals = [result["families"][f][key] for f in families if f in result["families"]]
    return sum(vals) / len(vals) if vals else float("nan")


def pooled(result: dict, families) -> tuple[float, float]:
    """pass@1 over all problems of these families, and its 95% interval."""
    p1 = [r["correct"] / r["k"] for r in result["per_problem"] if r["family"] in families]
    return (sum(p1) / len(p1), interval(p1)) if p1 else (float("nan"), float("nan"))


def markdown(result: dict, label: str) -> str:
    k = result["k"]
    lines = [f"# Evaluation of {label}", "",
             f"k = {k} samples per problem at temperature {result['temperature']}, top-p {result['top_p']}; "
             f"problems from unseen seeds; held out (never trained): {', '.join(result['heldout']) or 'none'}.", "",
             f"| family | problems | pass@1 (±95%) | pass@{k} | maj@{k} | response tokens |",
             "|---|---|---|---|---|---|"]
    for f, s in result["families"].items():
        mark = " (held out)" if f in result["heldout"] else ""
        lines.append(f"| {f}{mark} | {s['problems']} | {s['pass@1']:.3f} ± {s['pass@1_ci95']:.3f} | "
                     f"{s[f'pass@{k}']:.3f} | {s[f'maj@{k}']:.3f} | {s['response_tokens']:.1f} |")
    for name, fams in (("trained families", result["trained"]), ("held-out families", result["heldout"])):
        if fams:
            m, ci = pooled(result, fams)
            lines.append(f"| **{name}** | {sum(result['families'][f]['problems'] for f in fams)} | "
                         f"**{m:.3f} ± {ci:.3f}** | {group_mean(result, fams, f'pass@{k}'):.3f} | "
                         f"{group_mean(result, fams, f'maj@{k}'):.3f} | |")
    if result["tts"]:
        fams = list(result["families"])
        lines += ["", "## Accuracy against the thinking budget", "",
                  "| budget (tokens) | " + " | ".join(fams) + " | mean thinking tokens |",
                  "|---|" + "---|" * (len(fams) + 1)]
        for e in result["tts"]:
            think = sum(v["thinking_tokens"] for v in e["families"].values()) / len(e["families"])
            lines.append(f"| {e['budget'] if e['budget'] is not None else 'unlimited'} | "
                         + " | ".join(f"{e['families'][f]['accuracy']:.3f}" for f in fams) + f" | {think:.1f} |")
    return "\n".join(lines) + "\n"


def plot_tts(results: list[tuple[str, dict]], path) -> None:
    """Accuracy (trained families' mean, and held-out) against the thinking budget, one line per model."""
    import matplotlib  # heavy, and only for plots
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, res in results:
        if not res["tts"]:
            continue
        finite = [e["budget"] for e in res["tts"] if e["budget"] is not None]
        top = (max(finite) * 2 if finite else 64)
        xs = [e["budget"] if e["budget"] is not None else top for e in res["tts"]]
        for name, fams, style in (("trained", res["trained"], "-o"), ("held out", res["heldout"], "--s")):
            if not fams:
                continue
            ys = [sum(e["families"][f]["accuracy"] for f in fams) / len(fams) for e in res["tts"]]
            ax.plot(xs, ys, style, label=f"{label}: {name}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("thinking budget (tokens; rightmost = unlimited)")
    ax.set_ylabel("accuracy (T 0.6)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("test-time scaling: accuracy against thinking budget")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())  # whole or not at all
    plt.close(fig)


def main(args) -> dict:
    if args.problems < 1 or args.samples < 1 or args.budget_samples < 1 or args.max_new_tokens < 1 \
            or args.max_batch < 1:
        raise NanoseekError("--problems, -k, --budget-samples, --max-new-tokens and --max-batch must be >= 1")
    if not 0 < args.temperature <= 10 or not 0 < args.top_p <= 1:
        raise NanoseekError("--temperature must be in (0, 10] and --top-p in (0, 1]")
    budgets = parse_budgets(args.budgets)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.heldout is None:
        args.heldout = list(EVAL_HELDOUT)
    overlap = set(args.families) & set(args.heldout)
    if overlap:
        raise NanoseekError(f"{sorted(overlap)} cannot be both trained and held out")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    model = from_pretrained(args.checkpoint, device=device)
    if model.tokenizer is None:
        raise NanoseekError(f"{args.checkpoint} has no tokenizer.json")
    configs = {**family_configs(args.heldout), **family_configs(args.families)}
    families = list(args.families) + list(args.heldout)
    problems = problem_pool({f: configs[f] for f in families}, args.problems, args.seed, SEED_EVAL)
    label = args.label or Path(args.checkpoint).resolve().parent.name
    print(f"eval {label}: {len(problems)} problems ({', '.join(families)}), k={args.samples}, "
          f"T {args.temperature}, top-p {args.top_p}", flush=True)
    t0 = time.time()
    result = evaluate(model, model.tokenizer, problems, args.samples, args.temperature, args.top_p,
                      args.max_new_tokens, args.seed, budgets, args.budget_samples, args.max_batch)
    result.update(label=label, checkpoint=str(args.checkpoint), trained=list(args.families),
                  heldout=list(args.heldout), configs=configs, seconds=time.time() - t0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if result["tts"]:
        plot_tts([(label, result)], out / "tts.png")
    atomic_write(out / "eval.md", markdown(result, label))
    atomic_write(out / "eval.json", json.dumps(result, indent=1) + "\n")  # last: the mark of a finished eval
    for name, fams in (("trained", result["trained"]), ("held-out", result["heldout"])):
        if fams:
            m, ci = pooled(result, fams)
            print(f"{name:9} pass@1 {m:.3f} ± {ci:.3f}   pass@{args.samples} "
                  f"{group_mean(result, fams, f'pass@{args.samples}'):.3f}   maj@{args.samples} "
                  f"{group_mean(result, fams, f'maj@{args.samples}'):.3f}")
    print(f"-> {out / 'eval.md'}" + (f", {out / 'tts.png'}" if result["tts"] else "") + f"  ({time.time() - t0:.0f}s)")
    return result
