"""`nanoseek plan`: does a training layout fit in a GPU's memory? One rank's training step, simulated.

DeepSeek-V3 trained its 671B parameters on 2,048 H800s of 80 GB without tensor parallelism (report §3.2-§3.4): a
16-way pipeline (DualPipe), 64-way expert parallelism over 8 nodes, ZeRO-1 data parallelism over the rest, and memory
saved wherever it could be (RMSNorm and MLA's up-projections recomputed, activations cached in FP8, AdamW's moments
in BF16, the EMA in CPU memory). Whether a layout fits is a question about one rank: its part of the model, its
gradients and optimizer state, and the activations of the micro-batches its pipeline schedule keeps in flight.

`simulate` answers it by running that rank's part through the project's own code on fake tensors (torch's
FakeTensorMode: shapes, dtypes and devices, no data and no memory) under a fake process group of the layout's world
size (torch's `fake` backend: every collective returns at once):

    1. the whole model is built on the meta device (free, even at 671B); `parallel.parallelize` shards it as a run of
       that layout would on the chosen rank (EP's expert slots, FP8, AC, the pipeline stages it holds, or FSDP2's
       shards) and materialises only that part, as fake tensors;
    2. `steps` training steps (the first allocates the optimizer state, the last is the one reported), each one
       micro-batch of micro_batch x seq_len tokens forward and backward through the rank's stages, each forward in
       its own bf16 autocast region (the trainer's mode on GPUs: fp32 master weights and gradients), the gradients
       reduced as the trainer reduces them, then AdamW (torch's fused one, or `AdamWBF16Moments`);
    3. torch's MemTracker sorts every live tensor into parameters, gradients, optimizer states, activations and
       temporaries, after each phase and at every operation.

What a fake run cannot give is accounted from those measurements, and the output says so:

- micro-batches in flight: the rank runs one micro-batch per step; its pipeline schedule keeps several alive. Their
  number per stage is read from torch's own schedule (`pipeline_order`, this rank's forwards and backwards in order;
  a micro-batch's activations live from its forward to its (weight-)backward) and multiplies the activations measured
  for one micro-batch of that stage. (1F1B keeps PP on the first stage; DualPipe PP + 1, report Table 2.)
- ZeRO-1: the optimizer steps this rank's 1/dp slice of every parameter (views of the parameter and its gradient:
  what a ZeRO-1 rank updates before the all-gather; dp = the ranks holding that parameter, world/pp, or world/(pp*ep)
  for an expert shard), so its moments and its step's temporaries are measured at their sharded size. ZeRO-3 is
  FSDP2 as the trainer applies it (`--parallel fsdp`). ZeRO-0 keeps everything whole (DDP).
- routing: how many tokens reach each expert depends on the data, which fake tensors do not hold. The simulation
  assumes balanced routing, tokens*K/E rows for every expert (`balanced_routing`, a stand-in used only here).
- attention: on CUDA, SDPA runs MLA (q/k heads of 192, v of 128) with the memory-efficient kernel, which keeps the
  output and the log-sum-exp; for these fake CPU tensors it would pick the math path and keep the T x T scores. The
  simulation calls the memory-efficient kernel (`gpu_attention`).
- the device: the fake tensors sit on the CPU device. A CPU build of torch creates fake CUDA tensors, but its
  autograd engine aborts the process on their backward (no CUDA device guard is compiled in); sizes are the same.

Not counted: the CUDA context, NCCL's and the pipeline's communication buffers, the caching allocator's rounding and
fragmentation (together a few GiB on a real GPU), and whatever lives off the GPU (V3's EMA).
"""

import contextlib
import math
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining.schedules import _ComputationType
from torch.testing._internal.distributed.fake_pg import FakeStore

from nanoseek import comm_model
from nanoseek.config import ModelArgs
from nanoseek.cost import attention_flops_per_token, count_params, human
from nanoseek.errors import NanoseekError
from nanoseek.model import build_model
from nanoseek.model.moe import MoE
from nanoseek.parallel import Dist, Layout, parallelize
from nanoseek.parallel.activation_checkpoint import MODES as AC_MODES
from nanoseek.parallel.expert_parallel import EPExperts
from nanoseek.parallel.pipeline import SCHEDULES, stage_bounds, stage_ranks
from nanoseek.parallel.plan import by_kind
from nanoseek.train.common import AdamWBF16Moments, param_groups

