"""`nanoseek rl`: GRPO with verifiable rewards (DeepSeekMath / R1), on one CPU or under torchrun.

Each step takes `--prompts` problems (reasoning-gym, seeded, in a per-epoch shuffled order), samples `--group`
completions of each from the engine (its latent KV cache and batched decoding; every sample has its own seed, derived
from the run's seed, the step and its index, so rollouts do not depend on batching or on resuming), scores them with
the reward functions (weighted sum; each logged by name), turns the rewards into group z-scores, and takes
`--mu` passes of PPO-clipped updates over them (`--minibatches` optimizer steps per pass), with a k3 KL penalty to the
frozen starting model when `--beta` > 0 (β = 0 keeps no reference). The loss normalisation is `--loss` (grpo, dr_grpo,
dapo; see rl/grpo.py); `--clip-eps-high` makes the clip asymmetric. The router bias and the MTP module stay as the checkpoint left them.

Every step writes a metrics.jsonl row: each reward's mean, accuracy, response length, KL, clip fraction, entropy,
the share of the step spent on rollouts; each eval writes the accuracy and a table of sample prompts, completions and
rewards (samples/step_N.md). Checkpoints hold the policy, the optimizer, the data position and the step; the reference
is written once to OUT/reference; `--resume auto` continues bit-identically (CPU).
"""

import contextlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nanoseek import cost
from nanoseek.checkpoint import atomic_write, save_pretrained
from nanoseek.config import ModelArgs
from nanoseek.data.chat import SEED_RL
from nanoseek.data.tasks import RL_FAMILIES, family_configs, problem_pool
from nanoseek.engine import SamplingParams, generate_all, sample_seed
from nanoseek.errors import NanoseekError
from nanoseek.model import from_pretrained
from nanoseek.parallel import barrier
from nanoseek.rl import grpo, rewards as R
from nanoseek.train.common import lr_factor
from nanoseek.train.run import Run, add_run_args, check_positive, load_init


def add_args(p) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--init", required=True, help="checkpoint to start from (normally the SFT model)")
    g.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, samples/, model/")
    g.add_argument("--families", nargs="*", default=list(RL_FAMILIES), help="reasoning-gym families to train on")
    g.add_argument("--problems", type=int, default=2000, help="problems per family in the training pool")
    g = p.add_argument_group("GRPO")
    g.add_argument("--prompts", type=int, default=16, help="problems per step (all ranks together)")
    g.add_argument("--group", type=int, default=8, help="completions per problem, G")
    g.add_argument("--max-new-tokens", type=int, default=128, help="longest completion")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout top-p")
    g.add_argument("--reward", action="append", default=None, metavar="NAME[=WEIGHT]",
                   help="a reward: accuracy, math, format or module:function, optionally =weight; repeat for more "
                        "(default: accuracy and format=0.1)")
    g.add_argument("--loss", default="grpo", choices=["grpo", "dr_grpo", "dapo"],
                   help="loss normalisation: grpo (per-sequence mean, R1), dr_grpo (constant, no std scaling), "
                        "dapo (token-level)")
    g.add_argument("--beta", type=float, default=0.001, help="k3 KL coefficient to the reference (0: no reference)")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip ε (lower side)")
    g.add_argument("--clip-eps-high", type=float, default=None, help="upper clip ε (DAPO's clip-higher; default ε)")
    g.add_argument("--mu", type=int, default=1, help="passes over each batch of rollouts (GRPO's μ)")
    g.add_argument("--minibatches", type=int, default=1, help="optimizer steps per pass")
    g.add_argument("--micro-batch", type=int, default=64, help="sequences per forward (gradient accumulation)")
    g = p.add_argument_group("optimisation and run")
    g.add_argument("--max-steps", type=int, default=60, help="GRPO steps")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate (constant after warmup)")
    g.add_argument("--warmup", type=int, default=0, help="warmup steps")
    g.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="seed of the problem pool, its order and the rollouts")
    g.add_argument("--eval-problems", type=int, default=64, help="problems per evaluation (temperature 0.6)")
    add_run_args(g, save_every=20, keep=2, eval_every=20, log_every=1)


