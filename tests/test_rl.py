"""SFT, GRPO, distillation, evaluation and the report on a tiny model: the SFT loss mask; GRPO and SFT interrupted in
the middle (an exception, SIGKILL) and resumed equal uninterrupted runs bit for bit (weights and metrics); reward
functions that raise or are missing; malformed datasets; a teacher whose tokenizer differs from the student's; eval's
numbers and files, its thinking budget (the engine's), an eval killed mid-way and run again; the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.cli import main
from nanoseek.data.chat import MaskedLoader, encode_row, pack, trace_row
from nanoseek.train.run import Run

FAULTS = str(Path(__file__).parent / "faults.py")

RL = ["--problems", "10", "--prompts", "4", "--group", "3", "--max-new-tokens", "12", "--eval-problems", "4",
      "--threads", "1", "--micro-batch", "5"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained checkpoint (a few steps: enough to exercise every path, not to be right)."""
    root = tmp_path_factory.mktemp("rl")
    assert main(["pretrain", "--out", str(root / "pre"), "--docs", "600", "--max-steps", "3", "--seq-len", "64",
                 "--batch-size", "4", "--eval-every", "10", "--threads", "1"]) == 0
    return root / "pre" / "model"


@pytest.fixture(scope="module")
def sft_model(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    assert main(["sft", "--init", str(base), "--out", str(out), "--examples", "60", "--max-steps", "3",
                 "--seq-len", "128", "--batch-size", "2", "--threads", "1", "--families", "chain_sum",
                 "count_bits"]) == 0
    return out / "model"


def test_sft_loss_mask(base):
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(base)
    row = trace_row("What is 2 + 3?", ["2 + 3 = 5"], "5")
    ids, mask = encode_row(tok, row)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}])
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])  # no loss on the prompt
    assert all(mask[len(prompt):]) and ids[-1] == tok.eos_id  # the thought, answer and eos are trained
    assert tok.decode(ids[len(prompt):-1]) == "2 + 3 = 5\n</think>\n\n5"
    # the same row written inline (<think>…</think>answer) encodes the same
    inline = {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                           {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n\n5"}]}
    assert encode_row(tok, inline) == (ids, mask)
    # packing keeps examples whole; targets are -100 outside the assistant's tokens
    w_ids, w_mask, cut = pack(tok, [row] * 7, 40)
    assert cut == 0 and w_ids.shape[1] == 41
    x, y = MaskedLoader(w_ids, w_mask, batch=2, shuffle=False).next()
    t, m = torch.from_numpy(w_ids[:2, 1:]), torch.from_numpy(w_mask[:2, 1:])
    assert x.shape == (2, 40) and m.any() and torch.equal(y[m], t[m]) and (y[~m] == -100).all()


def test_cold_start_partial_thoughts():
    from nanoseek.data.chat import cold_start_rows
    fams = ["chain_sum", "count_bits"]
    full = cold_start_rows(40, seed=3, families=fams)
    assert full == cold_start_rows(40, seed=3, families=fams, partial=0.0)  # the default rows are unchanged
    cut = cold_start_rows(40, seed=3, families=fams, partial=0.5)
    short = 0
    for a, b in zip(full, cut):
        (qa, ta), (qb, tb) = a["messages"], b["messages"]
        assert qa == qb and ta["content"] == tb["content"]  # same problem, the right answer all the same
        assert ta["reasoning_content"].startswith(tb["reasoning_content"])  # a cut thought is a prefix of the full
        short += tb["reasoning_content"] != ta["reasoning_content"]
    assert 10 <= short <= 30  # about half of them
    assert all(r["messages"][1]["reasoning_content"] != f["messages"][1]["reasoning_content"]
               for r, f in zip(cold_start_rows(40, seed=3, families=fams, partial=1.0), full))


def test_sft_bad_datasets(base, tmp_path):
    out = tmp_path / "run"
    for text, msg in (('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n'
                       '{"messages": [oops\n', "bad.jsonl:2: not valid JSON"),
                      ('{"prompt": "no messages"}\n', "non-empty 'messages'"),
                      ('{"messages": [{"role": "user", "content": "hi"}]}\n', "last message must be the assistant"),
                      ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
                       "needs a role"),
                      ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}\n',
                       "string content")):
        (tmp_path / "bad.jsonl").write_text(text)
        r = cli("sft", "--init", str(base), "--out", str(out), "--data", str(tmp_path / "bad.jsonl"))
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()  # nothing written
    r = cli("sft", "--init", str(base), "--out", str(out), "--partial-thoughts", "1.5")
    assert r.returncode == 1 and "--partial-thoughts must be in [0, 1]" in r.stderr and not out.exists(), r.stderr


