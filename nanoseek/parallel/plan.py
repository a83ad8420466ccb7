"""One plan for a model on this rank (torchtitan's parallelize step): `check` refuses a layout that cannot be, in one
line, before anything is written; `parallelize` applies the wraps in one fixed order and returns the `Plan`, which
owns the per-step jobs that depend on the layout (gradient norm and clipping, the ranks' vote, EPLB) and the state
on disk (DCP checkpoints that any layout reads, the published model written rank by rank). The trainer
(`train/run.py: Run`) holds the plan and nothing else about parallelism.

The order, from the inside out (each wraps what the one before left):

    1. EP          the routed experts sharded over the mesh's ep dimension (expert_parallel.EP.shard)
    2. FP8         the chosen linears and experts swapped for FP8 classes (EP's shard included: FP8 x EP)
    3. AC          every decoder block's forward under torch.utils.checkpoint (activation_checkpoint.apply)
    4. PP | DP     the stages this rank holds (pipeline.Pipeline), or DDP / FSDP2 over the data-parallel ranks;
                   a model built on the meta device is materialised before PP / DDP and after FSDP2's sharding,
                   only this rank's part (materialize.py), to the one-process initial weights
    (5. compile    the trainer's, on CUDA)

What composes with what (anything not refused here is tested equal to one process, bench/RESULTS.md):

    | with          | EP  | PP  | FSDP2 | FP8 | AC  | --ep-overlap        | EPLB |
    | EP            |  -  | yes | yes   | yes | yes | yes                 | yes  |
    | PP            | yes |  -  | no*   | yes | yes | 1f1b, interleaved   | yes  |
    (* under PP the stages are replicated over dp and their gradients all-reduced by the pipeline itself)
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from nanoseek import fp8
from nanoseek.errors import NanoseekError
from nanoseek.parallel import activation_checkpoint, export, state
from nanoseek.parallel.data_parallel import wrap
from nanoseek.parallel.distributed import Dist, all_reduce, build_mesh
from nanoseek.parallel.expert_parallel import EP, local_slice
from nanoseek.parallel.materialize import materialize, on_meta
from nanoseek.parallel.pipeline import Pipeline, held_by


@dataclass
class Layout:
    """The parallel and precision options of a run (the trainers' flags of the same names)."""
    parallel: str = "ddp"  # ddp | fsdp | none: the data-parallel wrap
    ep: int = 1
    ep_overlap: bool = False
    ep_redundant: int = 0
    eplb_every: int = 0
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 4
    fp8: bool = False
    fp8_pow2: bool = False
    ac: str = "none"

    @classmethod
    def from_args(cls, args) -> "Layout":
        """The trainer's parsed flags; a trainer without a flag (sft has no --pp) gets its default."""
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__ if hasattr(args, k)})

    def data_ranks(self, d: Dist) -> tuple[int, int]:
        """(this rank's index, their number) among the ranks that read distinct data: all of them, or one per
        pipeline (its stages share a micro-batch); pp is the mesh's outermost dimension."""
        world = d.world // self.pp
        return d.rank % world, world

    def check(self, world: int) -> None:
        """One line for a layout that cannot be (see the module's table)."""
        if self.fp8_pow2 and not self.fp8:
            raise NanoseekError("--fp8-pow2 chooses the scales of --fp8; add --fp8")
        if self.ac not in activation_checkpoint.MODES:
            raise NanoseekError(f"--ac must be one of {', '.join(activation_checkpoint.MODES)}, got {self.ac!r}")
        if self.ep_overlap and self.pp > 1 and self.pp_schedule in ("zbv", "dualpipev"):
            # their weight-gradient pass runs apart from the input-gradient one, after the exchange's backward
            # (one pass for both) has freed its graph
            raise NanoseekError(f"--ep-overlap does not compose with --pp-schedule {self.pp_schedule} (its separate "
                                f"weight-gradient pass); use 1f1b or interleaved1f1b, or EP without --ep-overlap")
        if self.pp > 1 and world % self.pp:
            raise NanoseekError(f"--pp {self.pp} must divide the number of ranks ({world})")
        EP.check(self.ep, world, self.pp, self.ep_redundant, self.eplb_every)
        if self.ep == 1 and (self.ep_redundant or self.eplb_every or self.ep_overlap):
            raise NanoseekError("--ep-redundant, --eplb-every and --ep-overlap apply to expert parallelism: add --ep N")