def check_args(args) -> None:
    check_positive(args, ("problems", "prompts", "group", "max_new_tokens", "mu", "minibatches", "micro_batch",
                          "max_steps", "save_every", "keep", "eval_every", "eval_problems", "log_every"))
    if args.group < 2:
        raise NanoseekError("--group must be >= 2: advantages compare the completions of a group")
    if args.ep > 1:  # each rank's rollouts take their own number of decode steps; EP's all-to-alls need them in step
        raise NanoseekError("--ep is not supported by rl yet (rollouts of different lengths per rank would stall the "
                            "expert all-to-all); use data parallelism, or pretrain/sft with --ep")
    if args.beta < 0 or args.clip_eps <= 0 or (args.clip_eps_high is not None and args.clip_eps_high <= 0):
        raise NanoseekError("--beta must be >= 0 and the clip ε > 0")
    if not 0 <= args.temperature <= 10 or not 0 < args.top_p <= 1:
        raise NanoseekError("--temperature must be in [0, 10] and --top-p in (0, 1]")
    if args.temperature == 0:
        raise NanoseekError("--temperature 0 makes every completion of a group the same: nothing to learn from")


def rollout(model, tok, prompts: list[list[int]], group: int, params: dict, seeds: list[int]):
    """G completions of each prompt from the engine -> Requests (prompt-major: prompt i's are [i*G, (i+1)*G))."""
    return generate_all(model, tok, [p for p in prompts for _ in range(group)],
                        [SamplingParams(seed=s, **params) for s in seeds], max_batch=len(seeds))


def token_logprobs(model, ids: torch.Tensor, keep_logits: bool = False, temperature: float = 1.0):
    """Log-probabilities of ids[:, 1:] under the model at the sampling temperature (the policy that drew the rollouts
    is softmax(logits / T)), [N, L-1] (fp32); with the per-token entropy if asked."""
    logits = model(ids[:, :-1]).float() / temperature
    lp = F.log_softmax(logits, dim=-1)
    out = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(lp.exp() * lp).sum(-1) if keep_logits else None
    for m in getattr(model, "module", model).moe_layers():  # RL keeps the router bias: drop the load counts
        m.balance_loss = None
        m.tokens_per_expert.zero_()
    return out, ent


def batch_tensors(prompts, reqs, eos: int, device):
    """Right-padded sequences [N, L] (prompt + completion) and the completion mask over targets [N, L-1]."""
    seqs = [p + r.output for p, r in zip(prompts, reqs)]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), eos, dtype=torch.long)
    mask = torch.zeros(len(seqs), L - 1, dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, len(p) - 1:len(s) - 1] = True  # target t is token t+1: the completion's tokens
    return ids.to(device), mask.to(device)


def eval_accuracy(model, tok, problems, rewards, max_new_tokens: int, seed: int) -> tuple[float, list[dict]]:
    """Accuracy at R1's settings (T 0.6, top-p 0.95), one sample per problem; rows of prompt/completion/rewards."""
    prompts = [tok.prompt_ids(pr) for pr in problems]
    reqs = rollout(model, tok, prompts, 1, dict(max_tokens=max_new_tokens, temperature=0.6, top_p=0.95),
                   [sample_seed(seed, -1, i) for i in range(len(prompts))])
    rows = []
    for pr, r in zip(problems, reqs):
        rows.append({"family": pr["family"], "question": pr["question"], "expected": pr["answer"],
                     "completion": r.text, "accuracy": R.accuracy_reward(r.text, pr),
                     **{f"reward/{rw.name}": rw(r.text, pr) for rw in rewards}})
    return sum(r["accuracy"] >= 1 for r in rows) / max(1, len(rows)), rows


