"""`nanoseek serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

Routes: POST /v1/chat/completions (SSE streaming or not), POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text). DeepSeek-reasoner convention: the text between `<think>` and `</think>` is
`message.reasoning_content` (`delta.reasoning_content` when streaming), the rest `content`; `usage` counts the
reasoning tokens. `thinking_budget` (tokens) caps the thought; OpenAI's `reasoning_effort` maps onto budgets.

The engine runs in a process of its own (serve/core.py, as vLLM's EngineCore); request handlers hand it prompts and
await their requests' tokens (serve/runner.py: Group), which reach them at most every --stream-interval after the
first. A client that disconnects has its request aborted and its cache slot freed.
With --api-key every route but /health needs `Authorization: Bearer <key>` (compared in constant time, never
logged). Every field is validated with bounds -> 400 with an OpenAI-style error object; a full queue -> 429.
"""

import asyncio
import contextlib
import hmac
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
import torch
import uvicorn

from nanoseek.chat import Splitter, add_decode_args
from nanoseek.checkpoint import checkpoint_has_mtp
from nanoseek.config import ModelArgs
from nanoseek.engine import Engine, SamplingParams
from nanoseek.errors import NanoseekError
from nanoseek.serve.metrics import Metrics
from nanoseek.serve.core import CoreClient, CoreSpec
from nanoseek.serve.runner import EngineLoop, Group, QueueFull
from nanoseek.tokenizer import Tokenizer
from nanoseek.serve.web import PAGE

EFFORT_BUDGETS = {"low": 256, "medium": 1024, "high": 4096}  # reasoning_effort -> thinking tokens


# ---- request schemas -----------------------------------------------------------------------------------------------

class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str = Field(max_length=200_000)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] = Field(default="")

    @field_validator("content")
    @classmethod
    def short_enough(cls, v):
        if isinstance(v, str) and len(v) > 200_000:
            raise ValueError("content is longer than 200000 characters")
        if isinstance(v, list) and len(v) > 64:
            raise ValueError("at most 64 content parts")
        return v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(default=None, max_length=256)
    n: int = Field(default=1, ge=1, le=8)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float = Field(default=0.6, ge=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, le=100_000)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    thinking_budget: int | None = Field(default=None, ge=0, le=1_000_000)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    logprobs: bool = False
    min_tokens: int = Field(default=0, ge=0, le=1_000_000)  # vLLM's extensions, for fixed-length benchmark runs
    ignore_eos: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = Field(default=None, max_length=256)

    @field_validator("stop")
    @classmethod
    def stops(cls, v):
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences")
            if any(not s or len(s) > 256 for s in v):
                raise ValueError("stop sequences must be 1 to 256 characters")
        elif isinstance(v, str) and not 1 <= len(v) <= 256:
            raise ValueError("a stop sequence must be 1 to 256 characters")
        return v


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=256)


class CompletionRequest(Sampling):
    prompt: str = Field(max_length=200_000)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class BearerAuth:
    """With --api-key every route but /health needs `Authorization: Bearer <key>` (compared in constant time, never
    logged). Plain ASGI, not starlette's BaseHTTPMiddleware, which relays every streamed chunk through a task and a
    memory stream (a third of the HTTP thread's time per token, measured)."""

    def __init__(self, app, key: str):
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.want):
                response = JSONResponse(error_body("invalid or missing API key (Authorization: Bearer ...)",
                                                   "authentication_error", code="invalid_api_key"), status_code=401)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# ---- the app -------------------------------------------------------------------------------------------------------

