"""Between the HTTP handlers and the engine: `Group` (one HTTP request's choices, awaited by its handler), `Streams`
(per engine step: what each request hands over, and its timings for the metrics) and `EngineLoop`, the engine stepped
in a thread of this process (for embedding and the tests; `nanoseek serve` runs the engine in a process of its own,
serve/core.py, with the same Streams and Groups).

Hand-over. A request's first tokens go out at once, later ones at most every `stream_interval` seconds (`nanoseek
serve --stream-interval`, default 20 ms: 50 updates a second) and its last at once. Each hand-over costs the HTTP side
~0.1-0.3 ms of Python (starlette, SSE, the socket); at every token of a 2,000 tok/s CPU model that was a third of the
speed (bench/RESULTS.md, "Serving"). The metrics are taken per engine step, whatever the hand-overs.
"""

import asyncio
import logging
import threading
import time

from nanoseek.engine import Engine, Request, SamplingParams


class QueueFull(Exception):
    pass


class Group:
    """The requests of one HTTP request (its n choices); the engine side pushes, the handler awaits `next()`."""

    def __init__(self, requests: list[Request], loop: asyncio.AbstractEventLoop, arrived: float):
        self.requests, self.loop, self.arrived = requests, loop, arrived
        self.tokens: list[list[int]] = [[] for _ in requests]  # handed over, not yet taken by the handler
        self.finished = [False] * len(requests)  # as the handler was last told
        self.done = [False] * len(requests)  # as the engine side last pushed
        self.lock = threading.Lock()
        self.scheduled = False  # a wake-up of the event loop is on its way
        self.waiter: asyncio.Future | None = None

    def push(self, i: int, new: list[int], done: bool, threadsafe: bool = True) -> None:
        """Hand over request i's new tokens; wake the handler unless a wake-up is already on its way. threadsafe:
        called from another thread than the event loop's."""
        with self.lock:
            self.tokens[i] += new
            self.done[i] = done
            wake, self.scheduled = not self.scheduled, True
        if wake:
            self.loop.call_soon_threadsafe(self._wake) if threadsafe else self._wake()

    def _wake(self) -> None:
        with self.lock:
            self.scheduled = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _take(self) -> list[tuple[int, list[int], bool]]:
        with self.lock:
            out = [(i, t, d) for i, (t, d, f) in enumerate(zip(self.tokens, self.done, self.finished)) if t or d != f]
            for i, _, d in out:
                self.tokens[i], self.finished[i] = [], d
        return out

    async def next(self, timeout: float) -> list[tuple[int, list[int], bool]] | None:
        """[(choice index, new tokens, finished)] for the choices with news; None if `timeout` seconds pass with
        none (the handler then checks that its client is still there)."""
        out = self._take()
        if out:
            return out
        self.waiter = fut = self.loop.create_future()
        timer = self.loop.call_later(timeout, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            timer.cancel()
            self.waiter = None
        return self._take() or None

    @property
    def all_done(self) -> bool:
        return all(self.finished)


class Streams:
    """Per engine step, for each request the engine touched: its timings into `sink` (Metrics, or a Recorder whose
    records travel to the Metrics) and the tokens to hand over now (see the module's doc)."""

    def __init__(self, sink, stream_interval: float = 0.0):
        self.sink, self.interval = sink, stream_interval
        self.state: dict[int, list] = {}  # request id -> [arrived, first token, last token, output length, handed]
        self.spec_seen = (0, 0)

    def admit(self, r: Request, arrived: float) -> None:
        self.state[r.id] = [arrived, None, None, 0, None]
        self.sink.inc("prompt_tokens", len(r.prompt))

    def after_step(self, touched: list[Request], engine: Engine) -> list[tuple[Request, list[int]]]:
        """[(request, tokens to hand over)] for those with news (new tokens, or finished)."""
        now, sink, out = time.monotonic(), self.sink, []
        for r in touched:
            st = self.state.get(r.id)
            if st is None:
                continue
            n = len(r.output)
            if n > st[3]:
                if st[1] is None:
                    st[1] = now
                    sink.observe("ttft", now - st[0])
                else:
                    sink.observe("itl", now - st[2])
                st[2] = now
                sink.inc("generation_tokens", n - st[3])
            st[3] = n
            if not r.done and st[4] is not None and now - st[4] < self.interval:
                continue  # its tokens wait in the request for the next hand-over
            new = r.stream()
            if new:
                st[4] = now
            if r.done:
                del self.state[r.id]
                sink.observe("e2e", now - st[0])
                sink.observe("prompt_len", len(r.prompt))
                sink.observe("gen_len", n)
                sink.finished(r.finish_reason)
            if new or r.done:
                out.append((r, new))
        if engine.speculative:
            drafted, accepted = engine.spec_stats["drafted"], engine.spec_stats["accepted"]
            sink.inc("drafts", drafted - self.spec_seen[0])
            sink.inc("accepted", accepted - self.spec_seen[1])
            self.spec_seen = (drafted, accepted)
        return out


def safe_step(engine: Engine) -> list[Request]:
    """engine.step(); if it fails, every request ends with finish_reason "error" and the engine keeps serving."""
    try:
        return engine.step()
    except Exception as e:
        logging.getLogger("nanoseek.serve").exception("engine step failed: %s", e)
        touched = engine.waiting + engine.running
        for r in touched:
            engine.abort(r)
            r.finish_reason = "error"
        return touched


def engine_state(engine: Engine) -> dict:
    slots = len(engine.cache.kv[0]) if engine.cache.kv else 0
    return {"running": len(engine.running), "waiting": len(engine.waiting), "slots_used": slots - len(engine.free),
            "slots": slots}


class EngineLoop:
    """The engine stepped in a thread of this process. Handlers never touch the engine: `submit` and `cancel` leave
    requests and aborts in an inbox that the loop takes before each step."""

    def __init__(self, engine: Engine, max_queue: int = 64, stream_interval: float = 0.0):
        self.engine, self.max_queue = engine, max_queue
        self.tok, self.max_len, self.eos, self.text = engine.tok, engine.max_len, engine.eos, engine.text
        self.streams = Streams(None, stream_interval)  # its sink: the app's Metrics (set_metrics)
        self.cv = threading.Condition()
        self.inbox: list[Group] = []
        self.aborts: list[Group] = []
        self.owner: dict[int, tuple[Group, int]] = {}  # request id -> (its group, choice index); loop thread only
        self.stopped = False
        self.thread: threading.Thread | None = None

    def set_metrics(self, metrics) -> None:
        self.streams.sink = metrics

    def state(self) -> dict:
        s = engine_state(self.engine)
        s["waiting"] += sum(len(g.requests) for g in self.inbox)
        return s

    # ---- the handlers' side (event-loop thread) ----
    def submit(self, prompt: list[int], params: list[SamplingParams]) -> Group:
        """Queue one HTTP request's choices. Raises QueueFull, or NanoseekError for a request the engine refuses."""
        if self.state()["waiting"] + len(params) > self.max_queue:
            raise QueueFull()
        reqs = [self.engine.request(prompt, p) for p in params]
        g = Group(reqs, asyncio.get_running_loop(), time.monotonic())
        with self.cv:
            self.inbox.append(g)
            self.cv.notify()
        return g

    def cancel(self, g: Group) -> None:
        """Abort the group's unfinished requests (a client gone); their cache slots are freed before the next step."""
        if not g.all_done:
            with self.cv:
                self.aborts.append(g)
                self.cv.notify()

    # ---- the engine's side ----
    def run(self) -> None:
        """Step the engine until stop()."""
        while True:
            with self.cv:
                while not (self.inbox or self.aborts or self.engine.has_work or self.stopped):
                    self.cv.wait(timeout=0.5)
                if self.stopped:
                    break
                inbox, self.inbox, aborts, self.aborts = self.inbox, [], self.aborts, []
            touched = []
            for g in inbox:
                for i, r in enumerate(g.requests):
                    self.engine.waiting.append(r)
                    self.owner[r.id] = (g, i)
                    self.streams.admit(r, g.arrived)
            for g in aborts:
                for r in g.requests:
                    if not r.done:
                        self.engine.abort(r)
                        touched.append(r)
            self._hand_over(touched + safe_step(self.engine))
        for r in self.engine.waiting + self.engine.running:  # stopped: end what is left, so no handler waits
            self.engine.abort(r)
            self._hand_over([r])

    def _hand_over(self, touched: list[Request]) -> None:
        for r, new in self.streams.after_step(touched, self.engine):
            g, i = self.owner[r.id]
            if r.done:
                del self.owner[r.id]
            g.push(i, new, r.done)

    def start(self) -> "EngineLoop":
        self.thread = threading.Thread(target=self.run, daemon=True, name="nanoseek-engine")
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
