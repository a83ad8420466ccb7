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
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.errors import NanoseekError

RL_FAMILIES = ("chain_sum", "simple_equations", "letter_counting", "count_bits")


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
    g.add_argument("--save-every", type=int, default=20, help="write a checkpoint every K steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    g.add_argument("--resume", choices=["auto", "never"], default="never",
                   help="auto: continue from the newest complete checkpoint in OUT (or start if there is none)")
    g.add_argument("--eval-every", type=int, default=20, help="held-out accuracy and a sample table every K steps")
    g.add_argument("--eval-problems", type=int, default=64, help="problems per evaluation (temperature 0.6)")
    g.add_argument("--log-every", type=int, default=1, help="plain progress lines every K steps when not a TTY")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--usd-per-hour", type=float, default=2.0, help="price of one device-hour for the ledger")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    import argparse
    g.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: die after step N


def check_args(args) -> None:
    for name in ("problems", "prompts", "group", "max_new_tokens", "mu", "minibatches", "micro_batch", "max_steps",
                 "save_every", "keep", "eval_every", "eval_problems", "log_every"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        raise NanoseekError("--group must be >= 2: advantages compare the completions of a group")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise NanoseekError(f"--lr must be a positive number, got {args.lr}")
    if args.beta < 0 or args.clip_eps <= 0 or (args.clip_eps_high is not None and args.clip_eps_high <= 0):
        raise NanoseekError("--beta must be >= 0 and the clip ε > 0")
    if not 0 <= args.temperature <= 10 or not 0 < args.top_p <= 1:
        raise NanoseekError("--temperature must be in [0, 10] and --top-p in (0, 1]")
    if args.temperature == 0:
        raise NanoseekError("--temperature 0 makes every completion of a group the same: nothing to learn from")


def problem_pool(families, n: int, seed: int, offset: int) -> list[dict]:
    """Problems with reasoning-gym's own entry (what score_answer needs); family i uses seed*1000 + offset + i."""
    from nanoseek.data.tasks import check_families, generate
    check_families(families)
    pool = []
    for i, f in enumerate(families):
        pool += generate(f, n, seed * 1000 + offset + i)
    return pool


def prompt_ids(tok, problem: dict) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": problem["question"].strip()}])


def sample_seed(seed: int, step: int, index: int) -> int:
    return (((seed * 1_000_003) + step) * 1_000_033 + index) % (2**62)


def rollout(model, tok, prompts: list[list[int]], group: int, params: dict, seeds: list[int], max_batch: int):
    """G completions of each prompt from the engine -> Requests (prompt-major: prompt i's are [i*G, (i+1)*G))."""
    from nanoseek.engine import Engine, SamplingParams
    max_len = max(len(p) for p in prompts) + params["max_tokens"] + 1
    engine = Engine(model, tok, max_batch=max_batch, max_len=min(max_len, model.args.max_position_embeddings))
    sps = [SamplingParams(seed=s, **params) for s in seeds]
    return engine.generate([p for p in prompts for _ in range(group)], sps)


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
    from nanoseek.rl.rewards import accuracy_reward
    prompts = [prompt_ids(tok, pr) for pr in problems]
    reqs = rollout(model, tok, prompts, 1, dict(max_tokens=max_new_tokens, temperature=0.6, top_p=0.95),
                   [sample_seed(seed, -1, i) for i in range(len(prompts))], max_batch=len(prompts))
    rows = []
    for pr, r in zip(problems, reqs):
        rows.append({"family": pr["family"], "question": pr["question"], "expected": pr["answer"],
                     "completion": r.text, "accuracy": accuracy_reward(r.text, pr),
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


def main(args) -> dict:
    from nanoseek.checkpoint import save_pretrained
    from nanoseek.data.chat import SEED_RL
    from nanoseek.parallel import all_reduce, barrier, init_distributed, wrap
    from nanoseek.rl import grpo, rewards as R
    from nanoseek.train.common import (Metrics, Progress, autocast_for, gather_full, load_optimizer_tensors,
                                       lr_factor, param_groups, resume_latest, rng_state, save_training_checkpoint)
    from nanoseek.train.pretrain import prepare_run_dir
    from nanoseek.train.sft import load_init
    import numpy as np

    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rewards = R.build(args.reward or ["accuracy", "format=0.1"])
    d = init_distributed(args.device)
    if args.prompts % d.world:
        raise NanoseekError(f"--prompts {args.prompts} must be a multiple of the number of ranks ({d.world})")
    out, init = Path(args.out), Path(args.init)
    model, tok = load_init(init, d.device)
    pool = problem_pool(args.families, args.problems, args.seed, SEED_RL)
    eval_pool = problem_pool(args.families, max(1, -(-args.eval_problems // len(args.families))), args.seed,
                             SEED_RL + 50)[:args.eval_problems]
    for rw in rewards:  # a broken reward stops the run here, before anything is written
        gold = next(p for p in pool)
        rw.probe(f"{chr(10).join(gold['steps'])}\n</think>\n\n{gold['answer']}", gold)
    rw_acc = next((rw for rw in rewards if rw.name == "accuracy"), None)
    identity = {"init": str(init.resolve()), "families": list(args.families), "problems": args.problems,
                "seed": args.seed, "prompts": args.prompts, "group": args.group, "loss": args.loss,
                "beta": args.beta, "rewards": [[rw.name, rw.weight] for rw in rewards], "lr": args.lr,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "mu": args.mu,
                "minibatches": args.minibatches, "max_steps": args.max_steps}
    resuming = prepare_run_dir(out, identity, args.resume, d.main)
    barrier()  # every rank has decided before the main one writes run.json
    if d.main and not resuming:
        (out / "run.json").write_text(json.dumps({"identity": identity, "args": vars(args)}, indent=1, default=str))
    (out / "samples").mkdir(parents=True, exist_ok=True) if d.main else None

    # the reference: the starting weights, frozen, written once so a resumed run compares against the same model
    ref = None
    if args.beta > 0:
        from nanoseek.checkpoint import from_pretrained
        if d.main and not (out / "reference" / "config.json").exists():
            save_pretrained(model, out / "reference", tokenizer=tok)
        barrier()
        ref = from_pretrained(out / "reference", device=d.device, dtype=torch.float32).eval()
        for p in ref.parameters():
            p.requires_grad_(False)

    step, state, opt_state = 0, {}, None
    if resuming:
        ck, step, state, opt_state = resume_latest(out, model, d.device)
        if ck is not None:
            for rw in rewards:
                rw.errors = state.get("reward_errors", {}).get(rw.name, 0)
            if d.main:
                print(f"resumed from {ck} (step {step})", flush=True)
    raw = model
    for p in raw.mtp.parameters():  # RL trains the main head only; the MTP module (a draft model) stays as it was
        p.requires_grad_(False)
    policy = wrap(raw, d, "ddp")
    opt = torch.optim.AdamW(param_groups(raw, 0.0), lr=args.lr, betas=(0.9, 0.99), eps=1e-8,
                            fused=d.device.type == "cuda")
    if opt_state is not None:
        load_optimizer_tensors(opt, *opt_state)
    autocast = autocast_for(d.device)
    order_state = state.get("order", {"epoch": 0, "cursor": 0})
    nonzero = state.get("nonzero", {rw.name: 0 for rw in rewards})
    wall_before = state.get("wall_seconds", 0.0)
    totals = state.get("totals", {"rollout_tokens": 0, "rollout_seconds": 0.0, "train_tokens": 0})
    metrics, eval_log = (Metrics(out / n, resume_step=step if resuming else None, enabled=d.main)
                         for n in ("metrics.jsonl", "eval.jsonl"))

    def next_problems() -> list[dict]:
        """The step's problems, all ranks together, in a per-epoch shuffled order (state: epoch, cursor)."""
        picked = []
        while len(picked) < args.prompts:
            order = np.random.default_rng([args.seed, order_state["epoch"]]).permutation(len(pool))
            take = order[order_state["cursor"]: order_state["cursor"] + args.prompts - len(picked)]
            picked += [pool[i] for i in take]
            order_state["cursor"] += len(take)
            if order_state["cursor"] >= len(pool):
                order_state["epoch"], order_state["cursor"] = order_state["epoch"] + 1, 0
        return picked

    def evaluate(step_: int) -> None:
        acc, rows = eval_accuracy(raw, tok, eval_pool, rewards, args.max_new_tokens, args.seed)
        by_family = {}
        for r in rows:
            by_family.setdefault(r["family"], []).append(r["accuracy"] >= 1)
        eval_log.write({"step": step_, "accuracy": acc, "problems": len(rows),
                        "by_family": {f: sum(v) / len(v) for f, v in by_family.items()}})
        (out / "samples" / f"step_{step_:06d}.md").write_text(sample_table(step_, acc, rows))
        progress.write(f"step {step_}: held-out accuracy {acc:.3f} ({len(rows)} problems, T 0.6)  "
                       + "  ".join(f"{f} {sum(v) / len(v):.2f}" for f, v in by_family.items()))

    progress = Progress(args.max_steps, step, d.main, args.log_every, desc="grpo")
    if d.main:
        print(f"grpo: {len(pool):,} problems ({', '.join(args.families)}), {args.prompts} x G={args.group} "
              f"completions per step, loss {args.loss}, β {args.beta}, rewards "
              + ", ".join(f"{rw.name}×{rw.weight:g}" for rw in rewards), flush=True)
        if step == 0:
            evaluate(0)
    t_start = time.time()
    gen_params = dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    while step < args.max_steps:
        t0 = time.time()
        lr = args.lr * lr_factor(step, args.max_steps, args.warmup, "constant", 1.0, 0.0)
        for g in opt.param_groups:
            g["lr"] = lr
        # ---- rollouts: this rank's share of the step's problems ----
        problems = next_problems()
        share = args.prompts // d.world
        mine = problems[d.rank * share:(d.rank + 1) * share]
        prompts = [prompt_ids(tok, pr) for pr in mine]
        first = d.rank * share * args.group
        seeds = [sample_seed(args.seed, step, first + i) for i in range(share * args.group)]
        reqs = rollout(raw, tok, prompts, args.group, gen_params, seeds, max_batch=len(seeds))
        t_roll = time.time() - t0
        # ---- rewards ----
        t1 = time.time()
        errors_before = {rw.name: rw.errors for rw in rewards}
        per_reward = torch.zeros(len(rewards), len(reqs))
        for j, rw in enumerate(rewards):
            for i, r in enumerate(reqs):
                per_reward[j, i] = rw(r.text, mine[i // args.group])
        total = (torch.tensor([rw.weight for rw in rewards])[:, None] * per_reward).sum(0)
        adv = grpo.group_advantages(total.view(-1, args.group), scale=args.loss != "dr_grpo").flatten()
        t_reward = time.time() - t1
        # ---- training: μ passes, `minibatches` optimizer steps each ----
        t2 = time.time()
        seq_prompts = [p for p in prompts for _ in range(args.group)]
        ids, mask = batch_tensors(seq_prompts, reqs, tok.eos_id, d.device)
        adv = adv.to(d.device)
        T = args.temperature
        raw.eval()
        with torch.no_grad(), autocast():
            old = None
            if args.mu > 1 or args.minibatches > 1:
                old = torch.cat([token_logprobs(raw, ids[i:i + args.micro_batch], temperature=T)[0]
                                 for i in range(0, len(ids), args.micro_batch)])
            ref_lp = torch.cat([token_logprobs(ref, ids[i:i + args.micro_batch], temperature=T)[0]
                                for i in range(0, len(ids), args.micro_batch)]) if ref is not None else None
        raw.train()
        stats = torch.zeros(6, device=d.device)  # loss, kl sum, clipped tokens, entropy sum, tokens, grad norm
        n_updates = 0
        perm = torch.arange(len(ids))
        mb_size = -(-len(ids) // args.minibatches)
        for _ in range(args.mu):
            for mb in perm.split(mb_size):
                mb_tokens = mask[mb].sum().clamp(min=1)
                micro_list = mb.split(args.micro_batch)
                for k, micro in enumerate(micro_list):
                    sync = policy.no_sync if (d.enabled and k < len(micro_list) - 1) else contextlib.nullcontext
                    with sync(), autocast():
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
                        stats[0] += loss.detach().float() * scale
                        stats[1] += (kl * m).sum() if kl is not None else 0.0
                        stats[2] += (clipped & m).sum()
                        stats[3] += (ent * m).sum()
                        stats[4] += m.sum()
                gn = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.clip if args.clip > 0 else float("inf"))
                if torch.isfinite(gn):
                    opt.step()
                opt.zero_grad(set_to_none=True)
                stats[5] += gn.detach().float()
                n_updates += 1
        step += 1
        t_train = time.time() - t2
        # ---- metrics (summed over ranks) ----
        out_lens = torch.tensor([len(r.output) for r in reqs], dtype=torch.float32)
        groups = total.view(-1, args.group)
        vec = torch.cat([per_reward.sum(1), total.sum().reshape(1), out_lens.sum().reshape(1),
                         torch.tensor([float(len(reqs)), float(sum(r.finish_reason == "length" for r in reqs)),
                                       float((groups.std(1) == 0).sum()), float(len(groups))]),
                         (per_reward[[j for j, rw in enumerate(rewards) if rw is rw_acc]] >= 1).float().sum(1)
                         if rw_acc is not None else torch.zeros(1),
                         torch.tensor([float(rw.errors - errors_before[rw.name]) for rw in rewards])]).to(d.device)
        all_reduce(vec)
        all_reduce(stats)
        n_rw = len(rewards)
        n = vec[n_rw + 2].item()
        for j, rw in enumerate(rewards):
            nonzero[rw.name] += int(per_reward[j].ne(0).sum())
        roll_tokens = int(vec[n_rw + 1].item())
        totals["rollout_tokens"] += roll_tokens
        totals["rollout_seconds"] += t_roll
        totals["train_tokens"] += int(stats[4].item()) * args.mu
        dt = time.time() - t0
        row = {"step": step, "reward": vec[n_rw].item() / n,
               **{f"reward/{rw.name}": vec[j].item() / n for j, rw in enumerate(rewards)},
               "accuracy": vec[n_rw + 6].item() / n if rw_acc is not None else None,
               "response_length": vec[n_rw + 1].item() / n, "truncated": vec[n_rw + 3].item() / n,
               "zero_std_groups": vec[n_rw + 4].item() / vec[n_rw + 5].item(),
               "loss": stats[0].item() / (n_updates * d.world),
               "kl": stats[1].item() / stats[4].item() if ref is not None else None,
               "clip_fraction": stats[2].item() / stats[4].item(), "entropy": stats[3].item() / stats[4].item(),
               "grad_norm": stats[5].item() / (n_updates * d.world), "lr": lr,
               "reward_errors": {rw.name: int(vec[n_rw + 7 + j].item()) for j, rw in enumerate(rewards)},
               "rollout_seconds": t_roll, "reward_seconds": t_reward, "train_seconds": t_train, "step_seconds": dt,
               "rollout_share": t_roll / dt, "rollout_tokens_per_s": roll_tokens / max(t_roll, 1e-9) / d.world}
        metrics.write(row)
        progress.update(step, {"reward": f"{row['reward']:.3f}",
                               **({"acc": f"{row['accuracy']:.3f}"} if row["accuracy"] is not None else {}),
                               "len": f"{row['response_length']:.0f}",
                               **({"kl": f"{row['kl']:.4f}"} if row["kl"] is not None else {}),
                               "clip": f"{row['clip_fraction']:.3f}", "ent": f"{row['entropy']:.2f}",
                               "rollout": f"{100 * row['rollout_share']:.0f}%"})
        for j, rw in enumerate(rewards):
            if row["reward_errors"][rw.name]:
                progress.write(f"step {step}: reward {rw.name!r} failed on {row['reward_errors'][rw.name]} of "
                               f"{int(n)} completions (scored 0): {rw.last_error}")
            if step in (1, 5) or step % args.eval_every == 0:
                if nonzero[rw.name] == 0:
                    progress.write(f"step {step}: reward {rw.name!r} has been 0 for every completion so far: check "
                                   f"the function and what the model writes (samples/ has examples)")
        if d.main and (step % args.eval_every == 0 or step == args.max_steps):
            evaluate(step)
        if step % args.save_every == 0 or step == args.max_steps:
            st = {"order": dict(order_state), "rng": rng_state(), "nonzero": nonzero, "totals": totals,
                  "reward_errors": {rw.name: rw.errors for rw in rewards},
                  "wall_seconds": wall_before + time.time() - t_start}
            full = gather_full(raw, opt)
            if d.main:
                save_training_checkpoint(out, step, raw, full, st, tok, args.keep)
                ledger(out, step, st["wall_seconds"], totals, d, args)
            barrier()
        if args.stop_after == step:  # tests: an interruption right after this step
            raise SystemExit(3)
    progress.close()
    wall = wall_before + time.time() - t_start
    result = ledger(out, step, wall, totals, d, args)
    if d.main:
        save_pretrained(raw, out / "model", tokenizer=tok, state_dict=gather_full(raw, opt)["model"])
        errs = {rw.name: rw.errors for rw in rewards if rw.errors}
        print(f"model: {out / 'model'}  ({step} GRPO steps, {wall / 60:.1f} min, rollouts "
              f"{100 * totals['rollout_seconds'] / max(wall, 1e-9):.0f}% of the time)"
              + (f"; reward failures: {errs}" if errs else ""))
    barrier()
    return result


def ledger(out: Path, step: int, wall: float, totals: dict, d, args) -> dict:
    """The stage's cost: a forward per rollout token, a training step per trained token and pass, and a forward per
    token for each extra no-grad pass (reference, π_old). Prompt tokens are left out (they are short here)."""
    from nanoseek import cost
    from nanoseek.config import ModelArgs
    margs = ModelArgs.from_json(Path(args.init) / "config.json")
    fpt = cost.flops_per_token(margs, 256)
    extra = (args.beta > 0) + (args.mu > 1 or args.minibatches > 1)
    trained = totals["train_tokens"] / args.mu  # distinct completion tokens (each trained μ times)
    flops = fpt["forward"] * totals["rollout_tokens"] + (fpt["training"] * args.mu + fpt["forward"] * extra) * trained
    hours = wall * d.world / 3600
    row = {"stage": "rl", "steps": step, "rollout_tokens": totals["rollout_tokens"],
           "trained_tokens": totals["train_tokens"], "flops": flops, "wall_seconds": wall,
           "rollout_seconds": totals["rollout_seconds"], "device": str(d.device), "device_count": d.world,
           "device_hours": hours, "gpu_hours": hours if d.device.type == "cuda" else 0.0,
           "usd_per_device_hour": args.usd_per_hour, "usd": hours * args.usd_per_hour}
    if d.main:
        (out / "ledger.json").write_text(json.dumps(row, indent=1) + "\n")
    return row