GIB = 1 << 30
DEVICE = torch.device("cpu")  # where the fake tensors sit (see the module's doc)
ZERO = (0, 1, 3)


@dataclass
class Setup:
    """A layout to simulate: `nanoseek plan`'s flags."""
    gpus: int = 8
    ep: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 0  # 0: twice the pipeline's stages, past the schedule's warm-up
    zero: int = 1
    ac: str = "none"
    seq_len: int = 4096
    micro_batch: int = 1
    fp8: bool = False
    bf16_moments: bool = False
    gpu_memory_gib: float = 80.0
    rank: int = 0
    steps: int = 2

    @property
    def stages(self) -> int:
        return len(stage_ranks(self.pp_schedule, self.pp)) if self.pp > 1 else 1

    def layout(self) -> Layout:
        return Layout(parallel="fsdp" if self.zero == 3 else "none", ep=self.ep, pp=self.pp,
                      pp_schedule=self.pp_schedule, pp_microbatches=self.pp_microbatches or 2 * self.stages,
                      fp8=self.fp8, ac=self.ac)

    def check(self, args: ModelArgs) -> None:
        """One line for a layout that cannot be, before anything is built."""
        for name in ("gpus", "ep", "pp", "seq_len", "micro_batch", "steps"):
            if getattr(self, name) < 1:
                raise NanoseekError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.gpu_memory_gib > 0:
            raise NanoseekError(f"--gpu-memory-gib must be > 0, got {self.gpu_memory_gib}")
        if not 0 <= self.rank < self.gpus:
            raise NanoseekError(f"--rank must be in [0, {self.gpus - 1}], got {self.rank}")
        if self.zero not in ZERO:
            raise NanoseekError(f"--zero must be one of {', '.join(map(str, ZERO))}, got {self.zero}")
        if self.pp_schedule not in SCHEDULES:
            raise NanoseekError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {self.pp_schedule!r}")
        if self.ac not in AC_MODES:
            raise NanoseekError(f"--ac must be one of {', '.join(AC_MODES)}, got {self.ac!r}")
        if self.zero == 3 and self.pp > 1:
            raise NanoseekError("--zero 3 (FSDP2) inside pipeline stages is not built (nanoseek's PP replicates "
                                "each stage over its data-parallel ranks): use --zero 0 or 1 with --pp")
        if self.seq_len > args.max_position_embeddings:
            raise NanoseekError(f"--seq-len {self.seq_len} exceeds the model's context "
                                f"({args.max_position_embeddings})")
        if self.ep > 1 and not args.n_routed_experts:
            raise NanoseekError("--ep shards routed experts, and this model has none")
        if self.ep > 1 and args.n_routed_experts % self.ep:
            raise NanoseekError(f"--ep {self.ep} must divide the model's {args.n_routed_experts} routed experts")
        if self.gpus % (self.pp * self.ep):
            raise NanoseekError(f"--gpus {self.gpus} must be a multiple of --pp x --ep = {self.pp * self.ep}")
        if self.pp > 1 and args.num_hidden_layers < self.stages:
            raise NanoseekError(f"--pp {self.pp} with {self.pp_schedule} cuts {self.stages} stages, and the model "
                                f"has {args.num_hidden_layers} layers")
        if self.pp > 1 and self.pp_microbatches and self.pp_microbatches < self.stages:
            raise NanoseekError(f"--pp-microbatches must be >= the pipeline's {self.stages} stages, got "
                                f"{self.pp_microbatches}")
        self.layout().check(self.gpus)


# ---- stand-ins for what fake tensors cannot give (used by the simulation only) ---------------------------------------

