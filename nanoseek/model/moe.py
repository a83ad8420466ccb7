"""DeepSeekMoE (DeepSeek-V3 §2.1.2): shared experts plus fine-grained routed SwiGLU experts.

    h' = u + Σ_shared FFN_s(u) + Σ_i g_i FFN_i(u)

Router (`Gate`), in fp32:
  * scores s = sigmoid(u·e_i) (V3) or softmax (V2);
  * V3 (`noaux_tc`): the per-expert bias b_i (`e_score_correction_bias`) is added for *selection only*; experts are
    split into `n_group` groups, a group is scored by the sum of its top-2 biased scores, only the best `topk_group`
    groups stay eligible, top-K experts are picked among them; the gate values are the *unbiased* s_i of those
    experts, renormalised (`norm_topk_prob`) and multiplied by `routed_scaling_factor`;
  * V2: `greedy` top-K of softmax scores, or `group_limited_greedy` (groups scored by their max);
  * node-limited routing (`n_nodes`, `topk_nodes` = M, V3 §2.1.2): before the groups, only the experts of the M nodes
    with the highest sums of their K/M best biased scores stay eligible (expert-parallel all-to-all then reaches at
    most M nodes per token).
Balancing without an auxiliary loss: after each optimizer step the trainer calls `update_bias(γ)`, which moves b_i by
+γ for experts that got fewer tokens than the mean and −γ for those that got more; plus the small sequence-wise
balance loss L_Bal = α Σ_i f_i P_i (V3 eqs. 17-20), computed in training when α > 0.

Experts hold their weights stacked, [E, inter, hidden], so two implementations share one set of parameters:
`reference` loops over experts as the paper reads; `grouped` (the default) sorts the (token, expert) pairs by expert and
runs each projection as one grouped GEMM (`grouped_mm`), with no Python loop over experts and no host-device sync.
Decoding a few tokens it hands over to `few` (eager, on a CPU: only the chosen experts, on weight views) or, inside a
compiled decode step, to `gathered` (each token against its experts' weights, fused by the compiler).
"""

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelArgs

