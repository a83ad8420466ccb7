"""The processes and their layout: `torchrun` starts them, `init_distributed` joins them (gloo on CPU; nccl for CUDA
tensors and gloo for CPU ones on GPUs), `build_mesh` lays them out as (pp, dp_mod_ep, ep); small collective helpers."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


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


def initialized() -> bool:
    """Whether this process is in a process group (torchrun), which the helpers below need to communicate."""
    return dist.is_available() and dist.is_initialized()


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order ([obj] in one process)."""
    if not initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (obj itself in one process)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if initialized():
        dist.barrier()


def shutdown() -> None:
    if initialized():
        dist.destroy_process_group()