def _even(n: int, parts: int) -> list[int]:
    """n split into `parts` counts as equal as they can be."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def _balanced_plan(self, indices):
    """EPExperts.plan under balanced routing: the same exchange with every rank sending and receiving an equal share
    of the (token, expert) pairs, and each local expert getting an equal share of what arrives (the real plan reads
    the routed counts, which fake tensors do not hold, and exchanges them: two small all-to-alls left out here)."""
    K, n_local = indices.shape[1], self.gate_up_proj.shape[0]
    order = indices.flatten().argsort(stable=True)
    splits = _even(order.numel(), self.ep_size)
    total = sum(splits)
    recv_expert = torch.arange(total, device=indices.device) * n_local // total  # sorted by expert, as plan's
    return order, order // K, splits, splits, recv_expert


def _balanced_bincount(x, weights=None, minlength=0):
    """torch.bincount of routed expert ids (the FP8 experts' segments) -> balanced counts, as real numbers."""
    assert weights is None and minlength > 0, "the routing's bincounts name their number of experts"
    with unset_fake_temporarily():
        return torch.tensor(_even(x.numel(), minlength))


@contextlib.contextmanager
def balanced_routing():
    """Every expert receives tokens*K/E rows: the (token, expert) pairs the router picks on fake tensors are shapes
    without values, so their counts (all-to-all splits, FP8 expert segments) are set to the balanced ones."""
    with mock.patch.object(EPExperts, "plan", _balanced_plan), mock.patch.object(torch, "bincount", _balanced_bincount):
        yield


def _efficient_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    assert attn_mask is None and dropout_p == 0.0 and not enable_gqa, "training's attention: causal, no dropout"
    if torch.is_autocast_enabled(q.device.type):  # CUDA's autocast casts SDPA's inputs
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, q.requires_grad or k.requires_grad or v.requires_grad, is_causal=is_causal, scale=scale)[0]


@contextlib.contextmanager
def gpu_attention():
    """F.scaled_dot_product_attention as CUDA runs MLA's heads (q/k 192, v 128: no flash kernel for them): the
    memory-efficient kernel, which keeps the output and the log-sum-exp (for fake CPU tensors torch would take the
    math path and keep the T x T scores)."""
    with mock.patch.object(F, "scaled_dot_product_attention", _efficient_sdpa):
        yield


class _AllToAllBytes:
    """Counts the bytes each all_to_all_single sends to the other ranks of its group (its own share stays)."""

    def __init__(self):
        self.sent = 0

    @contextlib.contextmanager
    def counting(self):
        real = dist.all_to_all_single

        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            splits = input_split_sizes or _even(input.shape[0], dist.get_world_size(group))
            row = input[0].numel() * input.element_size() if input.shape[0] else 0
            self.sent += row * (sum(splits) - splits[dist.get_rank(group)])
            return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
        with mock.patch.object(dist, "all_to_all_single", counted):
            yield


# ---- measuring ------------------------------------------------------------------------------------------------------

def _get(snap: dict, *kinds: str) -> int:
    """Bytes of the given MemTracker kinds (Parameter, Buffer, Gradient, Activation, Temp, Optstate, Other, Total)."""
    dev = snap.get(DEVICE, {})
    return sum(v for k, v in dev.items() if k in kinds)


class _Tracker(MemTracker):
    """torch's MemTracker, keeping per phase of the step ("fb": forward and backward, "opt": the optimizer step) the
    most memory held at once, with and without the gradients, in place of its per-module peaks (which cost a pass
    over every module at every operation)."""

    def __init__(self):
        super().__init__()
        self.phase = "fb"
        self.most = defaultdict(int)

    def _update_peak_stats(self, peak_state) -> None:
        snap = self._curr_mem_snap
        total = _get(snap, "Total")
        self.most[self.phase] = max(self.most[self.phase], total)
        self.most[self.phase + "_no_grads"] = max(self.most[self.phase + "_no_grads"], total - _get(snap, "Gradient"))

    @contextlib.contextmanager
    def outside_fake(self):
        """Still tracking, with the fake mode off: what the code creates from nothing is real (an optimizer's step
        counter, which it reads as a number), what it derives from fake tensors fake."""
        with unset_fake_temporarily():
            entry, self._fake_mode_on_entry = self._fake_mode_on_entry, None
            try:
                yield
            finally:
                self._fake_mode_on_entry = entry

    def now(self, *kinds: str) -> int:
        return _get(self.get_tracker_snapshot(), *kinds)


