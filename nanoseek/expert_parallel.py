"""Expert parallelism (DeepSeek-V3 §3.2: 64-way EP), applied from outside the model as the rest of parallel.py is.

The world's W ranks form a DeviceMesh (dp_mod_ep, ep) of shape (W/N, N), ep borrowing from data parallelism as in
torchtitan: every rank still reads its own share of the global batch and holds the whole model but the routed experts,
of which it holds E/N (rank with ep index j: experts j·E/N ... (j+1)·E/N - 1). Inside an MoE layer each rank

    routes its tokens (the gate is replicated) -> sorts the (token, expert) pairs by expert, hence by the rank that
    holds it -> dispatch: all_to_all_single of the rows to those ranks -> runs its own experts on what it received
    (one grouped GEMM) -> combine: all_to_all_single of the outputs back -> weights them by the gate and sums per token.

`all_to_all_single` (gloo runs it on CPU tensors, nccl on GPUs) is wrapped in an autograd Function whose backward is
the reverse all-to-all, so expert gradients flow back to the ranks whose tokens produced them. An expert's gradient on
its rank is then the sum over the N ranks of its EP group; `reduce_expert_grads` sums it over the W/N replicas of the
shard and divides by W: exactly the data-parallel mean. (Dividing by the replicas alone, as a DDP or FSDP of the expert
shard over dp_mod_ep would, gives N times the gradient: pytorch#160285.) The rest of the model is data parallel as
without EP (DDP ignoring the expert shards, or FSDP2 with them as ignored parameters).

Checkpoints keep the published per-expert layout whatever N: `full_expert_tensor` gathers a shard's tensor (weights or
optimizer moments) over the EP group, and a resumed run slices what it holds from the full tensors, so a run saved at
one EP degree resumes at another.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh

from nanoseek.errors import NanoseekError
from nanoseek.model.moe import Experts


class AllToAll(torch.autograd.Function):
    """rows of x [sum(in_splits), D] sent in order to the group's ranks (in_splits[r] to rank r) -> the rows received
    [sum(out_splits), D], rank by rank. Backward: the same exchange reversed."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return AllToAll.apply(x, out_splits, in_splits, group)


