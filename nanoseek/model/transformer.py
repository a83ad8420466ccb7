"""The DeepSeek-V3 decoder (DeepseekV3ForCausalLM): embedding, pre-norm blocks of MLA + (dense FFN | DeepSeekMoE),
final norm, output head, and optionally the MTP modules. Single-device code; parallelism, FP8 and compile wrap it."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek import checkpoint
from nanoseek.config import ModelArgs
from nanoseek.errors import NanoseekError
from nanoseek.model.block import Block
from nanoseek.model.moe import MoE
from nanoseek.model.mtp import MTPModule
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding
from nanoseek.tokenizer import Tokenizer


@dataclass
class LossOutput:
    logits: torch.Tensor  # [B, T, V] of the main head
    loss: torch.Tensor  # lm_loss + λ·mtp_loss + balance_loss: what the trainer backpropagates
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor | None
    balance_loss: torch.Tensor | None


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(args, args.num_hidden_layers + k)
                                 for k in range(args.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(args)
        self.tokenizer = None  # a nanoseek Tokenizer, saved beside the weights when set

    # ---- forward ----
    def hidden(self, input_ids, positions=None, mask=None):
        """input_ids [B, T] -> final normed hidden states [B, T, D], and (cos, sin)."""
        cos, sin = self.rope(input_ids, positions)
        x = self.blocks(self.embed_tokens(input_ids), cos, sin, mask)
        return self.norm(x), (cos, sin)

    def rope(self, input_ids, positions=None):
        """The rotary (cos, sin) of positions [B, T] (default 0 .. T-1 of input_ids [B, T])."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return self.rotary(positions)

    def blocks(self, x, cos, sin, mask=None, layers=None, after=None):
        """x [B, T, D] through the decoder blocks (`layers`: a slice of them, a pipeline stage's), `after(block, x)`
        applied to each one's output (a pipeline stage joins the MoE balance loss to the backward there)."""
        for layer in self.layers if layers is None else layers:
            x = layer(x, cos, sin, mask)
            if after is not None:
                x = after(layer, x)
        return x

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, positions=None, mask=None):
        """input_ids [B, T] -> logits [B, T, V]. With labels [B, T] (labels[t] = input_ids[t+1], -100 ignored) ->
        LossOutput with the main, MTP and balance losses."""
        h, (cos, sin) = self.hidden(input_ids, positions, mask)
        logits = self.lm_head(h)
        if labels is None:
            return logits
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        mtp_loss = self.mtp_loss(h, input_ids, labels, cos, sin) if len(self.mtp) else None
        balance = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        balance_loss = torch.stack(balance).sum() if balance and self.training else None
        for m in self.moe_layers():
            m.balance_loss = None
        loss = lm_loss
        if mtp_loss is not None:
            loss = loss + self.args.mtp_loss_weight * mtp_loss
        if balance_loss is not None:
            loss = loss + balance_loss
        return LossOutput(logits, loss, lm_loss, mtp_loss, balance_loss)

    # ---- inference over the latent cache (the engine's prefill, decode and MTP drafts) ----
    def forward_cached(self, input_ids, cache_kv, cache_pe, slots, start, absorb: bool = True,
                       length: int | None = None):
        """input_ids [n, T], the next T tokens of n sequences held in cache rows `slots` [n], sequence i starting at
        position start[i]; cache_kv / cache_pe: one latent cache tensor per layer (see MLA.forward_cached, which also
        explains absorb and length) -> logits [n, T, V] and the final normed hidden states [n, T, D]."""
        pos = start[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rotary(pos)
        x = self.embed_tokens(input_ids)
        for layer, kv, pe in zip(self.layers, cache_kv, cache_pe):
            x = layer.forward_cached(x, cos, sin, kv, pe, slots, start, absorb, length)
        h = self.norm(x)
        return self.lm_head(h), h

    def mtp_forward_cached(self, h, next_ids, cache_kv, cache_pe, slots, start, absorb: bool = True,
                           length: int | None = None):
        """MTP depth 1 over its own latent cache: h [n, T, D] (the main model's final hidden states at positions
        start..) and next_ids [n, T] (the tokens after them) -> logits [n, V] for the token after the last of
        next_ids (the draft; the cache is written for all T)."""
        pos = start[:, None] + torch.arange(next_ids.shape[1], device=next_ids.device)
        cos, sin = self.rotary(pos)
        module = self.mtp[0]
        x = module.forward_cached(h, self.embed_tokens(next_ids), cos, sin, cache_kv[0], cache_pe[0], slots, start,
                                  absorb, length)
        return self.lm_head(module.shared_head.norm(x[:, -1]))

    def mtp_forward(self, h, input_ids, cos, sin, embed=None, after=None) -> list[torch.Tensor]:
        """Logits of each MTP depth k: position t predicts x_{t+k+1} from h^{k-1}_t and Emb(x_{t+k}); [B, T-k, V].
        embed: the shared embedding (default the model's; a pipeline's last stage passes its tied copy); after: as
        in `blocks`, on each MTP module's output."""
        T, out = input_ids.shape[1], []
        embed = self.embed_tokens if embed is None else embed
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            h = module(h[:, : T - k], embed(input_ids[:, k:]), cos[..., : T - k, :], sin[..., : T - k, :])
            if after is not None:
                h = after(module.block, h)
            out.append(self.lm_head(module.shared_head.norm(h)))
        return out

    def mtp_logits(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        h, (cos, sin) = self.hidden(input_ids)
        return self.mtp_forward(h, input_ids, cos, sin)

    def mtp_loss(self, h, input_ids, labels, cos, sin):
        """L_MTP / λ: the mean over depths k of the CE of predicting labels[t+k] (= x_{t+k+1})."""
        losses = [F.cross_entropy(logits.float().flatten(0, 1), labels[:, k:].flatten(), ignore_index=-100)
                  for k, logits in enumerate(self.mtp_forward(h, input_ids, cos, sin), start=1)]
        return torch.stack(losses).mean() if losses else None

    # ---- MoE helpers for the trainer ----
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_moe_impl(self, impl: str) -> "Transformer":
        assert impl in ("grouped", "reference")
        for m in self.moe_layers():
            m.impl = impl
        return self

    def update_bias(self, gamma: float | None = None) -> None:
        """Call after each optimizer step: the auxiliary-loss-free bias update of every MoE layer (γ=0 disables)."""
        gamma = self.args.bias_update_speed if gamma is None else gamma
        for m in self.moe_layers():
            m.update_bias(gamma)

    # ---- init, save, generate ----
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> "Transformer":
        std = self.args.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        for m in self.moe_layers():
            if m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.zero_()
            m.tokens_per_expert.zero_()
        return self

    def save_pretrained(self, path, tokenizer=None, max_shard_size: int | str = "5GB", fp8: bool = False) -> None:
        """Write the DeepseekV3ForCausalLM layout (safetensors, config.json, tokenizer) atomically to path; fp8: the
        published FP8 layout (see checkpoint.write_model_files)."""
        checkpoint.save_pretrained(self, path, tokenizer=tokenizer or self.tokenizer, max_shard_size=max_shard_size,
                                   fp8=fp8)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "Transformer":
        return from_pretrained(path, device=device, dtype=dtype)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Plain sampling by repeated full forwards (the reference the KV-cache engine is checked against)."""
        for _ in range(max_new_tokens):
            logits = self(input_ids[:, -self.args.max_position_embeddings:])[:, -1].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            input_ids = torch.cat([input_ids, nxt], dim=1)
            if eos_token_id is not None and (nxt == eos_token_id).all():
                break
        return input_ids


def build_model(args: ModelArgs, device="cpu", dtype=torch.float32, init: bool = True) -> Transformer:
    """Build on the meta device (no memory), then materialise on `device` and initialise. device="meta" stops there."""
    with torch.device("meta"):
        model = Transformer(args)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device).to(dtype)
    if args.tie_word_embeddings:  # materialising gives each module its own tensor: tie again
        model.lm_head.weight = model.embed_tokens.weight
    if init:
        model.init_weights()
    return model


def from_pretrained(path, device=None, dtype=None, fp8_weights=None) -> Transformer:
    """Load a DeepseekV3/V2ForCausalLM-format directory. dtype defaults to float32 on CPU, bfloat16 elsewhere.
    FP8 weights are dequantised to dtype, unless `fp8_weights` (a callable (model, state_dict), as
    nanoseek.fp8.keep_fp8_weights) takes them as stored, with their scales, before they are loaded."""
    path = Path(path)
    if not path.is_dir():
        raise NanoseekError(f"checkpoint directory {path} does not exist")
    args = ModelArgs.from_json(path / "config.json")
    if args.num_nextn_predict_layers and not checkpoint.checkpoint_has_mtp(path, args):
        args.num_nextn_predict_layers = 0  # e.g. written by transformers, which drops the MTP layers
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    model = build_model(args, device="meta")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    sd = checkpoint.load_state_dict(path, args, expected, dtype=dtype, keep_fp8=fp8_weights is not None)
    args.quantization_config = None  # the model's own weights are what it holds now
    for k, t in sd.items():
        kept = t.dtype in checkpoint.FP8_DTYPES or k.endswith("_scale_inv")  # as stored (fp8_weights)
        sd[k] = t.to(device=device, dtype=t.dtype if kept else
                     torch.float32 if k.endswith("e_score_correction_bias") else dtype)
    if fp8_weights is not None:
        fp8_weights(model, sd)
    model.load_state_dict(sd, strict=not args.tie_word_embeddings, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for m in model.moe_layers():
        m.tokens_per_expert = torch.zeros(m.n_experts, device=device)
    if (path / "tokenizer.json").exists():
        model.tokenizer = Tokenizer.from_dir(path)
    return model.eval()