def in_flight(schedule, pp_rank: int) -> tuple[dict[int, int], int]:
    """This pp rank's micro-batches in flight per stage, at the moment its schedule holds the most of them (torch's
    own order of its forwards and backwards: a forward adds one, the full or weight backward frees it) -> ({stage:
    count}, the most held at once over its stages)."""
    held, best, at = defaultdict(int), -1, {}

    def visit(a):
        nonlocal best, at
        kind = a.computation_type
        if kind == _ComputationType.OVERLAP_F_B:
            for sub in a.sub_actions:
                visit(sub)
        elif kind == _ComputationType.FORWARD:
            held[a.stage_index] += 1
            if sum(held.values()) > best:
                best, at = sum(held.values()), dict(held)
        elif kind in (_ComputationType.FULL_BACKWARD, _ComputationType.BACKWARD_WEIGHT):
            held[a.stage_index] -= 1
    for action in schedule.pipeline_order[pp_rank]:
        if action is not None:
            visit(action)
    return at, best


def _zero1_shards(groups: list[dict], dp_of) -> tuple[list[dict], list[tuple[nn.Parameter, torch.Tensor]]]:
    """AdamW's groups over this rank's ZeRO-1 slice of each parameter: 1/dp of it (dp_of(p)), a view sharing the
    parameter's storage, as a ZeRO-1 rank updates before the all-gather -> the groups, and (slice, parameter) pairs."""
    pairs, out = [], []
    for g in groups:
        params = []
        for p in g["params"]:
            n = math.ceil(p.numel() / dp_of(p))
            s = nn.Parameter(p.detach().view(-1)[:n])
            pairs.append((s, p))
            params.append(s)
        out.append({**{k: v for k, v in g.items() if k not in ("params", "names")}, "params": params})
    return out, pairs


# ---- the simulation ------------------------------------------------------------------------------------------------

def _parts(model, plan, setup: Setup) -> list[dict]:
    """The stages this rank runs, in order: module, stage index, first/last, and its layers."""
    if plan.pp is None:
        return [{"module": model, "stage": 0, "first": True, "last": True,
                 "layers": (0, len(model.layers)), "mtp": len(model.mtp) > 0}]
    bounds = stage_bounds(len(model.layers), setup.stages)
    owner = stage_ranks(setup.pp_schedule, setup.pp)
    stages = [s for s in range(setup.stages) if owner[s] == plan.pp.pp_rank]
    return [{"module": m, "stage": s, "first": m.first, "last": m.last, "layers": (bounds[s], bounds[s + 1]),
             "mtp": m.last and len(model.mtp) > 0} for m, s in zip(plan.pp.modules, stages)]


def _dp_of(setup: Setup):
    """parameter -> the data-parallel ranks that hold it (and share its ZeRO-1 optimizer state)."""
    dp = setup.gpus // setup.pp
    return lambda p: dp // setup.ep if getattr(p, "ep_module", None) is not None else dp


def _flops(model, parts, args: ModelArgs, setup: Setup) -> float:
    """Model FLOPs of one micro-batch's forward and backward on this rank: 6 x the matmul parameters a token touches
    in its stages (an expert shard: its share K/E of the experts, all E of them computed across the EP group) plus
    attention (cost.py's rule; recomputation not counted)."""
    tokens = setup.micro_batch * setup.seq_len
    K, E = args.num_experts_per_tok or 0, args.n_routed_experts or 1
    matmul, layers = 0.0, 0
    for part in parts:
        lo, hi = part["layers"]
        layers += hi - lo + (len(model.mtp) if part["mtp"] else 0)
        mods = list(model.layers[lo:hi]) + (list(model.mtp) if part["mtp"] else [])
        for m in mods:
            for name, p in m.named_parameters():
                if p.ndim >= 2:
                    share = K / E * setup.ep if ".experts." in f".{name}" else 1.0
                    matmul += p.numel() * share
        if part["last"]:  # the output head, once for the main model and once per MTP depth
            matmul += model.lm_head.weight.numel() * (1 + (len(model.mtp) if part["mtp"] else 0))
    fwd = 2 * matmul + layers * attention_flops_per_token(args, setup.seq_len)
    return 3 * fwd * tokens


