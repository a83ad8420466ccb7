"""Activation checkpointing (`--ac {none,selective,full}`), applied from outside the model as torchtitan applies it:
each decoder block (the main model's and the MTP modules') gets a forward that runs under
`torch.utils.checkpoint` (non-reentrant), so that it composes with DDP, FSDP2, EP and the pipeline's stages.

    full       a block keeps only its inputs; its whole forward runs again in the backward
    selective  op-level (torchtitan's SAC): the outputs of the matmuls and attention are kept, the cheap rest
               (norms, activations, element-wise ops, routing) is recomputed

The router's state: a MoE block's forward counts its routed tokens (the auxiliary-loss-free bias update's input) and
sets its sequence-wise balance loss. Recomputing it in the backward would count every token twice and leave a second
balance loss behind, so each recompute runs inside `KeepRouterState`, which puts both back as they were.
"""

import contextlib
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from nanoseek.errors import NanoseekError
from nanoseek.model.moe import MoE

MODES = ("none", "selective", "full")

# what selective AC keeps: the FLOP-heavy ops (torchtitan's op list, less its collectives)
_aten = torch.ops.aten
SAVE = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten._grouped_mm.default,
        _aten._scaled_dot_product_efficient_attention.default, _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default}


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVE else CheckpointPolicy.PREFER_RECOMPUTE


class KeepRouterState:
    """Around a block's recompute: its MoE layers' token counts and balance loss restored on exit."""

    def __init__(self, block: nn.Module):
        self.moes = [m for m in block.modules() if isinstance(m, MoE)]

    def __enter__(self):
        self.saved = [(m.tokens_per_expert.clone(), m.balance_loss) for m in self.moes]

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, (counts, loss) in zip(self.moes, self.saved):
                m.tokens_per_expert.copy_(counts)
                m.balance_loss = loss
        return False


@contextlib.contextmanager
def _outside(outer, inner):
    """inner inside outer: KeepRouterState's own copies stay outside SAC's mode, which sees only the block's ops."""
    with outer, inner:
        yield


def _contexts(block: nn.Module, mode: str):
    fwd, recompute = create_selective_checkpoint_contexts(_policy) if mode == "selective" else \
        (contextlib.nullcontext(), contextlib.nullcontext())
    return fwd, _outside(KeepRouterState(block), recompute)


def _checkpointed(block: nn.Module, forward, mode: str, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation and sampling: nothing is saved anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=partial(_contexts, block, mode), **kwargs)


def apply(model: nn.Module, mode: str) -> int:
    """Checkpoint every decoder block of `model` (in place; call before the data-parallel wrap and compile) ->
    the number of blocks checkpointed."""
    if mode not in MODES:
        raise NanoseekError(f"--ac must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return 0
    blocks = list(model.layers) + [m.block for m in model.mtp]
    for block in blocks:
        block.forward = partial(_checkpointed, block, block.forward, mode)  # the instance's, so names stay as they are
    return len(blocks)