class Plan:
    """The parallel form of one model on this rank: its mesh, EP and PP parts, the module to run forwards through
    (`wrapped`; None under PP, whose schedule runs them), and the layout's per-step jobs."""

    def __init__(self, model, d: Dist, layout: Layout):
        self.model, self.d, self.layout = model, d, layout
        self.mesh = self.ep = self.pp = None
        self.wrapped = model
        self.data_rank, self.data_world = layout.data_ranks(d)
        self.save_group = None  # DCP's gloo group, made at the first save

    # ---- the optimizer's parameters ----
    def param_groups(self, groups_of) -> tuple[list[dict], list[list[str]] | None]:
        """groups_of(keep_empty) -> AdamW's groups of the whole model (names beside params); this rank's share of
        them, and under PP every group's names (the checkpoint's grouping, whatever stages this rank holds)."""
        if self.pp is None:
            return by_kind(groups_of(False)), None
        mine = {id(p) for p in self.pp.parameters()}
        groups = [{**g, "params": [p for p in g["params"] if id(p) in mine],
                   "names": [n for n, p in zip(g["names"], g["params"]) if id(p) in mine]}
                  for g in groups_of(True)]
        if self.pp.embed_copy is not None:  # the last stage's tied copy, under the embedding's name
            no_decay = next(g for g in groups if g["weight_decay"] == 0.0)
            no_decay["params"].append(self.pp.embed_copy.weight)
            no_decay["names"].append("embed_tokens.weight")
        return groups, [g["names"] for g in groups_of(True)]

    # ---- the step ----
    def clip_grads(self, opt: torch.optim.Optimizer, clip: float) -> torch.Tensor:
        """Gradients to the data-parallel mean where the wrap did not (EP's shards), then the whole model's gradient
        norm (a device tensor), and the gradients clipped to `clip` (0: not clipped)."""
        if self.ep is None and self.pp is None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        if self.ep is not None:
            self.ep.reduce_grads(self.model)
        # the norm over expert shards (each logical expert once, summed over the EP group) and pipeline stages (summed
        # over the pp ranks) is theirs; the clipping torch's, per kind (one foreach cannot mix DTensors and tensors)
        norm = self.pp.grad_norm(self.ep) if self.pp is not None else self.ep.grad_norm_sq(self.model).sqrt()
        if clip > 0:
            for g in by_kind(opt.param_groups):
                torch.nn.utils.clip_grads_with_norm_(g["params"], clip, norm)
        return norm

    def vote(self, losses: dict, grad_norm: torch.Tensor, loads: list[torch.Tensor]):
        """The step's collectives after the gradient norm, all on the training device (nccl has no CPU backend):
        -> this rank's losses averaged over the ranks [n] and 1 where any rank saw a non-finite loss or gradient [1];
        the MoE layers' expert loads summed over the ranks, in place."""
        device = self.d.device
        vals = torch.stack([losses[k].detach().float().reshape(()) for k in losses]).to(device) if losses \
            else torch.zeros(0, device=device)
        bad = (~torch.isfinite(vals).all() | ~torch.isfinite(grad_norm)).float().reshape(1)
        all_reduce(bad, dist.ReduceOp.MAX)
        all_reduce(vals)
        vals /= self.data_world  # under PP only the ranks holding a last stage have losses (the others add zeros)
        for load in loads:
            all_reduce(load)
        if self.ep is not None and loads:
            self.ep.observe(loads)
        return vals, bad

    def rebalance(self, opt: torch.optim.Optimizer, step: int) -> dict:
        """EPLB every --eplb-every steps: the experts re-placed from the load since the last placement."""
        if self.ep is None or not self.ep.every or step % self.ep.every:
            return {}
        before_after = self.ep.rebalance(opt)
        return {"eplb_rank_load_max_over_mean": [round(v, 3) for v in before_after]} if before_after else {}

    # ---- the state on disk ----
    def save(self, opt: torch.optim.Optimizer, path, background: bool = False):
        """This rank's part of the weights and of AdamW's state into the DCP checkpoint directory `path`, every rank
        together (parallel/state.py); background: -> a future (DCP's async_save)."""
        if self.save_group is None:  # (collective: every rank saves together)
            self.save_group = state.checkpoint_group()
        return state.save(self, opt, path, background, self.save_group)

    def load(self, opt: torch.optim.Optimizer, path) -> None:
        """A DCP checkpoint, written under any layout, into this rank's part of the model and its optimizer."""
        state.load(self, opt, path)

    def save_published(self, out, tokenizer=None, fp8: bool = False) -> None:
        """OUT/model in the published layout, each rank writing what it holds (parallel/export.py)."""
        export.save_published(self, out, tokenizer, fp8)

    @torch.no_grad()
    def load_model_state(self, sd: dict) -> None:
        """A whole state dict (nanoseek names, whole tensors on the host: a published checkpoint's) into this rank's
        part: an expert shard takes its slots, an FSDP2 shard its rows, a stage held elsewhere nothing."""
        own = self.model.state_dict(keep_vars=True)
        missing = sorted(set(own) - set(sd))
        if missing:
            raise NanoseekError(f"the checkpoint lacks {missing[0]}")
        for name, t in own.items():
            if t.is_meta:
                continue
            v = sd[name]
            if getattr(t, "ep_module", None) is not None:
                v = local_slice(v, t)
            if isinstance(t, DTensor):
                v = distribute_tensor(v.to(t.device, t.dtype), t.device_mesh, t.placements, src_data_rank=None)
                t.to_local().copy_(v.to_local())
            else:
                t.copy_(v)
        if self.pp is not None and self.pp.embed_copy is not None:
            self.pp.embed_copy.weight.copy_(sd["embed_tokens.weight"])

    def sync_stages(self) -> None:
        """Under PP: every rank's model gets the weights of the stages it does not hold (evaluation and sampling
        run the whole model on one rank), until release_stages; the whole model is on each rank meanwhile."""
        if self.pp is not None:
            with torch.no_grad():
                full = self.pp.full_state(self.model.state_dict())
                self._released = [n for n, t in self.model.state_dict().items() if t.is_meta]
                for name in self._released:  # (what it holds is what the optimizer steps: left as it is)
                    self._set(name, full[name].to(self.d.device))

    def release_stages(self) -> None:
        """After sync_stages: what this rank does not hold back to the meta device (its memory freed)."""
        for name in getattr(self, "_released", []):
            self._set(name, torch.empty_like(self.model.get_parameter(name), device="meta"))
        self._released = []

    def _set(self, name: str, value: torch.Tensor) -> None:
        path, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(path)
        module._parameters[leaf] = nn.Parameter(value, module._parameters[leaf].requires_grad)


