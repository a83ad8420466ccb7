"""Expert load per EP rank before and after EPLB, from a model's own routing on reasoning text.

    .venv/bin/python bench/eplb.py --checkpoint /tmp/exp/fp8p2/model      # a trained nanoseek/DeepseekV3 checkpoint
    .venv/bin/python bench/eplb.py                                         # no checkpoint: a random `tiny` model

Runs the model (eval mode, no grad) over a few thousand tokens of locally generated reasoning text (the embedded
corpus' reasoning-gym families, `nanoseek.data.corpus.reasoning_texts`, tokenized by the checkpoint's tokenizer; a
model without one gets a tokenizer trained in-process on the same text), or over `--tokens-file` / `--random-ids`.
A hook on each main-model MoE layer's gate counts the tokens routed to each expert (the MTP module is not run). Then,
for each EP set-up (GPUs, nodes, redundant slots, policy), it prints max/mean of the load per GPU (1.0 is perfect;
an MoE layer under EP runs as slowly as its busiest GPU), per layer and averaged over layers:
  before: plain EP, no redundant slots, expert e on GPU e // (E/G);
  after:  parallel.eplb.rebalance_experts on the measured counts (hierarchical policy: the model's `n_group` groups
          packed onto nodes; global: groups ignored; on one node the two coincide, so one row).
The placement is evaluated on the very counts it was chosen from (the best case: real serving predicts the load).
With more than one node it also prints the mean number of nodes that serve a token's routed experts (what the
hierarchical policy keeps low, at some cost in balance), each expert's pairs sent to its replicas in turn.
"""

import argparse
import json
import platform
from pathlib import Path

from nanoseek.config import get_preset  # first: nanoseek sets torch's CPU allocator options before torch loads
from nanoseek.data.corpus import reasoning_texts
from nanoseek.parallel.eplb import balance, contiguous_placement, rebalance_experts, route_to_replicas
from nanoseek.model import build_model, from_pretrained
from nanoseek.model.moe import MoE
from nanoseek.tokenizer import Tokenizer

import torch


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a nanoseek/DeepseekV3 checkpoint directory (default: a random tiny model)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens to route")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=4, help="sequences per forward")
    ap.add_argument("--seed", type=int, default=7, help="seed of the generated text (and of the random model)")
    ap.add_argument("--tokens-file", help="route these token ids instead (a text file of whitespace-separated ids)")
    ap.add_argument("--random-ids", action="store_true", help="route uniform random in-vocabulary ids instead")
    ap.add_argument("--gpus", default="4,8", help="comma-separated EP sizes (GPUs)")
    ap.add_argument("--nodes", default="1,2", help="comma-separated node counts")
    ap.add_argument("--redundant", default="0,4,8", help="comma-separated numbers of redundant expert slots")
    ap.add_argument("--json", help="also write the results to this JSON file")
    return ap.parse_args(argv)


def load_model(args):
    """The model and a line saying what it is."""
    if args.checkpoint:
        model = from_pretrained(args.checkpoint)
        return model, f"checkpoint {args.checkpoint}"
    torch.manual_seed(args.seed)
    model = build_model(get_preset("tiny")).eval()
    return model, "RANDOM tiny model (untrained, seed %d): no checkpoint given; routing reflects the random init" \
        % args.seed


def token_ids(args, model) -> tuple[torch.Tensor, str]:
    """[B, seq_len] ids to route, and a line saying where they came from."""
    V = model.args.vocab_size
    if args.tokens_file:
        ids = [int(t) for t in Path(args.tokens_file).read_text().split()]
        if not ids or max(ids) >= V or min(ids) < 0:
            raise SystemExit(f"{args.tokens_file}: need ids in [0, {V})")
        source = f"ids from {args.tokens_file}"
    elif args.random_ids:
        ids = torch.randint(0, V, (args.tokens,), generator=torch.Generator().manual_seed(args.seed)).tolist()
        source = "uniform random ids"
    else:
        tok, ids, n = model.tokenizer, [], 64
        while len(ids) < args.tokens:  # generate documents until there are enough tokens
            texts = reasoning_texts(n, seed=args.seed)
            if tok is None:
                tok = Tokenizer.train(texts, vocab_size=V)
            ids = [i for t in texts for i in [tok.bos_id, *tok.encode(t), tok.eos_id]]
            n *= 2
        how = "the checkpoint's tokenizer" if model.tokenizer is not None else "a tokenizer trained here on it"
        source = f"{n // 2} reasoning-gym documents (seed {args.seed}), tokenized by {how}"
    T = min(args.tokens, len(ids)) // args.seq_len * args.seq_len
    if T == 0:
        raise SystemExit(f"fewer than --seq-len {args.seq_len} tokens to route")
    return torch.tensor(ids[:T]).view(-1, args.seq_len), source


