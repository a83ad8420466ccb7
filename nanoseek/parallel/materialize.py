"""Each rank materialises only what it holds (torchtitan's meta-device init): the model is built on the meta device,
parallelize shards it there (EP's expert slots, FSDP2's DTensor shards), then `materialize` allocates this rank's
part on the training device and initialises it to the numbers one process would give the whole model.

Those numbers come from the CPU generator in the one-process order: every weight of `Transformer.init_weights`'s walk
(norms 1, biases 0, the rest normal(0, initializer_range)) is drawn in chunks of CHUNK values, and each rank copies
the rows it holds. CPU `normal_` draws its values 16 at a time, so chunks of a multiple of 16 values (the tail kept
with the last chunk) give exactly the values and generator state of one call over the whole tensor
(tests/test_materialize.py): a run on any number of ranks starts from the one-process weights, and the peak memory of
building is one chunk above this rank's part. (Drawing on the CPU also makes a GPU run start from the same weights as
a CPU run.)
"""

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from nanoseek.model.moe import MoE

CHUNK = 1 << 22  # values drawn at a time (a multiple of 16)


def on_meta(model: nn.Module) -> bool:
    return any(_local(p).is_meta for p in model.parameters())


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _rows(p: torch.Tensor) -> tuple[tuple[int, ...], list[tuple[int, int, int]]]:
    """The whole tensor's shape, and the rows of it this rank holds as (global first row, local first row, count)."""
    m = getattr(p, "ep_module", None)
    if m is not None:  # an expert shard: slot i holds logical expert phy2log[first + i]
        S = p.shape[0]
        slots = m.placement_cpu[0][m.first:m.first + S].tolist()
        return (m.n_logical, *p.shape[1:]), [(e, i, 1) for i, e in enumerate(slots)]
    if isinstance(p, DTensor):  # an FSDP2 shard (dim 0)
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return tuple(p.shape), [(offset[0], 0, shape[0])] if shape[0] else []
    return tuple(p.shape), [(0, 0, p.shape[0] if p.dim() else 1)]


@torch.no_grad()
def _draw_normal(p: torch.Tensor, std: float) -> None:
    """p's rows from the whole tensor's normal(0, std) draw, chunk by chunk from the CPU generator."""
    shape, held = _rows(p)
    local = _local(p)
    if local.is_meta:
        held = []
    row = 1
    for s in shape[1:]:
        row *= s
    n = row * (shape[0] if shape else 1)
    flat = local.view(-1) if local.dim() else local.view(1)
    start = 0
    while start < n:
        end = min(n, start + CHUNK)
        if n - end < 16:
            end = n  # the tail with the last chunk, as one call would draw it
        buf = torch.empty(end - start).normal_(0.0, std)
        for g, l, count in held:  # copy the overlap of [start, end) with each held run of rows
            lo, hi = max(start, g * row), min(end, (g + count) * row)
            if lo < hi:
                dst = l * row + (lo - g * row)
                flat[dst:dst + hi - lo].copy_(buf[lo - start:hi - start])
        start = end


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, init: bool = True, held=None) -> None:
    """Allocate this rank's part of a meta-device model on `device` and, with init, initialise it as one process's
    `build_model` + `init_weights` would (consuming the CPU generator as it does, for what it does not hold too);
    without init (a resumed run, whose weights come from the checkpoint) zero it. held(name) -> bool: the parameters
    this rank holds (a pipeline's stages), the others left on meta. Buffers: the router's bias and counts zeroed."""
    tied = model.args.tie_word_embeddings
    tags = {n: p.ep_module for n, p in model.named_parameters() if hasattr(p, "ep_module")}
    if held is None:
        model.to_empty(device=device)
    else:
        for prefix, module in model.named_modules():
            for pname, p in list(module._parameters.items()):
                if p is not None and held(f"{prefix}.{pname}" if prefix else pname):
                    module._parameters[pname] = nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
            for bname, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[bname] = torch.empty_like(b, device=device)
    if tied:  # materialising gives each module its own tensor: tie again
        model.lm_head.weight = model.embed_tokens.weight
    for name, p in model.named_parameters():  # new tensors: EP's mark on its shards again
        if name in tags:
            p.ep_module = tags[name]
    for m in model.modules():
        if hasattr(m, "placement_cpu"):  # EP's maps, made on the CPU when the experts were sharded on meta
            m.set_placement(*m.placement_cpu, device=device)
        if isinstance(m, MoE):
            m.tokens_per_expert.zero_()
            if m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.zero_()
    std = model.args.initializer_range
    for name, p in model.named_parameters():  # init_weights's walk and rules
        if _local(p).is_meta:  # not this rank's: its values are drawn all the same, so the next ones are right
            if init and not name.endswith(("norm.weight", ".bias")):
                _draw_normal(p, std)
        elif name.endswith("norm.weight"):
            _local(p).fill_(1.0)
        elif name.endswith(".bias"):
            _local(p).zero_()
        elif init:
            _draw_normal(p, std)
        else:
            _local(p).zero_()  # overwritten by the checkpoint; never left as garbage
