"""The decoder block (V3 §2.1): pre-norm MLA, then pre-norm FFN (dense SwiGLU in the first `first_k_dense_replace`
layers, DeepSeekMoE after), each added to the residual stream. The main model stacks them; each MTP module holds one."""

from torch import nn

from nanoseek.config import ModelArgs
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, MoE
from nanoseek.model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MoE(args) if args.is_moe_layer(layer_id) else MLP(args.hidden_size, args.intermediate_size)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x, cos, sin, cache_kv, cache_pe, slots, start, absorb: bool = True,
                       length: int | None = None):
        """The same block over MLA's latent cache (prefill and decode): see MLA.forward_cached."""
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, cache_kv, cache_pe, slots, start,
                                              absorb, length)
        return x + self.mlp(self.post_attention_layernorm(x))
