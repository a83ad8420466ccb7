"""Decoupled RoPE with YaRN, as DeepSeek-V2/V3 apply it to the `qk_rope_head_dim` dims.

The real checkpoints expect rotation of *interleaved* pairs (x0, x1), (x2, x3), ... each by one frequency (DeepSeek's
`view_as_complex`; `transformers`' `rope_interleave=True`). YaRN extends the context by blending interpolated and
extrapolated frequencies with a linear ramp between two correction dims (β_fast, β_slow); the cos/sin are multiplied
by mscale(mscale)/mscale(mscale_all_dim) and the softmax scale by mscale(mscale_all_dim)² (see ModelArgs.softmax_scale).
"""

import math

import torch
from torch import nn

from nanoseek.config import ModelArgs, rope_type, yarn_mscale


def yarn_inv_freq(dim: int, base: float, rs: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin attention factor for YaRN (or plain RoPE when rs is empty)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if rope_type(rs) == "default":
        return inv_freq, 1.0
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(n_rot):  # the dim whose wavelength fits n_rot times in the original context
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate (low frequencies)
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    if rs.get("attention_factor") is not None:
        attn_factor = rs["attention_factor"]
    elif rs.get("mscale") and rs.get("mscale_all_dim"):
        attn_factor = yarn_mscale(factor, rs["mscale"]) / yarn_mscale(factor, rs["mscale_all_dim"])
    else:
        attn_factor = yarn_mscale(factor)
    return inv_freq, attn_factor


class RotaryEmbedding(nn.Module):
    """positions -> (cos, sin). inv_freq is kept as a plain fp32 tensor, not a buffer, so that model.to(bf16)
    cannot round it and no checkpoint ever carries it."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.inv_freq, self.attn_factor = yarn_inv_freq(args.qk_rope_head_dim, args.rope_theta, args.rope_scaling or {})

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] -> cos, sin [..., T, rope_dim/2] in fp32."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq
        return freqs.cos() * self.attn_factor, freqs.sin() * self.attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, d] by cos/sin [B or 1, T, d/2]; the layout stays interleaved."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.to(x.dtype)
