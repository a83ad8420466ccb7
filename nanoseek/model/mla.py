"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

Keys and values are produced from a small latent c_KV = W_DKV h (`kv_lora_rank` dims, RMS-normed by
`kv_a_layernorm`) plus one decoupled RoPE key k_R (`qk_rope_head_dim` dims) shared by all heads; the query is
optionally compressed the same way (`q_lora_rank`; V2-Lite has none and uses `q_proj`). Per head:

    q = [q_nope (qk_nope_head_dim); RoPE(q_pe) (qk_rope_head_dim)]      k = [W_UK c_KV; RoPE(k_R)]     v = W_UV c_KV

Only (c_KV, k_R) need caching: 576 numbers per token per layer for V3. This file holds the training / prefill
("naive") form, which expands the latent to per-head k and v. `compress_kv` and `query` are split out so the
absorbed decode form (W_UK folded into the query, W_UV applied after attention, attention over the cached latent)
can be written beside it using the same weights.
"""

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelArgs
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope


class MLA(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = args.qk_head_dim, args.v_head_dim
        self.softmax_scale = args.softmax_scale
        D, H, bias = args.hidden_size, self.n_heads, args.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=bias)  # W_DQ
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)  # [W_UQ; W_QR]
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)  # [W_DKV; W_KR]
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, D, bias=bias)  # W_O

    def query(self, x, cos, sin):
        """x [B, T, D] -> q_nope [B, T, H, nope], q_pe [B, T, H, rope] (rotated)."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, self.n_heads, self.qk_head_dim).split([self.qk_nope_head_dim,
                                                                           self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def compress_kv(self, x, cos, sin):
        """x [B, T, D] -> c_kv [B, T, kv_lora_rank] (normed), k_pe [B, T, rope] (rotated): what decoding caches."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None):
        """x [B, T, D]; cos/sin [B or 1, T, rope/2]; mask: None for causal, else bool/additive [B, 1, T, T]."""
        B, T, _ = x.shape
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.compress_kv(x, cos, sin)
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, qk_head_dim)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim))
