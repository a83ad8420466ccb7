"""Expert-parallel load balancer (EPLB; DeepSeek-V3 §3.4, the `deepseek-ai/EPLB` repository), written for nanoseek.

With expert parallelism each GPU holds some experts, and an MoE layer is as slow as its busiest GPU. Routing is not
uniform (the bias of auxiliary-loss-free balancing evens it out only on average over training), so serving duplicates
the heavy experts: the E *logical* experts become P ≥ E *physical* ones ("redundant experts"), P/G on each of G GPUs,
and a token routed to a logical expert goes to one of its replicas. From a measured load per logical expert, EPLB
chooses how many replicas each expert gets and where they live:

  * replicate: start from one replica each, then repeatedly give one more to the expert with the highest load per
    replica (a replica is assumed to take an equal share of its expert's tokens);
  * pack: place the replicas on the GPUs, P/G each, heaviest first onto the lightest GPU that still has room.

Hierarchical policy (when the node count divides the number of expert groups `n_group`; DeepSeek uses it for prefill):
first pack whole expert groups onto nodes, evenly by load, so that group-limited routing (a token's experts lie in at
most `topk_group` groups) keeps its traffic on few nodes; then replicate and pack within each node, over its GPUs.
Global policy (otherwise; DeepSeek's decode, with large EP): replicate over all experts and pack onto all GPUs,
ignoring groups. Physical expert p lives on GPU p // (P/G). Predicting the load (e.g. a moving average of past
counts) is the caller's business.

`rank_loads` and `balance` measure a placement (max/mean load per GPU), `expert_placement` lists what one EP rank
holds, and `route_to_replicas` sends each routed (token, expert) pair to one of that expert's replicas, evenly.
"""

import torch

from nanoseek.errors import NanoseekError


class PlacementError(NanoseekError, ValueError):
    """Impossible EPLB arguments (counts that do not divide, too few slots, a malformed load)."""


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the n items of each row into num_packs packs of n/num_packs items, as evenly by weight as a greedy can:
    items heaviest first, each into the lightest pack that still has room (ties: the lowest pack, the lowest item).

    weight [X, n] -> pack [X, n] (the pack of each item), rank [X, n] (its position inside the pack), int64."""
    X, n = weight.shape
    assert n % num_packs == 0, "callers check that the items divide evenly"
    room = n // num_packs
    pack = torch.empty(X, n, dtype=torch.int64)
    rank = torch.empty(X, n, dtype=torch.int64)
    order = weight.argsort(dim=-1, descending=True, stable=True)
    for x in range(X):
        w = weight[x].tolist()
        load, count = [0.0] * num_packs, [0] * num_packs
        for i in order[x].tolist():
            p = min((q for q in range(num_packs) if count[q] < room), key=load.__getitem__)
            pack[x, i], rank[x, i] = p, count[p]
            load[p] += w[i]
            count[p] += 1
    return pack, rank


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn n logical experts into num_phy ≥ n physical ones: one replica each, then each extra replica to the expert
    whose load per replica is highest (this minimises the largest load per replica).

    weight [X, n] -> phy2log [X, num_phy] (physical j < n is expert j; then the extras in order of creation),
    replica [X, num_phy] (which replica of its expert each one is: 0, 1, ...), count [X, n], all int64."""
    X, n = weight.shape
    rows = torch.arange(X)
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(X, 1)
    replica = torch.zeros(X, num_phy, dtype=torch.int64)
    count = torch.ones(X, n, dtype=torch.int64)
    for j in range(n, num_phy):
        e = (weight / count).argmax(dim=-1)  # [X]: the busiest replica's expert in each row
        phy2log[:, j], replica[:, j] = e, count[rows, e]
        count[rows, e] += 1
    return phy2log, replica, count


