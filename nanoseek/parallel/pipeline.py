"""Pipeline parallelism (DeepSeek-V3 §3.2.1: 16-way PP with DualPipe) through `torch.distributed.pipelining`: the
schedules are PyTorch's, nanoseek only cuts the model into stages, from outside it.

The world's W ranks form a DeviceMesh (dp, pp) of shape (W/P, P). The model's layers are cut into S stages of near
equal numbers of layers: S = P for `1f1b`, S = 2P for `interleaved1f1b` (rank r holds stages r and r + P), `zbv` and
`dualpipev` (the "V": rank r holds stages r and 2P-1-r, so rank 0 holds the first and the last stage, the embedding
and the output head together, as DualPipe places them). The first stage embeds the tokens; the last runs the final
norm, the output head and the MTP module, whose loss is part of the pipeline's loss. The token ids travel with the
hidden states (the MTP module embeds the next tokens with the shared embedding); where the first and last stage are
on different ranks the last holds a copy of the embedding, its gradient summed with the first's after each step
(as Megatron ties them), so both copies stay equal.

`--batch-size` stays the data-parallel group's micro-batch: the pipeline splits it into `--pp-microbatches` pieces,
each a microbatch of the schedule; the schedule sums their gradients, scaled by 1/n, which is the gradient of the
whole batch's mean loss. The sequence-wise balance loss of the MoE layers of every stage joins the backward through
`AuxLoss` (as Megatron's MoEAuxLossAutoScaler). Data parallelism over the dp dimension all-reduces the gradients
after each step; the optimizer and the rest of the trainer are as without PP.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleInterleaved1F1B,
                                          ScheduleZBVZeroBubble)

from nanoseek.errors import NanoseekError
from nanoseek.parallel.distributed import build_mesh

SCHEDULES = {"1f1b": Schedule1F1B, "interleaved1f1b": ScheduleInterleaved1F1B, "zbv": ScheduleZBVZeroBubble,
             "dualpipev": ScheduleDualPipeV}


class AuxLoss(torch.autograd.Function):
    """x unchanged forward; backward also sends gradient 1 into `aux` (a loss computed inside a stage that is not
    the last), so that it joins the pipeline's backward."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.save_for_backward(aux)
        return x.clone()  # not x itself: an alias would be a view, which zero-bubble schedules cannot detach

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


def stage_ranks(schedule: str, pp: int) -> list[int]:
    """stage index -> the pp rank holding it."""
    if schedule == "1f1b":
        return list(range(pp))
    if schedule == "interleaved1f1b":
        return list(range(pp)) * 2
    return list(range(pp)) + list(reversed(range(pp)))  # the V


def stage_bounds(L: int, S: int) -> list[int]:
    """The layers of S stages of near equal size: stage s holds layers [bounds[s], bounds[s + 1])."""
    return [round(i * L / S) for i in range(S + 1)]


def holders(model, schedule: str, pp: int):
    """name -> the pp ranks whose stages hold that model tensor, the one holding the canonical copy first: a layer's
    stage; the embedding on the first stage (the last stage trains a tied copy of its own: Pipeline.embed_copy); the
    final norm, head and MTP module on the last; anything else on every rank."""
    owner = stage_ranks(schedule, pp)
    S = len(owner)
    bounds = stage_bounds(len(model.layers), S)
    layer = {i: owner[s] for s in range(S) for i in range(bounds[s], bounds[s + 1])}
    first, last = owner[0], owner[S - 1]

    def ranks(name: str) -> tuple[int, ...]:
        if name.startswith("layers."):
            return (layer[int(name.split(".")[1])],)
        if name.startswith("embed_tokens."):
            return (first,)
        if name.startswith(("norm.", "lm_head.", "mtp.")):
            return (last,)
        return tuple(range(pp))
    return ranks


def held_by(model, schedule: str, pp: int, pp_rank: int):
    """name -> whether the pp rank materialises that parameter: what its stages hold (holders), and the embedding on
    the last stage's rank too, where the pipeline makes its tied copy from it (and then drops it)."""
    ranks, last = holders(model, schedule, pp), stage_ranks(schedule, pp)[-1]
    return lambda name: pp_rank in ranks(name) or (name.startswith("embed_tokens.") and pp_rank == last)


