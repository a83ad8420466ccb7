"""The engine core of `nanoseek serve`: the engine in a process of its own, as vLLM (V1) runs its EngineCore, so that
the HTTP side's Python (starlette, JSON, sockets, detokenising) never holds the GIL the engine loop needs between its
kernels, and each side has a core of its own (the engine gets all CPU cores but one for its intra-op threads).

    HTTP process (uvicorn, FastAPI)                          engine process (`run_core`)
    CoreClient.submit  -- ("add", id, prompt, params, t) -->  Core: takes its messages before each step, steps the
    CoreClient.cancel  -- ("abort", id) ------------------->  engine, and sends one message per step with news:
    Group.push        <-- ("out", [(id, tokens, end)], records, state) --

The front end checks each request itself (engine.make_request: no model needed), so errors are answered before the
engine sees them. Times are `time.monotonic()` (one clock for both processes): the core measures time to first token
from the request's arrival at the HTTP side. If the engine process dies, every open request ends with an error and the
server stops with one line saying so.
"""

import asyncio
import itertools
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass

import torch

from nanoseek import fp8
from nanoseek.engine import Engine, Request, SamplingParams, make_request, output_text
from nanoseek.errors import NanoseekError
from nanoseek.serve.metrics import Recorder
from nanoseek.serve.runner import Group, QueueFull, Streams, engine_state, safe_step


@dataclass
class CoreSpec:
    checkpoint: str
    max_batch: int = 8
    max_len: int | None = None
    compile: bool = True
    speculative: bool = False
    threads: int = 1
    stream_interval: float = 0.02  # seconds
    dequantize: bool = False  # an FP8 checkpoint's weights dequantised at load (else kept in FP8)


# ---- the engine process -------------------------------------------------------------------------------------------

def run_core(conn, spec: CoreSpec) -> None:
    """The engine process's entry: load, compile, say ready (or why not), then serve messages until told to stop or
    until the front end is gone."""
    try:
        try:
            torch.set_num_threads(spec.threads)
            model = fp8.from_pretrained(spec.checkpoint, dequantize=spec.dequantize)
            engine = Engine(model, max_batch=spec.max_batch, max_len=spec.max_len, compile=spec.compile,
                            speculative=spec.speculative)
            took = engine.warm_up()
        except (NanoseekError, OSError, ValueError, RuntimeError) as e:
            conn.send(("error", f"{type(e).__name__}: {e}" if not isinstance(e, NanoseekError) else str(e)))
            return
        conn.send(("ready", {"compiled": engine.compile, "compile_error": engine.compile_error, "warm_up_s": took,
                             "max_len": engine.max_len, "slots": spec.max_batch,
                             "weights": fp8.weights_line(model)}))
        Core(engine, conn, spec.stream_interval).run()
    except (KeyboardInterrupt, EOFError, BrokenPipeError, ConnectionResetError):
        pass  # Ctrl-C reaches both processes (the front end says it), or the front end is gone


class Core:
    def __init__(self, engine: Engine, conn, stream_interval: float):
        self.engine, self.conn = engine, conn
        self.recorder = Recorder()
        self.streams = Streams(self.recorder, stream_interval)
        self.ids: dict[int, Request] = {}  # the front end's request id -> the engine's request
        self.front: dict[int, int] = {}  # engine request id -> the front end's

    def run(self) -> None:
        while True:
            if not self.engine.has_work:
                self.conn.poll(None)  # idle: sleep until a message (or the front end's end: EOFError below)
            while self.conn.poll():
                if not self.handle(self.conn.recv()):
                    return
            self.hand_over(safe_step(self.engine) if self.engine.has_work else [])

    def handle(self, msg) -> bool:
        kind = msg[0]
        if kind == "add":
            _, fid, prompt, params, arrived = msg
            try:
                r = self.engine.request(prompt, params)
            except NanoseekError:  # the front end checked it; a mismatch ends it as an error
                self.conn.send(("out", [(fid, [], {"finish_reason": "error"})], [], engine_state(self.engine)))
                return True
            self.ids[fid], self.front[r.id] = r, fid
            self.engine.waiting.append(r)
            self.streams.admit(r, arrived)
        elif kind == "abort":
            r = self.ids.get(msg[1])
            if r is not None and not r.done:
                self.engine.abort(r)
                self.hand_over([r])
        elif kind == "stop":
            return False
        return True

    def hand_over(self, touched: list[Request]) -> None:
        outs = []
        for r, new in self.streams.after_step(touched, self.engine):
            fid = self.front[r.id]
            end = None
            if r.done:
                del self.ids[fid], self.front[r.id]
                end = {"finish_reason": r.finish_reason, "thinking_tokens": r.thinking_tokens, "text": r.text,
                       "logprobs": r.logprobs}
            outs.append((fid, new, end))
        if outs:
            self.conn.send(("out", outs, self.recorder.take(), engine_state(self.engine)))


