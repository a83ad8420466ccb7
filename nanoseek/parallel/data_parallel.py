"""Data parallelism, applied from outside the model (torchtitan's rule: the model is single-device code): DDP, or
FSDP2 (`fully_shard` per decoder block, then the root)."""

import torch
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from nanoseek.parallel.distributed import Dist


def wrap(model: torch.nn.Module, d: Dist, mode: str = "ddp", ignored=()) -> torch.nn.Module:
    """DDP (replicated weights, all-reduced gradients) or FSDP2 (`fully_shard` per block, then the root). `ignored`:
    parameter names the wrap leaves alone (expert-parallel shards, whose gradients expert_parallel reduces)."""
    if not d.enabled or mode == "none":
        return model
    if mode == "ddp":
        if ignored:
            DDP._set_params_and_buffers_to_ignore_for_model(model, list(ignored))
        # broadcast_buffers=False: the router's load counts are per rank until the trainer sums them
        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None, broadcast_buffers=False)
    if mode == "fsdp":
        skip = {p for n, p in model.named_parameters() if n in set(ignored)}
        for block in list(model.layers) + [m.block for m in model.mtp]:
            fully_shard(block, ignored_params=skip or None)
        fully_shard(model, ignored_params=skip or None)
        return model
    raise ValueError(mode)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