def _v3_wire(args: ModelArgs, setup: Setup, moe_layers: int) -> dict | None:
    """The all-to-all bytes of this rank's MoE layers per micro-batch in V3's own formats (FP8 dispatch, BF16
    combine; node-limited routing over 8-GPU H800 nodes: comm_model), forward and the backward's mirror."""
    if setup.ep < 2 or not moe_layers or (setup.ep > 8 and setup.ep % 8):
        return None
    b = comm_model.budget(args, comm_model.cluster("h800"), gpus=setup.ep, tokens=setup.micro_batch * setup.seq_len,
                          seq_len=setup.seq_len, sm_counts=[20])
    per = {link: sum(b["layer"][p][f"{link}_bytes"] for p in ("dispatch", "combine")) for link in ("ib", "nvlink")}
    return {k: 2 * moe_layers * v for k, v in per.items()}


@contextlib.contextmanager
def _swappable(mode: FakeTensorMode):
    """nn.Module.to_empty swaps each parameter for its new tensor, and torch.utils.swap_tensors refuses a tensor with
    weak references: the fake mode's memo of the fakes it made (used to give one real tensor one fake) is dropped
    before each swap."""
    real = torch.utils.swap_tensors

    def swap(t1, t2):
        mode.fake_tensor_converter.meta_converter.tensor_memo.clear()
        return real(t1, t2)
    with mock.patch.object(torch.utils, "swap_tensors", swap):
        yield


def simulate(args: ModelArgs, setup: Setup, log=lambda msg: None) -> dict:
    """Simulate `setup.steps` training steps of rank `setup.rank` under the layout (see the module's doc) -> the
    figures: the rank's part, its memory by kind (bytes), the in-flight counts, the verdict's numbers, FLOPs, bytes."""
    setup.check(args)
    if dist.is_initialized():
        raise NanoseekError("nanoseek plan runs its own fake process group: run it outside torchrun")
    t0 = time.time()
    dist.init_process_group("fake", store=FakeStore(), rank=setup.rank, world_size=setup.gpus)
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            model = build_model(args, device="meta")  # fake meta tensors: parallelize materialises them as fakes
        log(f"built on meta in {time.time() - t0:.1f}s")
        with _swappable(mode), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")  # torch's, on build_mesh's "dp"
            plan = parallelize(model, Dist(setup.rank, setup.gpus, 0, DEVICE), setup.layout(), init=False)
        parts = _parts(model, plan, setup)
        log(f"parallelized in {time.time() - t0:.1f}s")
        groups, _ = plan.param_groups(lambda keep: param_groups(model, 0.1, keep))
        pairs = []
        if setup.zero == 1:
            groups, pairs = _zero1_shards(groups, _dp_of(setup))
        if setup.zero == 3:
            groups = by_kind(groups)
        opt = AdamWBF16Moments(groups, lr=1e-4) if setup.bf16_moments else \
            torch.optim.AdamW(groups, lr=1e-4, fused=True)  # fused: the trainer's on CUDA
        with mode:
            ids = torch.zeros(setup.micro_batch, setup.seq_len, dtype=torch.long, device=DEVICE)
            hidden = torch.zeros(setup.micro_batch, setup.seq_len, args.hidden_size, device=DEVICE)
        wire = _AllToAllBytes()
        steps = []
        for _ in range(setup.steps):
            steps.append(_step(mode, model, plan, parts, opt, pairs, ids, hidden, wire))
            log(f"step {len(steps)} in {time.time() - t0:.1f}s")
        result = _figures(args, setup, model, plan, parts, steps[-1])
        result["seconds"] = time.time() - t0
        return result
    finally:
        dist.destroy_process_group()


