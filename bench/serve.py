"""Serving, with vLLM's benchmark conventions, side by side in one run on one checkpoint: `nanoseek serve` (a real
server process, default flags) driven by streaming clients, against the same engine called in-process
(`Engine.generate`, the same compile and batch flags) and against `transformers`' `generate`.

    .venv/bin/python bench/serve.py                        # a fresh tiny model (the speedrun's config)
    .venv/bin/python bench/serve.py --checkpoint out/speedrun/rl/model --speculative
    .venv/bin/python bench/serve.py --device cuda --sizes small   (on a GPU machine: see bench/RESULTS.md)

What it reports, as vLLM's `benchmark_serving` does: per load (a request rate, Poisson arrivals, or all at once,
with at most --concurrency requests in flight) the output tok/s, requests/s, time to first token (TTFT) and
inter-token latency (ITL: between successive streamed chunks of a request) at p50 and p99. Every request is a chat
completion of exactly --new tokens (`min_tokens` = `max_tokens`, `ignore_eos`), greedy, so each path does the same
work. Loads: one request at a time (bs=1), 8 and 32 concurrent streams, and a request-rate sweep.

Side by side: bs=1 tok/s of the server / the engine alone / transformers; the servers' 8 and 32 streams beside the
engine's batched throughput at the same batch; with --speculative, a second server with MTP speculative decoding
(its tok/s and draft acceptance, read from its /metrics).
"""

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from nanoseek.config import ModelArgs, get_preset  # first: nanoseek sets torch's CPU allocator options
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import build_model, from_pretrained
from nanoseek.serve.api import default_threads

import torch

QUESTIONS = ["What is 17 + 25?", "Spell 'bench' backwards.", "How many r's are in 'strawberry'?",
             "Solve 3x + 4 = 19.", "What is 2 to the power 10?", "Sort 5, 3, 9, 1.", "Is 91 prime?",
             "What is 12 times 12?"]


# ---- a minimal streaming HTTP client (asyncio streams: little client CPU on a 2-core machine) ----------------------

class Connection:
    """One keep-alive HTTP/1.1 connection (as a benchmark client's session keeps them)."""

    def __init__(self, host, port):
        self.host, self.port, self.rw = host, port, None

    async def stream_chat(self, payload: dict) -> dict:
        """POST a streaming chat completion; returns the send time, the arrival time of each chunk with text, the
        end and the usage's token count."""
        if self.rw is None:
            self.rw = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.rw
        body = json.dumps(payload).encode()
        t0 = time.perf_counter()
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        status = (await reader.readline()).split()
        if len(status) < 2 or status[1] != b"200":
            raise RuntimeError(f"HTTP {status}: {(await reader.read(300))!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        times, usage, buf = [], None, b""
        while True:  # chunked transfer encoding, carrying SSE events
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                break
            buf += await reader.readexactly(size)
            await reader.readexactly(2)
            now = time.perf_counter()
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event[5:].strip()
                if data == b"[DONE]":
                    continue
                obj = json.loads(data)
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj["choices"]:
                    d = ch.get("delta", {})
                    if d.get("content") or d.get("reasoning_content"):
                        times.append(now)
        return {"start": t0, "times": times, "end": time.perf_counter(), "tokens": usage["completion_tokens"]}

    def close(self):
        if self.rw is not None:
            self.rw[1].close()


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def load(host, port, n_requests: int, concurrency: int, rate: float, new: int, seed: int = 0) -> dict:
    """vLLM's benchmark loop: requests arrive at `rate` per second (Poisson; inf: all at once) and are sent by at
    most `concurrency` clients, each on its own keep-alive connection."""
    rng = random.Random(seed)
    queue: asyncio.Queue = asyncio.Queue()
    results = []

    async def client():
        conn = Connection(host, port)
        try:
            while (i := await queue.get()) is not None:
                results.append(await conn.stream_chat({
                    "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "stream": True,
                    "max_tokens": new, "min_tokens": new, "ignore_eos": True, "temperature": 0}))
        finally:
            conn.close()

    t0 = time.perf_counter()
    clients = [asyncio.create_task(client()) for _ in range(concurrency)]
    for i in range(n_requests):
        queue.put_nowait(i)
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    for _ in clients:
        queue.put_nowait(None)
    await asyncio.gather(*clients)
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tpot = [(r["end"] - r["times"][0]) / (r["tokens"] - 1) for r in results if r["times"] and r["tokens"] > 1]
    return {"tok/s": tokens / wall, "req/s": len(results) / wall, "tokens": tokens,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p99_ms": 1e3 * pct(tpot, 99),
            "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99),
            "chunks_per_request": statistics.mean(len(r["times"]) for r in results)}


# ---- the server process -------------------------------------------------------------------------------------------

class ServerProcess:
    def __init__(self, checkpoint, port, extra, log):
        cmd = [sys.executable, "-m", "nanoseek", "serve", str(checkpoint), "--port", str(port), *extra]
        self.port, self.log = port, log
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        t = time.time()
        while time.time() - t < 600:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                self.startup = time.time() - t
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not come up in 10 minutes")

    def metrics(self) -> dict:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10).read().decode()
        from prometheus_client.parser import text_string_to_metric_families
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the in-process references ------------------------------------------------------------------------------------