def by_kind(groups: list[dict]) -> list[dict]:
    """Each AdamW group split into its FSDP2 shards (DTensors) and its plain tensors (EP's expert shards, which FSDP2
    leaves alone): torch's fused and foreach AdamW refuse a group that mixes them (on CUDA the trainer's is fused)."""
    out = []
    for g in groups:
        for dtensor in (True, False):
            keep = [i for i, p in enumerate(g["params"]) if isinstance(p, DTensor) == dtensor]
            if keep:
                out.append({**g, **{k: [g[k][i] for i in keep] for k in ("params", "names") if k in g}})
    return out


def parallelize(model, d: Dist, layout: Layout, init: bool = True) -> Plan:
    """Apply the layout to `model` on this rank, in the module's order; call before the optimizer is built. A model
    on the meta device (build_model(..., device="meta")) is materialised here, only this rank's part of it, with the
    one-process initial weights (init; without, left to be loaded: Plan.load, Plan.load_model_state)."""
    layout.check(d.world)
    plan = Plan(model, d, layout)
    meta = on_meta(model)
    if d.enabled and (layout.pp > 1 or layout.ep > 1):  # one mesh for EP and PP, ep innermost
        plan.mesh = build_mesh(d.world, d.device, layout.pp, layout.ep)
    if layout.ep > 1:
        plan.ep = EP(layout.ep, d.world, d.rank, d.device, layout.ep_redundant, layout.eplb_every,
                     model.args.n_group or 1, layout.pp, layout.ep_overlap, plan.mesh)
        plan.ep.shard(model)
    if layout.fp8:
        fp8.convert(model, pow2=layout.fp8_pow2)
    activation_checkpoint.apply(model, layout.ac)
    if meta and layout.pp > 1:  # only the stages this rank holds
        materialize(model, d.device, init, held_by(model, layout.pp_schedule, layout.pp, d.rank // plan.data_world))
    elif meta and not (layout.parallel == "fsdp" and d.enabled):
        materialize(model, d.device, init)  # (FSDP2 shards first, then materialises only its shards: below)
    if layout.pp > 1:  # the stages this rank holds; no DDP/FSDP wrap (the pipeline reduces over dp itself)
        plan.pp = Pipeline(model, layout.pp, layout.pp_schedule, layout.pp_microbatches, d.world, d.rank, d.device,
                           model.args.mtp_loss_weight, plan.mesh)
        plan.wrapped = None
    else:
        plan.wrapped = wrap(model, d, layout.parallel, ignored=plan.ep.names if plan.ep else ())
        if meta and on_meta(model):
            materialize(model, d.device, init)
    return plan
