"""A fuzz run over the API schema (hypothesis): bodies built from the request fields with valid, boundary and wrong
values and types, plus raw junk, are POSTed to the running server. No answer is a 5xx, every error is an OpenAI
error object, and the server is alive at the end. Bounded: a fixed number of examples, loopback only."""

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_serve import Server, engine, http, tok  # noqa: E402,F401  (fixtures)

junk = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                 st.text(max_size=40), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                            st.integers(), max_size=2))
message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), junk),
                                 "content": st.one_of(st.text(max_size=60), junk,
                                                      st.lists(st.fixed_dictionaries(
                                                          {"type": st.sampled_from(["text", "image_url"]),
                                                           "text": st.text(max_size=20)}), max_size=2))})
fields = {
    "model": st.one_of(st.just("tiny"), junk),
    "messages": st.one_of(st.lists(message, min_size=0, max_size=3), junk),
    "prompt": st.one_of(st.text(max_size=60), junk),
    "n": st.one_of(st.integers(-2, 10), junk),
    "max_tokens": st.one_of(st.integers(-5, 400), junk),
    "temperature": st.one_of(st.floats(-1, 3), junk),
    "top_p": st.one_of(st.floats(-0.5, 1.5), junk),
    "top_k": st.one_of(st.integers(-3, 500), junk),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6), junk),
    "seed": st.one_of(st.integers(-5, 2**64), junk),
    "stream": st.one_of(st.booleans(), junk),
    "thinking_budget": st.one_of(st.integers(-3, 50), junk),
    "reasoning_effort": st.one_of(st.sampled_from(["low", "medium", "high", "max"]), junk),
    "logprobs": st.one_of(st.booleans(), junk),
    "top_logprobs": st.one_of(st.integers(-2, 30), junk),
}
body = st.fixed_dictionaries({}, optional=fields)


@pytest.fixture(scope="module")
def server(engine):  # noqa: F811
    s = Server(engine)
    yield s
    s.stop()


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(route=st.sampled_from(["/chat/completions", "/completions"]), b=body)
def test_no_5xx(server, route, b):
    if isinstance(b.get("max_tokens"), int) and not isinstance(b.get("max_tokens"), bool):
        b["max_tokens"] = min(b["max_tokens"], 8)  # keep generation short: the fuzz is about the schema
    else:
        b["max_tokens"] = 4
    status, text = http("POST", server.url + route, json.dumps(b).encode())
    assert status < 500, (status, text)
    if status >= 400:
        err = json.loads(text)["error"]
        assert isinstance(err["message"], str) and err["message"]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.binary(max_size=200))
def test_raw_bytes(server, raw):
    status, _ = http("POST", server.url + "/chat/completions", raw)
    assert status < 500


def test_alive_after(server):
    status, text = http("GET", f"http://127.0.0.1:{server.port}/health")
    assert status == 200 and json.loads(text)["status"] == "ok"