class Alone:
    """The engine in this process's main thread with the server's flags (threads, batch, length, compile)."""

    def __init__(self, ckpt, max_batch, max_len, compile, threads, speculative=False):
        torch.set_num_threads(threads)
        self.eng = Engine(from_pretrained(ckpt), max_batch=max_batch, max_len=max_len, compile=compile,
                          speculative=speculative)
        self.eng.warm_up()

    def bs1(self, prompts, sp) -> float:
        """One prompt at a time, each run to its end (Engine.generate)."""
        t, n = time.perf_counter(), 0
        for p in prompts:
            n += len(self.eng.generate([p], sp)[0].output)
        return n / (time.perf_counter() - t)

    def at_once(self, prompts, b, sp) -> float:
        """b prompts in one Engine.generate."""
        t = time.perf_counter()
        n = sum(len(r.output) for r in self.eng.generate([prompts[i % len(prompts)] for i in range(b)], sp))
        return n / (time.perf_counter() - t)

    def flowing(self, prompts, b, sp) -> float:
        """The servers' load without the server: 4b requests, b in flight, the next added as one finishes."""
        eng, t, todo, n = self.eng, time.perf_counter(), 4 * b, 0
        while todo or eng.has_work:
            while todo and len(eng.waiting) + len(eng.running) < b:
                todo -= 1
                eng.add(prompts[todo % len(prompts)], sp)
            n += sum(len(r.output) for r in eng.step() if r.done)
        return n / (time.perf_counter() - t)


async def paired_bs1(alone, port, prompts, sp, new) -> dict:
    """bs=1 request by request, each prompt through the engine alone and then through the server at once, so that
    both see the same moment of a noisy machine: tok/s of each over all prompts."""
    conn, t_engine, t_serve, n_engine, n_serve = Connection("127.0.0.1", port), 0.0, 0.0, 0, 0
    try:
        for p, q in zip(prompts, itertools.cycle(QUESTIONS)):
            t = time.perf_counter()
            n_engine += len(alone.eng.generate([p], sp)[0].output)
            t_engine += time.perf_counter() - t
            x = await conn.stream_chat({"messages": [{"role": "user", "content": q}], "stream": True,
                                        "max_tokens": new, "min_tokens": new, "ignore_eos": True, "temperature": 0})
            t_serve += x["end"] - x["start"]
            n_serve += x["tokens"]
    finally:
        conn.close()
    return {"engine": n_engine / t_engine, "serve": n_serve / t_serve}


def transformers_bs1(ckpt, prompts, new) -> float:
    import transformers
    transformers.logging.set_verbosity_error()  # (the MTP layer's weights, which transformers does not load)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        hf.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)
        t, n = time.perf_counter(), 0
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            n += out.shape[1] - len(p)
    return n / (time.perf_counter() - t)