class Stage(nn.Module):
    """Layers [lo, hi) of the model, run by the model's own pieces (Transformer.rope, blocks, norm, lm_head,
    mtp_forward); the first stage embeds, the last ends with norm, head and MTP, returning the loss-bearing tensors.
    Its inputs: (input_ids,) on the first stage, else (x, input_ids)."""

    def __init__(self, model, lo: int, hi: int, first: bool, last: bool, embed: nn.Embedding | None):
        super().__init__()
        self.first, self.last = first, last
        self.model = (model,)  # not a submodule: the stage holds (and the schedule steps) only its own parameters
        self.vocab = model.args.vocab_size
        self.calls = []  # per forward call of the current step: each MoE layer's routed-token counts
        self.layers = nn.ModuleList(model.layers[lo:hi])
        self.rotary = model.rotary
        self.embed_tokens = embed  # the first stage's own; on the last, the shared one (or its copy)
        if last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp

    def _balance(self, block, x):
        """A block's MoE balance loss into the backward (through AuxLoss: a stage's output is not the loss)."""
        moe = getattr(block, "mlp", None)
        if getattr(moe, "balance_loss", None) is not None and self.training:
            x = AuxLoss.apply(x, moe.balance_loss)
            moe.balance_loss = None
        return x

    def forward(self, *inputs):
        model = self.model[0]
        before = [load.clone() for load in self.loads()]
        if self.first:
            (ids,) = inputs
            x = self.embed_tokens(ids)
        else:
            x, ids = inputs
            # clamped: torch.pipelining's runtime shape inference runs each stage once on uninitialised buffers
            ids = ids.long().clamp(0, self.vocab - 1)
        cos, sin = model.rope(ids)
        x = model.blocks(x, cos, sin, layers=self.layers, after=self._balance)
        if not self.last:
            out = (x, ids.clone())  # (a copy: the received buffer is a view, which zero-bubble schedules cannot detach)
        else:
            h = model.norm(x)
            out = (model.lm_head(h), *model.mtp_forward(h, ids, cos, sin, self.embed_tokens, self._balance))
        self.calls.append([after - b for after, b in zip(self.loads(), before)])  # this call's routed tokens
        return out[0] if len(out) == 1 else out

    def loads(self) -> list[torch.Tensor]:
        """The routed-token counts of this stage's MoE layers (the MTP module's too, on the last)."""
        mods = list(self.layers) + ([m.block for m in self.mtp] if self.last else [])
        return [m.mlp.tokens_per_expert for m in mods if hasattr(getattr(m, "mlp", None), "tokens_per_expert")]


