"""GRPO's objective (DeepSeekMath / R1 eqs. 1-3), as plain functions of tensors.

For a prompt q, G completions o_1..o_G are sampled from π_old and scored r_1..r_G. Every token of o_i gets the
advantage A_i = (r_i − mean r) / std r (the group's z-score; no critic). The per-token objective is PPO's clipped
surrogate with ratio ρ = π_θ/π_old, minus β times the k3 estimate of KL(π_θ ‖ π_ref):

    ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β (π_ref/π_θ − log(π_ref/π_θ) − 1)

and the loss averages ℓ_t in one of three ways (`normalise`):
  grpo     R1 / DeepSeekMath: mean over each sequence's tokens, then over sequences (long answers weigh less per token)
  dr_grpo  Dr. GRPO (Liu et al. 2025): sum over tokens / (sequences × max_tokens), a constant; with A = r − mean r
           (no division by std) — both remove GRPO's length and difficulty biases
  dapo     DAPO (Yu et al. 2025): sum over all tokens / number of tokens in the batch (token-level)
ε_high > ε_low is DAPO's asymmetric "clip-higher".
"""

import torch


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [n_groups, G] -> advantages [n_groups, G]: r − mean, divided by the (unbiased) std when `scale`.
    A group whose rewards are all equal gets zero advantages (it carries no signal)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(centred[:, :1])
    return centred / (std + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref) from log-probabilities of the sampled tokens: e^{x} − x − 1 with
    x = log π_ref − log π_θ; ≥ 0, and unbiased under samples of π_θ."""
    x = ref_logp - logp
    return torch.exp(x) - x - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float = 0.2,
                      eps_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss −min(ρA, clip(ρ)A) and whether the clipped term was the one taken (for the clip fraction).
    logp/old_logp [N, T]; adv [N] or [N, T]."""
    eps_high = eps_low if eps_high is None else eps_high
    adv = adv[:, None] if adv.ndim == 1 else adv
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def normalise(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_tokens: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [N, T] over the completion tokens (mask [N, T]) to a scalar (see the module doc)."""
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum(-1)  # [N]
    if how == "grpo":
        return (total / mask.sum(-1).clamp(min=1)).mean()
    if how == "dr_grpo":
        return total.sum() / (per_token.shape[0] * (max_tokens or per_token.shape[1]))
    if how == "dapo":
        return total.sum() / mask.sum().clamp(min=1)
    raise ValueError(f"unknown loss normalisation {how!r}")


def grpo_loss(logp, old_logp, ref_logp, adv, mask, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float | None = None, how: str = "grpo", max_tokens: int | None = None) -> tuple:
    """The GRPO loss and per-token statistics: (loss, kl [N, T] or None, clipped [N, T])."""
    pg, clipped = clipped_surrogate(logp, old_logp, adv, eps_low, eps_high)
    kl = k3_kl(logp, ref_logp) if beta > 0 else None
    per_token = pg + beta * kl if kl is not None else pg
    return normalise(per_token, mask, how, max_tokens), kl, clipped


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021): 1 − C(n−c, k)/C(n, k) for c correct of n samples."""
    if n - c < k:
        return 1.0
    p = 1.0
    for i in range(n - c + 1, n + 1):
        p *= 1 - k / i
    return 1.0 - p