def create_app(engine: "Engine | CoreClient", model_name: str = "nanoseek", api_key: str | None = None,
               max_queue: int = 64, stream_interval: float = 0.0):
    """The FastAPI app. Over an Engine object (embedding, the tests) the engine is stepped in a thread of this
    process (runner.EngineLoop; stream_interval: seconds between a stream's hand-overs after its first, 0: every
    token); `nanoseek serve` passes a CoreClient, the engine in a process of its own (serve/core.py)."""
    runner = EngineLoop(engine, max_queue, stream_interval).start() if isinstance(engine, Engine) else engine

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if hasattr(runner, "attach"):
            runner.attach(asyncio.get_running_loop())
        yield

    app = FastAPI(title="nanoseek", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = Metrics(model_name, runner.max_len, runner.state)
    runner.set_metrics(metrics)
    app.state.runner = runner
    tok = runner.tok

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        metrics.inc("errors")
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        metrics.inc("errors")
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse(error_body(f"{loc or 'body'}: {first.get('msg', 'invalid request')}",
                                       "invalid_request_error", loc or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(_, e: Exception):  # never a traceback to the client
        metrics.inc("errors")
        return JSONResponse(error_body("internal error", "server_error"), status_code=500)

    if api_key:
        app.add_middleware(BearerAuth, key=api_key)

    def sampling(req: Sampling, prompt_len: int, chat: bool) -> list[SamplingParams]:
        limit = runner.max_len - prompt_len
        if limit < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context holds {runner.max_len}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = req.max_completion_tokens or req.max_tokens or limit
        if max_tokens > limit:
            raise APIError(400, f"max_tokens {max_tokens} + the prompt's {prompt_len} tokens exceed the context of "
                                f"{runner.max_len}", param="max_tokens", code="context_length_exceeded")
        budget = req.thinking_budget
        if budget is None and req.reasoning_effort:
            budget = EFFORT_BUDGETS[req.reasoning_effort]
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        top = (req.top_logprobs or 0) if req.logprobs else None
        return [SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                               seed=None if req.seed is None else req.seed + i, stop=stop, logprobs=top,
                               thinking_budget=budget, min_tokens=min(req.min_tokens, max_tokens),
                               ignore_eos=req.ignore_eos).validate() for i in range(req.n)]

    async def collect(g: Group, request: Request):
        while not g.all_done:
            if await g.next(timeout=1.0) is None and await request.is_disconnected():
                runner.cancel(g)
                return

    def usage(reqs, splits) -> dict:
        completion = sum(len(r.output) for r in reqs)
        # the thought's tokens and its closing </think>
        reasoning = sum(r.thinking_tokens + (tok.end_think_id in r.output) for r in reqs) if splits else 0
        prompt = len(reqs[0].prompt)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "completion_tokens_details": {"reasoning_tokens": reasoning}}

    def finish(r) -> str:
        return {"abort": "stop", "error": "error"}.get(r.finish_reason, r.finish_reason or "stop")

    def logprobs_of(r):
        if r.params.logprobs is None:
            return None
        return {"content": [{"token": tok.decode([e["token"]]), "logprob": e["logprob"],
                             "top_logprobs": [{"token": tok.decode([t]), "logprob": lp} for t, lp in e["top"]]}
                            for e in r.logprobs]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "nanoseek", "max_model_len": runner.max_len}]}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/")
    async def page():
        return HTMLResponse(PAGE.replace("__MODEL__", model_name))

    def check_model(name):
        if name and name != model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{model_name}'", param="model",
                           code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        msgs = []
        for i, m in enumerate(req.messages):
            if m.model_extra and "reasoning_content" in m.model_extra:
                raise APIError(400, "messages must not carry reasoning_content; send only content back",
                               param=f"messages.{i}.reasoning_content")
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": m.text()})
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
        params = sampling(req, len(prompt), True)
        return await respond(prompt, params, req.stream, request, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompt = tok.encode(req.prompt, bos=True)
        params = sampling(req, len(prompt), False)
        return await respond(prompt, params, req.stream, request, chat=False)

    async def respond(prompt, params, stream: bool, request: Request, chat: bool):
        try:
            g = runner.submit(prompt, params)
        except QueueFull:
            raise APIError(429, "the server is busy: the request queue is full; retry later", "rate_limit_error",
                           code="queue_full") from None
        except NanoseekError as e:
            raise APIError(400, str(e)) from None
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        splits = [Splitter(tok, r.starts_thinking) for r in g.requests] if chat else None

        if not stream:
            try:
                await collect(g, request)
            finally:
                runner.cancel(g)
            reqs = g.requests
            if any(r.finish_reason == "error" for r in reqs):
                raise APIError(500, "the engine failed while generating; the request was ended", "server_error")
            choices = []
            for i, r in enumerate(reqs):
                if chat:
                    splits[i].feed(r.output, final=True)
                    reasoning, content = splits[i].texts()
                    if r.params.stop:
                        content = _cut(content, r.params.stop)
                    msg = {"role": "assistant", "content": content}
                    if splits[i].opened:  # a thought was opened (one a budget cut may leave empty)
                        msg["reasoning_content"] = reasoning
                    choices.append({"index": i, "message": msg, "finish_reason": finish(r),
                                    "logprobs": logprobs_of(r)})
                else:
                    text = r.text if r.params.stop else runner.text(r)
                    choices.append({"index": i, "text": text, "finish_reason": finish(r), "logprobs": logprobs_of(r)})
            return {"id": cid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": model_name, "choices": choices, "usage": usage(reqs, splits)}

        async def events():
            obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(i, finish_reason=None, **part):
                return _sse({"id": cid, "object": obj, "created": created, "model": model_name,
                             "choices": [{"index": i, **part, "finish_reason": finish_reason}]})

            try:
                if chat:
                    for i in range(len(g.requests)):
                        yield chunk(i, delta={"role": "assistant", "content": ""})
                texts = [tok.decoder(skip_special_tokens=False) for _ in g.requests] if not chat else None
                while not g.all_done:
                    news = await g.next(timeout=1.0)
                    if news is None:
                        if await request.is_disconnected():
                            return
                        continue
                    for i, new, fin in news:
                        r = g.requests[i]
                        if chat:
                            for kind, delta in splits[i].feed(new, final=fin):
                                yield chunk(i, delta={"reasoning_content" if kind == "reasoning" else "content": delta})
                        else:  # the ids handed out so far (a budgeted thought's line may still be cut back)
                            sent = texts[i].text
                            texts[i].feed(new[:-1] if fin and new and new[-1] == runner.eos else new, final=fin)
                            text = r.text if fin and r.params.stop else texts[i].text  # r.text: cut at the stop
                            if len(text) > len(sent):
                                yield chunk(i, text=text[len(sent):])
                        if fin:
                            yield chunk(i, finish_reason=finish(r), **({"delta": {}} if chat else {"text": ""}))
                yield _sse({"id": cid, "object": obj, "created": created, "model": model_name, "choices": [],
                            "usage": usage(g.requests, splits)})
                yield "data: [DONE]\n\n"
            finally:  # also on client disconnect: abort and free the cache
                runner.cancel(g)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _cut(text: str, stops) -> str:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(hits)] if hits else text


def main(args) -> None:
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:  # fail before loading
        try:
            probe.bind((args.host, args.port))
        except OSError as e:
            raise NanoseekError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); choose another --port") \
                from None
    tok, margs = load_front(args.checkpoint)
    spec = CoreSpec(str(args.checkpoint), args.max_batch, args.max_len, args.compile, args.speculative, args.threads,
                    args.stream_interval / 1000, args.dequantize)
    if args.speculative and not margs.num_nextn_predict_layers:
        raise NanoseekError("--speculative needs the MTP module, and this checkpoint has none")
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    print(f"starting the engine process ({threads}): loading {args.checkpoint}"
          + (", compiling the decode step (seconds once cached; --no-compile skips it)" if args.compile else "")
          + "...", flush=True)
    core = CoreClient(spec, tok, margs.vocab_size, args.max_queue)
    info = core.start()
    if info.get("weights"):
        print("  " + info["weights"], flush=True)
    if args.compile:
        print(f"  compiled in {info['warm_up_s']:.1f} s" if info["compiled"] else
              f"  torch.compile is unavailable here ({info['compile_error']}); decoding eagerly", flush=True)
    name = args.model_name or margs.extra.get("_name_or_path") or "nanoseek"
    app = create_app(core, name, args.api_key, args.max_queue)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           access_log=False))
    core.on_death = lambda why: setattr(server, "should_exit", True)
    print(f"serving {args.checkpoint} as '{name}' on http://{args.host}:{args.port} "
          f"(OpenAI API at /v1, chat page at /, metrics at /metrics)", flush=True)
    try:
        server.run()
    finally:
        core.stop()
    if core.dead:
        raise NanoseekError(f"{core.dead}; the server stopped")


