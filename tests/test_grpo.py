"""GRPO's math against values computed by hand: group advantages (also a group whose rewards are all equal), the
PPO clip, the k3 KL, each loss normalisation, pass@k; and the reward functions (built in, user, broken)."""

import math
import sys

import pytest
import torch

from nanoseek.errors import NanoseekError
from nanoseek.rl import grpo
from nanoseek.rl import rewards as R


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    a = grpo.group_advantages(r, eps=0.0 + 1e-12)
    # group 1: mean 0.5, unbiased std sqrt(1/3) -> ±0.5·sqrt(3) = ±0.8660
    s = 0.5 * math.sqrt(3)
    assert torch.allclose(a[0], torch.tensor([s, -s, -s, s]), atol=1e-6)
    # all equal: no signal, exactly zero (not NaN)
    assert torch.equal(a[1], torch.zeros(4))
    # group 3: mean 0.75, std = sqrt((3·0.5625 + 5.0625)/3) = 1.5 -> [-0.5, -0.5, -0.5, 1.5]
    assert torch.allclose(a[2], torch.tensor([-0.5, -0.5, -0.5, 1.5]), atol=1e-6)
    # Dr. GRPO: centred only
    assert torch.allclose(grpo.group_advantages(r, scale=False)[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]))


def test_k3_kl_by_hand():
    logp = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.2), math.log(0.6)])
    # x = log(ref/p): log 0.5, 0, log 2 -> e^x - x - 1
    want = torch.tensor([0.5 - math.log(0.5) - 1, 0.0, 2 - math.log(2) - 1])
    assert torch.allclose(grpo.k3_kl(logp, ref), want, atol=1e-6)
    assert (grpo.k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))  # ratios
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, clipped = grpo.clipped_surrogate(logp, old, adv, eps_low=0.2)
    # A>0, ρ=1.5: min(1.5, 1.2) = 1.2 (clipped); A>0, ρ=0.5: min(0.5, 0.8) = 0.5 (not clipped)
    # A<0, ρ=1.1: min(-1.1, -1.1) = -1.1; A<0, ρ=1.5: min(-1.5, -1.2) = -1.5 (not clipped: pessimistic side)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, 1.1, 1.5]]), atol=1e-6)
    assert clipped.tolist() == [[True, False, False, False]]
    # asymmetric (clip-higher): ε_high = 0.28 lets ρ=1.5 count up to 1.28
    loss, _ = grpo.clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    assert loss[0, 0].item() == pytest.approx(-1.28)
    # A<0 with ρ below 1-ε: min(-0.5, -0.8) = -0.8 (clipped)
    loss, clipped = grpo.clipped_surrogate(torch.log(torch.tensor([[0.5]])), torch.zeros(1, 1), torch.tensor([-1.0]))
    assert loss.item() == pytest.approx(0.8) and clipped.item()


def test_loss_normalisations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    # grpo: (mean(1,2,3) + mean(4)) / 2 = (2 + 4) / 2
    assert grpo.normalise(per_token, mask, "grpo").item() == pytest.approx(3.0)
    # dapo: (1+2+3+4) / 4 tokens
    assert grpo.normalise(per_token, mask, "dapo").item() == pytest.approx(2.5)
    # dr_grpo: 10 / (2 sequences × max_tokens 5)
    assert grpo.normalise(per_token, mask, "dr_grpo", max_tokens=5).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        grpo.normalise(per_token, mask, "nope")


def test_grpo_loss_gradient_direction():
    """At ρ = 1 the gradient of the loss raises the log-prob of positive-advantage tokens, lowers the others."""
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, kl, clipped = grpo.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    loss.backward()
    assert kl is None and not clipped.any()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()  # descent raises row 0, lowers row 1
    assert loss.item() == pytest.approx(0.0)  # -mean(ρA) with ρ=1 and A summing to zero
    # with β > 0 and π_ref = π_θ the KL term is zero and adds no gradient
    logp2 = torch.zeros(2, 3, requires_grad=True)
    loss2, kl2, _ = grpo.grpo_loss(logp2, logp2.detach(), logp2.detach(), adv, mask, beta=0.5)
    loss2.backward()
    assert torch.allclose(kl2, torch.zeros(2, 3)) and torch.allclose(logp2.grad, logp.grad)


def test_pass_at_k():
    assert grpo.pass_at_k(8, 0, 1) == 0.0 and grpo.pass_at_k(8, 8, 1) == 1.0
    assert grpo.pass_at_k(8, 2, 1) == pytest.approx(0.25)
    assert grpo.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert grpo.pass_at_k(8, 6, 4) == 1.0  # fewer wrong than k


# ---- rewards ----

PROBLEM = {"question": "What is 4 - 1?", "answer": "3", "family": "chain_sum",
           "entry": {"question": "x", "answer": "3", "metadata": {}}}


def test_builtin_rewards():
    good = "4 - 1 = 3\n</think>\n\n3"
    assert R.format_reward(good, PROBLEM) == 1.0
    assert R.format_reward("4 - 1 = 3 3", PROBLEM) == 0.0  # never closed the thought
    assert R.format_reward("x\n</think>\n\n3</think>", PROBLEM) == 0.0
    assert R.accuracy_reward(good, PROBLEM) == 1.0
    assert R.accuracy_reward("x\n</think>\n\n4", PROBLEM) == 0.0
    assert R.accuracy_reward("3", PROBLEM) == 0.0  # no answer without a closed thought
    math_problem = {"question": "half?", "answer": "\\frac{1}{2}"}
    assert R.accuracy_reward("x\n</think>\n\n0.5", math_problem) == 1.0  # math-verify
    assert R.math_reward("x\n</think>\n\n$\\frac{2}{4}$", math_problem) == 1.0
    assert R.math_reward("x\n</think>\n\n0.4", math_problem) == 0.0


def test_user_rewards_and_failures(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(
        "def length(c, p):\n    return len(c) / 100\n"
        "def boom(c, p):\n    raise ValueError('bad')\n"
        "def text(c, p):\n    return 'yes'\n"
        "def nan(c, p):\n    return float('nan')\n"
        "def flag(c, p):\n    return c.endswith('3')\n"
        "x = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rs = R.build(["myrewards:length=0.5", "myrewards:flag"])
    assert [(r.name, r.weight) for r in rs] == [("myrewards:length", 0.5), ("myrewards:flag", 1.0)]
    assert rs[0]("a" * 50, PROBLEM) == 0.5 and rs[1]("..3", PROBLEM) == 1.0
    for spec, msg in (("myrewards:boom", "raised ValueError: bad"), ("myrewards:text", "not a number"),
                      ("myrewards:nan", "returned nan")):
        r = R.build([spec])[0]
        assert r("c", PROBLEM) == 0.0 and r.errors == 1 and msg in r.last_error  # scored 0, counted
        with pytest.raises(NanoseekError, match="fix it before training"):
            r.probe("c", PROBLEM)
    for spec, msg in (("nosuchmodule_xyz:f", "cannot import"), ("myrewards:missing", "no attribute"),
                      ("myrewards:x", "not callable"), ("accurasy", "not a built-in"),
                      ("format=abc", "must be a number"), ("format,format", "named twice")):
        with pytest.raises(NanoseekError, match=msg):
            R.build(spec.split(","))
