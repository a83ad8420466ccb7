"""EPLB (parallel/eplb.py): the three maps agree with each other and place every expert, each GPU gets its share of
slots; placements match hand-worked examples (hierarchical and global) and the replication is optimal against a brute
force; on Zipf-skewed loads the busiest GPU gets lighter than under plain contiguous EP; the hierarchical policy keeps
expert groups whole on nodes; the result is deterministic; bad layouts raise a clear ValueError; the EP helpers (a
rank's slots, routing pairs to replicas) are consistent with the maps."""

import itertools

import pytest
import torch

from nanoseek.parallel.eplb import (PlacementError, balance, contiguous_placement, expert_placement, rank_loads,
                           rebalance_experts, replicate_experts, route_to_replicas)

# (experts, groups, nodes, gpus, slots): hierarchical and global set-ups, with and without redundant slots
LAYOUTS = [(16, 4, 1, 4, 16), (16, 4, 1, 4, 20), (16, 4, 2, 4, 24), (16, 4, 2, 8, 24), (16, 1, 2, 8, 24),
           (16, 4, 3, 6, 24), (64, 8, 2, 8, 72), (64, 8, 4, 16, 96), (12, 3, 2, 4, 12)]


def zipf_load(layers: int, experts: int, s: float = 1.2, seed: int = 0) -> torch.Tensor:
    """Expert loads ∝ 1/rank^s, the ranks shuffled per layer: a few hot experts, a long tail."""
    g = torch.Generator().manual_seed(seed)
    base = 1000.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** s
    return torch.stack([base[torch.randperm(experts, generator=g)] for _ in range(layers)])


