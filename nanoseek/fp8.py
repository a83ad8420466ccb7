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

Two kernels compute each GEMM from the same quantised operands:
- the emulation (any device; the CPU's): dequantise, multiply in FP32. It gives the numbers a Hopper FP8 GEMM with FP32
  promotion computes, up to FP32 summation order (tests/test_fp8.py checks it against a float64 computation of the
  same quantised operands). torch's CPU `scaled_mm` has only tensor- or row-wise scales, so this is ours to write;
- on Hopper (SM90, cuBLASLt >= 12.9), `torch._scaled_mm` with 1×128 / 128×128 block scales (`hopper_mm`). Shapes it
  cannot take (a K not a multiple of 512 for the weight's blocks, an N not a multiple of 16) and other GPUs fall back
  to the emulation, with one warning line.

Serving an FP8 checkpoint (`from_pretrained`, `keep_fp8_weights`): its weights stay e4m3 in memory with their block
scales, dequantised per layer as it runs (CPU) or multiplied by `hopper_mm` (Hopper), about half the bytes of bf16.
"""

import contextlib
import contextvars
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoseek.checkpoint import FP8_DTYPES, dequantize_fp8, fp8_scale, quantize_fp8
from nanoseek.errors import NanoseekError
from nanoseek.model import transformer
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
    K, n = q.shape[-1], scale.shape[-1]
    padded = F.pad(q.float(), (0, n * TILE - K)).view(*q.shape[:-1], n, TILE)
    return (padded * scale[..., None]).view(*q.shape[:-1], n * TILE)[..., :K]


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


# ---- the block-scaled GEMM ------------------------------------------------------------------------------------------

_warned = set()
native_calls = 0  # GEMMs hopper_mm has run (the GPU checks read it: did the native kernel run, or the emulation?)


def _fallback(reason: str) -> None:
    """One line per reason, the first time a native FP8 GEMM cannot run and the emulation does its work."""
    if reason not in _warned:
        _warned.add(reason)
        print(f"nanoseek.fp8: {reason}; emulating the block-scaled GEMM in fp32", file=sys.stderr, flush=True)


def hopper_mm(a, sa, b, sb, b_blocks: bool, out_dtype):
    """a [M, K] e4m3 in 1×128 tiles (scales [M, ⌈K/128⌉]) times bᵀ, b [N, K] e4m3 in 128×128 blocks (b_blocks: scales
    [⌈N/128⌉, ⌈K/128⌉]) or in 1×128 tiles (scales [N, ⌈K/128⌉]) -> [M, N] in out_dtype with FP32 accumulation, by
    cuBLASLt's block-scaled GEMM on Hopper; None where it cannot run (the caller emulates). cuBLASLt wants the scales
    outer-dimension-major, the rows of a a multiple of 4, and whole tiles along K (zero padding adds nothing)."""
    if not a.is_cuda:
        return None
    cap = torch.cuda.get_device_capability(a.device)
    if cap != (9, 0):
        _fallback(f"block-scaled FP8 GEMMs need SM90 (H100/H200), this GPU is SM{cap[0]}{cap[1]}")
        return None
    M, K = a.shape
    N = b.shape[0]
    if N % 16 or (b_blocks and -(-K // TILE) % 4):
        _fallback(f"no block-scaled kernel for a [{M}, {K}] x [{K}, {N}] GEMM (it needs N % 16 == 0 and, for a "
                  f"weight in blocks, a multiple of 4 blocks along K)")
        return None
    pad_k, pad_m = -K % TILE, -M % 4
    if pad_k or pad_m:  # e4m3 has no pad kernel: pad the bytes (0x00 is +0.0)
        a = F.pad(a.view(torch.uint8), (0, pad_k, 0, pad_m)).view(a.dtype)
        b = F.pad(b.view(torch.uint8), (0, pad_k)).view(b.dtype)
        sa = F.pad(sa, (0, 0, 0, pad_m), value=1.0)
    sa = sa.float().t().contiguous().t()  # [M, K/128], column-major
    sb = sb.float().contiguous().t() if b_blocks else sb.float().t().contiguous()  # [K/128, N/128] / [K/128, N]
    try:
        y = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    except (RuntimeError, TypeError) as e:
        _fallback(f"torch._scaled_mm refused the block scales ({str(e).splitlines()[0][:160]})")
        return None
    global native_calls
    native_calls += 1
    return y[:M]


def blockwise_mm(xq, xs, wq, ws, b_blocks: bool = True, out_dtype=torch.float32):
    """xq [M, K] in 1×128 tiles (scales xs) · wq [N, K]ᵀ in 128×128 blocks or 1×128 tiles (scales ws) -> [M, N]:
    `hopper_mm` where it runs, else the emulation (dequantise, FP32 matmul)."""
    y = hopper_mm(xq, xs, wq, ws, b_blocks, out_dtype)
    if y is None:
        w = dequantize_blocks(wq, ws) if b_blocks else dequantize_tiles(wq, ws)
        y = (dequantize_tiles(xq, xs) @ w.T).to(out_dtype)
    return y


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
        return blockwise_mm(xq, xs, wq, ws, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        pow2 = ctx.pow2
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad: dy [M, N] tiled along N (the inner dimension), W's blocks as they are
            dyq, dys = quantize_tiles(dy, pow2)
            dx = hopper_mm(dyq, dys, wq.t().contiguous(), ws.t().contiguous(), True, ctx.dtype) if dy.is_cuda else None
            if dx is None:
                dx = (dequantize_tiles(dyq, dys) @ dequantize_blocks(wq, ws)).to(ctx.dtype)
        if ctx.needs_input_grad[1]:  # Wgrad: dyᵀ [N, M] and xᵀ [K, M], both tiled along the tokens M
            x = dequantize_tiles(xq, xs)  # the cached FP8 activations, re-tiled 128×1
            dw = blockwise_mm(*quantize_tiles(dy.T, pow2), *quantize_tiles(x.T, pow2), b_blocks=False,
                              out_dtype=ctx.wdtype)
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


# ---- FP8 weights served ---------------------------------------------------------------------------------------------

def fp8_weight_linear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, block=(TILE, TILE)) -> torch.Tensor:
    """x [..., K] · Wᵀ for W stored e4m3 [N, K] with block scales ws: on Hopper the activations are quantised in 1×128
    tiles on the fly ("activation_scheme": "dynamic") and multiplied by the FP8 GEMM; elsewhere W is dequantised for
    this call only (one layer's weight at a time in high precision) and multiplied in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    y = None
    if x.is_cuda and tuple(block) == (TILE, TILE):
        y = hopper_mm(*quantize_tiles(flat), wq, ws, True, x.dtype)
    if y is None:
        y = flat @ dequantize_fp8(wq, ws, block, x.dtype).T
    return y.view(*x.shape[:-1], wq.shape[0])


class FP8WeightLinear(nn.Linear):
    """A linear layer of an FP8 checkpoint, for inference: `weight` e4m3 [N, K] as stored, `weight_scale_inv` fp32
    [⌈N/b⌉, ⌈K/b⌉] beside it (the class keep_fp8_weights gives)."""
    block = (TILE, TILE)

    def forward(self, x):
        y = fp8_weight_linear(x, self.weight, self.weight_scale_inv, self.block)
        return y if self.bias is None else y + self.bias


class FP8WeightExperts(Experts):
    """The routed experts of an FP8 checkpoint, for inference: gate_up_proj [E, 2I, D] and down_proj [E, D, I] in
    e4m3 as stored, their block scales in gate_up_proj_scale_inv [E, 2, ⌈I/b⌉, ⌈D/b⌉] (gate's blocks, then up's) and
    down_proj_scale_inv [E, ⌈D/b⌉, ⌈I/b⌉]. Each expert's weights are dequantised when tokens reach it."""
    block = (TILE, TILE)

    def gate_up(self, e, dtype):  # -> [..., 2I, D] for e an index or a tensor of indices
        q = self.gate_up_proj[e]
        halves = q.view(*q.shape[:-2], 2, q.shape[-2] // 2, q.shape[-1])
        return dequantize_fp8(halves, self.gate_up_proj_scale_inv[e], self.block, dtype).flatten(-3, -2)

    def down(self, e, dtype):  # -> [..., D, I]
        return dequantize_fp8(self.down_proj[e], self.down_proj_scale_inv[e], self.block, dtype)

    def expert(self, x, e):
        """x [n, D] through expert e (an int) -> [n, D]; on Hopper both GEMMs in FP8 (gate and up as one GEMM where
        their blocks line up, I a multiple of 128)."""
        if x.is_cuda and (self.gate_up_proj.shape[1] // 2) % TILE == 0:
            h = fp8_weight_linear(x, self.gate_up_proj[e], self.gate_up_proj_scale_inv[e].flatten(0, 1), self.block)
        else:
            h = F.linear(x, self.gate_up(e, x.dtype))
        gate, up = h.chunk(2, dim=-1)
        return fp8_weight_linear(F.silu(gate) * up, self.down_proj[e], self.down_proj_scale_inv[e], self.block)

    def grouped(self, x, weights, indices):
        """Only the experts some token chose are visited (and dequantised), each over its tokens."""
        if indices.numel() <= 2 * self.gate_up_proj.shape[0] and torch.compiler.is_compiling():
            return self.gathered(x, weights, indices)
        y = torch.zeros_like(x)
        for e in indices.unique().tolist():
            tok, slot = torch.where(indices == e)
            y.index_add_(0, tok, self.expert(x[tok], e) * weights[tok, slot, None].to(x.dtype))
        return y

    reference = grouped

    def gathered(self, x, weights, indices):
        """A compiled decode step: each token against its K experts' dequantised weights (as Experts.gathered)."""
        gate, up = (x[:, None, None, :] * self.gate_up(indices, x.dtype)).sum(-1).chunk(2, dim=-1)
        h = F.silu(gate) * up * weights[..., None].to(x.dtype)
        return (h[:, :, None, :] * self.down(indices, x.dtype)).sum((1, 3))


# the projections whose weight the model reads as a tensor (absorbed MLA multiplies kv_b_proj's into the query):
# dequantised at load, as their share of the weights is small
READ_AS_TENSOR = re.compile(r"kv_b_proj$")


def keep_fp8_weights(model: nn.Module, sd: dict) -> None:
    """from_pretrained's hook: the FP8 weights of `sd` (with their `_scale_inv` entries, as
    checkpoint.load_state_dict(keep_fp8=True) gives them) are taken as stored by FP8WeightLinear / FP8WeightExperts
    modules, whose classes replace those of the model's (on the meta device, before the weights are assigned)."""
    dtype = next(t.dtype for t in sd.values() if t.is_floating_point() and t.dtype not in FP8_DTYPES
                 and t.dim() > 1)
    for key in sorted(k for k in sd if k.endswith("_scale_inv")):
        wname = key[:-len("_scale_inv")]
        if wname.endswith(".weight"):
            mname = wname[:-len(".weight")]
            m = model.get_submodule(mname)
            if type(m) is nn.Linear and not READ_AS_TENSOR.search(mname):
                m.__class__ = FP8WeightLinear
                m.weight.requires_grad_(False)
                m.register_buffer("weight_scale_inv", torch.empty(sd[key].shape, device="meta"))
                continue
            sd[wname] = dequantize_fp8(sd[wname], sd.pop(key), FP8WeightLinear.block, dtype)
        else:  # the routed experts' stacked scales
            mname, pname = wname.rsplit(".", 1)
            m = model.get_submodule(mname)
            if type(m) is Experts:
                m.__class__ = FP8WeightExperts
            getattr(m, pname).requires_grad_(False)
            m.register_buffer(key.rsplit(".", 1)[1], torch.empty(sd[key].shape, device="meta"))


def from_pretrained(path, device=None, dtype=None, dequantize: bool = False) -> nn.Module:
    """Load a checkpoint keeping its FP8 weights in FP8 (about half the bytes of bf16), or with dequantize as
    nanoseek.model.from_pretrained does; a checkpoint without FP8 weights loads the same either way."""
    return transformer.from_pretrained(path, device, dtype, fp8_weights=None if dequantize else keep_fp8_weights)


def weights_line(model: nn.Module) -> str | None:
    """'FP8 weights kept in FP8: ...' for a model holding FP8 weights (what serve and chat say at load), else None."""
    kept = [m for m in model.modules() if isinstance(m, (FP8WeightLinear, FP8WeightExperts))]
    if not kept:
        return None
    return (f"FP8 weights kept in FP8 ({len(kept)} modules): {weight_bytes(model) / 2**20:.1f} MiB of weights in "
            f"memory, dequantised per layer as it runs (--dequantize: dequantise them at load instead)")


def weight_bytes(model: nn.Module) -> int:
    """The bytes of a model's parameters and buffers (tied tensors once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


# V3 §3.3.1: what runs in FP8, by parameter-path pattern; everything else keeps its precision
DEFAULT_FILTER = re.compile(r"(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                            r"|mlp\.(gate_proj|up_proj|down_proj)|shared_experts\.(gate_proj|up_proj|down_proj)"
                            r"|mlp\.experts|eh_proj)$")


_FP8_CLASSES = {}


def fp8_experts_class(cls: type) -> type:
    """An Experts subclass made FP8 by cooperative inheritance: FP8{cls} (cls, FP8Experts), so that cls's calls to
    the next class's `grouped` (EPExperts.compute: a rank's own experts) reach FP8Experts.grouped."""
    if cls not in _FP8_CLASSES:
        _FP8_CLASSES[cls] = type(f"FP8{cls.__name__}", (cls, FP8Experts), {})
    return _FP8_CLASSES[cls]


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
        elif isinstance(m, Experts) and not isinstance(m, (FP8Experts, FP8WeightExperts)):
            m.__class__ = fp8_experts_class(type(m))  # e.g. expert parallelism's shard: FP8 x EP
        else:
            continue
        m.fp8_pow2 = pow2
        done.append(name)
    if not done:
        raise NanoseekError("--fp8: no linear layer or experts of this model matched the FP8 filter")
    return done


def is_converted(model: nn.Module) -> bool:
    return any(isinstance(m, (FP8Linear, FP8Experts)) for m in model.modules())