_grouped_mm_op = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm")


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grouped_mm is not covered by autocast: cast both operands to the autocast dtype as F.linear would be."""
    if torch.is_autocast_enabled(a.device.type):
        dt = torch.get_autocast_dtype(a.device.type)
        a, b = a.to(dt), b.to(dt)
    return _grouped_mm_op(a, b, offs=offs)


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)). The dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk, self.n_experts = args.num_experts_per_tok, args.n_routed_experts
        self.n_group, self.topk_group = args.n_group or 1, args.topk_group or 1
        self.topk_method, self.scoring_func = args.topk_method, args.scoring_func
        self.norm_topk_prob, self.routed_scaling_factor = args.norm_topk_prob, args.routed_scaling_factor
        self.n_nodes, self.topk_nodes = args.n_nodes or 1, args.topk_nodes or args.n_nodes or 1
        self.weight = nn.Parameter(torch.empty(self.n_experts, args.hidden_size))
        if self.topk_method == "noaux_tc":  # fp32 always; a buffer: it is moved by update_bias, not by the optimizer
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):  # model.to(bf16) must not round the router bias: keep it fp32
        super()._apply(fn, recurse)
        if self.e_score_correction_bias is not None and self.e_score_correction_bias.is_floating_point():
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor):
        """x [N, D] -> weights [N, K] fp32, indices [N, K], scores [N, E] fp32 (unbiased)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.topk_nodes < self.n_nodes:  # node-limited: only the experts of the M best nodes stay eligible
            per_node = choice.view(-1, self.n_nodes, self.n_experts // self.n_nodes)
            node_scores = per_node.topk(max(1, self.topk // self.topk_nodes), dim=-1).values.sum(dim=-1)
            keep = node_scores.topk(self.topk_nodes, dim=-1).indices
            node_mask = torch.zeros_like(node_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = per_node.masked_fill(~node_mask.unsqueeze(-1), float("-inf")).flatten(1)
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, n_group]
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob and self.topk > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores


class Dispatch(torch.autograd.Function):
    """xs = x[token]: each token copied to the rows of its K experts. The backward gathers each copy's gradient back
    through the inverse permutation and sums the K copies, a parallel gather where autograd's default for x[token]
    is a scatter-add (`index_put_` with accumulate), 4x slower on CPU."""

    @staticmethod
    def forward(ctx, x, token, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None


class Experts(nn.Module):
    """n_routed_experts SwiGLU experts. Weights stacked: gate_up_proj [E, 2I, D] (each expert's gate_proj rows, then
    its up_proj rows: one GEMM computes both) and down_proj [E, D, I]. Checkpoints store them per expert."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def reference(self, x, weights, indices):
        """The paper's form: for each expert, run the tokens routed to it and add their gated outputs."""
        y = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            tok, slot = torch.where(indices == e)
            if tok.numel() == 0:
                continue
            gate, up = (x[tok] @ self.gate_up_proj[e].T).chunk(2, dim=-1)
            y.index_add_(0, tok, (F.silu(gate) * up @ self.down_proj[e].T) * weights[tok, slot, None].to(x.dtype))
        return y

    def few(self, x, weights, indices):
        """Few tokens on a CPU (decoding): run each chosen (token, expert) pair on views of that expert's weights —
        no weight copies, and no visit to the experts nobody chose. (Reading the indices syncs, so not on a GPU.)"""
        y = torch.zeros_like(x)
        for t, (es, ws) in enumerate(zip(indices.tolist(), weights.to(x.dtype))):
            for e, w in zip(es, ws):
                gate, up = F.linear(x[t], self.gate_up_proj[e]).chunk(2, dim=-1)
                y[t] += F.linear(F.silu(gate) * up, self.down_proj[e]) * w
        return y

    def gathered(self, x, weights, indices):
        """Few tokens in a compiled graph (decoding): each token against its K experts' weights. Written as multiply
        and sum so that the compiler fuses the indexing into one reduction that reads each chosen weight once (eager,
        the indexing would copy the weights, and a matmul would make the compiler copy them too)."""
        gate, up = (x[:, None, None, :] * self.gate_up_proj[indices]).sum(-1).chunk(2, dim=-1)  # [N, K, I] each
        h = F.silu(gate) * up * weights[..., None].to(x.dtype)
        return (h[:, :, None, :] * self.down_proj[indices]).sum((1, 3))  # [N, D]

    def grouped(self, x, weights, indices):
        """Sort the N·K (token, expert) pairs by expert, then one grouped GEMM per projection."""
        E, K = self.gate_up_proj.shape[0], indices.shape[1]
        if indices.numel() <= 2 * E and not torch.is_grad_enabled() and torch.compiler.is_compiling():
            return self.gathered(x, weights, indices)  # a compiled decode step (grouped_mm does not compile on a CPU)
        if indices.numel() < E and not torch.is_grad_enabled() and x.device.type == "cpu":
            return self.few(x, weights, indices)
        flat = indices.flatten()  # [N*K]
        order = flat.argsort(stable=True)
        token = order // K  # the token of each sorted pair
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))  # no bincount: it would sync on GPU
        offs = counts.cumsum(0, dtype=torch.int32)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        xs = Dispatch.apply(x, token, inverse, K)  # [N*K, D], grouped by expert
        gate, up = _grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        h = F.silu(gate) * up * weights.flatten()[order, None].to(x.dtype)  # gate value applied before down_proj
        out = _grouped_mm(h, self.down_proj.transpose(1, 2), offs=offs)  # [N*K, D]
        return x.new_zeros(x.shape, dtype=out.dtype).index_add_(0, token, out)  # out: bf16 under autocast


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, impl: str = "grouped"):
        super().__init__()
        self.impl = impl  # "grouped" (fast) or "reference"
        self.n_experts, self.topk = args.n_routed_experts, args.num_experts_per_tok
        self.aux_loss_alpha = args.aux_loss_alpha if args.seq_aux else 0.0
        self.gate = Gate(args)
        self.experts = Experts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)
        n_shared = args.n_shared_experts or 0
        self.shared_experts = MLP(args.hidden_size, n_shared * args.moe_intermediate_size) if n_shared else None
        # tokens routed to each expert since the last update_bias(); read by the trainer for the load balance
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts, dtype=torch.float32), persistent=False)
        self.balance_loss = None  # set by forward in training when α > 0

    def _apply(self, fn, recurse=True):  # counts stay fp32 whatever dtype the model is cast to
        super()._apply(fn, recurse)
        if self.tokens_per_expert.is_floating_point():
            self.tokens_per_expert = self.tokens_per_expert.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, D)
        flat = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(flat)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert.index_add_(0, indices.flatten(),
                                                  torch.ones(indices.numel(), device=x.device))
            if self.aux_loss_alpha > 0:
                self.balance_loss = self.sequence_balance_loss(scores, indices, shape[0])
        routed = getattr(self.experts, self.impl)(flat, weights, indices)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed.view(shape)

    def sequence_balance_loss(self, scores, indices, batch: int):
        """α Σ_i f_i P_i per sequence, averaged over the batch (V3 eqs. 17-20)."""
        T = scores.shape[0] // batch
        s = scores.view(batch, T, -1)
        p = (s / s.sum(-1, keepdim=True)).mean(1)  # P_i [B, E]
        hits = torch.zeros_like(s).scatter_(2, indices.view(batch, T, -1), 1.0)
        f = hits.sum(1) * self.n_experts / (self.topk * T)  # f_i [B, E]
        return self.aux_loss_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Auxiliary-loss-free balancing: b_i += γ·sign(mean load − load_i), then reset the counts."""
        load = self.tokens_per_expert
        if gamma > 0 and self.gate.e_score_correction_bias is not None and load.sum() > 0:
            self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        load.zero_()
