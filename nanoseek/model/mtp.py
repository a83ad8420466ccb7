"""Multi-Token Prediction (DeepSeek-V3 §2.2).

Module k (of D = `num_nextn_predict_layers`) predicts the token k+1 steps ahead, keeping the full causal chain:

    h'_t = eh_proj([enorm(Emb(x_{t+k})); hnorm(h^{k-1}_t)])      (embedding first, as the real weights expect)
    h^k  = TRM_k(h'),   P^k = OutHead(shared_head.norm(h^k))

Emb and OutHead are the main model's (shared); h^0 is the main model's final (normed) hidden state, as vLLM and
SGLang feed it to the MTP layer of the real checkpoints. The loss is L_MTP = λ/D Σ_k CE_k. In a checkpoint module k
lives at `model.layers.{num_hidden_layers + k - 1}` with copies of the shared embedding and head. At inference the
plain forward skips MTP; the modules stay loaded for speculative decoding.
"""

import torch
from torch import nn

from nanoseek.config import ModelArgs
from nanoseek.model.block import Block
from nanoseek.model.norm import RMSNorm


class SharedHead(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class MTPModule(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.block = Block(args, layer_id)  # the same decoder block as the main model
        self.shared_head = SharedHead(args)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos, sin, mask=None) -> torch.Tensor:
        """h_prev [B, T, D] (depth k-1), emb_next [B, T, D] = Emb(x_{t+k}) -> h^k [B, T, D] (before the head norm)."""
        return self.block(self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1)), cos, sin, mask)

    def forward_cached(self, h_prev, emb_next, cos, sin, cache_kv, cache_pe, slots, start, absorb: bool = True,
                       length: int | None = None):
        """The same over the module's own latent cache (speculative decoding's drafts): see MLA.forward_cached."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block.forward_cached(x, cos, sin, cache_kv, cache_pe, slots, start, absorb, length)