class Pipeline:
    """The stages this rank holds, their schedule, and the step that runs it (see the module's doc)."""

    def __init__(self, model, pp: int, schedule: str, microbatches: int, world: int, rank: int,
                 device: torch.device, mtp_weight: float, mesh=None):
        """mesh: parallel.build_mesh's (pp, dp_mod_ep, ep) mesh (made here when not given)."""
        if schedule not in SCHEDULES:
            raise NanoseekError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if pp < 2 or world % pp:
            raise NanoseekError(f"--pp {pp} must be >= 2 and divide the number of ranks ({world})")
        owner = stage_ranks(schedule, pp)
        S = len(owner)
        L = len(model.layers)
        if L < S:
            raise NanoseekError(f"--pp {pp} with {schedule} needs {S} stages, and the model has {L} layers")
        self.mesh = mesh if mesh is not None else build_mesh(world, device, pp)
        self.pp_group, self.dp_group = self.mesh.get_group("pp"), self.mesh["dp"].get_group()
        self.pp, self.dp = pp, world // pp
        self.pp_rank, self.dp_rank = rank // self.dp, rank % self.dp  # pp outermost: rank = pp_rank * dp + dp_rank
        self.mtp_weight, self.microbatches, self.model, self.device = mtp_weight, microbatches, model, device
        bounds = stage_bounds(L, S)
        self.holders = holders(model, schedule, pp)
        self.last_owner = owner[S - 1]
        mine = [s for s in range(S) if owner[s] == self.pp_rank]
        self.has_first, self.has_last = 0 in mine, S - 1 in mine
        # the last stage's embedding is a copy, tied to the first stage's (one parameter in two stages of one rank
        # loses a gradient under the zero-bubble schedules, whose weight passes run per stage)
        self.embed_copy = None
        if self.has_last:
            self.embed_copy = nn.Embedding.from_pretrained(model.embed_tokens.weight.detach().clone(), freeze=False)
            if not self.has_first:  # the model's own is the first stage's: not kept twice here
                model.embed_tokens.weight = nn.Parameter(torch.empty_like(model.embed_tokens.weight, device="meta"))
        self.modules = []
        stages = []
        for s in mine:
            first, last = s == 0, s == S - 1
            embed = model.embed_tokens if first else self.embed_copy
            module = Stage(model, bounds[s], bounds[s + 1], first, last, embed if first or last else None)
            self.modules.append(module)
            stages.append(PipelineStage(module, s, S, device, group=self.pp_group))
        # the pp ranks holding the first and the last stage, when they differ: one group per dp replica (every rank
        # creates every group, in the same order); this rank's, where it holds one of those stages
        self.tie_group = None
        if self.last_owner != 0:
            for d in range(self.dp):
                g = dist.new_group([d, self.last_owner * self.dp + d])
                if d == self.dp_rank and self.pp_rank in (0, self.last_owner):
                    self.tie_group = g
        self.parts = {}  # the last stage's loss terms of the current step, for the logs
        cls = SCHEDULES[schedule]
        try:
            self.schedule = cls(stages[0], microbatches, loss_fn=self.loss) if cls is Schedule1F1B else \
                cls(stages, microbatches, loss_fn=self.loss)
        except (ValueError, AssertionError) as e:
            raise NanoseekError(f"--pp-schedule {schedule} with --pp {pp} and --pp-microbatches {microbatches}: "
                                f"{e}") from None

    def parameters(self):
        """This rank's trainable parameters (each once)."""
        seen = {}
        for m in self.modules:
            for p in m.parameters():
                seen[id(p)] = p
        if self.embed_copy is not None:
            seen[id(self.embed_copy.weight)] = self.embed_copy.weight
        return list(seen.values())

    def loss(self, outputs, target):
        """The last stage's loss for one microbatch: the main CE + λ · the mean MTP CE (as Transformer.forward)."""
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        logits, mtp = outputs[0], outputs[1:]
        lm = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)
        total = lm
        self.parts.setdefault("loss", []).append(lm.detach())
        if mtp:
            m = torch.stack([F.cross_entropy(lg.float().flatten(0, 1), target[:, k:].flatten(), ignore_index=-100)
                             for k, lg in enumerate(mtp, start=1)]).mean()
            total = total + self.mtp_weight * m
            self.parts.setdefault("mtp_loss", []).append(m.detach())
        self.parts.setdefault("total_loss", []).append(total.detach())
        return total

    def step(self, x, y) -> dict:
        """One forward + backward of the data-parallel micro-batch x [B, T] (targets y) through the pipeline;
        gradients left in the parameters (tied copies summed, data-parallel mean) -> the step's mean losses on this
        rank's last stage (zeros on the other ranks: `Run` averages over the ranks that hold one)."""
        self.parts = {}
        if x.shape[0] % self.microbatches:
            raise NanoseekError(f"--batch-size {x.shape[0]} must be a multiple of --pp-microbatches "
                                f"{self.microbatches}")
        for m in self.modules:
            m.calls = []
        args = (x,) if self.has_first else ()
        kwargs = {"target": y} if self.has_last else {}
        self.schedule.step(*args, **kwargs)
        for m in self.modules:  # a shape-inference forward (the first step's) must not count as routed tokens
            if len(m.calls) > self.microbatches:
                for load, first in zip(m.loads(), m.calls[0]):
                    load -= first
        self.sync_grads()
        zero = torch.zeros((), device=x.device)
        # (the first step's shape inference runs the loss once more, first: the last M are the microbatches')
        return {k: torch.stack(self.parts[k][-self.microbatches:]).mean() if k in self.parts else zero
                for k in ("loss", "mtp_loss", "total_loss")} | {"balance_loss": zero}

    # ---- the ranks together ----
    @torch.no_grad()
    def sync_grads(self) -> None:
        """The tied embedding copies' gradients summed (first and last stage: on one rank, or over the tie group),
        then the data-parallel mean."""
        tied = ([self.model.embed_tokens.weight] if self.has_first else []) + \
            ([self.embed_copy.weight] if self.has_last else [])
        for w in tied:
            if w.grad is None:
                w.grad = torch.zeros_like(w)
        if len(tied) == 2:  # both stages here (the V schedules' rank 0)
            total = tied[0].grad + tied[1].grad
            for w in tied:
                w.grad.copy_(total)
        elif tied and self.tie_group is not None:
            dist.all_reduce(tied[0].grad, group=self.tie_group)
        if self.dp > 1:
            for p in self.parameters():  # (expert-parallel shards: expert_parallel.EP.reduce_grads reduces them)
                if p.grad is not None and getattr(p, "ep_module", None) is None:
                    dist.all_reduce(p.grad, group=self.dp_group)
                    p.grad.div_(self.dp)

    def grad_norm(self, ep=None) -> torch.Tensor:
        """The whole model's gradient norm: Σ g² over this rank's stages (the tied copy of the embedding counted once;
        expert shards through `ep`), summed over the pp ranks."""
        sq = torch.zeros((), dtype=torch.float32, device=self.device)  # on the training device: nccl has no CPU
        for p in self.parameters():
            if p.grad is not None and (self.embed_copy is None or p is not self.embed_copy.weight) \
                    and getattr(p, "ep_module", None) is None:
                sq += p.grad.detach().float().pow(2).sum()
        if ep is not None:
            sq += ep.sharded_sq(self.parameters())
        dist.all_reduce(sq, group=self.pp_group)
        return sq.sqrt().float()

    def owner(self, name: str) -> int:
        """The pp rank whose stages hold the canonical copy of the model tensor `name` (state-dict name)."""
        return self.holders(name)[0]

    def full_state(self, sd: dict) -> dict:
        """The model's state dict with every tensor as its owning stage holds it (broadcast within the pp group)."""
        out = {}
        for name, t in sd.items():  # (what this rank does not hold is a buffer to receive into)
            # (on the training device: the owner sends from there, and nccl and gloo cannot meet in one broadcast)
            t = torch.empty(t.shape, dtype=t.dtype, device=self.device) if t.is_meta else t.detach().clone()
            if len(self.holders(name)) < self.pp:  # (what every rank holds is its own already)
                dist.broadcast(t, group_src=self.owner(name), group=self.pp_group)
            out[name] = t
        return out
