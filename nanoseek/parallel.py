"""Parallelism applied from outside the model (torchtitan's rule): the model is single-device code; `torchrun` starts
the processes, `init_distributed` joins them (gloo on CPU, nccl on GPU), `wrap` applies DDP or FSDP2."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one; pick the device (cuda:LOCAL_RANK when available)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # on GPUs nccl for CUDA tensors and gloo for CPU ones (torchtitan's pair): a CPU collective is then not an
        # error but a slow path, and the training step takes none (tests/test_nccl_safety.py)
        dist.init_process_group(backend="cuda:nccl,cpu:gloo" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, dev)


def build_mesh(world: int, device: torch.device, pp: int = 1, ep: int = 1) -> DeviceMesh:
    """The ranks as a (pp, dp_mod_ep, ep) mesh, ep innermost as torchtitan lays them out: an EP group is ep
    neighbouring ranks (one node's NVLink when ep <= GPUs per node), the data-parallel ranks of one set of pipeline
    stages are dp = W/pp neighbours, and a pipeline spans ranks dp apart. "dp" is dp_mod_ep x ep flattened. Rank
    r = (pp index) * dp + (dp index), dp index = (dp_mod_ep index) * ep + (ep index)."""
    dp = world // pp
    mesh = init_device_mesh(device.type, (pp, dp // ep, ep), mesh_dim_names=("pp", "dp_mod_ep", "ep"))
    mesh["dp_mod_ep", "ep"]._flatten("dp")
    return mesh


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


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