@pytest.mark.parametrize("E,groups,nodes,gpus,P", LAYOUTS)
def test_maps_are_consistent(E, groups, nodes, gpus, P):
    w = zipf_load(5, E)
    phy2log, log2phy, logcnt = rebalance_experts(w, P, groups, nodes, gpus)
    L = w.shape[0]
    assert phy2log.shape == (L, P) and logcnt.shape == (L, E) and log2phy.shape[:2] == (L, E)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == P).all()  # every expert placed; counts fill the slots
    for l in range(L):
        assert torch.equal(torch.bincount(phy2log[l], minlength=E), logcnt[l])
        slots = log2phy[l][log2phy[l] >= 0]
        assert torch.equal(slots.sort().values, torch.arange(P))  # each slot listed exactly once
        assert torch.equal(torch.bincount(slots // (P // gpus), minlength=gpus), torch.full((gpus,), P // gpus))
        for e in range(E):
            c = int(logcnt[l, e])
            assert (phy2log[l, log2phy[l, e, :c]] == e).all() and (log2phy[l, e, c:] == -1).all()
    assert torch.allclose(rank_loads(w, phy2log, logcnt, gpus).sum(-1), w.sum(-1))  # load neither lost nor made


def test_global_hand_example():
    """Loads [9, 4, 2, 1], 6 slots on 2 GPUs: expert 0 gets two extra replicas (9/2 = 4.5 > 4, then 3 < 4); the
    replicas 4, 3, 3, 3, 2, 1 pack heaviest first: GPU 0 = {4, 3, 1}, GPU 1 = {3, 3, 2}, both 8."""
    w = torch.tensor([[9.0, 4.0, 2.0, 1.0]])
    phy2log, log2phy, logcnt = rebalance_experts(w, 6, 1, 1, 2)
    assert phy2log.tolist() == [[1, 0, 3, 0, 0, 2]]
    assert logcnt.tolist() == [[3, 1, 1, 1]]
    assert log2phy.tolist() == [[[3, 4, 1], [0, -1, -1], [5, -1, -1], [2, -1, -1]]]
    assert rank_loads(w, phy2log, logcnt, 2).tolist() == [[8.0, 8.0]]
    assert balance(w, *contiguous_placement(1, 4)[::2], 2).item() == pytest.approx(13 / 8)  # {9, 4} | {2, 1}


def test_hierarchical_hand_example():
    """8 experts in 4 groups of 2, group loads 20, 2, 10, 12 onto 2 nodes: node 0 = {g0, g1}, node 1 = {g3, g2} (22
    each); inside a node the experts pack onto its 2 GPUs heaviest first."""
    w = torch.tensor([[10.0, 10.0, 1.0, 1.0, 5.0, 5.0, 6.0, 6.0]])
    phy2log, _, logcnt = rebalance_experts(w, 8, 4, 2, 4)
    assert phy2log.tolist() == [[0, 2, 1, 3, 6, 4, 7, 5]]
    assert rank_loads(w, phy2log, logcnt, 4).tolist() == [[11.0, 11.0, 11.0, 11.0]]


def test_replication_is_optimal():
    """The greedy replication reaches the smallest possible largest load per replica (brute force over all counts)."""
    w = torch.tensor([[7.0, 5.0, 3.0, 1.5]])
    for P in range(4, 10):
        _, _, count = replicate_experts(w, P)
        best = min(max(wi / ci for wi, ci in zip(w[0].tolist(), c))
                   for c in itertools.product(range(1, P - 2), repeat=4) if sum(c) == P)
        assert (w / count).max().item() == pytest.approx(best)


@pytest.mark.parametrize("E,groups,nodes,gpus,P", [(16, 4, 1, 4, 20), (16, 4, 2, 4, 24), (16, 4, 2, 8, 24),
                                                   (16, 1, 2, 8, 24), (64, 8, 4, 16, 80), (256, 8, 4, 32, 288)])
def test_skewed_load_gets_balanced(E, groups, nodes, gpus, P):
    w = zipf_load(8, E, seed=E + P)
    phy2log, _, logcnt = rebalance_experts(w, P, groups, nodes, gpus)
    c2l, _, ccnt = contiguous_placement(w.shape[0], E)
    before, after = balance(w, c2l, ccnt, gpus), balance(w, phy2log, logcnt, gpus)
    assert (after <= before).all(), (before, after)
    assert after.mean() < 0.8 * before.mean(), (before.mean(), after.mean())


def test_no_redundancy_still_packs_better():
    w = zipf_load(8, 16, seed=3)
    phy2log, _, logcnt = rebalance_experts(w, 16, 1, 1, 4)
    assert (logcnt == 1).all()
    assert balance(w, phy2log, logcnt, 4).mean() < balance(w, *contiguous_placement(8, 16)[::2], 4).mean()


@pytest.mark.parametrize("E,groups,nodes,gpus", [(16, 4, 2, 4), (16, 4, 4, 8), (64, 8, 2, 8), (64, 8, 4, 16)])
def test_hierarchical_keeps_groups_on_a_node(E, groups, nodes, gpus):
    w = zipf_load(6, E, seed=1)
    phy2log, log2phy, _ = rebalance_experts(w, E, groups, nodes, gpus)  # no redundancy: whole groups per node
    node_of_expert = log2phy[..., 0] // (E // nodes)  # [L, E]
    per_group = node_of_expert.view(6, groups, E // groups)
    assert (per_group == per_group[..., :1]).all()
    assert (torch.stack([torch.bincount(n, minlength=nodes) for n in node_of_expert]) == E // nodes).all()
    # with redundancy, every replica still stays on its group's node
    phy2log, _, _ = rebalance_experts(w, E + 2 * gpus, groups, nodes, gpus)
    group_nodes = (phy2log // (E // groups)).view(6, nodes, -1)  # the groups each node's slots serve
    for l in range(6):
        sets = [set(g.tolist()) for g in group_nodes[l]]
        assert all(len(s) == groups // nodes for s in sets) and len(set().union(*sets)) == groups


def test_global_policy_when_groups_do_not_divide_nodes():
    """3 groups over 2 nodes: groups are ignored. The two hot experts of group 0 go to different GPUs and nodes."""
    w = torch.tensor([[10.0, 10.0, 1.0, 1.0, 1.0, 1.0]])
    out = rebalance_experts(w, 6, 3, 2, 2)
    for a, b in zip(out, rebalance_experts(w, 6, 1, 1, 2)):
        assert torch.equal(a, b)
    log2phy = out[1]
    assert log2phy[0, 0, 0] // 3 != log2phy[0, 1, 0] // 3
    assert balance(w, out[0], out[2], 2).item() == pytest.approx(1.0)
    zw = zipf_load(4, 12, seed=2)  # and on a skewed load the same holds
    for a, b in zip(rebalance_experts(zw, 16, 3, 2, 4), rebalance_experts(zw, 16, 1, 1, 4)):
        assert torch.equal(a, b)


def test_deterministic():
    w = zipf_load(4, 64, seed=5)
    tie = torch.ones(4, 64)  # ties everywhere: the order must not depend on luck either
    for load in (w, tie):
        a, b = rebalance_experts(load, 96, 8, 2, 16), rebalance_experts(load.clone(), 96, 8, 2, 16)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    phy2log, _, logcnt = rebalance_experts(tie, 64, 8, 2, 16)
    assert (balance(tie, phy2log, logcnt, 16) == 1.0).all()


@pytest.mark.parametrize("args,match", [
    ((18, 4, 1, 4), "num_replicas \\(18\\) must be a multiple of num_gpus \\(4\\)"),
    ((12, 4, 1, 4), "num_replicas \\(12\\) must be at least the number of logical experts \\(16\\)"),
    ((24, 4, 4, 6), "num_gpus \\(6\\) must be a multiple of num_nodes \\(4\\)"),
    ((24, 5, 1, 4), "split evenly into num_groups \\(5\\)"),
    ((24, 4, 0, 4), "positive"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(zipf_load(2, 16), *args)
    with pytest.raises(PlacementError):  # also a NanoseekError: the CLI reports it as one line
        rebalance_experts(zipf_load(2, 16), *args)


def test_bad_load():
    with pytest.raises(ValueError, match="layers, logical experts"):
        rebalance_experts(torch.ones(16), 16, 1, 1, 4)
    with pytest.raises(ValueError, match="non-negative"):
        rebalance_experts(-torch.ones(2, 16), 16, 1, 1, 4)


def test_expert_placement():
    phy2log, _, _ = rebalance_experts(zipf_load(3, 16), 24, 4, 2, 8)
    parts = [expert_placement(phy2log, r, 8) for r in range(8)]
    assert torch.equal(torch.cat([s for s, _ in parts]), torch.arange(24))
    assert torch.equal(torch.cat([e for _, e in parts], dim=-1), phy2log)
    slots, experts = expert_placement(phy2log[1], 2, 8)
    assert slots.tolist() == [6, 7, 8] and torch.equal(experts, phy2log[1, 6:9])
    with pytest.raises(ValueError, match="rank 8 of 8"):
        expert_placement(phy2log, 8, 8)


def test_route_to_replicas():
    """Each routed pair lands on a replica of its own expert; an expert's replicas share its pairs evenly (±1)."""
    w = zipf_load(1, 16, seed=4)
    phy2log, log2phy, logcnt = rebalance_experts(w, 24, 4, 2, 8)
    g = torch.Generator().manual_seed(0)
    indices = torch.multinomial(w[0].float().expand(500, -1), 4, generator=g)  # [N, K], skewed like the load
    slots = route_to_replicas(indices, log2phy[0], logcnt[0])
    assert slots.shape == indices.shape and torch.equal(phy2log[0][slots], indices)
    per_slot = torch.bincount(slots.flatten(), minlength=24)
    for e in range(16):
        shares = per_slot[log2phy[0, e, :logcnt[0, e]]]
        assert shares.max() - shares.min() <= 1
