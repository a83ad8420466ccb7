"""`nanoseek serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

Routes: POST /v1/chat/completions (SSE streaming or not), POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text). DeepSeek-reasoner convention: the text between `<think>` and `</think>` is
`message.reasoning_content` (`delta.reasoning_content` when streaming), the rest `content`; `usage` counts the
reasoning tokens. `thinking_budget` (tokens) caps the thought; OpenAI's `reasoning_effort` maps onto budgets.

One engine thread runs `Engine.step()` while there is work; request handlers hand it prompts and read the new tokens
of their request from an asyncio queue. A client that disconnects has its request aborted and its cache slot freed.
With --api-key every route but /health needs `Authorization: Bearer <key>` (compared in constant time, never
logged). Every field is validated with bounds -> 400 with an OpenAI-style error object; a full queue -> 429.
"""

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
import uvicorn

from nanoseek.chat import Splitter
from nanoseek.engine import Engine, SamplingParams
from nanoseek.errors import NanoseekError
from nanoseek.model import from_pretrained
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


# ---- the engine thread ---------------------------------------------------------------------------------------------

class Handle:
    def __init__(self, loop):
        self.loop, self.queue, self.request = loop, asyncio.Queue(), None


class Runner:
    """Owns the engine; one thread steps it; handlers submit and cancel under a lock."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.lock = threading.Condition()
        self.handles: dict[int, Handle] = {}
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0, "aborted": 0,
                      "latency_sum": 0.0, "latency_count": 0}
        self.stopped = False
        self.thread = threading.Thread(target=self.loop, daemon=True, name="nanoseek-engine")
        self.thread.start()

    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        h = Handle(asyncio.get_running_loop())
        with self.lock:
            if len(self.engine.waiting) >= self.max_queue:
                raise APIError(429, "the server is busy: the request queue is full; retry later", "rate_limit_error",
                               code="queue_full")
            try:
                h.request = self.engine.add(prompt, params)
            except NanoseekError as e:
                raise APIError(400, str(e)) from None
            self.handles[h.request.id] = h
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += len(prompt)
            self.lock.notify()
        return h

    def cancel(self, h: Handle) -> None:
        with self.lock:
            if h.request is not None and not h.request.done:
                self.engine.abort(h.request)
                self.stats["aborted"] += 1
            self.handles.pop(h.request.id if h.request else -1, None)

    def loop(self) -> None:
        while not self.stopped:
            with self.lock:
                while not self.engine.has_work and not self.stopped:
                    self.lock.wait(timeout=0.5)
                if self.stopped:
                    return
                try:
                    touched = self.engine.step()
                except Exception as e:  # never leave clients hanging: end every request, keep serving
                    logging.getLogger("nanoseek.serve").exception("engine step failed: %s", e)
                    self.stats["errors"] += 1
                    touched = self.engine.waiting + self.engine.running
                    for r in touched:
                        self.engine.abort(r)
                        r.finish_reason = "error"
                events = []
                for r in touched:
                    h = self.handles.get(r.id)
                    if h is None:
                        continue
                    new = r.stream()
                    events.append((h, new, r.done))
                    self.stats["completion_tokens"] += len(new)
                    if r.done:
                        self.handles.pop(r.id, None)
            for h, new, done in events:
                h.loop.call_soon_threadsafe(h.queue.put_nowait, (new, done))

    def queue_depth(self) -> int:
        return len(self.engine.waiting)


# ---- the app -------------------------------------------------------------------------------------------------------

def create_app(engine: Engine, model_name: str = "nanoseek", api_key: str | None = None, max_queue: int = 64):
    app = FastAPI(title="nanoseek", version="0.1.0", docs_url=None, redoc_url=None)
    runner = Runner(engine, max_queue)
    app.state.runner = runner
    tok = engine.tok

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        runner.stats["errors"] += 1
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        runner.stats["errors"] += 1
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse(error_body(f"{loc or 'body'}: {first.get('msg', 'invalid request')}",
                                       "invalid_request_error", loc or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(_, e: Exception):  # never a traceback to the client
        runner.stats["errors"] += 1
        return JSONResponse(error_body("internal error", "server_error"), status_code=500)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path not in ("/health",):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("invalid or missing API key (Authorization: Bearer ...)",
                                               "authentication_error", code="invalid_api_key"), status_code=401)
        return await call_next(request)

    def sampling(req: Sampling, prompt_len: int, chat: bool) -> list[SamplingParams]:
        limit = engine.max_len - prompt_len
        if limit < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context holds {engine.max_len}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = req.max_completion_tokens or req.max_tokens or limit
        if max_tokens > limit:
            raise APIError(400, f"max_tokens {max_tokens} + the prompt's {prompt_len} tokens exceed the context of "
                                f"{engine.max_len}", param="max_tokens", code="context_length_exceeded")
        budget = req.thinking_budget
        if budget is None and req.reasoning_effort:
            budget = EFFORT_BUDGETS[req.reasoning_effort]
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        top = (req.top_logprobs or 0) if req.logprobs else None
        return [SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                               seed=None if req.seed is None else req.seed + i, stop=stop, logprobs=top,
                               thinking_budget=budget).validate() for i in range(req.n)]

    async def collect(h: Handle, request: Request):
        while True:
            try:
                new, done = await asyncio.wait_for(h.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    runner.cancel(h)
                    return
                continue
            if done:
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
                                            "owned_by": "nanoseek", "max_model_len": engine.max_len}]}

    @app.get("/metrics")
    async def metrics():
        s = runner.stats
        lines = ["# TYPE nanoseek_requests_total counter", f"nanoseek_requests_total {s['requests']}",
                 "# TYPE nanoseek_prompt_tokens_total counter", f"nanoseek_prompt_tokens_total {s['prompt_tokens']}",
                 "# TYPE nanoseek_completion_tokens_total counter",
                 f"nanoseek_completion_tokens_total {s['completion_tokens']}",
                 "# TYPE nanoseek_errors_total counter", f"nanoseek_errors_total {s['errors']}",
                 "# TYPE nanoseek_aborted_total counter", f"nanoseek_aborted_total {s['aborted']}",
                 "# TYPE nanoseek_queue_depth gauge", f"nanoseek_queue_depth {runner.queue_depth()}",
                 "# TYPE nanoseek_running gauge", f"nanoseek_running {len(engine.running)}",
                 "# TYPE nanoseek_request_latency_seconds summary",
                 f"nanoseek_request_latency_seconds_sum {s['latency_sum']:.6f}",
                 f"nanoseek_request_latency_seconds_count {s['latency_count']}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

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
        t0 = time.time()
        handles = []
        try:
            for sp in params:
                handles.append(runner.submit(prompt, sp))
        except APIError:
            for h in handles:
                runner.cancel(h)
            raise
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        splits = [Splitter(tok, h.request.starts_thinking) for h in handles] if chat else None

        def done_stats():
            runner.stats["latency_sum"] += time.time() - t0
            runner.stats["latency_count"] += 1

        if not stream:
            try:
                await asyncio.gather(*(collect(h, request) for h in handles))
            finally:
                for h in handles:
                    runner.cancel(h)
            reqs = [h.request for h in handles]
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
                    text = r.text if r.params.stop else engine.text(r)
                    choices.append({"index": i, "text": text, "finish_reason": finish(r), "logprobs": logprobs_of(r)})
            done_stats()
            return {"id": cid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": model_name, "choices": choices, "usage": usage(reqs, splits)}

        async def events():
            try:
                obj = "chat.completion.chunk" if chat else "text_completion"
                if chat:
                    for i in range(len(handles)):
                        yield _sse({"id": cid, "object": obj, "created": created, "model": model_name,
                                    "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}]})
                queues = {i: h for i, h in enumerate(handles)}
                sent_text = {i: "" for i in queues}
                got = {i: [] for i in queues}
                pending = {i: asyncio.ensure_future(h.queue.get()) for i, h in queues.items()}
                while pending:
                    done, _ = await asyncio.wait(pending.values(), timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                    if not done and await request.is_disconnected():
                        return
                    for i in [i for i, f in pending.items() if f in done]:
                        new, fin = pending.pop(i).result()
                        r = handles[i].request
                        if chat:
                            for kind, delta in splits[i].feed(new, final=fin):
                                key = "reasoning_content" if kind == "reasoning" else "content"
                                yield _sse({"id": cid, "object": obj, "created": created, "model": model_name,
                                            "choices": [{"index": i, "delta": {key: delta}, "finish_reason": None}]})
                        else:  # from the ids streamed so far: a budgeted thought's line may still be cut back
                            got[i] += new
                            ids = got[i][:-1] if fin and got[i] and got[i][-1] == engine.eos else got[i]
                            text = r.text if fin and r.params.stop else tok.decode(ids)
                            if fin or not text.endswith("\ufffd"):
                                delta, sent_text[i] = text[len(sent_text[i]):], text
                                if delta:
                                    yield _sse({"id": cid, "object": obj, "created": created, "model": model_name,
                                                "choices": [{"index": i, "text": delta, "finish_reason": None}]})
                        if fin:
                            last = {"index": i, "finish_reason": finish(r)}
                            last.update({"delta": {}} if chat else {"text": ""})
                            yield _sse({"id": cid, "object": obj, "created": created, "model": model_name,
                                        "choices": [last]})
                        else:
                            pending[i] = asyncio.ensure_future(handles[i].queue.get())
                reqs = [h.request for h in handles]
                yield _sse({"id": cid, "object": obj, "created": created, "model": model_name, "choices": [],
                            "usage": usage(reqs, splits)})
                yield "data: [DONE]\n\n"
                done_stats()
            finally:  # also on client disconnect: abort and free the cache
                for h in handles:
                    runner.cancel(h)

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
    model = from_pretrained(args.checkpoint)
    if model.tokenizer is None:
        raise NanoseekError(f"{args.checkpoint} has no tokenizer.json; serving needs one")
    engine = Engine(model, max_batch=args.max_batch, max_len=args.max_len, compile=getattr(args, "compile", False))
    name = args.model_name or model.args.extra.get("_name_or_path") or "nanoseek"
    app = create_app(engine, name, args.api_key, args.max_queue)
    print(f"serving {args.checkpoint} as '{name}' on http://{args.host}:{args.port} "
          f"(OpenAI API at /v1, chat page at /)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


def add_args(sp) -> None:
    sp.add_argument("checkpoint", help="checkpoint directory (with tokenizer files)")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sp.add_argument("--port", type=int, default=8000, help="port")
    sp.add_argument("--api-key", default=None, help="require Authorization: Bearer <key> on every route but /health")
    sp.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    sp.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    sp.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step (several times faster per token; compiles on first use)")
    sp.add_argument("--max-len", type=int, default=None, help="context length (default: the model's)")
    sp.add_argument("--model-name", default=None, help="the model id clients use (default: nanoseek)")