def _step(mode, model, plan, parts, opt, pairs, ids, hidden, wire) -> dict:
    """One training step of one micro-batch through this rank's stages, measured."""
    tracker = _Tracker()
    tracker.track_external(model, *[p["module"] for p in parts], opt)  # all it holds, used by a stage or not
    act, outs = {}, []
    wire.sent = 0
    with mode, tracker, balanced_routing(), gpu_attention(), wire.counting():
        params, buffers, opt_before = tracker.now("Parameter"), tracker.now("Buffer"), tracker.now("Optstate")
        for part in parts:
            before = tracker.now("Activation")
            m = part["module"]
            # the trainer's bf16 autocast on GPUs, one region per forward: leaving it frees the weights' bf16 casts
            # it caches, which AC does not keep and which are no activations of the micro-batch
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                if plan.pp is None:
                    out = m(ids, labels=ids).loss
                elif part["first"]:
                    out = m(ids)
                else:  # the activations received from the previous stage (the pipeline's recv buffer)
                    out = m(hidden.clone().requires_grad_(), ids)
                if plan.pp is not None and part["last"]:
                    out = plan.pp.loss(out, ids)
            outs.append(out)
            act[part["stage"]] = tracker.now("Activation") - before
        for part, out in reversed(list(zip(parts, outs))):
            if part["last"]:
                out.backward()
            else:
                x = out[0]
                x.backward(torch.zeros_like(x))  # the gradient the next stage sends back
        del outs, out
        if plan.pp is not None:
            plan.pp.sync_grads()  # tied embedding copies, the data-parallel mean
        plan.clip_grads(opt, 0.0)  # the trainer's reduction and gradient norm (not clipped: fake tensors hold no norm)
        grads = tracker.now("Gradient")
        tracker.phase = "opt"
        for s, p in pairs:
            s.grad = p.grad.view(-1)[:s.numel()] if p.grad is not None else None
        with tracker.outside_fake():
            opt.step()
        opt_bytes = tracker.now("Optstate")
        opt.zero_grad(set_to_none=True)
        for _, p in pairs:
            p.grad = None
    return {"params": params, "buffers": buffers, "grads": grads, "opt": opt_bytes, "opt_new": opt_bytes - opt_before,
            "act": act,
            "most": dict(tracker.most), "a2a_sent": wire.sent}


def _figures(args: ModelArgs, setup: Setup, model, plan, parts, m: dict) -> dict:
    """The measured step's numbers, the in-flight activations, the estimate of the rank's peak and the verdict."""
    counts = {s: 1 for s in m["act"]}
    if plan.pp is not None:
        at_peak, _ = in_flight(plan.pp.schedule, plan.pp.pp_rank)
        counts = {s: at_peak.get(s, 0) for s in m["act"]}
    held_act = sum(counts[s] * a for s, a in m["act"].items())
    # forward + backward: the most held apart from the gradients, plus every gradient (accumulated over the
    # micro-batches of a step), plus the micro-batches in flight beyond the one measured per stage, plus the
    # optimizer state where this step made it (a first step's forward and backward run before it exists)
    fb = m["most"].get("fb_no_grads", 0) + m["grads"] + held_act - sum(m["act"].values()) + m["opt_new"]
    opt_peak = m["most"].get("opt", 0)  # after the last micro-batch's backward: no activations left
    total = max(fb, opt_peak)
    at_opt = opt_peak > fb
    kinds = {"parameters": m["params"] + m["buffers"], "gradients": m["grads"], "optimizer": m["opt"],
             "activations": 0 if at_opt else held_act}
    kinds["working"] = total - sum(kinds.values())
    moe_layers = sum(isinstance(b.mlp, MoE) for p in parts for b in
                     list(model.layers[p["layers"][0]:p["layers"][1]]) + ([x.block for x in model.mtp] if p["mtp"]
                                                                         else []))
    notes = []
    if plan.pp is not None and plan.pp.embed_copy is not None and not model.embed_tokens.weight.is_meta:
        notes.append(f"this rank holds the embedding twice, its first stage's and its last stage's tied copy "
                     f"(pipeline.py), {_size(4 * model.embed_tokens.weight.numel())} of fp32 parameters")
    if setup.zero == 3 and setup.ep > 1:
        notes.append("AdamW's groups are split into FSDP2 shards and expert shards: torch's fused (and foreach) AdamW "
                     "refuses a group mixing DTensors and plain tensors, as the trainer's would on CUDA")
    p = count_params(args)
    return {
        "setup": asdict(setup), "model_params": p["total"], "model_params_with_mtp": p["total_with_mtp"],
        "stages": [{k: x[k] for k in ("stage", "layers", "first", "last", "mtp")} for x in parts],
        "pp_rank": plan.pp.pp_rank if plan.pp is not None else 0, "ep_rank": setup.rank % setup.ep,
        "dp": setup.gpus // setup.pp, "expert_dp": setup.gpus // setup.pp // setup.ep,
        "pp_microbatches": setup.layout().pp_microbatches if setup.pp > 1 else 1,
        "held_params": _held_numel(plan, model), "param_bytes": m["params"], "buffer_bytes": m["buffers"],
        "activations_per_microbatch": m["act"], "in_flight": counts, "activations_in_flight": held_act,
        "bytes": kinds, "total": total,
        "peak_phase": "optimizer step" if at_opt else "forward/backward",
        "limit": setup.gpu_memory_gib * GIB, "fits": total <= setup.gpu_memory_gib * GIB,
        "flops_per_microbatch": _flops(model, parts, args, setup),
        "flops_per_step": _flops(model, parts, args, setup) * (setup.layout().pp_microbatches if setup.pp > 1 else 1),
        "a2a_bytes_per_step": m["a2a_sent"] * (setup.layout().pp_microbatches if setup.pp > 1 else 1),
        "tokens_per_microbatch": setup.micro_batch * setup.seq_len, "moe_layers": moe_layers,
        "a2a_bytes_per_microbatch": m["a2a_sent"], "a2a_v3_format": _v3_wire(args, setup, moe_layers),
        "assumed": _assumed(setup, plan), "notes": notes,
    }


