"""Expert parallelism's communication against its compute, and the share of it hidden by the two-micro-batch overlap,
on one MoE layer of the given preset, side by side in one run. Run it under torchrun (gloo on CPU, nccl on GPUs):

    .venv/bin/torchrun --nproc_per_node 2 bench/ep.py                      # the tiny preset's MoE layer, 4,096 tokens
    .venv/bin/torchrun --nproc_per_node 2 bench/ep.py --preset small --tokens 8192 --device cuda

Per layer forward, and forward + backward (median of --reps, each rank's own tokens, all routed by the layer's gate):
- serial: dispatch, experts, combine one after the other (EPExperts.grouped), with the all-to-alls timed alone
  (comm) and the expert GEMMs timed alone (compute);
- overlapped: the tokens in two micro-batches, one's all-to-all in flight while the other computes
  (EPExperts.overlapped, as `--ep-overlap` trains); hidden = (serial - overlapped) / comm, the share of the
  communication time no longer on the critical path.
"""

import argparse
import json
import os
import statistics
import time

from nanoseek.config import get_preset  # first: nanoseek sets torch's CPU allocator options
from nanoseek.parallel.expert_parallel import EP, all_to_all
from nanoseek.model.moe import Experts, MoE

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dist.init_process_group("cuda:nccl,cpu:gloo" if args.device.startswith("cuda") else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = args.device.startswith("cuda")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if cuda else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    margs = get_preset(args.preset)
    moe = MoE(margs).to(device)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ep = EP(world, world, rank, device)
    ep.shard(moe)
    x = torch.randn(args.tokens, margs.hidden_size, device=device, generator=None)
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
    ex = moe.experts
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    t = {k: [] for k in ("serial", "comm", "compute", "overlapped", "overlap_wait",
                         "serial_train", "comm_train", "compute_train", "overlapped_train")}
    dy = torch.randn_like(x)

    def train_step(fn):  # forward + backward of the layer's routed part, as a training step runs it
        xg = x.detach().requires_grad_(True)
        fn(xg, weights, indices).backward(dy)
        sync()

    with torch.no_grad():
        for rep in range(args.reps + 1):
            dist.barrier()
            s = time.perf_counter()
            ex.grouped(x, weights, indices)
            sync()
            serial = time.perf_counter() - s
            # the parts alone: the two all-to-alls of the rows, and the experts on what this rank receives
            order, token, ins, outs, recv_expert = ex.plan(indices)
            rows = x.index_select(0, token)
            dist.barrier()
            s = time.perf_counter()
            recv = all_to_all(rows, outs, ins, ep.group)
            back = all_to_all(recv, ins, outs, ep.group)
            sync()
            comm = time.perf_counter() - s
            s = time.perf_counter()
            ex.compute(recv, torch.ones(recv.shape[0], 1, device=device), recv_expert[:, None])
            sync()
            compute = time.perf_counter() - s
            dist.barrier()
            timings = {}
            s = time.perf_counter()
            y = ex.overlapped(x, weights, indices, timings)
            sync()
            overlapped = time.perf_counter() - s
            with torch.enable_grad():  # forward + backward: four all-to-alls, the experts' forward and backward
                dist.barrier()
                s = time.perf_counter()
                train_step(ex.grouped)
                serial_train = time.perf_counter() - s
                recv_g = recv.detach().requires_grad_(True)
                s = time.perf_counter()
                ex.compute(recv_g, torch.ones(recv.shape[0], 1, device=device), recv_expert[:, None]) \
                    .backward(recv.detach())
                sync()
                compute_train = time.perf_counter() - s
                dist.barrier()
                s = time.perf_counter()
                train_step(ex.overlapped)
                overlapped_train = time.perf_counter() - s
                ex.zero_grad(set_to_none=True)
            if rep:  # the first is a warm-up
                for k, v in zip(t, (serial, comm, compute, overlapped, timings["wait"], serial_train, 2 * comm,
                                    compute_train, overlapped_train)):
                    t[k].append(v)
        same = torch.allclose(y, ex.grouped(x, weights, indices), atol=1e-5)
    med = {k: statistics.median(v) for k, v in t.items()}
    res = torch.tensor([med[k] for k in t], dtype=torch.float64, device=device)  # nccl: no CPU collectives
    dist.all_reduce(res)
    med = {k: v / world for k, v in zip(t, res.tolist())}  # the ranks' mean of their medians
    hidden = (med["serial"] - med["overlapped"]) / med["comm"] if med["comm"] > 0 else float("nan")
    hidden_train = (med["serial_train"] - med["overlapped_train"]) / med["comm_train"]
    if rank == 0:
        print(f"torch {torch.__version__}, {world} ranks ({dist.get_backend()}), {torch.get_num_threads()} threads "
              f"each; preset {args.preset} MoE layer, {args.tokens} tokens per rank, EP {world}, "
              f"median of {args.reps}; overlapped == serial: {same}")
        for k in ("serial", "comm", "compute", "overlapped"):
            print(f"  {k:12s} {1e3 * med[k]:8.2f} ms  {med[k] / med['serial']:.2f}x of serial")
        print(f"  comm / compute {med['comm'] / med['compute']:.2f}; overlapped / serial "
              f"{med['overlapped'] / med['serial']:.2f}; communication hidden {100 * hidden:.0f}% "
              f"(still waited on inside the overlap: {1e3 * med['overlap_wait']:.2f} ms)")
        print("forward + backward (a training step's share of the layer):")
        for k in ("serial_train", "comm_train", "compute_train", "overlapped_train"):
            print(f"  {k:18s} {1e3 * med[k]:8.2f} ms  {med[k] / med['serial_train']:.2f}x of serial")
        print(f"  communication hidden {100 * hidden_train:.0f}% (comm: the four all-to-alls, twice the forward's)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**{k + "_ms": 1e3 * v for k, v in med.items()}, "hidden_share": hidden,
                       "hidden_share_train": hidden_train, "same": same,
                           "world": world, "preset": args.preset, "tokens": args.tokens}, f, indent=1)
    dist.barrier()  # every rank's work done before the groups go (a C++ abort at teardown otherwise: dev/LOG.md)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
