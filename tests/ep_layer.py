"""Run under torchrun (2 gloo ranks) by tests/test_expert_parallel.py: one MoE layer's routed experts under EP, the
overlapped exchange (--ep-overlap) against the plain one under bf16 autocast, the trainer's mode on GPUs: the same
output dtype and values, and the same gradients for the input, the gate weights and the experts; and the dtypes the
exchanges carried (token rows, forward and backward). Prints one JSON line on rank 0."""

import json

import torch
import torch.distributed as dist

from nanoseek.config import get_preset
from nanoseek.parallel.expert_parallel import EP
from nanoseek.model.moe import MoE


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    moe = MoE(get_preset("tiny"))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    EP(world, world, rank, torch.device("cpu")).shard(moe)
    ex = moe.experts
    torch.manual_seed(1 + rank)  # each rank its own tokens
    x = torch.randn(64, 128)
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
    dy = torch.randn(64, 128, dtype=torch.bfloat16)
    results, rows = {}, set()
    send = dist.all_to_all_single

    def recorded(out, inp, *a, **k):  # the dtype of every exchange of token rows (not of the counts)
        if inp.dim() > 1:
            rows.add(str(inp.dtype))
        return send(out, inp, *a, **k)
    dist.all_to_all_single = recorded
    for name in ("grouped", "overlapped"):
        xg, wg = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        ex.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = getattr(ex, name)(xg, wg, indices)
        y.backward(dy.to(y.dtype))
        results[name] = dict(y=y.detach().float(), dtype=str(y.dtype), dx=xg.grad, dx_dtype=str(xg.grad.dtype),
                             dw=wg.grad, gu=ex.gate_up_proj.grad.clone(), down=ex.down_proj.grad.clone())
    a, b = results["grouped"], results["overlapped"]
    diff = {k: (a[k].float() - b[k].float()).abs().max().item() for k in ("y", "dx", "dw", "gu", "down")}
    scale = {k: a[k].float().abs().max().item() for k in diff}
    out = {"dtype": [a["dtype"], b["dtype"]], "dx_dtype": [a["dx_dtype"], b["dx_dtype"]], "diff": diff,
           "scale": scale, "sent": sorted(rows)}
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        print(json.dumps(gathered))
    dist.barrier()  # every rank's work done before the groups go (a C++ abort at teardown otherwise: dev/LOG.md)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