def _assumed(setup: Setup, plan) -> list[str]:
    out = []
    if setup.ep > 1 or setup.fp8:
        out.append("balanced routing: every expert receives tokens x K/E (fake tensors hold no routing)")
    if plan.pp is not None:
        out.append(f"in flight: torch's {setup.pp_schedule} order for pp rank {plan.pp.pp_rank} "
                   f"({setup.layout().pp_microbatches} micro-batches), times the activations measured for one")
    if setup.zero == 1:
        out.append("ZeRO-1 (the trainer has DDP and FSDP2, not ZeRO-1): the optimizer steps a 1/dp slice of each "
                   "parameter")
    return out


def _held_numel(plan, model) -> int:
    """Parameters this rank holds, its stages' or not (an FSDP2 shard counts its local part; a tied one once)."""
    params = {id(p): p for p in list(model.parameters()) + (plan.pp.parameters() if plan.pp is not None else [])}
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params.values() if not p.is_meta)


# ---- output ---------------------------------------------------------------------------------------------------------

def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def verdict(r: dict) -> str:
    """'fits: X GiB of 80 GiB (Y%)' or 'does not fit: needs X GiB of 80 GiB, Z GiB over'."""
    total, limit = r["total"], r["limit"]
    if r["fits"]:
        share = 100 * total / limit
        return f"fits: {_size(total)} of {limit / GIB:g} GiB ({share:.0f}%)" if share >= 1 else \
            f"fits: {_size(total)} of {limit / GIB:g} GiB ({share:.2g}%)"
    return f"does not fit: needs {_size(total)} of {limit / GIB:g} GiB, {_size(total - limit)} over"


def _textbook(r: dict) -> str:
    """The in-flight count the schedule's paper gives, beside torch's."""
    s = r["setup"]
    if s["pp_schedule"] == "1f1b":
        return f"; 1F1B: PP - pp rank = {s['pp'] - r['pp_rank']}"
    if s["pp_schedule"] == "dualpipev":
        return f"; DualPipe's PP + 1, V3 report Table 2, with PP = {2 * s['pp']} stages: {2 * s['pp'] + 1}"
    return ""


