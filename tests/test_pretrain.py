"""Pretraining: a 2-rank gloo torchrun run equals a 1-process run of the same global batch; a failure in the middle of
a checkpoint save leaves the previous checkpoint, from which --resume auto continues bit-identically; a run killed
(SIGKILL) while its corpus is prepared, while its first checkpoint is written, or at a random moment, continues when
the same command runs again and equals one that never stopped; a NaN gradient skips the step with the weights
untouched; the loader's state round-trips; gradient accumulation; the ledger; TensorBoard; bad input -> one line,
exit 1, nothing lost. Faults are injected from outside (tests/faults.py, monkeypatch)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek.checkpoint import read_published
from nanoseek.parallel.state import read as read_checkpoint
from nanoseek.cli import main
from nanoseek.data.corpus import load_meta
from nanoseek.data.loader import PackedLoader
from nanoseek.train.run import Run

SMALL = ["--seq-len", "64", "--batch-size", "4", "--eval-every", "4", "--eval-batches", "2", "--warmup", "2",
         "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "d"
    assert main(["data", "--out", str(d), "--docs", "600", "--vocab-size", "512"]) == 0
    return d


def metrics(run) -> list[dict]:
    return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


FAULTS = str(Path(__file__).parent / "faults.py")


def with_fault(fault: str, *args, timeout=300):
    """The CLI in a subprocess with a fault injected (tests/faults.py)."""
    return subprocess.run([sys.executable, FAULTS, fault, "--", *args], capture_output=True, text=True,
                          timeout=timeout)


def pretrain(run, data, steps, *extra):
    return main(["pretrain", "--out", str(run), "--data", str(data), "--max-steps", str(steps), *SMALL, *extra])


def test_data_dir_and_loader_state(data):
    meta = load_meta(data)
    assert set(meta["splits"]) == {"train", "val", "heldout"}
    assert meta["heldout_families"] is None or "basic_arithmetic" in meta["heldout_families"]
    fams = {json.loads(l)["family"] for l in (data / "train_problems.jsonl").read_text().splitlines()}
    held = {json.loads(l)["family"] for l in (data / "heldout_problems.jsonl").read_text().splitlines()}
    assert held == {"basic_arithmetic"} and not fams & held
    a = PackedLoader(data, meta, "train", 64, 4, seed=3)
    for _ in range(5):
        a.next()
    b = PackedLoader(data, meta, "train", 64, 4, seed=0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(a.n_windows // 4 + 3):  # across an epoch boundary too
        xa, ya = a.next()
        xb, yb = b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one
    # two ranks together read exactly the one-process batch
    r0, r1 = (PackedLoader(data, meta, "train", 64, 2, rank=r, world=2, seed=3) for r in (0, 1))
    one = PackedLoader(data, meta, "train", 64, 4, seed=3)
    for _ in range(3):
        assert torch.equal(torch.cat([r0.next()[0], r1.next()[0]]), one.next()[0])


def torchrun(*args, fault=None):
    exe = Path(sys.executable).parent / "torchrun"
    target = [FAULTS, fault, "--"] if fault else ["-m", "nanoseek"]
    return subprocess.run([str(exe), "--nproc_per_node", "2", *target, *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("parallel,tol", [("ddp", 1e-5), ("fsdp", 1e-4)])
def test_two_ranks_equal_one_process(data, tmp_path, parallel, tol):
    """Tolerance (relative, per-step loss): DDP 1e-5, FSDP2 1e-4 (its reduce-scatter sums in another order, and a
    last-bit change can flip a near-tied expert choice)."""
    assert pretrain(tmp_path / "one", data, 5) == 0
    r = torchrun("pretrain", "--out", str(tmp_path / "two"), "--data", str(data), "--max-steps", "5", *SMALL[:2],
                 "--batch-size", "2", *SMALL[4:], "--parallel", parallel)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= tol * abs(x["loss"])
    wa = read_published(tmp_path / "one" / "model")
    wb = read_published(tmp_path / "two" / "model")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3


def test_fsdp_failed_save_and_resume(data, tmp_path):
    common = ["pretrain", "--data", str(data), "--max-steps", "6", *SMALL[:2], "--batch-size", "2", *SMALL[4:],
              "--parallel", "fsdp", "--save-every", "3"]
    assert torchrun(*common, "--out", str(tmp_path / "straight")).returncode == 0
    assert torchrun(*common, "--out", str(tmp_path / "cut"), fault="fail-save:6").returncode != 0
    r = torchrun(*common, "--out", str(tmp_path / "cut"), "--resume", "auto")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(tmp_path / "cut")]


def test_failed_save_then_resume_is_bit_identical(data, tmp_path):
    assert pretrain(tmp_path / "straight", data, 8, "--save-every", "4") == 0
    # fail in the middle of the step-8 save (its tensors written, not yet train_state.json)
    r = with_fault("fail-save:8", "pretrain", "--out", str(tmp_path / "broken"), "--data", str(data), "--max-steps",
                   "8", *SMALL, "--save-every", "4")
    assert r.returncode != 0 and "injected failure" in r.stderr
    ckpts = sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir())
    assert ckpts == ["step_000004"]  # the incomplete step-8 save left nothing behind
    assert pretrain(tmp_path / "broken", data, 8, "--save-every", "4", "--resume", "auto") == 0
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "broken")
    assert [m["step"] for m in b] == list(range(1, 9))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # bit-identical
    wa = read_published(tmp_path / "straight" / "model")
    wb = read_published(tmp_path / "broken" / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ledger = json.loads((tmp_path / "broken" / "ledger.json").read_text())
    assert ledger["tokens"] == 8 * 4 * 64 and ledger["steps"] == 8


def test_killed_anywhere_then_resumed_equals_straight(data, tmp_path):
    assert pretrain(tmp_path / "straight", data, 12, "--save-every", "2") == 0
    run = tmp_path / "killed"
    args = ["pretrain", "--out", str(run), "--data", str(data), "--max-steps", "12", *SMALL, "--save-every", "2",
            "--resume", "auto"]
    p = subprocess.Popen([sys.executable, "-m", "nanoseek", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once a few steps are logged
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(run)]


def test_killed_while_preparing_the_corpus_or_saving_then_rerun(tmp_path):
    """SIGKILL while the embedded corpus is written (no --data: pretrain prepares OUT/data), then while the first
    checkpoint is written: each time the same command continues, and the run equals one never interrupted."""
    args = ["pretrain", "--docs", "300", "--max-steps", "4", "--save-every", "2", *SMALL, "--resume", "auto"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    run = tmp_path / "killed"
    r = with_fault("kill-corpus", *args, "--out", str(run))
    assert r.returncode == -signal.SIGKILL and not (run / "data").exists() and (run / "run.json").is_file()
    r = with_fault("kill-save:2", *args, "--out", str(run))
    assert r.returncode == -signal.SIGKILL and (run / "data" / "meta.json").is_file()
    assert not list((run / "checkpoints").glob("step_*"))  # the half-written first checkpoint is not one
    r = cli(*args, "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(run)]
    wa = read_published(tmp_path / "straight" / "model")
    wb = read_published(run / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_gradient_skips_step(data, tmp_path, monkeypatch):
    optimizer_step = Run.optimizer_step

    def nan_at_step_3(self, *a, **k):  # a NaN gradient on one rank, injected from outside
        if self.step == 2:
            next(self.model.parameters()).grad.fill_(float("nan"))
        return optimizer_step(self, *a, **k)
    monkeypatch.setattr(Run, "optimizer_step", nan_at_step_3)
    run = tmp_path / "nan"
    assert pretrain(run, data, 4, "--save-every", "1", "--keep", "10") == 0
    m = metrics(run)
    assert [x["skipped"] for x in m] == [False, False, True, False]
    assert m[-1]["skipped_steps"] == 1
    w2 = read_checkpoint(run / "checkpoints" / "step_000002")
    w3 = read_checkpoint(run / "checkpoints" / "step_000003")
    w4 = read_checkpoint(run / "checkpoints" / "step_000004")
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the skipped step changed nothing, router bias included
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)
    assert json.loads((run / "ledger.json").read_text())["skipped_steps"] == 1


def test_grad_accumulation_equals_big_batch(data, tmp_path):
    assert pretrain(tmp_path / "big", data, 3, "--batch-size", "4") == 0
    assert pretrain(tmp_path / "acc", data, 3, "--batch-size", "2", "--batch-tokens", str(4 * 64)) == 0
    for x, y in zip(metrics(tmp_path / "big"), metrics(tmp_path / "acc")):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * x["loss"]


def test_bad_input(data, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "just a few words"}) + "\n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "ok"}\n{oops\n')
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert pretrain(tmp_path / "done", data, 1) == 0
    before = (tmp_path / "done" / "metrics.jsonl").read_text()
    cases = [
        (["data", "--out", str(tmp_path / "a"), "--files", str(empty)], "holds no text"),
        (["data", "--out", str(tmp_path / "b"), "--files", str(tmp_path / "missing.txt")], "does not exist"),
        (["data", "--out", str(tmp_path / "c"), "--files", str(latin)], "not UTF-8"),
        (["data", "--out", str(tmp_path / "e"), "--files", str(bad_jsonl)], "bad.jsonl:2 is not valid JSON"),
        (["pretrain", "--out", str(tmp_path / "f"), "--data", str(tmp_path / "nodata")], "not a nanoseek data"),
        (["pretrain", "--out", str(tmp_path / "g"), "--data", str(data), "--max-steps", "0"], "--max-steps must"),
        (["pretrain", "--out", str(tmp_path / "h"), "--data", str(data), "--lr", "-1"], "--lr must"),
        (["pretrain", "--out", str(tmp_path / "i"), "--data", str(data), "--seq-len", "100000"], "exceeds"),
        (["pretrain", "--out", str(other), "--data", str(data)], "not empty"),
        (["pretrain", "--out", str(tmp_path / "k"), "--families", "chain_sum", "nope"], "unknown task family 'nope'"),
        (["pretrain", "--out", str(tmp_path / "k2"), "--families", "basic_arithmetic"], "is a held-out family"),
        (["pretrain", "--out", str(tmp_path / "done"), "--data", str(data), "--max-steps", "1"], "already holds a run"),
        (["pretrain", "--out", str(tmp_path / "done"), "--data", str(data), "--max-steps", "2", "--resume", "auto"],
         "holds a different run"),
        (["cost", "--preset", "v3", "--tokens", "1e12", "--gpu", "tpu"], "unknown --gpu"),
        (["cost", "--preset", "v3", "--tokens", "1e12", "--mfu", "2"], "--mfu"),
    ]
    for args, needle in cases:
        r = cli(*args)
        assert r.returncode == 1, (args, r.stdout[-500:], r.stderr[-1500:])
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)
    # a dataset too small for one batch
    d2 = tmp_path / "d2"
    assert main(["data", "--out", str(d2), "--files", str(tiny), "--tokenizer", str(data)]) == 0
    r = cli("pretrain", "--out", str(tmp_path / "j"), "--data", str(d2), "--batch-size", "8")
    assert r.returncode == 1 and "too few for one batch" in r.stderr and "Traceback" not in r.stderr
    assert (other / "keep.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    assert (tmp_path / "done" / "metrics.jsonl").read_text() == before


def test_user_files_jsonl_parquet(tmp_path, data):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"text": f"Document number {i}: " + "the quick brown fox " * 20} for i in range(60)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    pq.write_table(pa.table({"text": [r["text"] for r in rows[30:]]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("A plain text document. " * 50)
    out = tmp_path / "user"
    assert main(["data", "--out", str(out), "--files", str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"),
                 str(tmp_path / "c.txt"), "--tokenizer", str(data)]) == 0
    meta = load_meta(out)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 61
    assert pretrain(tmp_path / "run", out, 2) == 0


def test_cost_cli_json(capsys):
    assert main(["cost", "--preset", "v3", "--tokens", "14.8e12", "--gpu", "h800", "--gpus", "2048", "--mfu", "0.35",
                 "--gpu-hours", "2.664e6", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert {"flops", "gpu_hours", "usd", "implied_mfu"} <= set(e)
    assert 0.3 < e["implied_mfu"] < 0.5  # 3.86e24 FLOPs over 2.664M H800-hours at 989 TFLOP/s: ~41%
    assert abs(e["gpu_hours"] * 0.35 - e["flops"] / 989e12 / 3600) < 1


def test_tensorboard_and_wandb(data, tmp_path, monkeypatch, capsys):
    """--tensorboard writes event files whose scalars are the metrics by name; --wandb logs an offline run; a missing
    library is one line naming the extra to install, before anything is written."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "tracked"
    assert pretrain(run, data, 3, "--tensorboard", "--wandb") == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    losses = [e.value for e in ea.Scalars("loss")]
    assert losses == pytest.approx([m["loss"] for m in metrics(run)], rel=1e-6) and len(losses) == 3
    assert "eval/val_loss" in ea.Tags()["scalars"]
    assert list((run / "wandb").glob("offline-run-*"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    capsys.readouterr()
    assert pretrain(tmp_path / "nowandb", data, 3, "--wandb") == 1
    err = capsys.readouterr().err
    assert "pip install 'nanoseek[wandb]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nowandb").exists()


def test_bad_data_leaves_the_run_directory_untouched(data, tmp_path):
    """A wrong --data is one line before run.json is written, so the same --out works once the path is fixed."""
    run = tmp_path / "r"
    assert pretrain(run, tmp_path / "no-such-data", 2) == 1
    assert not run.exists()
    assert pretrain(run, data, 2) == 0
