"""Expert parallelism (DeepSeek-V3 §3.2: 64-way EP), applied from outside the model as the rest of parallel/ is.

The data-parallel ranks of each pipeline stage (all W without PP) form the (dp_mod_ep, ep) dimensions of
distributed.build_mesh, of shape (W/PP/N, N), ep innermost and borrowing from data parallelism as in torchtitan: every rank still reads its own share of the global batch and holds the whole model but the routed experts,
of which it holds E/N (rank with ep index j: experts j·E/N ... (j+1)·E/N - 1). Inside an MoE layer each rank

    routes its tokens (the gate is replicated) -> sorts the (token, expert) pairs by expert, hence by the rank that
    holds it -> dispatch: all_to_all_single of the rows to those ranks -> runs its own experts on what it received
    (one grouped GEMM) -> combine: all_to_all_single of the outputs back -> weights them by the gate and sums per token.

`all_to_all_single` (gloo runs it on CPU tensors, nccl on GPUs) is wrapped in an autograd Function whose backward is
the reverse all-to-all, so expert gradients flow back to the ranks whose tokens produced them. An expert's gradient on
its rank is then the sum over the N ranks of its EP group; `EP.reduce_grads` sums it over the W/N replicas of the
shard and divides by W: exactly the data-parallel mean. (Dividing by the replicas alone, as a DDP or FSDP of the expert
shard over dp_mod_ep would, gives N times the gradient: pytorch#160285.) The rest of the model is data parallel as
without EP (DDP ignoring the expert shards, or FSDP2 with them as ignored parameters).

Checkpoints keep the published per-expert layout whatever N: `EP.full` gathers a shard's tensor (weights or
optimizer moments) over the EP group, and a resumed run slices what it holds from the full tensors, so a run saved at
one EP degree resumes at another.
"""

import time

import torch
import torch.distributed as dist
import torch.nn as nn

from nanoseek.errors import NanoseekError
from nanoseek.model.moe import Experts
from nanoseek.parallel.distributed import build_mesh
from nanoseek.parallel.eplb import balance, contiguous_placement, rebalance_experts, route_to_replicas


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


def sent(x: torch.Tensor) -> torch.Tensor:
    """The tokens as dispatched: under autocast in its dtype (bf16 on GPUs), which the experts' first matmul casts
    them to anyway, so that the exchange carries half the bytes of the fp32 residual stream (V3 dispatches FP8)."""
    dev = x.device.type
    return x.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else x


