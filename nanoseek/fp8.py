"""FP8 training as DeepSeek-V3 does it (V3 tech report §3.3, App. B), applied to a model from outside.

Fine-grained scaling, E4M3 for every tensor, online scales (amax / 448), FP32 accumulation:
- activations in 1×128 tiles (one scale per token per 128 input channels);
- weights in 128×128 blocks (as the published checkpoints store them; edge blocks where a dimension is not a multiple
  of 128: the scale is taken over the part that exists, as zero padding would give);
- all three GEMMs of a linear layer in FP8: Fprop y = x·Wᵀ (x in 1×128 tiles, W in blocks), Dgrad dx = dy·W (dy in
  1×128 tiles along its channels, W in blocks), Wgrad dW = dyᵀ·x (both tiled along the tokens, the GEMM's inner
  dimension: the cached FP8 activations re-tiled from 1×128 to 128×1, and dy likewise). Activation gradients are never
  quantised in 128×128 blocks: V3 App. B.2 saw a 16B MoE diverge that way.

What goes to FP8 (V3 §3.3.1): MLA's projections, the dense and shared experts' MLPs, the routed experts' GEMMs, the MTP
module's linears. What stays in high precision: the embedding, the output head, the router's gate, the norms and the
attention core (softmax(QKᵀ)V). Master weights, gradients and optimizer states stay FP32.

`convert(model)` swaps the classes of those modules for FP8 subclasses in place (parameters, names and checkpoints
unchanged; the model's files know nothing of it); `high_precision()` evaluates them without FP8 for a while.

The GEMMs here are the emulation: quantise to `float8_e4m3fn` with the scales, dequantise, multiply in FP32. It gives
the same numbers a Hopper FP8 GEMM with FP32 promotion computes, up to FP32 summation order (tests/test_fp8.py checks it
against a float64 computation of the same quantised operands). torch's CPU `scaled_mm` has only tensor- or row-wise
scales, so block-wise scaling is ours to write.
"""

import contextlib
import contextvars
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoseek.checkpoint import dequantize_fp8, fp8_scale, quantize_fp8
from nanoseek.errors import NanoseekError
from nanoseek.model.moe import Experts

TILE = 128  # V3's tile / block edge


# ---- quantisation ---------------------------------------------------------------------------------------------------

def quantize_tiles(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], scales [..., ceil(K/128)]): one scale per row per 128 consecutive channels (the
    1×128 tiles); the last tile of a row may be shorter."""
    K = x.shape[-1]
    Kp = -(-K // TILE) * TILE
    padded = F.pad(x.float(), (0, Kp - K)).view(*x.shape[:-1], Kp // TILE, TILE)
    scale = fp8_scale(padded.abs().amax(-1), pow2)  # [..., K/128]
    q = (padded / scale[..., None]).view(*x.shape[:-1], Kp)[..., :K].to(torch.float8_e4m3fn)
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    K = q.shape[-1]
    return q.float() * scale.repeat_interleave(TILE, -1)[..., :K]


def quantize_blocks(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], scales [ceil(N/128), ceil(K/128)]): one scale per 128×128 block, edge blocks smaller
    (the layout of DeepSeek's `weight_scale_inv`: checkpoint.quantize_fp8, which writes FP8 checkpoints)."""
    return quantize_fp8(w, (TILE, TILE), pow2)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return dequantize_fp8(q, scale, (TILE, TILE))


def fake_tiles(x: torch.Tensor, pow2: bool) -> torch.Tensor:
    """x through 1×128-tile FP8 and back (the values an FP8 GEMM multiplies), fp32."""
    return dequantize_tiles(*quantize_tiles(x, pow2))


def fake_blocks(w: torch.Tensor, pow2: bool) -> torch.Tensor:
    return dequantize_blocks(*quantize_blocks(w, pow2))


# ---- the three GEMMs ------------------------------------------------------------------------------------------------