def format_report(r: dict, name: str) -> str:
    """`nanoseek plan`'s answer: the layout, the rank, its memory by kind and how each was had, the verdict."""
    s, b, dp = r["setup"], r["bytes"], r["dp"]
    layout = [f"PP {s['pp']} ({s['pp_schedule']}, {r['pp_microbatches']} micro-batches a step) x DP {dp}"
              if s["pp"] > 1 else f"DP {dp}"]
    if s["ep"] > 1:
        layout.append(f"EP {s['ep']} within DP (each expert on {r['expert_dp']} rank{'s' * (r['expert_dp'] > 1)})")
    layout += [f"ZeRO-{s['zero']}", f"AC {s['ac']}"] + ["FP8"] * s["fp8"] + ["bf16 moments"] * s["bf16_moments"]
    stages = ", ".join(f"stage {x['stage']} (layers {x['layers'][0]}-{x['layers'][1] - 1}"
                       + ", embedding" * x["first"] + ", head" * x["last"] + ", MTP" * x["mtp"] + ")"
                       for x in r["stages"])
    act = r["activations_per_microbatch"]
    unit, div = ("GiB", GIB) if r["total"] >= GIB else ("MiB", 1 << 20)
    per = ", ".join(f"stage {st} {a / div:.2f}" for st, a in act.items())
    flight = ""
    if s["pp"] > 1:
        n = r["in_flight"]
        flight = (f"; x in flight {' and '.join(str(n[st]) for st in act)} ({sum(n.values())} in all"
                  f"{_textbook(r)})")
    opt = {0: "whole (DDP)", 1: f"of this rank's ZeRO-1 slices (1/{dp} of each dense parameter"
                                + (f", 1/{r['expert_dp']} of each expert shard)" if s["ep"] > 1 else ")"),
           3: "of this rank's FSDP2 shards"}[s["zero"]]
    g = lambda x: f"{x / div:9.2f}"  # noqa: E731
    mtp = f" ({human(r['model_params_with_mtp'])} with MTP)" if r["model_params_with_mtp"] > r["model_params"] else ""
    where = [f"pp rank {r['pp_rank']}"] * (s["pp"] > 1) + [f"ep rank {r['ep_rank']}"] * (s["ep"] > 1)
    lines = [
        f"nanoseek plan: {name}, {human(r['model_params'])} parameters{mtp}, on {s['gpus']:,} GPUs of "
        f"{s['gpu_memory_gib']:g} GiB",
        f"  layout      {'; '.join(layout)}",
        f"  rank {s['rank']:<6} {', '.join(where) + ': ' if where else ''}{stages}; {human(r['held_params'])} "
        f"parameters",
        f"  simulated   {s['steps']} training steps, each one micro-batch of {s['micro_batch']} x {s['seq_len']:,} "
        f"tokens, on fake tensors under a fake process group of {s['gpus']:,} ranks: {r['seconds']:.0f} s",
        "", f"  memory at the peak ({r['peak_phase']}), {unit}",
        f"    parameters {g(b['parameters'])}   measured: fp32 master weights and buffers",
        f"    gradients  {g(b['gradients'])}   measured: fp32",
        f"    optimizer  {g(b['optimizer'])}   measured: AdamW's {'bf16' if s['bf16_moments'] else 'fp32'} "
        f"moments {opt}",
        f"    activations{g(b['activations'])}   measured per micro-batch: {per}{flight}",
        f"    working    {g(b['working'])}   measured: the step's temporaries (activation gradients, "
        f"recomputation, casts)",
        f"    total      {g(r['total'])}",
        "", f"  {verdict(r)}", "",
        f"  compute     {human(r['flops_per_microbatch'], 'FLOP')} per micro-batch on this rank ("
        + (f"{human(r['flops_per_step'], 'FLOP')} per step of {r['pp_microbatches']}; " if s["pp"] > 1 else "")
        + f"{r['tokens_per_microbatch']:,} tokens each; 6 x active parameters + attention, recomputation not "
          f"counted)",
    ]
    if s["ep"] > 1 and r["moe_layers"]:
        lines.append(f"  all-to-all  {r['a2a_bytes_per_microbatch'] / 1e9:.2f} GB per micro-batch sent to other ranks "
                     + (f"({r['a2a_bytes_per_step'] / 1e9:.1f} GB per step) " if s["pp"] > 1 else "")
                     + f"by this rank's {r['moe_layers']} MoE layers (forward and backward, recomputation included, "
                       f"in the dtypes this code sends)")
        if r["a2a_v3_format"]:
            v3 = r["a2a_v3_format"]
            lines.append(f"              in V3's wire formats (FP8 dispatch, BF16 combine, node-limited routing; "
                         f"comm_model): {v3['ib'] / 1e9:.2f} GB over IB + {v3['nvlink'] / 1e9:.2f} GB over NVLink")
    lines += [f"  assumed     {a}" for a in r["assumed"]] + [f"  note        {n}" for n in r["notes"]]
    lines.append("  not counted the CUDA context, NCCL and pipeline buffers, allocator rounding and fragmentation "
                 "(a few GiB on a real GPU)")
    return "\n".join(lines)
