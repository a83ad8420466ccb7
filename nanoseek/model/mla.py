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

    def forward_cached(self, x, cos, sin, cache_kv, cache_pe, slots, start, absorb: bool = True,
                       length: int | None = None):
        """Attention with the latent cache, for prefill and decode.

        x [n, T, D] are the next T tokens of n sequences held in cache rows `slots` [n], sequence i starting at
        position start[i]. Their c_kv / k_pe are written to cache_kv [slots_total, S, kv_lora_rank] and
        cache_pe [slots_total, S, rope] at those positions; each query then attends to every cached position up to its
        own. absorb=True: W_UK is folded into the query and W_UV applied after attention, so attention runs over the
        latent itself (cost per key: kv_lora_rank + rope). absorb=False: the latent is expanded to per-head k and v
        (the naive form, kept for checking). Both read and write the same cache. length: attend over the first
        `length` cache positions (masked) instead of up to the furthest query: fixed shapes and no host sync, for a
        compiled decode step.
        """
        n, T, _ = x.shape
        H, dn, dv, r = self.n_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
        q_nope, q_pe = self.query(x, cos, sin)  # (n, T, H, dn), (n, T, H, dr)
        c_kv, k_pe = self.compress_kv(x, cos, sin)  # (n, T, r), (n, T, dr)
        pos = start[:, None] + torch.arange(T, device=x.device)  # (n, T)
        cache_kv[slots[:, None], pos] = c_kv.to(cache_kv.dtype)
        cache_pe[slots[:, None], pos] = k_pe.to(cache_pe.dtype)
        S = int(pos.max()) + 1 if length is None else length
        kv, pe = cache_kv[slots, :S].to(x.dtype), cache_pe[slots, :S].to(x.dtype)  # (n, S, r), (n, S, dr)
        allowed = torch.arange(S, device=x.device)[None, None, :] <= pos[:, :, None]  # (n, T, S)
        w = self.kv_b_proj.weight.view(H, dn + dv, r)
        w_uk, w_uv = w[:, :dn], w[:, dn:]  # (H, dn, r), (H, dv, r)
        if absorb:
            q_abs = torch.einsum("nthd,hdr->nthr", q_nope, w_uk)  # W_UK absorbed into the query
            scores = torch.einsum("nthr,nsr->nhts", q_abs, kv) + torch.einsum("nthd,nsd->nhts", q_pe, pe)
            p = (scores.float() * self.softmax_scale).masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
            o_lat = torch.einsum("nhts,nsr->nthr", p.to(x.dtype), kv)  # attention over the latent
            o = torch.einsum("nthr,hvr->nthv", o_lat, w_uv)  # W_UV applied after attention
        else:
            k_nope = torch.einsum("nsr,hdr->nshd", kv, w_uk)
            v = torch.einsum("nsr,hvr->nshv", kv, w_uv)
            k = torch.cat([k_nope, pe[:, :, None].expand(-1, -1, H, -1)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=allowed[:, None], scale=self.softmax_scale).transpose(1, 2)
        return self.o_proj(o.reshape(n, T, H * dv))

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