def test_sft_model_writes_the_format(sft_model):
    cfg = json.loads((sft_model / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    run = sft_model.parent
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    assert (run / "ledger.json").is_file() and (run / "sft_data.jsonl").is_file()


def test_training_logprobs_are_the_sampling_policy(sft_model):
    """What GRPO differentiates is the distribution the rollouts were drawn from: softmax(logits / T), at T = 1 and
    below (the engine's sampling distribution, top-p off)."""
    from types import SimpleNamespace

    from nanoseek import from_pretrained
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.train.rl import token_logprobs
    model = from_pretrained(sft_model, dtype=torch.float32).eval()
    ids = torch.randint(0, model.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids[:, :-1])
        for T in (1.0, 0.6):
            lp, _ = token_logprobs(model, ids, temperature=T)
            r = SimpleNamespace(params=SamplingParams(temperature=T))
            want = torch.tensor([[Engine.probs(r, logits[b, t])[ids[b, t + 1]].log().item() for t in range(8)]
                                 for b in range(2)])
            assert torch.allclose(lp, want, atol=1e-5), T
        assert not torch.allclose(token_logprobs(model, ids, temperature=0.6)[0], token_logprobs(model, ids)[0])


def weights(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def strip(rows):
    timing = {"rollout_seconds", "reward_seconds", "train_seconds", "step_seconds", "rollout_share",
              "rollout_tokens_per_s"}
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_grpo_resume_is_bit_identical(sft_model, tmp_path, monkeypatch):
    """β > 0 (a reference), μ = 2 with 2 minibatches (π_old differs from π_θ): stopped after step 3 and resumed from
    the step-2 checkpoint, the run ends with the same weights and the same metrics as one that never stopped."""
    args = ["rl", "--init", str(sft_model), *RL, "--max-steps", "4", "--save-every", "2", "--eval-every", "2",
            "--beta", "0.01", "--mu", "2", "--minibatches", "2", "--temperature", "1.0"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--out", str(a)]) == 0
    optimizer_step = Run.optimizer_step

    def stop_after_3(self, *a, **k):  # an interruption right after step 3's update, injected from outside
        out = optimizer_step(self, *a, **k)
        if self.step == 3:
            raise SystemExit(3)
        return out
    with monkeypatch.context() as m:
        m.setattr(Run, "optimizer_step", stop_after_3)
        with pytest.raises(SystemExit):
            main([*args, "--out", str(b)])
    assert main([*args, "--out", str(b), "--resume", "auto"]) == 0
    wa, wb = weights(a / "model"), weights(b / "model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rb] == [1, 2, 3, 4] and strip(ra) == strip(rb)
    row = ra[-1]
    for key in ("reward", "reward/accuracy", "reward/format", "accuracy", "response_length", "kl", "clip_fraction",
                "entropy", "rollout_share"):
        assert row[key] is not None and row[key] == row[key], key  # present, not NaN
    assert not torch.equal(weights(sft_model)["model.norm.weight"], wa["model.norm.weight"])  # it trained
    assert (a / "reference" / "config.json").is_file() and (a / "samples" / "step_000004.md").is_file()
    evals = [json.loads(l) for l in (a / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(0 <= e["accuracy"] <= 1 for e in evals)
    ledger = json.loads((a / "ledger.json").read_text())
    assert ledger["rollout_tokens"] > 0 and ledger["flops"] > 0


@pytest.mark.parametrize("loss", ["dr_grpo", "dapo"])
def test_grpo_loss_variants_run(sft_model, tmp_path, loss):
    assert main(["rl", "--init", str(sft_model), "--out", str(tmp_path / loss), *RL, "--max-steps", "1",
                 "--loss", loss, "--beta", "0", "--clip-eps-high", "0.28", "--eval-every", "5"]) == 0
    assert not (tmp_path / loss / "reference").exists()  # β = 0 keeps no reference
    row = json.loads((tmp_path / loss / "metrics.jsonl").read_text().splitlines()[0])
    assert row["kl"] is None and row["loss"] == row["loss"]


def test_grpo_rewards_that_fail(sft_model, tmp_path):
    (tmp_path / "userrw.py").write_text(
        "def flaky(c, p):\n    if '</think>' not in c:\n        raise RuntimeError('no answer')\n    return 0.5\n"
        "def broken(c, p):\n    return None\n"
        "def zero(c, p):\n    return 0\n")
    env_path = f"{tmp_path}"
    import os
    env = {**os.environ, "PYTHONPATH": env_path + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base_args = ["-m", "nanoseek", "rl", "--init", str(sft_model), *RL, "--max-steps", "2", "--eval-every", "5",
                 "--beta", "0"]

    def run(out, *rewards):
        return subprocess.run([sys.executable, *base_args, "--out", str(out),
                               *[x for r in rewards for x in ("--reward", r)]],
                              capture_output=True, text=True, timeout=300, env=env)
    # missing module / function, wrong type at the probe: one line, exit 1, nothing written
    for spec, msg in (("nosuch_mod:f", "cannot import module"), ("userrw:nosuch", "has no attribute"),
                      ("userrw:broken", "returned NoneType")):
        r = run(tmp_path / "x", spec)
        assert r.returncode == 1 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "x").exists()
    # a reward that raises on some completions and one that is always zero: reported, the run goes on
    r = run(tmp_path / "y", "accuracy", "userrw:flaky=0.2", "userrw:zero")
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    assert "reward 'userrw:zero' has been 0 for every completion" in text
    rows = [json.loads(l) for l in (tmp_path / "y" / "metrics.jsonl").read_text().splitlines()]
    errors = sum(row["reward_errors"]["userrw:flaky"] for row in rows)
    if errors:
        assert "reward 'userrw:flaky' failed on" in text and "no answer" in text
    assert all("reward/userrw:zero" in row for row in rows)


def test_eval_and_report(sft_model, tmp_path):
    out = tmp_path / "eval" / "sft"
    assert main(["eval", "--checkpoint", str(sft_model), "--out", str(out), "--problems", "3", "-k", "3",
                 "--max-new-tokens", "10", "--budgets", "0,4,none", "--budget-samples", "1", "--threads", "1",
                 "--families", "chain_sum", "count_bits"]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert set(res["families"]) == {"chain_sum", "count_bits", "basic_arithmetic"} and res["heldout"] == \
        ["basic_arithmetic"]
    for s in res["families"].values():
        assert s["problems"] == 3 and 0 <= s["pass@1"] <= s["pass@3"] <= 1
    assert [e["budget"] for e in res["tts"]] == [0, 4, None]
    assert all(v["thinking_tokens"] == 0 for v in res["tts"][0]["families"].values())  # budget 0: no thinking
    assert all(v["thinking_tokens"] <= 4 for v in res["tts"][1]["families"].values())
    for f, v in res["tts"][2]["families"].items():  # unlimited: the k samples' own accuracy
        assert v["accuracy"] == pytest.approx(res["families"][f]["pass@1"])
    # the budget is the engine's: a thought still open at the budget is cut back to its last whole line, then closed
    from nanoseek import from_pretrained
    from nanoseek.data.tasks import problem_pool
    from nanoseek.evaluate import sample
    model = from_pretrained(sft_model, dtype=torch.float32).eval()
    tok = model.tokenizer
    got = sample(model, tok, problem_pool(["chain_sum"], 3, 0, 0), 2,
                 dict(max_tokens=16, temperature=1.0, top_p=1.0, thinking_budget=6), 0, 7, 8)
    assert len(got) == 6
    for r in got:
        thought = r.output[:r.output.index(tok.end_think_id)]
        assert r.thinking_tokens == len(thought) <= 6
        assert len(thought) < 6 or thought[-1] == tok.newline_id
    assert (out / "tts.png").stat().st_size > 1000 and "pass@1" in (out / "eval.md").read_text()
    # a run directory with the eval of two models (here the same one twice) and the SFT run -> report
    run = tmp_path
    (run / "eval" / "rl").mkdir()
    (run / "eval" / "rl" / "eval.json").write_text((out / "eval.json").read_text())
    (run / "sft").symlink_to(sft_model.parent)
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "GRPO − SFT, trained families: +0.000 ± 0.000" in text and "## Cost" in text
    assert "## Thoughts before and after RL" in text and "samples right*" in text
    # runs/distill_cpu.sh's three students (here the same eval thrice) -> the distillation table, paired
    for way in ("sft", "rl", "distilled"):
        (run / "distill" / "eval" / way).mkdir(parents=True)
        (run / "distill" / "eval" / way / "eval.json").write_text((out / "eval.json").read_text())
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "## Distillation" in text and "| student, distilled from the teacher | ? |" in text
    assert "student, distilled from the teacher − student, SFT + GRPO, trained families: +0.000 ± 0.000" in text
    assert (run / "plots" / "accuracy.png").is_file() and (run / "plots" / "tts.png").is_file()
    # a families.json: its trained and held-out families, with their configs, are what eval draws and scores
    from nanoseek.data.tasks import write_families
    spec = write_families(run / "families.json", ["chain_sum"], ["count_bits"])
    spec["trained"]["chain_sum"].update(min_terms=2, max_terms=2)
    (run / "families.json").write_text(json.dumps(spec))
    assert main(["eval", "--checkpoint", str(sft_model), "--out", str(tmp_path / "e3"), "--problems", "2", "-k", "1",
                 "--max-new-tokens", "4", "--budgets", "", "--threads", "1", "--families",
                 str(run / "families.json")]) == 0
    res = json.loads((tmp_path / "e3" / "eval.json").read_text())
    assert res["trained"] == ["chain_sum"] and res["heldout"] == ["count_bits"] and res["configs"] == \
        {**spec["trained"], **spec["heldout"]}
    assert all(r["question"].count(" + ") + r["question"].count(" - ") == 1
               for r in res["per_problem"] if r["family"] == "chain_sum")
    assert main(["report", str(run)]) == 0 and "Task families (`families.json`" in (run / "report.md").read_text()
    r = cli("eval", "--checkpoint", str(sft_model), "--out", str(tmp_path / "e2"), "--budgets", "4,many")
    assert r.returncode == 1 and "'many' is not a number" in r.stderr


def test_eval_killed_midway_then_rerun(sft_model, tmp_path):
    """SIGKILL in the middle of an eval leaves no eval.json (the speedrun's mark of a finished eval); the same
    command then writes the same results as an eval never interrupted."""
    args = ["eval", "--checkpoint", str(sft_model), "--problems", "2", "-k", "2", "--max-new-tokens", "10",
            "--budgets", "0,4,none", "--budget-samples", "1", "--threads", "1", "--families", "chain_sum"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    r = subprocess.run([sys.executable, FAULTS, "kill-engine:12", "--", *args, "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9 and not (out / "eval.json").exists(), r.stderr[-2000:]
    assert main([*args, "--out", str(out)]) == 0
    a, b = (json.loads((d / "eval.json").read_text()) for d in (tmp_path / "straight", out))
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_sft_killed_mid_training_then_rerun(base, tmp_path):
    args = ["sft", "--init", str(base), "--examples", "40", "--max-steps", "4", "--save-every", "2", "--seq-len",
            "128", "--batch-size", "2", "--threads", "1", "--families", "chain_sum", "--resume", "auto"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    r = subprocess.run([sys.executable, FAULTS, "kill-step:3", "--", *args, "--out", str(tmp_path / "k")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert main([*args, "--out", str(tmp_path / "k")]) == 0
    ra, rb = ([json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (tmp_path / "straight", tmp_path / "k"))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb] and len(rb) == 4
    wa, wb = weights(tmp_path / "straight" / "model"), weights(tmp_path / "k" / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_distill(sft_model, base, tmp_path, monkeypatch):
    # a student whose tokenizer differs from the teacher's: one line, nothing written
    other = tmp_path / "other"
    assert main(["tokenizer", "--out", str(tmp_path / "tok"), "--docs", "200", "--vocab-size", "300"]) == 0
    assert main(["init", "--preset", "tiny", "--out", str(other), "--tokenizer", str(tmp_path / "tok")]) == 0
    r = cli("distill", "--teacher", str(sft_model), "--student", str(other), "--out", str(tmp_path / "d0"))
    assert r.returncode == 1 and "different tokenizers" in r.stderr and not (tmp_path / "d0").exists(), r.stderr
    # with a verifier that accepts everything well formed, the kept samples become the student's SFT data
    import nanoseek.rl.rewards as R
    monkeypatch.setattr(R, "accuracy_reward", lambda c, p: 1.0)
    monkeypatch.setattr(R, "format_reward", lambda c, p: 1.0)
    out = tmp_path / "d1"
    assert main(["distill", "--teacher", str(sft_model), "--student", str(base), "--out", str(out),
                 "--families", "chain_sum", "--prompts-per-family", "6", "--samples", "2", "--keep-per-prompt", "1",
                 "--max-new-tokens", "8", "--max-steps", "2", "--seq-len", "64", "--batch-size", "1",
                 "--threads", "1"]) == 0
    rows = [json.loads(l) for l in (out / "distill_data.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert (out / "sft" / "model" / "config.json").is_file()


def test_grpo_two_ranks_equal_one_process(sft_model, tmp_path):
    """torchrun, 2 gloo ranks, each rolling out half of the step's problems: the same rollouts (seeds follow the
    sample's global index), rewards and, the per-sequence mean being averaged by DDP, the same update."""
    args = [*RL, "--max-steps", "2", "--eval-every", "5", "--beta", "0.01"]
    assert main(["rl", "--init", str(sft_model), "--out", str(tmp_path / "one"), *args]) == 0
    exe = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(exe), "--nproc_per_node", "2", "-m", "nanoseek", "rl", "--init", str(sft_model),
                        "--out", str(tmp_path / "two"), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(a, b):
        assert x["reward"] == y["reward"] and x["response_length"] == y["response_length"]
        assert abs(x["entropy"] - y["entropy"]) < 1e-4 * abs(x["entropy"])
    wa, wb = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_sft_under_ep_2_loads_each_ranks_part_and_equals_ddp(base, tmp_path):
    """sft builds the model on meta and each rank loads only its part of --init (its expert slots under --ep 2): the
    same run as plain DDP on the same ranks (not one process exactly: each rank averages over its own assistant
    tokens); and its final weights are --init's moved by 3 AdamW steps (a model not loaded from --init
    would be far from them)."""
    from tests.test_expert_parallel import torchrun
    common = ["sft", "--init", str(base), "--examples", "60", "--max-steps", "3", "--seq-len", "128", "--threads", "1",
              "--families", "chain_sum", "count_bits", "--batch-size", "2"]
    torchrun(*common, "--out", str(tmp_path / "ddp"))
    torchrun(*common, "--out", str(tmp_path / "ep"), "--ep", "2")
    a, b = ([json.loads(l) for l in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("ddp", "ep"))
    assert len(a) == len(b) == 3
    from nanoseek.checkpoint import read_published
    w0, w = read_published(base), read_published(tmp_path / "ep" / "model")
    # AdamW moves a weight by about lr at most per step: 3 steps, lr up to 1e-3 (measured 3.0e-3)
    assert w0.keys() == w.keys() and max((w0[k] - w[k]).abs().max().item() for k in w) < 3.5e-3
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * x["loss"], (x, y)