def _rebalance_hierarchical(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """weight [L, E] fp64 -> phy2log [L, P], replica [L, P], logcnt [L, E]. The global policy is num_groups =
    num_nodes = 1."""
    L, E = weight.shape
    group_size, groups_per_node = E // num_groups, num_groups // num_nodes
    per_node, phy_per_node, phy_per_gpu = E // num_nodes, num_replicas // num_nodes, num_replicas // num_gpus

    # 1. expert groups -> nodes. node_experts: each node's logical experts, its groups in packing order
    group_node, group_rank = balanced_packing(weight.view(L, num_groups, group_size).sum(-1), num_nodes)
    groups_in_order = (group_node * groups_per_node + group_rank).argsort(dim=-1)  # [L, num_groups]
    node_experts = (groups_in_order[..., None] * group_size + torch.arange(group_size)).view(L * num_nodes, per_node)

    # 2. replicate within each node (one row per (layer, node); "local" ids index node_experts)
    node_load = weight.gather(-1, node_experts.view(L, E)).view(L * num_nodes, per_node)
    phy2local, replica, count = replicate_experts(node_load, phy_per_node)

    # 3. the node's replicas -> its GPUs, each replica carrying load / count
    gpu, slot = balanced_packing((node_load / count).gather(-1, phy2local), num_gpus // num_nodes)
    position = gpu * phy_per_gpu + slot  # [L * num_nodes, phy_per_node]: where each replica goes in its node
    phy2local = torch.empty_like(phy2local).scatter_(-1, position, phy2local)
    replica = torch.empty_like(replica).scatter_(-1, position, replica)

    phy2log = node_experts.gather(-1, phy2local).view(L, num_replicas)
    logcnt = torch.empty(L, E, dtype=torch.int64).scatter_(-1, node_experts.view(L, E), count.view(L, E))
    return phy2log, replica.view(L, num_replicas), logcnt


def check_layout(num_logical: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    """Raise PlacementError unless E logical experts fit as num_replicas slots over num_gpus GPUs on num_nodes nodes."""
    def need(ok, msg):
        if not ok:
            raise PlacementError(msg)
    need(min(num_logical, num_replicas, num_groups, num_nodes, num_gpus) > 0, "all counts must be positive")
    need(num_replicas % num_gpus == 0,
         f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus}): each GPU holds as many slots")
    need(num_replicas >= num_logical,
         f"num_replicas ({num_replicas}) must be at least the number of logical experts ({num_logical})")
    need(num_gpus % num_nodes == 0, f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    need(num_logical % num_groups == 0,
         f"the logical experts ({num_logical}) must split evenly into num_groups ({num_groups}) groups")


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose the replicas and placement of every MoE layer's experts from their load.

    weight [L, E]: the load of each logical expert (e.g. routed tokens) in each of L layers; num_replicas P: physical
    experts (slots) per layer, a multiple of num_gpus, at least E; num_groups: the expert groups of group-limited
    routing (`n_group`); num_nodes: nodes, within which GPUs talk fast; num_gpus G: a multiple of num_nodes. The
    hierarchical policy runs when num_nodes divides num_groups, else the global one. Returns (int64, on the CPU):
      phy2log [L, P]: the logical expert in each slot (slot p is on GPU p // (P/G));
      log2phy [L, E, R]: the slots of each logical expert, padded with -1 (R: the most replicas of any expert);
      logcnt [L, E]: the number of replicas of each logical expert (≥ 1, summing to P over E).
    Deterministic: the same load gives the same placement."""
    if weight.dim() != 2:
        raise PlacementError(f"weight must be [layers, logical experts], got shape {tuple(weight.shape)}")
    L, E = weight.shape
    check_layout(E, num_replicas, num_groups, num_nodes, num_gpus)
    weight = weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(weight).all() or (weight < 0).any():
        raise PlacementError("expert loads must be finite and non-negative")
    if num_groups % num_nodes == 0:
        phy2log, replica, logcnt = _rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, replica, logcnt = _rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    R = int(logcnt.max())
    log2phy = torch.full((L, E * R), -1, dtype=torch.int64)
    log2phy.scatter_(-1, phy2log * R + replica, torch.arange(num_replicas).expand(L, -1))
    return phy2log, log2phy.view(L, E, R), logcnt


def contiguous_placement(num_layers: int, num_logical: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """No redundancy, expert e in slot e (on GPU e // (E/G)): the placement of plain EP, as rebalance_experts returns
    it: phy2log [L, E], log2phy [L, E, 1], logcnt [L, E]."""
    phy2log = torch.arange(num_logical).repeat(num_layers, 1)
    return phy2log, phy2log[..., None].clone(), torch.ones_like(phy2log)


def rank_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """The load of each GPU when each logical expert's load splits evenly over its replicas.

    weight [L, E], phy2log [L, P], logcnt [L, E] -> [L, G] fp64."""
    L, P = phy2log.shape
    per_slot = (weight.double().cpu() / logcnt).gather(-1, phy2log)  # [L, P]
    return per_slot.view(L, num_gpus, P // num_gpus).sum(-1)


def balance(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """max/mean GPU load per layer, [L] fp64: 1.0 is perfect balance (and what a layer without load reports); an MoE
    layer's time under EP scales with the max."""
    loads = rank_loads(weight, phy2log, logcnt, num_gpus)
    mean = loads.mean(-1)
    return torch.where(mean > 0, loads.amax(-1) / mean.clamp_min(1e-300), torch.ones_like(mean))


def expert_placement(phy2log: torch.Tensor, ep_rank: int, ep_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What EP rank ep_rank holds: its slots [P/G] (ep_rank·P/G ...) and their logical experts [..., P/G] (phy2log
    [P] or [L, P], as rebalance_experts returns it): the expert weights to load into the rank's stacked tensor."""
    P = phy2log.shape[-1]
    if P % ep_size or not 0 <= ep_rank < ep_size:
        raise PlacementError(f"rank {ep_rank} of {ep_size}: the rank must be in [0, ep_size) and ep_size divide the "
                             f"{P} slots")
    slots = torch.arange(ep_rank * (P // ep_size), (ep_rank + 1) * (P // ep_size), device=phy2log.device)
    return slots, phy2log[..., slots]


def route_to_replicas(indices: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """One layer's routed logical experts indices [N, K] -> the slots [N, K] that serve them: the pairs routed to an
    expert go to its replicas in turn (in token order), so replicas of an expert get equal shares ±1. log2phy [E, R],
    logcnt [E] (one layer of rebalance_experts' output, on indices' device). No host sync: usable inside a step."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)  # the pairs grouped by expert, token order kept inside a group
    counts = torch.zeros_like(logcnt).index_add_(0, flat, torch.ones_like(flat))
    starts = counts.cumsum(0) - counts
    nth_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # n-th pair of its expert
    nth = torch.empty_like(flat).scatter_(0, order, nth_sorted)
    return log2phy[flat, nth % logcnt[flat]].view_as(indices)