def sample_table(step: int, acc: float, rows: list[dict], n: int = 12) -> str:
    def cell(s) -> str:
        return str(s).replace("|", "\\|").replace("\n", "⏎ ")[:160]
    keys = [k for k in rows[0] if k.startswith("reward/")] if rows else []
    out = [f"# step {step}: accuracy {acc:.3f} on {len(rows)} held-out problems (T 0.6, top-p 0.95)", "",
           "| family | question | expected | completion | " + " | ".join(k[7:] for k in keys) + " |",
           "|---|---|---|---|" + "---|" * len(keys)]
    for r in rows[:n]:
        out.append(f"| {r['family']} | {cell(r['question'])} | {cell(r['expected'])} | {cell(r['completion'])} | "
                   + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    return "\n".join(out) + "\n"


def reference_model(run: Run, model, tok):
    """The frozen reference of the KL term: the starting weights, written once to OUT/reference so a resumed run
    compares against the same model (None when β = 0)."""
    if run.args.beta <= 0:
        return None
    if run.main and not (run.out / "reference" / "config.json").exists():
        save_pretrained(model, run.out / "reference", tokenizer=tok)
    barrier()
    ref = from_pretrained(run.out / "reference", device=run.d.device, dtype=torch.float32).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class ProblemOrder:
    """The step's problems, all ranks together, from the pool in a per-epoch shuffled order (state: epoch, cursor)."""

    def __init__(self, pool: list[dict], seed: int, state: dict | None = None):
        self.pool, self.seed = pool, seed
        self.state = dict(state or {"epoch": 0, "cursor": 0})

    def next(self, n: int) -> list[dict]:
        picked, st = [], self.state
        while len(picked) < n:
            order = np.random.default_rng([self.seed, st["epoch"]]).permutation(len(self.pool))
            take = order[st["cursor"]: st["cursor"] + n - len(picked)]
            picked += [self.pool[i] for i in take]
            st["cursor"] += len(take)
            if st["cursor"] >= len(self.pool):
                st["epoch"], st["cursor"] = st["epoch"] + 1, 0
        return picked


def score(rewards, reqs, problems, group: int, loss: str):
    """Each reward of each completion [R, N], their weighted sum [N], and the group advantages [N]."""
    per_reward = torch.zeros(len(rewards), len(reqs))
    for j, rw in enumerate(rewards):
        for i, r in enumerate(reqs):
            per_reward[j, i] = rw(r.text, problems[i // group])
    total = (torch.tensor([rw.weight for rw in rewards])[:, None] * per_reward).sum(0)
    adv = grpo.group_advantages(total.view(-1, group), scale=loss != "dr_grpo").flatten()
    return per_reward, total, adv


def policy_update(run: Run, policy, ref, ids, mask, adv) -> dict:
    """μ passes over the rollouts, `minibatches` optimizer steps each (PPO-clipped GRPO loss with the k3 KL to the
    reference), micro-batched -> sums over this rank's tokens (loss, kl, clipped, entropy, tokens, grad_norm)."""
    args, raw, T = run.args, run.model, run.args.temperature
    raw.eval()
    with torch.no_grad(), run.autocast():
        old = None
        if args.mu > 1 or args.minibatches > 1:
            old = torch.cat([token_logprobs(raw, ids[i:i + args.micro_batch], temperature=T)[0]
                             for i in range(0, len(ids), args.micro_batch)])
        ref_lp = torch.cat([token_logprobs(ref, ids[i:i + args.micro_batch], temperature=T)[0]
                            for i in range(0, len(ids), args.micro_batch)]) if ref is not None else None
    raw.train()
    stats = torch.zeros(6, device=run.d.device)  # loss, kl sum, clipped tokens, entropy sum, tokens, grad norm
    n_updates = 0
    mb_size = -(-len(ids) // args.minibatches)
    for p in range(args.mu):
        for b, mb in enumerate(torch.arange(len(ids)).split(mb_size)):
            mb_tokens = mask[mb].sum().clamp(min=1)
            micro_list = mb.split(args.micro_batch)
            for k, micro in enumerate(micro_list):
                sync = policy.no_sync if (run.d.enabled and k < len(micro_list) - 1) else contextlib.nullcontext
                with sync(), run.autocast():
                    lp, ent = token_logprobs(policy, ids[micro], keep_logits=True, temperature=T)
                    old_lp = old[micro] if old is not None else lp.detach()
                    loss, kl, clipped = grpo.grpo_loss(
                        lp, old_lp, ref_lp[micro] if ref_lp is not None else None, adv[micro], mask[micro],
                        args.beta, args.clip_eps, args.clip_eps_high, args.loss, args.max_new_tokens)
                    # the loss was normalised over this micro-batch: rescale to the minibatch's share
                    m = mask[micro]
                    scale = (m.sum() / mb_tokens) if args.loss == "dapo" else len(micro) / len(mb)
                    (loss * scale).backward()
                with torch.no_grad():
                    zero = torch.zeros((), device=stats.device)
                    stats += torch.stack([(loss.detach() * scale).float(), (kl * m).sum().float() if kl is not None
                                          else zero, (clipped & m).sum().float(), (ent * m).sum().float(),
                                          m.sum().float(), zero])
            last = p == args.mu - 1 and (b + 1) * mb_size >= len(ids)
            # RL keeps the router bias as the checkpoint left it
            out = run.optimizer_step({}, args.clip, update_bias=False, count=last)
            stats[5] += out["grad_norm"]
            n_updates += 1
    return dict(zip(("loss", "kl", "clipped", "entropy", "tokens", "grad_norm"), stats.tolist())) | \
        {"updates": n_updates}


def main(args) -> dict:
    check_args(args)
    rewards = R.build(args.reward or ["accuracy", "format=0.1"])
    run = Run(args, "rl")
    if args.prompts % run.d.world:
        raise NanoseekError(f"--prompts {args.prompts} must be a multiple of the number of ranks ({run.d.world})")
    init = Path(args.init)
    model, tok = load_init(init, run.d.device)
    pool = problem_pool(args.families, args.problems, args.seed, SEED_RL)
    eval_pool = problem_pool(args.families, max(1, -(-args.eval_problems // len(args.families))), args.seed,
                             SEED_RL + 50)[:args.eval_problems]
    for rw in rewards:  # a broken reward stops the run here, before anything is written
        gold = pool[0]
        rw.probe(f"{chr(10).join(gold['steps'])}\n</think>\n\n{gold['answer']}", gold)
    run.open({"init": str(init.resolve()), "families": family_configs(args.families), "problems": args.problems,
              "seed": args.seed, "prompts": args.prompts, "group": args.group, "loss": args.loss,
              "beta": args.beta, "rewards": [[rw.name, rw.weight] for rw in rewards], "lr": args.lr,
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "mu": args.mu,
              "minibatches": args.minibatches, "max_steps": args.max_steps})
    ref = reference_model(run, model, tok)
    state = run.resume(model)
    for rw in rewards:
        rw.errors = state.get("reward_errors", {}).get(rw.name, 0)
    for p in model.mtp.parameters():  # RL trains the main head only; the MTP module (a draft model) stays as it was
        p.requires_grad_(False)
    policy = run.start(model, args.max_steps, args.lr, 0.0, betas=(0.9, 0.99))
    order = ProblemOrder(pool, args.seed, state.get("order"))
    nonzero = state.get("nonzero", {rw.name: 0 for rw in rewards})
    totals = state.get("totals", {"rollout_tokens": 0, "rollout_seconds": 0.0, "train_tokens": 0})
    run.cost = lambda wall: ledger_fields(args, totals)
    if run.main:
        print(f"grpo: {len(pool):,} problems ({', '.join(args.families)}), {args.prompts} x G={args.group} "
              f"completions per step, loss {args.loss}, β {args.beta}, rewards "
              + ", ".join(f"{rw.name}×{rw.weight:g}" for rw in rewards), flush=True)
        if run.step == 0:
            evaluate(run, tok, eval_pool, rewards)
    while run.step < args.max_steps:
        row = grpo_step(run, policy, ref, tok, rewards, order, totals)
        for rw in rewards:
            nonzero[rw.name] += row.pop(f"nonzero/{rw.name}")
        run.log(row, show={"reward": f"{row['reward']:.3f}",
                           **({"acc": f"{row['accuracy']:.3f}"} if row["accuracy"] is not None else {}),
                           "len": f"{row['response_length']:.0f}",
                           **({"kl": f"{row['kl']:.4f}"} if row["kl"] is not None else {}),
                           "clip": f"{row['clip_fraction']:.3f}", "ent": f"{row['entropy']:.2f}",
                           "rollout": f"{100 * row['rollout_share']:.0f}%"})
        warn_rewards(run, rewards, row["reward_errors"], nonzero, args.prompts * args.group)
        if run.main and run.due(args.eval_every):
            evaluate(run, tok, eval_pool, rewards)
        if run.due(args.save_every):
            run.checkpoint({"order": dict(order.state), "nonzero": nonzero, "totals": totals,
                            "reward_errors": {rw.name: rw.errors for rw in rewards}})
    result = run.finish(tok)
    errs = {rw.name: rw.errors for rw in rewards if rw.errors}
    run.print(f"model: {run.out / 'model'}  ({run.step} GRPO steps, {result['wall_seconds'] / 60:.1f} min, rollouts "
              f"{100 * totals['rollout_seconds'] / max(result['wall_seconds'], 1e-9):.0f}% of the time)"
              + (f"; reward failures: {errs}" if errs else ""))
    return result


def grpo_step(run: Run, policy, ref, tok, rewards, order: ProblemOrder, totals: dict) -> dict:
    """One GRPO step: this rank's share of the step's problems rolled out (every sample seeded by its run seed, step
    and global index), scored, turned into group advantages, and the policy updated -> the step's metrics, by name,
    over all ranks (with each reward's count of nonzero scores on this rank, `nonzero/NAME`)."""
    args, d, t0 = run.args, run.d, time.time()
    lr = args.lr * lr_factor(run.step, args.max_steps, args.warmup, "constant", 1.0, 0.0)
    run.set_lr(lr)
    share = args.prompts // d.world
    mine = order.next(args.prompts)[d.rank * share:(d.rank + 1) * share]
    prompts = [tok.prompt_ids(pr) for pr in mine]
    first = d.rank * share * args.group
    seeds = [sample_seed(args.seed, run.step, first + i) for i in range(share * args.group)]
    reqs = rollout(run.model, tok, prompts, args.group,
                   dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p), seeds)
    t_roll, t1 = time.time() - t0, time.time()
    errors_before = {rw.name: rw.errors for rw in rewards}
    per_reward, total, adv = score(rewards, reqs, mine, args.group, args.loss)
    t_reward, t2 = time.time() - t1, time.time()
    ids, mask = batch_tensors([p for p in prompts for _ in range(args.group)], reqs, tok.eos_id, d.device)
    upd = policy_update(run, policy, ref, ids, mask, adv.to(d.device))
    t_train = time.time() - t2
    groups = total.view(-1, args.group)
    acc_j = next((j for j, rw in enumerate(rewards) if rw.name == "accuracy"), None)
    s = run.all_sum({"n": len(reqs), "reward": total.sum(), "length": sum(len(r.output) for r in reqs),
                     "truncated": sum(r.finish_reason == "length" for r in reqs),
                     "zero_std": (groups.std(1) == 0).sum(), "groups": len(groups),
                     "correct": (per_reward[acc_j] >= 1).sum() if acc_j is not None else 0,
                     **{f"reward/{rw.name}": per_reward[j].sum() for j, rw in enumerate(rewards)},
                     **{f"errors/{rw.name}": rw.errors - errors_before[rw.name] for rw in rewards},
                     **{f"train/{k}": v for k, v in upd.items()}})
    n, tokens = s["n"], s["train/tokens"]
    totals["rollout_tokens"] += int(s["length"])
    totals["rollout_seconds"] += t_roll
    totals["train_tokens"] += int(tokens) * args.mu
    dt = time.time() - t0
    return {"reward": s["reward"] / n, **{f"reward/{rw.name}": s[f"reward/{rw.name}"] / n for rw in rewards},
            "accuracy": s["correct"] / n if acc_j is not None else None,
            "response_length": s["length"] / n, "truncated": s["truncated"] / n,
            "zero_std_groups": s["zero_std"] / s["groups"], "loss": s["train/loss"] / s["train/updates"],
            "kl": s["train/kl"] / tokens if ref is not None else None, "clip_fraction": s["train/clipped"] / tokens,
            "entropy": s["train/entropy"] / tokens, "grad_norm": s["train/grad_norm"] / s["train/updates"],
            "lr": lr, "reward_errors": {rw.name: int(s[f"errors/{rw.name}"]) for rw in rewards},
            "rollout_seconds": t_roll, "reward_seconds": t_reward, "train_seconds": t_train, "step_seconds": dt,
            "rollout_share": t_roll / dt, "rollout_tokens_per_s": s["length"] / max(t_roll, 1e-9) / d.world,
            **{f"nonzero/{rw.name}": int(per_reward[j].ne(0).sum()) for j, rw in enumerate(rewards)}}


def evaluate(run: Run, tok, problems, rewards) -> None:
    """Held-out accuracy (T 0.6) to eval.jsonl, and a table of samples to samples/step_N.md."""
    acc, rows = eval_accuracy(run.model, tok, problems, rewards, run.args.max_new_tokens, run.args.seed)
    by_family = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r["accuracy"] >= 1)
    run.log({"accuracy": acc, "problems": len(rows), "by_family": {f: sum(v) / len(v) for f, v in by_family.items()}},
            log="eval")
    atomic_write(run.out / "samples" / f"step_{run.step:06d}.md", sample_table(run.step, acc, rows))
    run.write(f"step {run.step}: held-out accuracy {acc:.3f} ({len(rows)} problems, T 0.6)  "
              + "  ".join(f"{f} {sum(v) / len(v):.2f}" for f, v in by_family.items()))


def warn_rewards(run: Run, rewards, errors: dict, nonzero: dict, n: int) -> None:
    """A reward that failed this step, or that has been 0 for every completion so far: say so by name."""
    for rw in rewards:
        if errors[rw.name]:
            run.write(f"step {run.step}: reward {rw.name!r} failed on {errors[rw.name]} of {n} completions "
                      f"(scored 0): {rw.last_error}")
        if (run.step in (1, 5) or run.step % run.args.eval_every == 0) and nonzero[rw.name] == 0:
            run.write(f"step {run.step}: reward {rw.name!r} has been 0 for every completion so far: check the "
                      f"function and what the model writes (samples/ has examples)")


def ledger_fields(args, totals: dict) -> dict:
    """The stage's cost: a forward per rollout token, a training step per trained token and pass, and a forward per
    token for each extra no-grad pass (reference, π_old). Prompt tokens are left out (they are short here)."""
    fpt = cost.flops_per_token(ModelArgs.from_json(Path(args.init) / "config.json"), 256)
    extra = (args.beta > 0) + (args.mu > 1 or args.minibatches > 1)
    trained = totals["train_tokens"] / args.mu  # distinct completion tokens (each trained μ times)
    flops = fpt["forward"] * totals["rollout_tokens"] + (fpt["training"] * args.mu + fpt["forward"] * extra) * trained
    return {"rollout_tokens": totals["rollout_tokens"], "trained_tokens": totals["train_tokens"], "flops": flops,
            "rollout_seconds": totals["rollout_seconds"]}
