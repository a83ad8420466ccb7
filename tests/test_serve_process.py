"""`nanoseek serve` as users run it: a real process with its engine in a process of its own, default flags (the
compiled decode step, warmed up before it listens). Greedy tokens equal the eager engine's; vLLM's `min_tokens` /
`ignore_eos` give fixed-length runs; /metrics parses with prometheus_client's own parser and its histograms count the
requests; clients that vanish under load leave no slot held; Ctrl-C stops it cleanly; mistakes are one line."""

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")
prometheus = pytest.importorskip("prometheus_client.parser")

from nanoseek import ModelArgs, build_model  # noqa: E402
from nanoseek.engine import Engine, SamplingParams  # noqa: E402
from tests.test_serve import CFG, free_port  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from nanoseek.data.corpus import reasoning_texts
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.train(reasoning_texts(200, seed=1), vocab_size=300)
    torch.manual_seed(0)
    model = build_model(ModelArgs.from_dict(CFG).validate())
    with torch.no_grad():  # sharper logits than the init's: greedy paths without near-ties
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3)
    path = tmp_path_factory.mktemp("serve") / "model"
    model.save_pretrained(path, tokenizer=tok)
    return path


def start(ckpt, *flags):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", str(ckpt), "--port", str(port),
                             "--max-batch", "8", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240  # a cold compile takes ~15-30 s on 2 cores
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, port
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("the server did not come up")


@pytest.fixture(scope="module")
def server(ckpt):
    proc, port = start(ckpt)  # default flags: compiled, warmed up
    yield port
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)


def metrics(port) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, s.labels.get("le"), s.labels.get("finished_reason")): s.value
            for f in prometheus.text_string_to_metric_families(text) for s in f.samples}


def test_compiled_default_equals_eager(server, ckpt):
    from nanoseek.model import from_pretrained
    model = from_pretrained(ckpt)
    eager = Engine(model, max_batch=1)
    for prompt in ("Problem: 12 + 30", "Spell 'cat' backwards."):
        ids = model.tokenizer.encode(prompt, bos=True)
        ref = eager.generate([ids], SamplingParams(max_tokens=40, temperature=0))[0]
        got = client(server).completions.create(model="nanoseek", prompt=prompt, max_tokens=40, temperature=0)
        assert got.choices[0].text == eager.text(ref)
        assert got.usage.completion_tokens == len(ref.output)


def test_min_tokens_and_ignore_eos(server):
    c = client(server)
    kw = dict(model="nanoseek", messages=[{"role": "user", "content": "hi"}], temperature=0.8, seed=3)
    r = c.chat.completions.create(**kw, max_tokens=30, extra_body={"min_tokens": 30, "ignore_eos": True})
    assert r.usage.completion_tokens == 30 and r.choices[0].finish_reason == "length"
    streamed = 0
    for chunk in c.chat.completions.create(**kw, max_tokens=25, stream=True, stream_options={"include_usage": True},
                                           extra_body={"min_tokens": 25, "ignore_eos": True}):
        if chunk.usage:
            streamed = chunk.usage.completion_tokens
    assert streamed == 25
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(**kw, max_tokens=5, extra_body={"min_tokens": -1})


def test_metrics_parse_and_count_requests(server):
    before = metrics(server)
    c = client(server)
    n, tokens = 3, 0
    for i in range(n):
        r = c.chat.completions.create(model="nanoseek", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=12,
                                      temperature=0, extra_body={"min_tokens": 12})
        tokens += r.usage.completion_tokens
    after = metrics(server)

    def delta(name, reason=None):
        return after.get((name, None, reason), 0) - before.get((name, None, reason), 0)
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens",
              "request_generation_tokens"):
        assert delta(f"nanoseek:{h}_count") == n, h
    assert delta("nanoseek:request_generation_tokens_sum") == tokens
    assert delta("nanoseek:generation_tokens_total") == tokens
    assert delta("nanoseek:inter_token_latency_seconds_count") == tokens - n  # one per step after the first
    assert delta("nanoseek:request_success_total", "length") == n
    assert after[("nanoseek:time_to_first_token_seconds_bucket", "+Inf", None)] >= n
    for g in ("num_requests_running", "num_requests_waiting", "kv_cache_slots_used", "kv_cache_usage_perc"):
        assert after[(f"nanoseek:{g}", None, None)] == 0