@torch.no_grad()
def routed_experts(model, ids: torch.Tensor, batch: int) -> tuple[list[str], list[torch.Tensor]]:
    """Names of the main model's MoE layers and, per layer, the experts each token was routed to, [tokens, K]."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE) and not name.startswith("mtp")]
    routed = [[] for _ in layers]

    def hook(i):
        def keep(gate, inputs, out):  # Gate.forward -> (weights, indices [N, K], scores)
            routed[i].append(out[1].cpu())
        return keep
    handles = [m.gate.register_forward_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    model.eval()
    for b in range(0, ids.shape[0], batch):
        model(ids[b: b + batch])
    for h in handles:
        h.remove()
    return [name for name, _ in layers], [torch.cat(r) for r in routed]


def nodes_per_token(indices: torch.Tensor, log2phy, logcnt, slots: int, nodes: int) -> float:
    """Mean number of distinct nodes that serve a token's K routed experts, its pairs sent to replicas in turn."""
    node = route_to_replicas(indices, log2phy, logcnt) // (slots // nodes)  # [T, K]
    hit = torch.zeros(indices.shape[0], nodes, dtype=torch.bool).scatter_(1, node, True)
    return hit.sum(1).double().mean().item()


def ints(csv: str) -> list[int]:
    return [int(x) for x in csv.split(",") if x]


def setups(E: int, n_group: int, gpus, nodes, redundant):
    """(gpus, nodes, slots, policy, num_groups) of every valid EP set-up."""
    out = []
    for G in gpus:
        for N in nodes:
            for R in redundant:
                P = E + R
                if E % G or P % G or G % N:
                    continue
                if N == 1:
                    out.append((G, N, P, "global (= hierarchical, 1 node)", 1))
                    continue
                if n_group % N == 0 and n_group > 1:
                    out.append((G, N, P, "hierarchical", n_group))
                out.append((G, N, P, "global", 1))
    return out


def main(args):
    model, what = load_model(args)
    ids, source = token_ids(args, model)
    names, routed = routed_experts(model, ids, args.batch)
    L, E = len(routed), model.args.n_routed_experts
    counts = torch.stack([torch.bincount(r.flatten(), minlength=E) for r in routed]).double()  # [L, E]
    n_group = model.args.n_group or 1
    print(f"model: {what}")
    print(f"  {L} MoE layers ({', '.join(names)}), {E} routed experts, top-{model.args.num_experts_per_tok}, "
          f"{n_group} groups (top-{model.args.topk_group}); torch {torch.__version__}, {platform.machine()}")
    print(f"tokens: {ids.numel()} ({ids.shape[0]} x {ids.shape[1]}), {source}")
    expert_imb = counts.amax(-1) / counts.mean(-1)
    print("expert load max/mean per layer (1 GPU per expert, no redundancy): "
          + ", ".join(f"{x:.2f}" for x in expert_imb.tolist()))
    print()
    rows = []
    print("| GPUs | nodes | slots (redundant) | policy | before max/mean | after max/mean "
          "| per layer: before → after | nodes/token before → after |")
    print("|---|---|---|---|---|---|---|---|")
    for G, N, P, policy, groups in setups(E, n_group, *(ints(s) for s in (args.gpus, args.nodes, args.redundant))):
        c2l, c2p, ccnt = contiguous_placement(L, E)
        before = balance(counts, c2l, ccnt, G)
        phy2log, log2phy, logcnt = rebalance_experts(counts, P, groups, N, G)
        after = balance(counts, phy2log, logcnt, G)
        per_layer = ", ".join(f"{b:.2f}→{a:.2f}" for b, a in zip(before.tolist(), after.tolist()))
        spread = [sum(nodes_per_token(r, m[l], c[l], slots, N) for l, r in enumerate(routed)) / L
                  for m, c, slots in ((c2p, ccnt, E), (log2phy, logcnt, P))]
        print(f"| {G} | {N} | {P} ({P - E}) | {policy} | {before.mean():.3f} | {after.mean():.3f} | {per_layer} "
              f"| {spread[0]:.2f} → {spread[1]:.2f} |")
        rows.append(dict(gpus=G, nodes=N, slots=P, redundant=P - E, policy=policy, num_groups=groups,
                         before=before.tolist(), after=after.tolist(), before_mean=before.mean().item(),
                         after_mean=after.mean().item(), nodes_per_token_before=spread[0],
                         nodes_per_token_after=spread[1], replicas=logcnt.tolist()))
    print("\n(before: contiguous EP, no redundancy; after: EPLB on the same counts. Means are over layers. "
          "nodes/token: distinct nodes serving a token's routed experts, pairs sent to an expert's replicas in turn.)")
    if args.json:
        out = dict(args=vars(args), model=what, tokens=ids.numel(), source=source, layers=names,
                   expert_load=counts.tolist(), expert_max_over_mean=expert_imb.tolist(), setups=rows)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main(parse_args())
