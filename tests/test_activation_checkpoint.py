"""Activation checkpointing (--ac): the same run as without it, router included: recomputing a MoE block in the
backward must not count its tokens twice (the bias update's input) nor leave a second balance loss."""

import contextlib
import copy
from pathlib import Path

import pytest
import torch

from nanoseek.checkpoint import read_published
from nanoseek.parallel import activation_checkpoint as ac
from nanoseek import build_model, get_preset
from nanoseek.cli import main
from tests.test_pretrain import data, metrics  # noqa: F401  (data: the 600-document corpus fixture)


def step(model, ids):
    out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.loss.detach(), grads, [m.tokens_per_expert.clone() for m in model.moe_layers()], \
        [m.balance_loss for m in model.moe_layers()]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_same_gradients_and_router_counts(mode):
    torch.manual_seed(0)
    base = build_model(get_preset("tiny")).train()
    ids = torch.randint(0, base.args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    ref = step(copy.deepcopy(base), ids)
    model = copy.deepcopy(base)
    assert ac.apply(model, mode) == 5  # 4 blocks and the MTP module's
    got = step(model, ids)
    assert torch.equal(got[0], ref[0]) and torch.allclose(got[1], ref[1], rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got[2], ref[2]))  # each routed token counted once
    assert all(b is None for b in got[3])  # no balance loss left behind by the recompute


def test_without_keeping_the_router_state_tokens_count_twice(monkeypatch):
    """The control: with KeepRouterState made a no-op, the recompute counts the routed tokens again."""
    monkeypatch.setattr(ac, "KeepRouterState", lambda block: contextlib.nullcontext())
    torch.manual_seed(0)
    base = build_model(get_preset("tiny")).train()
    ids = torch.randint(0, base.args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    ref = step(copy.deepcopy(base), ids)
    model = copy.deepcopy(base)
    ac.apply(model, "full")
    got = step(model, ids)
    assert all(torch.equal(a, 2 * b) for a, b in zip(got[2], ref[2]))


def test_bad_mode():
    from nanoseek.errors import NanoseekError
    with pytest.raises(NanoseekError, match="--ac must be one of"):
        ac.apply(build_model(get_preset("tiny")), "some")


def test_pretraining_with_ac_is_the_same_run(data, tmp_path):
    """6 steps with --ac full and --ac selective against none: per-step losses, grad norms and expert loads, and the
    final weights, router bias included."""
    common = ["pretrain", "--data", str(data), "--max-steps", "6", "--seq-len", "64", "--eval-every", "3",
              "--eval-batches", "2", "--warmup", "2", "--threads", "1", "--batch-size", "4"]
    runs = {}
    for mode in ("none", "full", "selective"):
        assert main([*common, "--out", str(tmp_path / mode), "--ac", mode]) == 0
        runs[mode] = metrics(tmp_path / mode)
    w0 = read_published(tmp_path / "none" / "model")
    for mode in ("full", "selective"):
        for a, b in zip(runs["none"], runs[mode]):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (a, b)
            assert a["expert_load_max_over_mean"] == b["expert_load_max_over_mean"]
        w = read_published(Path(tmp_path / mode / "model"))
        assert max((w[k] - w0[k]).abs().max().item() for k in w0) <= 1e-5
        assert all(torch.equal(w[k], w0[k]) for k in w0 if k.endswith("e_score_correction_bias"))
