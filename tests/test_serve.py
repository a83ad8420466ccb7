"""The OpenAI-compatible server, driven by the official `openai` client on loopback: chat (plain and streamed, which
agree), reasoning_content split from content, n > 1, stop sequences, the thinking budget, /v1/completions, errors
the client raises as errors (400, 401, 404, 429), metrics, and 32 concurrent streams with 8 cancelled midway: the
other 24 complete, nothing leaks, the server keeps serving."""

import asyncio
import json
import socket
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from nanoseek import ModelArgs, build_model  # noqa: E402
from nanoseek.engine import Engine  # noqa: E402
from nanoseek.serve.api import create_app  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

CFG = dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
           num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
           qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, max_position_embeddings=256,
           num_nextn_predict_layers=0, torch_dtype="float32")


def http(method, url, data=None, headers=None):
    """(status, body) of a raw request, for what the openai client cannot send."""
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, engine, **kw):
        self.app = create_app(engine, "tiny", **kw)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self):
        self.server.should_exit = True
        self.app.state.runner.stop()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def tok():
    from nanoseek.data.corpus import reasoning_texts
    return Tokenizer.train(reasoning_texts(200, seed=1), vocab_size=300)


@pytest.fixture(scope="module")
def engine(tok):
    torch.manual_seed(0)
    m = build_model(ModelArgs.from_dict(CFG).validate())
    return Engine(m, tokenizer=tok, max_batch=8)


@pytest.fixture(scope="module")
def server(engine):
    s = Server(engine)
    yield s
    s.stop()


def client(server, **kw):
    return openai.OpenAI(base_url=server.url, api_key=kw.pop("api_key", "none"), max_retries=0, timeout=60, **kw)


def test_chat_plain_and_stream_agree(server, tok):
    c = client(server)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=24, seed=5,
              temperature=0.9, extra_body={"thinking_budget": 6})
    r = c.chat.completions.create(**kw)
    msg = r.choices[0].message
    reasoning = msg.model_extra.get("reasoning_content")
    assert reasoning is not None and r.usage.completion_tokens == 24
    assert 1 <= r.usage.completion_tokens_details.reasoning_tokens <= 7  # ≤ budget + the </think> token
    parts = {"reasoning_content": "", "content": ""}
    finish = None
    for chunk in c.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            d = ch.delta
            parts["content"] += d.content or ""
            parts["reasoning_content"] += (d.model_extra or {}).get("reasoning_content") or ""
            finish = ch.finish_reason or finish
    assert parts["content"] == msg.content and parts["reasoning_content"].strip() == reasoning
    assert finish == "length"


def test_reasoning_split_matches_tokens(server, engine, tok):
    """The split follows </think>: reasoning = the tokens before it, content = those after."""
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=20,
                                  temperature=0, extra_body={"thinking_budget": 4})
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    from nanoseek.engine import SamplingParams
    ref = Engine(engine.model, tokenizer=tok, max_batch=1).generate(
        [prompt], SamplingParams(max_tokens=20, temperature=0, thinking_budget=4))[0].output
    cut = ref.index(tok.end_think_id)
    assert r.choices[0].message.model_extra["reasoning_content"] == tok.decode(ref[:cut],
                                                                               skip_special_tokens=True).strip()
    answer = [t for t in ref[cut + 1:] if t != tok.eos_id]
    assert r.choices[0].message.content == tok.decode(answer, skip_special_tokens=True).lstrip("\n")


def test_thought_cut_to_nothing_is_still_announced(server):
    """A budget that ends before the thought's first whole line leaves it empty; the client still learns a thought was
    opened: reasoning_content is "" in the message, and the stream's first reasoning delta is an empty string."""
    c = client(server)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0,
              extra_body={"thinking_budget": 0})
    assert c.chat.completions.create(**kw).choices[0].message.model_extra["reasoning_content"] == ""
    deltas = [(d.model_extra or {}).get("reasoning_content") for chunk in c.chat.completions.create(**kw, stream=True)
              for d in (ch.delta for ch in chunk.choices)]
    assert [x for x in deltas if x is not None] == [""]


def test_n_stop_and_completions(server):
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "count"}], n=3, max_tokens=8,
                                  seed=1, temperature=1.0)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    free = c.completions.create(model="tiny", prompt="Problem: 1 + 1", max_tokens=12, temperature=0)
    text = free.choices[0].text
    if len(text.strip()) > 4:
        stop = text.strip()[2:4]
        cut = c.completions.create(model="tiny", prompt="Problem: 1 + 1", max_tokens=12, temperature=0, stop=[stop])
        assert stop not in cut.choices[0].text and text.startswith(cut.choices[0].text)
        assert cut.choices[0].finish_reason == "stop"
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_errors_are_errors(server):
    c = client(server)
    ok = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=ok, temperature=5)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=ok, max_tokens=10_000)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=ok, n=50)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=ok, stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "x",
                                                           "reasoning_content": "y"}])
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-9", messages=ok)
    status, body = http("POST", server.url + "/chat/completions", b"{not json")
    assert status == 400 and "error" in json.loads(body)