def make_checkpoint(path: Path) -> None:
    """A fresh tiny model (the speedrun's config) with a tokenizer trained on generated reasoning text."""
    from nanoseek.data.corpus import reasoning_texts
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.train(reasoning_texts(2000, seed=1), vocab_size=get_preset("tiny").vocab_size)
    torch.manual_seed(0)
    model = build_model(ModelArgs.from_dict(get_preset("tiny").to_dict()).validate()).eval()
    model.save_pretrained(path, tokenizer=tok)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a checkpoint with tokenizer (default: a fresh tiny model)")
    ap.add_argument("--new", type=int, default=128, help="tokens per request")
    ap.add_argument("--requests", type=int, default=8, help="requests per bs=1 run (one prompt each, in turn)")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[8, 32], help="concurrent streams")
    ap.add_argument("--rates", type=float, nargs="*", default=[4.0, 16.0], help="request rates (req/s) to sweep")
    ap.add_argument("--speculative", action="store_true", help="also a server with MTP speculative decoding")
    ap.add_argument("--no-compile", action="store_true", help="measure the eager decode path instead")
    ap.add_argument("--threads", type=int, default=default_threads(),
                    help="the server's --threads, also the engine's alone (default: the server's default)")
    ap.add_argument("--stream-interval", type=float, default=None, help="the server's --stream-interval (ms)")
    ap.add_argument("--reps", type=int, default=3, help="serve / engine pairs per load")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {args.new} tokens "
          f"per request, greedy; {'eager' if args.no_compile else 'compiled'} decode step", flush=True)
    tmp = tempfile.TemporaryDirectory()
    ckpt = Path(args.checkpoint) if args.checkpoint else Path(tmp.name) / "model"
    if not args.checkpoint:
        make_checkpoint(ckpt)
    tok = from_pretrained(ckpt).tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
               for i in range(args.requests)]
    max_batch = max([1, *args.concurrency])
    max_len = max(len(p) for p in prompts) + args.new + 8
    flags = ["--max-batch", str(max_batch), "--max-len", str(max_len), "--threads", str(args.threads)] + \
        (["--no-compile"] if args.no_compile else []) + \
        (["--stream-interval", str(args.stream_interval)] if args.stream_interval is not None else [])
    res = {"checkpoint": str(args.checkpoint or "fresh tiny"), "new": args.new}

    all_cores = torch.get_num_threads()
    res["threads"], res["all_cores"] = args.threads, all_cores

    log = open(Path(tmp.name) / "server.log", "w+")
    sp = SamplingParams(max_tokens=args.new, min_tokens=args.new, ignore_eos=True, temperature=0)
    srv = ServerProcess(ckpt, free_port(), flags, log)
    try:
        res["startup_s"] = srv.startup
        alone = Alone(ckpt, max_batch, max_len, not args.no_compile, args.threads)
        asyncio.run(load("127.0.0.1", srv.port, 2, 1, float("inf"), args.new))  # first connections
        rows = {"bs=1": [], **{f"{c} streams": [] for c in args.concurrency}}
        for rep in range(args.reps):  # each pair side by side: bs=1 request by request, the loads one after the other
            x = asyncio.run(load("127.0.0.1", srv.port, len(prompts), 1, float("inf"), args.new))
            rows["bs=1"].append({"serve": x, "engine": alone.bs1(prompts, sp),
                                 "paired": asyncio.run(paired_bs1(alone, srv.port, prompts, sp, args.new))})
            for c in args.concurrency:
                x = asyncio.run(load("127.0.0.1", srv.port, 4 * c, c, float("inf"), args.new))
                rows[f"{c} streams"].append({"serve": x, "engine": alone.flowing(prompts, c, sp),
                                             "engine_at_once": alone.at_once(prompts, c, sp)})
            for label, r in rows.items():
                print(f"rep {rep} {label}: serve {r[-1]['serve']['tok/s']:,.0f} tok/s, engine {r[-1]['engine']:,.0f}",
                      flush=True)
        res["rows"] = rows
        res["rates"] = {r: asyncio.run(load("127.0.0.1", srv.port, 32, max_batch, r, args.new)) for r in args.rates}
    finally:
        srv.stop()
    del alone
    torch.set_num_threads(all_cores)
    res["engine_all_cores_bs1"] = Alone(ckpt, max_batch, max_len, not args.no_compile, all_cores).bs1(prompts, sp)
    res["transformers_bs1"] = transformers_bs1(ckpt, prompts, args.new)
    if args.speculative:  # plain and speculative servers, side by side, bs=1
        spec = {"serve": [], "serve_speculative": [], "engine_speculative": []}
        one = ServerProcess(ckpt, free_port(), flags + ["--max-batch", "1"], log)
        two = ServerProcess(ckpt, free_port(), flags + ["--max-batch", "1", "--speculative"], log)
        alone = Alone(ckpt, 1, max_len, not args.no_compile, args.threads, speculative=True)
        try:
            for rep in range(args.reps):
                spec["serve"].append(asyncio.run(load("127.0.0.1", one.port, len(prompts), 1, float("inf"),
                                                      args.new))["tok/s"])
                spec["serve_speculative"].append(asyncio.run(load("127.0.0.1", two.port, len(prompts), 1,
                                                                  float("inf"), args.new))["tok/s"])
                spec["engine_speculative"].append(alone.bs1(prompts, sp))
            m = two.metrics()
            spec["acceptance"] = m.get("nanoseek:spec_decode_num_accepted_tokens_total", 0) / \
                max(1, m.get("nanoseek:spec_decode_num_drafts_total", 0))
            spec["engine_acceptance"] = alone.eng.spec_stats["accepted"] / max(1, alone.eng.spec_stats["drafted"])
        finally:
            one.stop()
            two.stop()
        res["speculative"] = spec
    report(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


def report(res, args):
    med = statistics.median
    rows, hf = res["rows"], res["transformers_bs1"]
    b1 = rows["bs=1"]
    serve1, eng1 = med(r["serve"]["tok/s"] for r in b1), med(r["engine"] for r in b1)
    print(f"\n{args.reps} reps, each serve run beside an engine-alone run; medians (each rep's ratio in brackets)")
    print("\n| path | tok/s | ratio |\n|---|---|---|")
    print(f"| transformers generate, bs=1 | {hf:,.1f} | 1.00x |")
    print(f"| Engine.generate alone, bs=1, {res['threads']} threads (the server's) | {eng1:,.1f} | {eng1 / hf:.2f}x |")
    a = res["engine_all_cores_bs1"]
    print(f"| Engine.generate alone, bs=1, {res['all_cores']} threads | {a:,.1f} | {a / hf:.2f}x |")
    ratios = " ".join(f"{r['serve']['tok/s'] / r['engine']:.2f}" for r in b1)
    print(f"| **nanoseek serve, bs=1** | {serve1:,.1f} | **{serve1 / hf:.2f}x**; serve / engine "
          f"{med(r['serve']['tok/s'] / r['engine'] for r in b1):.2f} [{ratios}] |")
    ratios = " ".join(f"{r['paired']['serve'] / r['paired']['engine']:.2f}" for r in b1)
    print(f"| bs=1 request by request, each prompt through the engine then the server | "
          f"{med(r['paired']['serve'] for r in b1):,.1f} / {med(r['paired']['engine'] for r in b1):,.1f} | "
          f"serve / engine **{med(r['paired']['serve'] / r['paired']['engine'] for r in b1):.2f}** [{ratios}] |")
    for c in args.concurrency:
        rs = rows[f"{c} streams"]
        sv, fl, ao = (med(r["serve"]["tok/s"] for r in rs), med(r["engine"] for r in rs),
                      med(r["engine_at_once"] for r in rs))
        ratios = " ".join(f"{r['serve']['tok/s'] / r['engine']:.2f}" for r in rs)
        print(f"| {c} streams: serve / engine with {c} in flight (4x{c} requests) | {sv:,.1f} / {fl:,.1f} | "
              f"**{med(r['serve']['tok/s'] / r['engine'] for r in rs):.2f}** [{ratios}] |")
        print(f"| {c} streams: serve / engine, {c} prompts at once | {sv:,.1f} / {ao:,.1f} | "
              f"{med(r['serve']['tok/s'] / r['engine_at_once'] for r in rs):.2f} |")
    if "speculative" in res:
        sp = res["speculative"]
        s0, s1, e1 = med(sp["serve"]), med(sp["serve_speculative"]), med(sp["engine_speculative"])
        print(f"| serve --speculative, bs=1 | {s1:,.1f} | {s1 / s0:.2f}x of serve ({s0:,.1f}), acceptance "
              f"{sp['acceptance']:.1%}; engine alone speculative {e1:,.1f} ({sp['engine_acceptance']:.1%}) |")
    print("\n| load (last rep) | output tok/s | req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | "
          "chunks/request |\n|---|---|---|---|---|---|---|")
    loads = [(k, v[-1]["serve"]) for k, v in rows.items()] + [(f"rate {r:g}/s", x) for r, x in res["rates"].items()]
    for label, x in loads:
        print(f"| {label} | {x['tok/s']:,.1f} | {x['req/s']:.2f} | {x['ttft_p50_ms']:.1f} / {x['ttft_p99_ms']:.1f} | "
              f"{x['tpot_p50_ms']:.2f} / {x['tpot_p99_ms']:.2f} | {x['itl_p50_ms']:.2f} / {x['itl_p99_ms']:.2f} | "
              f"{x['chunks_per_request']:.0f} |")


if __name__ == "__main__":
    main()