def test_cancellation_under_load_frees_every_slot(server):
    """16 streams on 8 slots (8 wait), 6 clients vanish midway: every other stream ends, no slot stays held."""
    async def one(ac, i):
        stream = await ac.chat.completions.create(model="nanoseek", messages=[{"role": "user", "content": f"q {i}"}],
                                                  max_tokens=200, temperature=0,
                                                  extra_body={"min_tokens": 200, "ignore_eos": True}, stream=True)
        chunks, finish = 0, None
        async for chunk in stream:
            chunks += 1
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
            if i < 6 and chunks >= 2:
                break
        await stream.close()
        return "cancelled" if i < 6 else finish

    async def run():
        ac = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="none", max_retries=0, timeout=120)
        return await asyncio.wait_for(asyncio.gather(*(one(ac, i) for i in range(16))), timeout=200)

    before = metrics(server)
    results = asyncio.run(run())
    assert results[:6] == ["cancelled"] * 6 and results[6:] == ["length"] * 10
    deadline = time.time() + 20
    while time.time() < deadline and metrics(server)[("nanoseek:kv_cache_slots_used", None, None)]:
        time.sleep(0.2)
    m = metrics(server)
    assert m[("nanoseek:kv_cache_slots_used", None, None)] == 0
    assert m[("nanoseek:num_requests_running", None, None)] == 0
    assert m[("nanoseek:num_requests_waiting", None, None)] == 0
    ended = {k[2]: v - before.get(k, 0) for k, v in m.items() if k[0] == "nanoseek:request_success_total"}
    assert sum(ended.values()) == 16 and ended.get("abort", 0) >= 1, ended  # (a vanished client is noticed when
    # the server next writes to it, so a short request may end before that)
    r = client(server).chat.completions.create(model="nanoseek", messages=[{"role": "user", "content": "again"}],
                                               max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_eager_server_stops_on_ctrl_c_and_mistakes_are_one_line(ckpt, tmp_path):
    proc, port = start(ckpt, "--no-compile", "--stream-interval", "0")
    r = client(port).chat.completions.create(model="nanoseek", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4)
    assert r.usage.completion_tokens <= 4
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130) and "Traceback" not in out, out  # 130: the CLI's code for Ctrl-C
    (tmp_path / "empty").mkdir()
    cases = [(["serve", str(tmp_path / "empty")], "no config.json"),
             (["serve", str(ckpt), "--speculative"], "MTP"),
             (["serve", str(ckpt), "--stream-interval", "-1"], "--stream-interval"),
             (["serve", str(ckpt), "--threads", "0"], "--threads"),
             (["chat", "--checkpoint", str(ckpt), "--speculative", "--prompt", "x"], "MTP")]
    for args, needle in cases:
        r = subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, timeout=120)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 1 and len(lines) == 1 and needle in lines[0], (args, r.stderr)


def test_chat_command_compiled_by_default(ckpt):
    """`nanoseek chat` one-shot: compiled and warmed up by default (the note goes to stderr), the answer on stdout;
    --no-compile gives the same greedy text."""
    outs = []
    for flags in ([], ["--no-compile"]):
        r = subprocess.run([sys.executable, "-m", "nanoseek", "chat", "--checkpoint", str(ckpt), "--prompt", "2+2?",
                            "--temperature", "0", "--max-tokens", "16", "--no-color", *flags],
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
        assert ("compiled in" in r.stderr) == (not flags), r.stderr
    assert outs[0] == outs[1] and "[thinking]" in outs[0]
    assert json.dumps(outs[0])  # plain text


def test_chat_of_an_fp8_checkpoint_keeps_its_weights_in_fp8(ckpt, tmp_path):
    """`nanoseek convert --fp8` then `chat`: the weights stay FP8 in memory (said on stderr) and answer as the same
    checkpoint dequantised at load (--dequantize)."""
    r = subprocess.run([sys.executable, "-m", "nanoseek", "convert", str(ckpt), str(tmp_path / "fp8"), "--fp8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    outs = []
    for flags in ([], ["--dequantize"]):
        r = subprocess.run([sys.executable, "-m", "nanoseek", "chat", "--checkpoint", str(tmp_path / "fp8"),
                            "--prompt", "2+2?", "--temperature", "0", "--max-tokens", "12", "--no-color",
                            "--no-compile", *flags], capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr
        assert ("FP8 weights kept in FP8" in r.stderr) == (not flags), r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1]