def own(engine):
    """An engine of its own over the same model: each server's loop steps its engine alone."""
    return Engine(engine.model, tokenizer=engine.tok, max_batch=8)


def test_api_key_and_queue_limit(engine):
    s = Server(own(engine), api_key="sekret", max_queue=1)
    try:
        assert http("GET", f"http://127.0.0.1:{s.port}/health")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="wrong").models.list()
        good = client(s, api_key="sekret")
        assert good.models.list().data[0].id == "tiny"
        assert http("GET", f"http://127.0.0.1:{s.port}/metrics")[0] == 401

        async def flood():
            ac = openai.AsyncOpenAI(base_url=s.url, api_key="sekret", max_retries=0, timeout=60)
            calls = [ac.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=40, temperature=0) for _ in range(24)]
            return await asyncio.gather(*calls, return_exceptions=True)
        results = asyncio.run(flood())
        assert any(isinstance(r, openai.RateLimitError) for r in results)
        assert any(not isinstance(r, Exception) for r in results)
    finally:
        s.stop()


def test_32_streams_8_cancelled(server, engine):
    def ask(i):
        return dict(model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=30,
                    temperature=0)

    async def one(ac, i):
        stream = await ac.chat.completions.create(**ask(i), stream=True)
        text, chunks, finish = "", 0, None
        async for chunk in stream:
            for ch in chunk.choices:
                chunks += 1
                text += (ch.delta.content or "") + ((ch.delta.model_extra or {}).get("reasoning_content") or "")
                finish = ch.finish_reason or finish
            if i < 8 and chunks >= 3:  # the client goes away midway
                break
        await stream.close()
        return ("cancelled" if i < 8 else finish), text

    async def run():
        ac = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
        return await asyncio.wait_for(asyncio.gather(*(one(ac, i) for i in range(32))), timeout=240)

    results = asyncio.run(run())
    assert [r[0] for r in results[:8]] == ["cancelled"] * 8
    c = client(server)
    for i, (finish, text) in enumerate(results[8:], start=8):
        assert finish in ("length", "stop")
        ref = c.chat.completions.create(**ask(i)).choices[0].message  # greedy: the same text, alone
        assert text.replace("\n", "") == (ref.model_extra.get("reasoning_content", "") + ref.content).replace("\n", "")
    deadline = time.time() + 20
    runner = server.app.state.runner
    while time.time() < deadline and (engine.running or engine.waiting or runner.owner):
        time.sleep(0.1)
    assert not engine.running and not engine.waiting and not runner.owner  # nothing leaked
    assert sorted(engine.free) == list(range(8))
    assert c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "again"}],
                                     max_tokens=3).choices[0].finish_reason in ("length", "stop")


def test_splitter_tag_cut_across_chunks(tok):
    """</think> as its own token, or as text pieces arriving in different chunks: the same split."""
    from nanoseek.chat import Splitter
    pieces = ["Let me", " add: 2+2", " is 4.", "</", "thi", "nk>", "\n\nThe answer", " is 4."]
    for as_token in (True, False):
        s = Splitter(tok, thinking=True)
        got = {"reasoning": "", "content": ""}
        for i, p in enumerate(pieces):
            ids = [tok.end_think_id] if as_token and p == "</" else ([] if as_token and p in ("thi", "nk>")
                                                                       else tok.encode(p))
            for kind, delta in s.feed(ids, final=i == len(pieces) - 1):
                got[kind] += delta
                assert "<" not in got["reasoning"] and "think>" not in got["content"]
        assert got == {"reasoning": "Let me add: 2+2 is 4.", "content": "The answer is 4."}
        assert s.texts() == ("Let me add: 2+2 is 4.", "The answer is 4.")


def test_engine_failure_ends_requests_and_keeps_serving(engine):
    engine = own(engine)
    s = Server(engine)
    real = engine.forward
    try:
        def broken(*a, **k):
            raise RuntimeError("injected engine failure")
        engine.forward = broken
        with pytest.raises(openai.InternalServerError):
            client(s).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4)
        engine.forward = real
        r = client(s).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=3)
        assert r.choices[0].finish_reason in ("length", "stop")
        assert sorted(engine.free) == list(range(8))
    finally:
        engine.forward = real
        s.stop()