def load_front(checkpoint) -> tuple:
    """What the HTTP side needs of a checkpoint: its tokenizer and config, read as from_pretrained reads them (the
    weights load in the engine process)."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise NanoseekError(f"checkpoint directory {path} does not exist")
    margs = ModelArgs.from_json(path / "config.json")
    if margs.num_nextn_predict_layers and not checkpoint_has_mtp(path, margs):
        margs.num_nextn_predict_layers = 0  # as from_pretrained: e.g. written by transformers, without the MTP layer
    if not (path / "tokenizer.json").is_file():
        raise NanoseekError(f"{checkpoint} has no tokenizer.json; serving needs one")
    return Tokenizer.from_dir(path), margs


def default_threads() -> int:
    """torch's default intra-op threads (the cores) less one, kept for the HTTP side: on a 2-core machine a second
    intra-op thread made `nanoseek serve` 2x slower at bs=1 (it fought the HTTP thread and the clients for a core;
    bench/RESULTS.md, "Serving")."""
    return max(1, torch.get_num_threads() - 1)


def add_args(sp) -> None:
    sp.add_argument("checkpoint", help="checkpoint directory (with tokenizer files)")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sp.add_argument("--port", type=int, default=8000, help="port")
    sp.add_argument("--api-key", default=None, help="require Authorization: Bearer <key> on every route but /health")
    sp.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    sp.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    add_decode_args(sp)
    sp.add_argument("--threads", type=int, default=default_threads(),
                    help="the engine process's intra-op CPU threads (default: all cores but one, which the HTTP "
                         f"process and its clients get, as vLLM's CPU backend reserves one; here {default_threads()})")
    sp.add_argument("--stream-interval", type=float, default=20.0, metavar="MS",
                    help="a stream's tokens go out at most every MS milliseconds after its first (default 20: 50 "
                         "updates a second; 0: every token, which costs a fast CPU model a third of its speed)")
    sp.add_argument("--max-len", type=int, default=None, help="context length (default: the model's)")
    sp.add_argument("--model-name", default=None, help="the model id clients use (default: nanoseek)")
