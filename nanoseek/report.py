"""`nanoseek report RUN`: the speedrun's report — report.md and PNG plots — from what its stages wrote.

RUN holds pretrain/, sft/, rl/ (each with metrics.jsonl, eval.jsonl, ledger.json) and eval/sft/, eval/rl/ (eval.json).
Missing stages are skipped. The report has the loss curves, the reward curve, accuracy before and after RL (with the
paired difference on the same problems and its 95% interval), accuracy against the thinking budget, and the cost of
every stage.
"""

import io
import json
import math
import platform
import time
from pathlib import Path

from nanoseek import cost
from nanoseek.checkpoint import atomic_write
from nanoseek.config import ModelArgs
from nanoseek.errors import NanoseekError
from nanoseek.evaluate import group_mean, plot_tts, pooled


def read_jsonl(p: Path) -> list[dict]:
    if not p.is_file():
        return []
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]


def read_json(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.is_file() else None


def smooth(xs: list[float], w: int = 5) -> list[float]:
    out = []
    for i in range(len(xs)):
        win = [x for x in xs[max(0, i - w + 1):i + 1] if x is not None]
        out.append(sum(win) / len(win) if win else float("nan"))
    return out


def paired(a: dict, b: dict, families) -> tuple[float, float, int]:
    """Mean per-problem pass@1 difference b − a over the same problems, its 95% half-width, and the count."""
    pa = [r for r in a["per_problem"] if r["family"] in families]
    pb = [r for r in b["per_problem"] if r["family"] in families]
    if len(pa) != len(pb) or any(x["question"] != y["question"] for x, y in zip(pa, pb)):
        raise NanoseekError("the two evaluations used different problems: rerun them with the same --seed and "
                            "families")
    d = [y["correct"] / y["k"] - x["correct"] / x["k"] for x, y in zip(pa, pb)]
    if len(d) < 2:
        return float("nan"), float("nan"), len(d)
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
    return m, 1.96 * sd / math.sqrt(len(d)), len(d)


def save_png(fig, path: Path) -> None:
    """A figure written whole or not at all."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())


def plots(run: Path, out: Path, stages: dict, evals: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    out.mkdir(parents=True, exist_ok=True)
    # losses
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for ax, name in zip(axes, ("pretrain", "sft")):
        m, e = stages[name]["metrics"], stages[name]["eval"]
        if m:
            ax.plot([r["step"] for r in m], smooth([r["loss"] for r in m]), label="train (smoothed)")
        for key in ("val_loss", "heldout_loss"):
            pts = [(r["step"], r[key]) for r in e if r.get(key) is not None and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), "o-", label=key.replace("_", " "))
        ax.set_title(f"{name}: loss (nats/token)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out / "loss.png")
    plt.close(fig)
    made.append("loss.png")
    # rewards
    m, e = stages["rl"]["metrics"], stages["rl"]["eval"]
    if m:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
        steps = [r["step"] for r in m]
        for key in [k for k in m[0] if k.startswith("reward")] + ["accuracy"]:
            if m[0].get(key) is not None and not isinstance(m[0][key], dict):
                axes[0].plot(steps, smooth([r[key] for r in m]), label=key)
        if e:
            axes[0].plot([r["step"] for r in e], [r["accuracy"] for r in e], "ko-", label="held-out accuracy")
        axes[0].set_title("GRPO: rewards (smoothed) and accuracy")
        axes[0].set_xlabel("step")
        axes[0].grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        axes[1].plot(steps, smooth([r["response_length"] for r in m]), label="response length (tokens)")
        ax2 = axes[1].twinx()
        ax2.plot(steps, smooth([r["entropy"] for r in m]), "g", label="entropy (nats)")
        axes[1].set_title("GRPO: response length and entropy")
        axes[1].set_xlabel("step")
        axes[1].legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        save_png(fig, out / "reward.png")
        plt.close(fig)
        made.append("reward.png")
    if evals:
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
        fams = list(next(iter(evals.values()))["families"])
        width = 0.8 / len(evals)
        for i, (label, res) in enumerate(evals.items()):
            ys = [res["families"][f]["pass@1"] for f in fams]
            err = [res["families"][f]["pass@1_ci95"] for f in fams]
            ax.bar([j + i * width for j in range(len(fams))], ys, width, yerr=err, capsize=2, label=label)
        ax.set_xticks([j + width * (len(evals) - 1) / 2 for j in range(len(fams))])
        ax.set_xticklabels([f + ("*" if f in res["heldout"] else "") for f in fams], rotation=20, fontsize=8)
        ax.set_ylabel("pass@1 (T 0.6, ±95%)")
        ax.set_ylim(0, 1)
        ax.set_title("accuracy before and after RL (* never trained)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_png(fig, out / "accuracy.png")
        plt.close(fig)
        made.append("accuracy.png")
        if any(r["tts"] for r in evals.values()):
            plot_tts(list(evals.items()), out / "tts.png")
            made.append("tts.png")
    return made


def cell(text: str) -> str:
    """A sampled completion as one markdown table cell: lines kept as <br>, pipes escaped."""
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def side_by_side(before: dict, after: dict, labels=("SFT", "GRPO")) -> list[str]:
    """The first sample of the same held-out problem from two evaluations, one problem per trained family: the first
    whose count of right samples rose, else the family's first problem."""
    rows_b = {(r["family"], r["question"]): r for r in before["per_problem"]}
    L = [f"| problem | {labels[0]} | {labels[1]} |", "|---|---|---|"]
    for fam in before["trained"]:
        pairs = [(rows_b[(r["family"], r["question"])], r) for r in after["per_problem"]
                 if r["family"] == fam and (r["family"], r["question"]) in rows_b]
        if not pairs:
            continue
        b, a = next(((b, a) for b, a in pairs if a["correct"] > b["correct"]), pairs[0])
        L.append(f"| **{fam}**<br>{cell(b['question'])}<br>(answer {cell(b['answer'])}) | "
                 f"{cell(b['example'])}<br>*{b['correct']}/{b['k']} samples right* | "
                 f"{cell(a['example'])}<br>*{a['correct']}/{a['k']} samples right* |")
    return L


def param_count(model_dir: Path) -> str:
    """cost.param_summary of a checkpoint's config.json, '1.74M (0.86M active; 2.25M with MTP)' (the model built on
    the meta device: no memory, no weights read)."""
    try:
        return cost.param_summary(ModelArgs.from_json(model_dir / "config.json"))
    except Exception:  # a report never fails on a model it only describes
        return "?"


def distillation(run: Path, evals: dict) -> list[str]:
    """runs/distill_cpu.sh's comparison: the smaller student given SFT, SFT + GRPO, or distilled from the GRPO
    teacher, scored on the main job's held-out problems, with paired differences."""
    d = run / "distill"
    ways = {w: read_json(d / "eval" / w / "eval.json") for w in ("sft", "rl", "distilled")}
    ways = {w: r for w, r in ways.items() if r}
    if not ways:
        return []
    names = {"sft": "student, SFT", "rl": "student, SFT + GRPO", "distilled": "student, distilled from the teacher"}
    dirs = {"sft": d / "sft" / "model", "rl": d / "rl" / "model", "distilled": d / "distilled" / "sft" / "model"}
    rows = ([("teacher (the GRPO model above)", evals["rl"], run / "rl" / "model")] if "rl" in evals else []) + \
        [(names[w], r, dirs[w]) for w, r in ways.items()]
    L = ["## Distillation (runs/distill_cpu.sh)", "",
         "A smaller dense student (`tiny-dense`), pretrained on the same corpus, then fine-tuned three ways; all "
         "scored on the same held-out problems as the models above.", "",
         "| model | parameters | trained families pass@1 | held-out family pass@1 |", "|---|---|---|---|"]
    for name, r, path in rows:
        tm, tci = pooled(r, r["trained"])
        hm, hci = pooled(r, r["heldout"])
        L.append(f"| {name} | {param_count(path)} | {tm:.3f} ± {tci:.3f} | {hm:.3f} ± {hci:.3f} |")
    L.append("")
    for a, b in (("sft", "distilled"), ("rl", "distilled"), ("sft", "rl")):
        if a in ways and b in ways:
            m, ci, n = paired(ways[a], ways[b], ways[a]["trained"])
            L.append(f"- {names[b]} − {names[a]}, trained families: {m:+.3f} ± {ci:.3f} (paired, {n} problems)")
    return L + [""]


def build(run) -> str:
    run = Path(run)
    if not run.is_dir():
        raise NanoseekError(f"{run} is not a directory")
    stages = {s: {"metrics": read_jsonl(run / s / "metrics.jsonl"), "eval": read_jsonl(run / s / "eval.jsonl"),
                  "ledger": read_json(run / s / "ledger.json")} for s in ("pretrain", "sft", "rl")}
    evals = {label: r for label, r in ((l, read_json(run / "eval" / l / "eval.json")) for l in ("sft", "rl")) if r}
    if not any(s["ledger"] for s in stages.values()) and not evals:
        raise NanoseekError(f"{run} holds no stage output (pretrain/, sft/, rl/, eval/)")
    made = plots(run, run / "plots", stages, evals)
    L = [f"# nanoseek speedrun report", "",
         f"{time.strftime('%Y-%m-%d %H:%M')} · {platform.node()} · {platform.processor() or platform.machine()} · "
         f"run `{run}`", ""]
    fam_file = run / "families.json"
    if fam_file.is_file():
        spec = json.loads(fam_file.read_text())
        L += ["Task families (`families.json`, the reasoning-gym configs every stage reads): trained "
              + "; ".join(f"`{f}` {json.dumps(c)}" for f, c in spec.get("trained", {}).items())
              + "; never trained, only scored: "
              + ("; ".join(f"`{f}` {json.dumps(c)}" for f, c in spec.get("heldout", {}).items()) or "none") + ".", ""]
    # ---- results ----
    if evals:
        k = next(iter(evals.values()))["k"]
        L += ["## Reasoning accuracy", "",
              f"pass@1 = mean over k = {k} samples per problem (temperature 0.6, top-p 0.95), problems from seeds never "
              f"trained on; ± is the 95% interval over problems.", "",
              f"| model | trained families pass@1 | pass@{k} | maj@{k} | held-out family pass@1 | response tokens |",
              "|---|---|---|---|---|---|"]
        for label, r in evals.items():
            tm, tci = pooled(r, r["trained"])
            hm, hci = pooled(r, r["heldout"])
            toks = sum(s["response_tokens"] for s in r["families"].values()) / len(r["families"])
            L.append(f"| {label} | {tm:.3f} ± {tci:.3f} | {group_mean(r, r['trained'], f'pass@{k}'):.3f} | "
                     f"{group_mean(r, r['trained'], f'maj@{k}'):.3f} | {hm:.3f} ± {hci:.3f} | {toks:.1f} |")
        if "sft" in evals and "rl" in evals:
            a, b = evals["sft"], evals["rl"]
            rl_fams = ((read_json(run / "rl" / "run.json") or {}).get("args") or {}).get("families") or []
            rl_fams = [f for f in rl_fams if f in a["trained"]]
            groups = [("trained families", a["trained"]), ("held-out family", a["heldout"])]
            if rl_fams and rl_fams != a["trained"]:  # GRPO trained on a subset of the SFT families
                groups.insert(0, (f"families trained by GRPO ({', '.join(rl_fams)})", rl_fams))
            for name, fams in groups:
                if fams:
                    m, ci, n = paired(a, b, fams)
                    L.append("")
                    L.append(f"**GRPO − SFT, {name}: {m:+.3f} ± {ci:.3f}** pass@1 (paired over the same {n} "
                             f"problems, 95% interval)")
        L += ["", "Per family:", "", "| family | " + " | ".join(evals) + " |", "|---|" + "---|" * len(evals)]
        for f in next(iter(evals.values()))["families"]:
            L.append(f"| {f}{' (held out)' if f in next(iter(evals.values()))['heldout'] else ''} | " + " | ".join(
                f"{r['families'][f]['pass@1']:.3f} ± {r['families'][f]['pass@1_ci95']:.3f}" for r in evals.values())
                + " |")
        L += ["", "![accuracy](plots/accuracy.png)", ""]
        if any(r["tts"] for r in evals.values()):
            L += ["## Test-time scaling: accuracy against the thinking budget", "",
                  "The engine's `thinking_budget`, as `nanoseek chat` and `serve` apply it: the thought is "
                  "sampled up to `budget` tokens; one still open there is cut back to its last whole line "
                  "(thinking tokens: those kept), closed, and the model answers. Unlimited: the k samples above.",
                  "",
                  "| budget | " + " | ".join(f"{l}: trained | {l}: held out | {l}: thinking tokens"
                                             for l in evals) + " |",
                  "|---|" + "---|---|---|" * len(evals)]
            budgets = [e["budget"] for e in next(iter(evals.values()))["tts"]]
            for i, bgt in enumerate(budgets):
                cells = []
                for r in evals.values():
                    e = r["tts"][i]["families"]
                    tr = sum(e[f]["accuracy"] for f in r["trained"]) / len(r["trained"])
                    ho = sum(e[f]["accuracy"] for f in r["heldout"]) / len(r["heldout"]) if r["heldout"] else \
                        float("nan")
                    th = sum(v["thinking_tokens"] for v in e.values()) / len(e)
                    cells.append(f"{tr:.3f} | {ho:.3f} | {th:.1f}")
                L.append(f"| {bgt if bgt is not None else 'unlimited'} | " + " | ".join(cells) + " |")
            L += ["", "![test-time scaling](plots/tts.png)", ""]
        if "sft" in evals and "rl" in evals and all("example" in r for r in evals["sft"]["per_problem"][:1]):
            L += ["## Thoughts before and after RL", "",
                  "The first of the k samples (same seed) for the same held-out problem, one problem per trained "
                  "family: the first whose count of right samples rose under GRPO, else the family's first.", ""]
            L += side_by_side(evals["sft"], evals["rl"]) + [""]
    L += distillation(run, evals)
    # ---- training curves ----
    L += ["## Training", ""]
    p = stages["pretrain"]
    if p["metrics"]:
        last = p["eval"][-1] if p["eval"] else {}
        base = (p["ledger"] or {}).get("unigram_baseline_nats")
        L.append(f"Pretraining: {len(p['metrics'])} steps, final train loss {p['metrics'][-1]['loss']:.3f}"
                 + (f", validation {last['val_loss']:.3f}" if last.get("val_loss") is not None else "")
                 + (f", unseen family {last['heldout_loss']:.3f}" if last.get("heldout_loss") is not None else "")
                 + (f" (unigram baseline {base:.3f})" if base else "") + " nats/token.")
    s = stages["sft"]
    if s["metrics"]:
        last = s["eval"][-1] if s["eval"] else {}
        L.append(f"SFT: {len(s['metrics'])} steps, final loss {s['metrics'][-1]['loss']:.3f}"
                 + (f", validation {last['val_loss']:.3f}" if last.get("val_loss") is not None else "") + ".")
    r = stages["rl"]
    if r["metrics"]:
        m = r["metrics"]
        head, tail = m[:max(1, len(m) // 5)], m[-max(1, len(m) // 5):]

        def avg(rows, key):
            v = [x[key] for x in rows if x.get(key) is not None]
            return sum(v) / len(v) if v else float("nan")
        L.append(f"GRPO: {len(m)} steps; reward {avg(head, 'reward'):.3f} → {avg(tail, 'reward'):.3f}, rollout "
                 f"accuracy {avg(head, 'accuracy'):.3f} → {avg(tail, 'accuracy'):.3f}, response length "
                 f"{avg(head, 'response_length'):.1f} → {avg(tail, 'response_length'):.1f} tokens, entropy "
                 f"{avg(head, 'entropy'):.2f} → {avg(tail, 'entropy'):.2f} (first and last fifth of the steps); "
                 f"rollouts took {100 * avg(m, 'rollout_share'):.0f}% of a step at "
                 f"{avg(m, 'rollout_tokens_per_s'):,.0f} tokens/s.")
        if r["eval"]:
            L.append("Held-out accuracy during GRPO (one sample per problem): " + ", ".join(
                f"step {e['step']}: {e['accuracy']:.3f}" for e in r["eval"]) + ".")
    L += ["", "![losses](plots/loss.png)", ""] + (["![rewards](plots/reward.png)", ""] if "reward.png" in made else [])
    # ---- cost ----
    L += ["## Cost", "", "| stage | wall time | FLOPs | device-hours | cost |", "|---|---|---|---|---|"]
    total_s = total_h = total_usd = total_f = 0.0
    for name, st in stages.items():
        lg = st["ledger"]
        if not lg:
            continue
        fl = lg.get("training_flops", lg.get("flops", 0.0))
        L.append(f"| {name} | {lg['wall_seconds'] / 60:.1f} min | {fl:.3g} | {lg['device_hours']:.4f} | "
                 f"${lg['usd']:.4f} |")
        total_s += lg["wall_seconds"]
        total_h += lg["device_hours"]
        total_usd += lg["usd"]
        total_f += fl
    for label, res in evals.items():
        sec = res.get("seconds", 0.0)
        L.append(f"| eval {label} | {sec / 60:.1f} min | | {sec / 3600:.4f} | |")
        total_s += sec
    L += [f"| **total** | **{total_s / 60:.1f} min** | {total_f:.3g} | {total_h:.4f} | ${total_usd:.4f} |", "",
          "Device-hours are priced at the ledger's $/device-hour (`--usd-per-hour`, default $2, DeepSeek's H800 "
          "rental rate).", "",
          "## Use it", "", "```", f"nanoseek chat --checkpoint {run / 'rl' / 'model'}",
          f"nanoseek serve {run / 'rl' / 'model'}", "```", ""]
    text = "\n".join(L)
    atomic_write(run / "report.md", text)
    return text


def main(args) -> None:
    build(args.run)
    print(f"-> {Path(args.run) / 'report.md'} and {Path(args.run) / 'plots'}/")