class FP8LinearFn(torch.autograd.Function):
    """y = x·Wᵀ with Fprop, Dgrad and Wgrad in FP8 (see the module's doc); x [M, K], W [N, K] -> y [M, N] in x's
    dtype. Saves the FP8 activations (their 1×128 tiles), as V3 caches them."""

    @staticmethod
    def forward(ctx, x, w, pow2: bool):
        xq, xs = quantize_tiles(x, pow2)
        wq, ws = quantize_blocks(w, pow2)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.pow2, ctx.dtype, ctx.wdtype = pow2, x.dtype, w.dtype
        return (dequantize_tiles(xq, xs) @ dequantize_blocks(wq, ws).T).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        pow2 = ctx.pow2
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad: dy [M, N] tiled along N (the inner dimension), W's blocks as they are
            dx = (fake_tiles(dy, pow2) @ dequantize_blocks(wq, ws)).to(ctx.dtype)
        if ctx.needs_input_grad[1]:  # Wgrad: dyᵀ [N, M] and xᵀ [K, M], both tiled along the tokens M
            x = dequantize_tiles(xq, xs)  # the cached FP8 activations, re-tiled 128×1
            dw = (fake_tiles(dy.T, pow2) @ fake_tiles(x.T, pow2).T).to(ctx.wdtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """x [..., K] · W [N, K]ᵀ in FP8 -> [..., N]."""
    return FP8LinearFn.apply(x.reshape(-1, x.shape[-1]), w, pow2).view(*x.shape[:-1], w.shape[0])


# ---- the modules ----------------------------------------------------------------------------------------------------

_high = contextvars.ContextVar("nanoseek_fp8_high_precision", default=False)


@contextlib.contextmanager
def high_precision():
    """Within it, converted modules compute as before conversion (evaluation, or a check against FP8)."""
    token = _high.set(True)
    try:
        yield
    finally:
        _high.reset(token)


class FP8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8 (the class `convert` gives a chosen nn.Linear)."""
    fp8_pow2 = False

    def forward(self, x):
        if _high.get():
            return super().forward(x)
        y = fp8_linear(x, self.weight, self.fp8_pow2)
        return y if self.bias is None else y + self.bias


class FP8Experts(Experts):
    """The routed experts with each expert's two GEMMs in FP8: the (token, expert) pairs sorted by expert as in
    `Experts.grouped`, then one FP8 GEMM per expert over its segment (per-expert `scaled_mm` on Hopper)."""
    fp8_pow2 = False

    def grouped(self, x, weights, indices):
        if _high.get():
            return super().grouped(x, weights, indices)
        K = indices.shape[1]
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        token = order // K
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()  # (a host sync: the emulation)
        xs = x.index_select(0, token)
        gated = weights.flatten()[order, None].to(x.dtype)
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                seg = slice(start, start + n)
                gate, up = fp8_linear(xs[seg], self.gate_up_proj[e], self.fp8_pow2).chunk(2, dim=-1)
                outs.append(fp8_linear(F.silu(gate) * up * gated[seg], self.down_proj[e], self.fp8_pow2))
            start += n
        out = torch.cat(outs) if outs else xs.new_zeros(0, x.shape[-1])
        return x.new_zeros(x.shape, dtype=out.dtype).index_add_(0, token, out)


# V3 §3.3.1: what runs in FP8, by parameter-path pattern; everything else keeps its precision
DEFAULT_FILTER = re.compile(r"(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                            r"|mlp\.(gate_proj|up_proj|down_proj)|shared_experts\.(gate_proj|up_proj|down_proj)"
                            r"|mlp\.experts|eh_proj)$")


def convert(model: nn.Module, filter=DEFAULT_FILTER, pow2: bool = False) -> list[str]:
    """Swap the chosen modules (by name: a regex or a callable name -> bool) for their FP8 classes, in place; returns
    their names. Call before torch.compile and before DDP/FSDP wrap the model."""
    match = filter.search if hasattr(filter, "search") else filter
    done = []
    for name, m in model.named_modules():
        if not name or not match(name):
            continue
        if type(m) is nn.Linear:
            m.__class__ = FP8Linear
        elif type(m) is Experts:
            m.__class__ = FP8Experts
        else:
            continue
        m.fp8_pow2 = pow2
        done.append(name)
    if not done:
        raise NanoseekError("--fp8: no linear layer or experts of this model matched the FP8 filter")
    return done


def is_converted(model: nn.Module) -> bool:
    return any(isinstance(m, (FP8Linear, FP8Experts)) for m in model.modules())