class EPExperts(Experts):
    """This rank's shard of the routed experts: gate_up_proj [S, 2I, D], down_proj [S, D, I], its S physical slots
    first .. first + S - 1 of the layer's P = E + R (S = P/N; without redundant experts slot = expert). phy2log,
    log2phy and logcnt (EPLB's maps) say which logical expert each slot holds; the gate's indices are logical ids.
    (The class EP.shard gives Experts.)"""
    ep_group = None
    ep_size = 1
    first = 0  # this rank's first physical slot
    redundant = 0
    overlap = False  # two micro-batches with asynchronous all-to-alls (--ep-overlap)

    def set_placement(self, phy2log, log2phy, logcnt, device=None) -> None:
        """The maps, on `device` (once given, kept: a pipeline stage held elsewhere has its weights on meta, its maps
        on the training device)."""
        self.placement_device = device or getattr(self, "placement_device", None) or self.gate_up_proj.device
        dev = self.placement_device
        self.placement_cpu = tuple(v.cpu() for v in (phy2log, log2phy, logcnt))  # (kept through materialize)
        for k, v in (("phy2log", phy2log), ("log2phy", log2phy), ("logcnt", logcnt)):
            self.register_buffer(k, v.to(dev), persistent=False)

    def compute(self, x, weights, indices):
        """This rank's own experts over the rows it received (indices: local slots): the next class's `grouped` in
        the method order, Experts' own, or FP8's where fp8.convert made the class FP8 too (FP8 x EP)."""
        return super(EPExperts, self).grouped(x, weights, indices)

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slots of a per-logical-expert tensor [E, ...]."""
        S = (self.n_logical + self.redundant) // self.ep_size
        return full[self.phy2log[self.first:self.first + S].to(full.device)]

    def to_logical(self, phys: torch.Tensor, reduce: bool = False) -> torch.Tensor:
        """[P, ...] in slot order -> [E, ...]: each logical expert's first replica (replicas hold equal weights), or
        with reduce the sum over its replicas (gradients)."""
        if reduce:
            out = phys.new_zeros(self.n_logical, *phys.shape[1:])
            return out.index_add_(0, self.phy2log.to(phys.device), phys)
        return phys[self.log2phy[:, 0].to(phys.device)]

    def physical(self, indices: torch.Tensor) -> torch.Tensor:
        """Logical expert ids [T, K] -> the slots serving them (replicas in turn; identity without redundancy)."""
        return route_to_replicas(indices, self.log2phy, self.logcnt) if self.redundant else indices

    def grouped(self, x, weights, indices):
        """x [T, D], weights/indices [T, K] (global ids) -> [T, D]: dispatch, local experts, combine (with
        `overlap`, in two micro-batches whose exchanges overlap the other's experts: `overlapped`)."""
        if self.overlap and x.shape[0] >= 2:
            return self.overlapped(x, weights, indices)
        x = sent(x)
        order, token, in_splits, out_splits, recv_expert = self.plan(self.physical(indices))
        recv = all_to_all(x.index_select(0, token), out_splits, in_splits, self.ep_group)  # dispatch
        ones = torch.ones(recv.shape[0], 1, dtype=torch.float32, device=x.device)
        out = self.compute(recv, ones, recv_expert[:, None])  # each received row through its expert
        back = all_to_all(out, in_splits, out_splits, self.ep_group)  # combine: rows in `order`
        gated = back * weights.flatten()[order, None].to(back.dtype)
        return x.new_zeros(x.shape, dtype=back.dtype).index_add_(0, token, gated)

    reference = grouped  # the paper's loop runs on a rank's own experts only through the exchange above

    def plan(self, indices):
        """The exchange for routing to the slots `indices` [T, K]: pair order, tokens, and the rows sent to / received
        from each rank (one small synchronous all-to-all of the counts), the local expert of each received row."""
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

    def overlapped(self, x, weights, indices, timings: dict | None = None):
        """The same result as `grouped`, with the tokens in two micro-batches whose all-to-alls run asynchronously:
        B's dispatch travels while A's experts compute, A's combine while B's experts compute (V3's two-micro-batch
        overlap, §3.4, here within a layer), and likewise backward (OverlappedExchange). timings (optional) gets the
        seconds spent computing experts and waiting on communication, forward and backward."""
        x = sent(x)
        T = x.shape[0]
        halves = [slice(0, T // 2), slice(T // 2, T)]
        plans = [self.plan(self.physical(indices[h])) for h in halves]
        train = torch.is_grad_enabled() and (x.requires_grad or self.gate_up_proj.requires_grad)
        return OverlappedExchange.apply(x, weights, self.gate_up_proj, self.down_proj, self, halves, plans,
                                        timings, train)


def _timed(timings, key, fn):
    t = time.perf_counter()
    out = fn()
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
    return out


class OverlappedExchange(torch.autograd.Function):
    """EPExperts.overlapped's exchange with autograd: two micro-batches, asynchronous all_to_all_single, each
    micro-batch's transfer in flight while the other's experts compute, forward and backward. The experts' own graph
    per micro-batch is kept from the forward and differentiated in the backward."""

    @staticmethod
    def forward(ctx, x, weights, gate_up, down, experts, halves, plans, timings, train):
        group, D = experts.ep_group, x.shape[1]
        # what the experts return: bf16 under autocast (the trainer's mode on GPUs) while x stays fp32; every buffer
        # of an exchange takes the dtype of what is sent through it (all_to_all_single refuses mixed dtypes)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        sends = []
        for h, (order, token, ins, outs, _) in zip(halves, plans):  # both dispatches in flight
            buf = x.new_empty(sum(outs), D)
            sends.append((buf, dist.all_to_all_single(buf, x[h].detach().index_select(0, token), outs, ins,
                                                      group=group, async_op=True)))
        graphs, backs = [], []
        for (buf, work), (order, token, ins, outs, recv_expert) in zip(sends, plans):
            _timed(timings, "wait", work.wait)
            recv = buf.requires_grad_(train)
            with torch.set_grad_enabled(train):  # this micro-batch's experts, their graph kept for the backward
                ones = torch.ones(recv.shape[0], 1, dtype=torch.float32, device=x.device)
                out = _timed(timings, "compute", lambda: experts.compute(recv, ones, recv_expert[:, None])
                             if recv.shape[0] else recv * 0.0).to(out_dtype)
            graphs.append((recv, out))
            back = out.new_empty(sum(ins), D)
            backs.append((back, dist.all_to_all_single(back, out.detach().contiguous(), ins, outs, group=group,
                                                       async_op=True)))
        y = x.new_zeros(x.shape, dtype=out_dtype)  # as EPExperts.grouped returns it
        rows = []
        for h, (back, work), (order, token, *_) in zip(halves, backs, plans):
            _timed(timings, "wait", work.wait)
            rows.append(back)
            y[h].index_add_(0, token, back * weights[h].flatten()[order, None].to(back.dtype))
        ctx.save_for_backward(weights)
        ctx.state = (experts, halves, plans, graphs, rows, timings, gate_up, down)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        (weights,) = ctx.saved_tensors
        experts, halves, plans, graphs, rows, timings, gate_up, down = ctx.state
        group, D = experts.ep_group, dy.shape[1]
        dx, dw = dy.new_zeros(dy.shape, dtype=ctx.x_dtype), torch.zeros_like(weights)
        sends = []
        for h, (order, token, ins, outs, _), back in zip(halves, plans, rows):  # combine's backward, both in flight
            g = dy[h].index_select(0, token)  # [pairs, D], each pair's upstream gradient
            dw[h].view(-1)[order] = (g * back).sum(-1).to(dw.dtype)
            g = (g * weights[h].flatten()[order, None].to(g.dtype)).contiguous()
            buf = g.new_empty(sum(outs), D)
            sends.append((buf, dist.all_to_all_single(buf, g, outs, ins, group=group, async_op=True)))
        dgu, ddown = torch.zeros_like(gate_up), torch.zeros_like(down)
        returns = []
        for (buf, work), (recv, out), (order, token, ins, outs, _) in zip(sends, graphs, plans):
            _timed(timings, "wait", work.wait)

            def grads():
                return torch.autograd.grad(out, (recv, gate_up, down), buf, allow_unused=True)
            g_recv, g_gu, g_down = _timed(timings, "compute", grads)
            if g_gu is not None:
                dgu += g_gu
            if g_down is not None:
                ddown += g_down
            back = g_recv.new_empty(sum(ins), D)
            returns.append((back, dist.all_to_all_single(back, g_recv.contiguous(), ins, outs, group=group,
                                                         async_op=True)))
        for h, (back, work), (order, token, *_) in zip(halves, returns, plans):  # dispatch's backward
            _timed(timings, "wait", work.wait)
            dx[h].index_add_(0, token, back.to(dx.dtype))
        return dx, dw, dgu, ddown, None, None, None, None, None


class EP:
    """The mesh and groups of one EP configuration (see the module's doc), and, with redundant experts, their
    placement (EPLB)."""

    def __init__(self, ep: int, world: int, rank: int, device: torch.device, redundant: int = 0, every: int = 0,
                 n_group: int = 1, pp: int = 1, overlap: bool = False, mesh=None):
        """mesh: parallel.build_mesh's (pp, dp_mod_ep, ep) mesh (made here when not given)."""
        self.check(ep, world, pp, redundant, every)
        dp = world // pp  # the data-parallel ranks (with PP: those holding the same stages)
        self.size, self.world, self.rank, self.device = ep, dp, rank, device  # world: the data-parallel mean's divisor
        self.index = rank % ep  # this rank's place in its EP group (ep innermost)
        self.redundant, self.every, self.n_group, self.overlap = redundant, every, n_group, overlap
        self.layers = []  # the sharded Experts modules, in the model's order (= moe_layers' order)
        self.load = None  # routed tokens per layer and logical expert since the last placement [L, E]
        if world > 1:
            self.mesh = mesh if mesh is not None else build_mesh(world, device, pp, ep)
            self.group, self.replicas = self.mesh.get_group("ep"), self.mesh.get_group("dp_mod_ep")
        else:
            self.mesh = self.group = self.replicas = None

    @staticmethod
    def check(ep: int, world: int, pp: int = 1, redundant: int = 0, every: int = 0) -> None:
        """One line for an EP configuration that cannot be (the trainers call it before touching anything)."""
        if ep < 1:
            raise NanoseekError(f"--ep must be >= 1, got {ep}")
        if redundant < 0 or every < 0:
            raise NanoseekError("--ep-redundant and --eplb-every must be >= 0")
        if (world // pp) % ep:
            raise NanoseekError(f"--ep {ep} must divide the number of data-parallel ranks ({world // pp}"
                                + (f" = {world} ranks / --pp {pp})" if pp > 1 else "); run it under torchrun"))

    def shard(self, model: nn.Module) -> list[str]:
        """Keep this rank's experts in every MoE layer (the model's and the MTP module's), in place; call before the
        data-parallel wrap and the optimizer. With redundant experts, each layer has E + R physical slots, (E + R)/N
        per rank, first placed as EPLB places a uniform load. Returns the names of the sharded parameters."""
        names = []
        self.by_name = {}
        for name, m in model.named_modules():
            if type(m) is not Experts:
                continue
            E = m.gate_up_proj.shape[0]
            P = E + self.redundant
            if P % self.size:
                raise NanoseekError(f"--ep {self.size} must divide n_routed_experts + --ep-redundant ({E} + "
                                    f"{self.redundant})")
            m.__class__ = EPExperts
            m.ep_group, m.ep_size, m.n_logical, m.redundant = self.group, self.size, E, self.redundant
            m.overlap = self.overlap
            m.first = self.index * (P // self.size)  # this rank's first physical slot
            phy2log, log2phy, logcnt = self._placement(torch.ones(1, E))
            full = {pname: getattr(m, pname).detach() for pname in ("gate_up_proj", "down_proj")}
            m.set_placement(phy2log[0], log2phy[0], logcnt[0])
            for pname, t in full.items():
                p = nn.Parameter(m.local(t).clone(), requires_grad=getattr(m, pname).requires_grad)
                p.ep_module = m  # read by checkpoint gathering and optimizer-state loading
                setattr(m, pname, p)
                names.append(f"{name}.{pname}")
                self.by_name[f"{name}.{pname}"] = m
            self.layers.append(m)
        self.names = names
        return names

    def _placement(self, load: torch.Tensor):
        """EPLB over this EP group (one node: the hierarchical policy packs whole groups onto it)."""
        E = load.shape[1]
        if not self.redundant:
            return contiguous_placement(load.shape[0], E)
        groups = self.n_group if E % self.n_group == 0 else 1
        return rebalance_experts(load, E + self.redundant, groups, 1, self.size)

    def reduce_grads(self, model: nn.Module) -> None:
        """Expert-shard gradients: the replicas of a logical expert summed (so they stay equal), then summed over
        the shard's data-parallel replicas and divided by the world (the DP mean)."""
        for p in model.parameters():
            m = getattr(p, "ep_module", None)
            if m is None or p.grad is None:
                continue
            if m.redundant:
                logical = m.to_logical(self.gather(p.grad), reduce=True)
                p.grad.copy_(m.local(logical))
            if self.replicas is not None and self.world > self.size:
                dist.all_reduce(p.grad, group=self.replicas)
            p.grad.div_(self.world)

    def grad_norm_sq(self, model: nn.Module) -> torch.Tensor:
        """Σ g² over the whole model's gradients: the replicated part once, each logical expert once."""
        dense = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in model.parameters():
            if p.grad is not None and getattr(p, "ep_module", None) is None:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                dense += g.detach().float().pow(2).sum()
        return dense + self.sharded_sq(model.parameters())

    def sharded_sq(self, params) -> torch.Tensor:
        """Σ g² over the expert shards among `params`, each logical expert once (a slot's share is 1 / its expert's
        replica count), summed over the EP group."""
        sharded = torch.zeros((), dtype=torch.float32, device=self.device)  # on the training device: nccl
        for p in params:
            m = getattr(p, "ep_module", None)
            if m is not None and p.grad is not None:
                share = 1.0 / m.local(m.logcnt.float()).to(p.grad.device)  # [slots]: 1 / the replicas of its expert
                sharded += (p.grad.detach().float().pow(2).flatten(1).sum(1) * share).sum()
        if self.group is not None:
            dist.all_reduce(sharded, group=self.group)
        return sharded

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """A shard's tensor [slots, ...] gathered over the EP group -> [P, ...], physical slot order."""
        if self.group is None:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)

    def full(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The whole logical tensor [E, ...] of the expert shard `name` (its parameter or an optimizer moment)."""
        return self.by_name[name].to_logical(self.gather(t))

    # ---- EPLB: re-placing the experts from their measured load ----
    def observe(self, loads: list[torch.Tensor]) -> None:
        """The routed tokens per logical expert of every layer in this step (summed over all ranks)."""
        if self.redundant and self.every:
            step = torch.stack([l.detach().float().cpu() for l in loads])
            self.load = step if self.load is None else self.load + step

    @torch.no_grad()
    def rebalance(self, opt: torch.optim.Optimizer) -> list[float]:
        """New placement of every layer from the load observed since the last one: the slots' weights and optimizer
        moments re-gathered into it (every rank computes the same placement from the same load). Returns the max /
        mean rank load per layer under the old and the new placement, averaged (for the log)."""
        if self.load is None:
            return []
        phy2log, log2phy, logcnt = self._placement(self.load)
        before = balance(self.load, torch.stack([m.phy2log.cpu() for m in self.layers]),
                         torch.stack([m.logcnt.cpu() for m in self.layers]), self.size).mean().item()
        after = balance(self.load, phy2log, logcnt, self.size).mean().item()
        for i, m in enumerate(self.layers):
            tensors = [m.gate_up_proj, m.down_proj]
            tensors += [v for p in (m.gate_up_proj, m.down_proj) for v in opt.state.get(p, {}).values()
                        if torch.is_tensor(v) and v.dim() > 0]
            logical = [m.to_logical(self.gather(t.data)) for t in tensors]
            m.set_placement(phy2log[i], log2phy[i], logcnt[i])
            for t, full in zip(tensors, logical):
                t.data.copy_(m.local(full))
        self.load = None
        return [before, after]


def local_slice(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The slots of a full [E, ...] tensor that an expert shard p holds (resume at any EP degree)."""
    m = p.ep_module
    if full.shape[0] != m.n_logical:
        raise NanoseekError(f"a saved expert tensor has {full.shape[0]} experts, this model {m.n_logical}")
    return m.local(full)