class EPExperts(Experts):
    """This rank's shard of the routed experts: gate_up_proj [E/N, 2I, D], down_proj [E/N, D, I] of experts
    first .. first + E/N - 1; the gate's indices are global expert ids. (The class `shard_experts` gives Experts.)"""
    ep_group = None
    ep_size = 1
    first = 0  # the global id of this rank's first expert

    def grouped(self, x, weights, indices):
        """x [T, D], weights/indices [T, K] (global ids) -> [T, D]: dispatch, local experts, combine."""
        order, token, in_splits, out_splits, recv_expert = self.plan(indices)
        recv = all_to_all(x.index_select(0, token), out_splits, in_splits, self.ep_group)  # dispatch
        ones = torch.ones(recv.shape[0], 1, dtype=torch.float32, device=x.device)
        out = Experts.grouped(self, recv, ones, recv_expert[:, None])  # each received row through its expert
        back = all_to_all(out, in_splits, out_splits, self.ep_group)  # combine: rows in `order`
        gated = back * weights.flatten()[order, None].to(back.dtype)
        return x.new_zeros(x.shape, dtype=back.dtype).index_add_(0, token, gated)

    reference = grouped  # the paper's loop runs on a rank's own experts only through the exchange above

    def plan(self, indices):
        """The exchange for routing `indices` [T, K]: pair order, tokens, and the rows sent to / received from each
        rank (one small synchronous all-to-all of the counts), the local expert of each received row."""
        n_local, K = self.gate_up_proj.shape[0], indices.shape[1]
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        expert = flat[order]
        dest = expert // n_local
        in_counts = torch.bincount(dest, minlength=self.ep_size)
        out_counts = torch.empty_like(in_counts)
        dist.all_to_all_single(out_counts, in_counts, group=self.ep_group)
        in_splits, out_splits = in_counts.tolist(), out_counts.tolist()
        recv_expert = expert.new_empty(sum(out_splits))
        dist.all_to_all_single(recv_expert, expert - dest * n_local, out_splits, in_splits, group=self.ep_group)
        return order, order // K, in_splits, out_splits, recv_expert

    @torch.no_grad()
    def overlapped(self, x, weights, indices, timings: dict | None = None):
        """The same result as `grouped` (without autograd), with the tokens in two micro-batches whose all-to-alls
        run asynchronously: micro-batch B's dispatch travels while A's experts compute, A's combine while B's
        experts compute (V3's two-micro-batch overlap, §3.4, here within a layer). timings (optional) gets the
        seconds spent computing and waiting on communication."""
        import time
        T = x.shape[0]
        halves = [slice(0, T // 2), slice(T // 2, T)]
        plans = [self.plan(indices[h]) for h in halves]
        clock = time.perf_counter
        wait = comp = 0.0
        sends = []
        for h, (order, token, ins, outs, _) in zip(halves, plans):  # both dispatches in flight
            buf = x.new_empty(sum(outs), x.shape[1])
            sends.append((buf, dist.all_to_all_single(buf, x[h].index_select(0, token), outs, ins,
                                                      group=self.ep_group, async_op=True)))
        backs = []
        for (buf, work), (order, token, ins, outs, recv_expert) in zip(sends, plans):
            t = clock()
            work.wait()
            wait += clock() - t
            t = clock()
            ones = torch.ones(buf.shape[0], 1, dtype=torch.float32, device=x.device)
            out = Experts.grouped(self, buf, ones, recv_expert[:, None]) if buf.shape[0] else buf
            comp += clock() - t
            back = x.new_empty(sum(ins), x.shape[1])
            backs.append((back, dist.all_to_all_single(back, out.contiguous(), ins, outs, group=self.ep_group,
                                                       async_op=True)))
        y = torch.zeros_like(x)
        for h, (back, work), (order, token, *_), w in zip(halves, backs, plans, (weights[hh] for hh in halves)):
            t = clock()
            work.wait()
            wait += clock() - t
            y[h].index_add_(0, token, back * w.flatten()[order, None].to(back.dtype))
        if timings is not None:
            timings["compute"] = timings.get("compute", 0.0) + comp
            timings["wait"] = timings.get("wait", 0.0) + wait
        return y


class EP:
    """The mesh and groups of one EP configuration (see the module's doc)."""

    def __init__(self, ep: int, world: int, rank: int, device: torch.device):
        if ep < 1 or world % ep:
            raise NanoseekError(f"--ep {ep} must divide the number of ranks ({world})")
        self.size, self.world, self.rank = ep, world, rank
        self.index = rank % ep  # this rank's place in its EP group
        if world > 1:
            self.mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp_mod_ep", "ep"))
            self.group, self.replicas = self.mesh.get_group("ep"), self.mesh.get_group("dp_mod_ep")
        else:
            self.mesh = self.group = self.replicas = None

    def shard(self, model: nn.Module) -> list[str]:
        """Keep this rank's experts in every MoE layer (the model's and the MTP module's), in place; call before the
        data-parallel wrap and the optimizer. Returns the names of the sharded parameters."""
        names = []
        for name, m in model.named_modules():
            if type(m) is not Experts:
                continue
            E = m.gate_up_proj.shape[0]
            if E % self.size:
                raise NanoseekError(f"--ep {self.size} must divide n_routed_experts ({E})")
            n = E // self.size
            lo = self.index * n
            for pname in ("gate_up_proj", "down_proj"):
                full = getattr(m, pname)
                p = nn.Parameter(full.detach()[lo:lo + n].clone(), requires_grad=full.requires_grad)
                p.ep_shard = (lo, n, E)  # read by checkpoint gathering and optimizer-state loading
                setattr(m, pname, p)
                names.append(f"{name}.{pname}")
            m.__class__ = EPExperts
            m.ep_group, m.ep_size, m.first = self.group, self.size, lo
        self.names = names
        return names

    def reduce_grads(self, model: nn.Module) -> None:
        """Expert-shard gradients: summed over the shard's replicas, divided by the world (the DP mean)."""
        for p in model.parameters():
            if getattr(p, "ep_shard", None) is not None and p.grad is not None:
                if self.replicas is not None and self.world > self.size:
                    dist.all_reduce(p.grad, group=self.replicas)
                p.grad.div_(self.world)

    def grad_norm_sq(self, model: nn.Module) -> torch.Tensor:
        """Σ g² over the whole model's gradients: the replicated part once, the expert shards summed over the EP
        group (each rank holds 1/N of them)."""
        dense = torch.zeros((), dtype=torch.float32)
        sharded = torch.zeros((), dtype=torch.float32)
        for p in model.parameters():
            if p.grad is None:
                continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            sq = g.detach().float().pow(2).sum().cpu()
            if getattr(p, "ep_shard", None) is not None:
                sharded += sq
            else:
                dense += sq
        if self.group is not None:
            dist.all_reduce(sharded, group=self.group)
        return dense + sharded


def full_expert_tensor(t: torch.Tensor, ep: "EP | None") -> torch.Tensor:
    """An expert shard's tensor [E/N, ...] gathered over the EP group into [E, ...] (every rank of it calls)."""
    if ep is None or ep.group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(ep.size)]
    dist.all_gather(parts, t.contiguous(), group=ep.group)
    return torch.cat(parts)


def local_slice(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The rows of a full [E, ...] tensor that an expert shard p holds (resume at any EP degree)."""
    lo, n, E = p.ep_shard
    if full.shape[0] != E:
        raise NanoseekError(f"a saved expert tensor has {full.shape[0]} experts, this model {E}")
    return full[lo:lo + n]
