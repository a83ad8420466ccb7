"""Run by tests/test_nccl_safety.py in its own process: the training step's collectives under a process group whose
only backend is for the accelerator, as `init_process_group("nccl")` makes on GPUs, where a collective on a CPU
tensor fails ("No backend type associated with device type cpu"). On this CPU the accelerator is the meta device:
torch's fake backend registered as `meta:fake` at world 4, every parameter, gradient and buffer on meta, so the
process group refuses exactly what nccl refuses: any tensor the step moved or created off the training device. This
process is rank 0 of EP 2 x DP 2, and of a PP 2 x DP 2 layout for the pipeline's gradient sync and norm. Exits
non-zero, naming the collective, on the first that breaks the rule; `--control` runs one CPU all_reduce, which must
fail (the check can fail)."""

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from nanoseek.config import get_preset
from nanoseek.parallel.expert_parallel import EP
from nanoseek.model import build_model
from nanoseek.parallel import Dist, Layout, Plan
from nanoseek.parallel.pipeline import Pipeline


def main():
    world, device = 4, torch.device("meta")
    dist.init_process_group("meta:fake", store=FakeStore(), rank=0, world_size=world)  # the accelerator's only
    if "--control" in sys.argv:
        dist.all_reduce(torch.zeros(1))
        return
    ep = EP(2, world, 0, device)  # mesh (dp_mod_ep, ep) = (2, 2)
    model = build_model(get_preset("tiny"), device=device)
    ep.shard(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    ep.reduce_grads(model)  # the expert shards' data-parallel mean
    norm = ep.grad_norm_sq(model).sqrt()  # the whole model's gradient norm
    pp_mesh = init_device_mesh("meta", (2, 2), mesh_dim_names=("dp", "pp"))
    stages = SimpleNamespace(parameters=lambda: list(model.parameters()), embed_copy=None, device=device,
                             pp_group=pp_mesh.get_group("pp"), dp_group=pp_mesh.get_group("dp"), dp=2,
                             has_first=True, has_last=False, tie_group=pp_mesh.get_group("pp"), model=model)
    Pipeline.sync_grads(stages)  # the tied embedding's sum and the data-parallel mean
    norm = Pipeline.grad_norm(stages, ep)
    plan = Plan(model, Dist(0, world, 0, device), Layout(ep=2))  # the trainer's vote: losses, the non-finite
    plan.ep = ep  # flag, the router loads over the ranks
    losses = {"loss": torch.zeros((), device=device), "mtp_loss": torch.zeros((), device=device)}
    plan.vote(losses, norm, [m.tokens_per_expert for m in model.moe_layers()])
    print("ok: every collective of the step on the training device")


if __name__ == "__main__":
    main()
