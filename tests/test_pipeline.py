"""Pipeline parallelism on CPU (gloo, 2 ranks) through torch.distributed.pipelining: `--pp 2` with each schedule
(1f1b, interleaved1f1b, zbv, dualpipev) equals one process of the same batch: per-step losses (the MTP loss and the
tied embedding included), gradient norms, the router's loads (no shape-inference pass counted) and the final weights,
written in the published layout."""

import json
import shutil
from pathlib import Path

import pytest

from nanoseek.checkpoint import read_published
from nanoseek.cli import main
from tests.test_expert_parallel import SMALL, metrics, torchrun


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    assert main(["data", "--out", str(root / "d"), "--docs", "600", "--vocab-size", "512"]) == 0
    common = ["pretrain", "--data", str(root / "d"), "--max-steps", "6", *SMALL, "--batch-size", "4"]
    assert main([*common, "--out", str(root / "one")]) == 0
    return root, common


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved1f1b", "zbv", "dualpipev"])
def test_pp2_equals_one_process(runs, schedule):
    root, common = runs
    out = root / schedule
    torchrun(*common, "--out", str(out), "--pp", "2", "--pp-schedule", schedule, "--pp-microbatches", "4")
    a, b = metrics(root / "one"), metrics(out)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * x["loss"], (x, y)
        assert abs(x["mtp_loss"] - y["mtp_loss"]) <= 1e-5 * x["mtp_loss"], (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-3 * x["grad_norm"], (x, y)
        assert x["expert_load_max_over_mean"] == y["expert_load_max_over_mean"]
    wa, wb = (read_published(p / "model") for p in (root / "one", out))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3  # a third of one Adam step at lr 3e-3
    ev = [json.loads(l) for l in (out / "eval.jsonl").read_text().splitlines()]
    assert len(ev) == 2 and all(v["val_loss"] < 10 for v in ev)  # evaluated through the whole model on every rank
    ev1 = [json.loads(l) for l in (root / "one" / "eval.jsonl").read_text().splitlines()]
    for x, y in zip(ev1, ev):  # every rank brought in the stages it lacks, the embedding included, before evaluating
        assert abs(x["val_loss"] - y["val_loss"]) <= 1e-4 * x["val_loss"], (x, y)


def test_pp_with_ep_and_dp_equals_one_process(runs):
    """4 gloo ranks = PP 2 x DP 2, EP 2 inside the data-parallel ranks of each stage: the one-process run still."""
    root, common = runs
    out = root / "pp_ep_dp"
    assert common[-2:] == ["--batch-size", "4"]  # the global batch: 2 per data-parallel rank here
    torchrun(*common[:-1], "2", "--out", str(out), "--pp", "2", "--pp-microbatches", "2", "--ep", "2", nproc=4)
    a, b = metrics(root / "one"), metrics(out)
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * x["loss"] and abs(x["grad_norm"] - y["grad_norm"]) <= \
            1e-3 * x["grad_norm"], (x, y)
    wa, wb = (read_published(p / "model") for p in (root / "one", out))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3  # a third of one Adam step at lr 3e-3


def test_pp_with_redundant_experts_placed_by_eplb_equals_one_process(runs):
    """PP 2 x DP 2 with EP 2, 2 redundant expert slots re-placed by EPLB every 2 steps: each rank holds only its
    stages (the other stages' expert placement maps still on the training device, for EPLB and the evaluation that
    brings those stages in), and the run is still the one-process run."""
    root, common = runs
    out = root / "pp_ep_eplb"
    torchrun(*common[:-1], "2", "--out", str(out), "--pp", "2", "--pp-microbatches", "2", "--ep", "2",
             "--ep-redundant", "2", "--eplb-every", "2", nproc=4)
    a, b = metrics(root / "one"), metrics(out)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * x["loss"], (x, y)


def test_pp_resume_is_the_same_run(runs):
    """Saved under PP 2 (1f1b) at step 3, killed, resumed: the same run as without the stop. Each rank materialises
    its stages without drawing, then loads them, and the last stage's tied copy of the embedding with them."""
    root, common = runs
    args = [*common, "--pp", "2", "--pp-schedule", "1f1b", "--pp-microbatches", "4", "--save-every", "3"]
    torchrun(*args, "--out", str(root / "pp_straight"))
    cut = root / "pp_cut"
    shutil.copytree(root / "pp_straight", cut)
    for later in ("checkpoints/step_000006", "model", "ledger.json"):
        p = cut / later
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    torchrun(*args, "--out", str(cut), "--resume", "auto")
    a, b = metrics(root / "pp_straight"), metrics(cut)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["mtp_loss"] == y["mtp_loss"], (x, y)


def cut_at(src, dst, step: int = 3):
    """A copy of run `src` as it was when its step-`step` checkpoint was the newest (killed then)."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").glob("step_*"):
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    shutil.rmtree(dst / "model")
    (dst / "ledger.json").unlink()


def test_saved_at_world_2_resumes_under_pp_2(runs):
    """DCP: saved by 2 ranks under FSDP2 + EP 2 (each writing its shards and its experts, in the background:
    --async-save; AdamW's groups split by kind) at step 3, resumed on 2 ranks as PP 2 (each rank reading only its
    stage, its groups whole): still the one-process run (FSDP2's tolerance)."""
    root, common = runs
    torchrun(*common[:-1], "2", "--out", str(root / "fsdp_ep_async"), "--save-every", "3", "--async-save",
             "--parallel", "fsdp", "--ep", "2")
    cut_at(root / "fsdp_ep_async", root / "to_pp")
    torchrun(*common, "--out", str(root / "to_pp"), "--save-every", "3", "--pp", "2", "--pp-microbatches", "4",
             "--resume", "auto")
    a, b, c = metrics(root / "one"), metrics(root / "fsdp_ep_async"), metrics(root / "to_pp")
    assert len(a) == len(b) == len(c) == 6
    for x, y, z in zip(a, b, c):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * x["loss"] and abs(x["loss"] - z["loss"]) <= 1e-4 * x["loss"]
    wa, wc = (read_published(p / "model") for p in (root / "one", root / "to_pp"))
    assert wa.keys() == wc.keys() and max((wa[k] - wc[k]).abs().max().item() for k in wa) < 1e-3
