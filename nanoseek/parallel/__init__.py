"""Parallelism, applied from outside the model (torchtitan's rule: the model is single-device code).

    distributed.py            the processes (init_distributed: torchrun's group), their mesh (pp, dp_mod_ep, ep)
    data_parallel.py          DDP, FSDP2
    expert_parallel.py        EP: experts sharded, tokens exchanged by all-to-all, the two-micro-batch overlap
    eplb.py                   DeepSeek's redundant-expert placement
    pipeline.py               PP: stages cut from outside, torch.distributed.pipelining's schedules
    activation_checkpoint.py  --ac: blocks recomputed in the backward, the router's counts kept
    plan.py                   parallelize(model, d, layout) -> Plan: the wraps in one order, what composes, the
                              per-step jobs (gradient norm, clipping, the ranks' vote, the whole state)
"""

from nanoseek.parallel.distributed import Dist, all_reduce, barrier, build_mesh, init_distributed, shutdown
from nanoseek.parallel.plan import Layout, Plan, parallelize

__all__ = ["Dist", "Layout", "Plan", "all_reduce", "barrier", "build_mesh", "init_distributed", "parallelize",
           "shutdown"]
