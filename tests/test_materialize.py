"""A meta-device model materialised by parallel.materialize starts from exactly the weights `build_model` gives in one
process, and leaves the CPU generator where it would: drawn chunk by chunk, the rows a rank holds copied out
(the multi-rank runs of test_expert_parallel / test_pipeline / test_pretrain start from these weights)."""

import pytest
import torch

from nanoseek import build_model, get_preset
from nanoseek.parallel import materialize as mat


@pytest.mark.parametrize("preset", ["tiny", "cpu", "tiny-dense"])
@pytest.mark.parametrize("chunk", [mat.CHUNK, 48])  # 48: many chunks per tensor, tails merged
def test_same_weights_and_generator_state_as_one_process(preset, chunk, monkeypatch):
    monkeypatch.setattr(mat, "CHUNK", chunk)
    torch.manual_seed(3)
    ref = build_model(get_preset(preset))
    after_ref = torch.rand(4)
    torch.manual_seed(3)
    model = build_model(get_preset(preset), device="meta")
    assert mat.on_meta(model)
    mat.materialize(model, torch.device("cpu"))
    after = torch.rand(4)
    assert not mat.on_meta(model)
    for (n1, a), (n2, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    assert torch.equal(after, after_ref)  # the generator where one process leaves it
    ids = torch.randint(0, model.args.vocab_size, (1, 16))
    assert torch.equal(ref(ids), model(ids))


def test_without_init_nothing_is_drawn():
    """A resumed run takes its weights from the checkpoint: materialising it draws nothing from the generator."""
    torch.manual_seed(0)
    model = build_model(get_preset("tiny"), device="meta")
    state = torch.get_rng_state()
    mat.materialize(model, torch.device("cpu"), init=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.isfinite(p).all() for p in model.parameters())