# ---- the HTTP process's side --------------------------------------------------------------------------------------

class CoreClient:
    """The front end's handle on the engine process: the runner interface of `create_app` (submit, cancel, state,
    set_metrics, tok, max_len, eos, text), over a pipe read by the event loop itself."""

    def __init__(self, spec: CoreSpec, tok, vocab_size: int, max_queue: int = 64):
        self.spec, self.tok, self.vocab_size, self.max_queue = spec, tok, vocab_size, max_queue
        self.eos = tok.eos_id
        self.metrics = None
        self.groups: dict[int, tuple[Group, int]] = {}  # front-end request id -> (its group, choice index)
        self._ids = itertools.count()
        self._state = {"running": 0, "waiting": 0, "slots_used": 0, "slots": spec.max_batch}
        self.dead: str | None = None
        self.on_death = None  # called once (in the event loop) if the engine process ends on its own

    def start(self) -> dict:
        """Start the engine process and wait until it is ready (loaded and compiled); returns what it said."""
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=run_core, args=(child, self.spec), daemon=True, name="nanoseek-engine")
        self.proc.start()
        child.close()
        while not self.conn.poll(0.5):
            if not self.proc.is_alive():
                raise NanoseekError(f"the engine process exited (code {self.proc.exitcode}) before it was ready")
        try:
            kind, info = self.conn.recv()
        except EOFError:
            raise NanoseekError("the engine process ended before it was ready") from None
        if kind == "error":
            self.proc.join(timeout=10)
            raise NanoseekError(f"the engine process could not start: {info}")
        self.max_len = info["max_len"]
        return info

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the engine's messages in the event loop (called at the app's start-up)."""
        self.loop = loop
        loop.add_reader(self.conn.fileno(), self._readable)

    def set_metrics(self, metrics) -> None:
        self.metrics = metrics

    def state(self) -> dict:
        return self._state

    def text(self, r: Request) -> str:
        return output_text(self.tok, r.output, self.eos)

    def submit(self, prompt: list[int], params: list[SamplingParams]) -> Group:
        if self.dead:
            raise NanoseekError(f"the engine process has stopped ({self.dead})")
        if len(self.groups) + len(params) > self.spec.max_batch + self.max_queue:
            raise QueueFull()
        reqs = [make_request(next(self._ids), prompt, p, self.max_len, self.vocab_size, self.tok) for p in params]
        g = Group(reqs, asyncio.get_running_loop(), time.monotonic())
        for i, r in enumerate(reqs):
            self.groups[r.id] = (g, i)
            self.conn.send(("add", r.id, r.prompt, r.params, g.arrived))
        return g

    def cancel(self, g: Group) -> None:
        for r in g.requests:
            if not r.done and r.id in self.groups and not self.dead:
                self.conn.send(("abort", r.id))

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                _, outs, records, self._state = self.conn.recv()
                if self.metrics is not None:
                    self.metrics.replay(records)
                for fid, new, end in outs:
                    self._deliver(fid, new, end)
        except (EOFError, OSError):
            self._died("the engine process ended unexpectedly")

    def _deliver(self, fid: int, new: list[int], end: dict | None) -> None:
        if fid not in self.groups:
            return
        g, i = self.groups[fid]
        r = g.requests[i]
        r.output += new
        if end is not None:
            del self.groups[fid]
            r.finish_reason, r.thinking_tokens, r.text, r.logprobs = (end["finish_reason"],
                                                                      end.get("thinking_tokens", 0),
                                                                      end.get("text", ""), end.get("logprobs", []))
        g.push(i, new, end is not None, threadsafe=False)

    def _died(self, why: str) -> None:
        if self.dead:
            return
        self.dead = why
        self.loop.remove_reader(self.conn.fileno())
        logging.getLogger("nanoseek.serve").error("%s; stopping", why)
        for fid in list(self.groups):
            self._deliver(fid, [], {"finish_reason": "error"})
        if self.on_death is not None:
            self.on_death(why)

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
