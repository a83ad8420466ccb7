"""`GET /metrics` of `nanoseek serve`: Prometheus metrics through `prometheus_client`, named as vLLM names its own
(`vllm:time_to_first_token_seconds` -> `nanoseek:time_to_first_token_seconds`), so that dashboards built for vLLM
read a nanoseek server with the prefix changed.

Histograms: time to first token, inter-token latency (between successive outputs of a request), end-to-end request
latency, prompt and generation lengths. Counters: requests by finish reason, prompt and generation tokens, errors,
speculative drafts and accepted drafts. Gauges, read at scrape time: requests running and waiting, KV-cache slots used
and their fraction. One registry per app, so that several servers in one process (tests) keep apart.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# bucket bounds as vLLM's (seconds; tokens as powers of 1-2-5)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_len: int) -> tuple[int, ...]:
    out, m = [], 1
    while m <= max_len:
        out += [b for b in (m, 2 * m, 5 * m) if b <= max_len]
        m *= 10
    return tuple(out)


class Recorder:
    """What the engine loop measures (`observe`, `inc`, `finished`), kept as records to ship to the process that owns
    the Metrics (the engine core's process sends them with its outputs); `Metrics` takes the same calls directly."""

    def __init__(self):
        self.records: list[tuple] = []
        self.counts: dict[str, float] = {}  # counters add up between two shipments

    def observe(self, name: str, value: float) -> None:
        self.records.append(("observe", name, value))

    def inc(self, name: str, n: float = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def finished(self, reason: str) -> None:
        self.records.append(("finished", reason))

    def take(self) -> list[tuple]:
        out = self.records + [("inc", name, n) for name, n in self.counts.items()]
        self.records, self.counts = [], {}
        return out


class Metrics:
    """The registry. `state()` returns the engine's live numbers for the gauges: {"running", "waiting",
    "slots_used", "slots"}."""

    def __init__(self, model_name: str, max_len: int, state):
        self.registry = r = CollectorRegistry()
        lab = {"model_name": model_name}
        P = "nanoseek:"

        def counter(name, doc, labels=()):
            c = Counter(P + name, doc, ["model_name", *labels], registry=r)
            return c.labels(**lab) if not labels else c

        def histogram(name, doc, buckets):
            return Histogram(P + name, doc, ["model_name"], buckets=buckets, registry=r).labels(**lab)

        def gauge(name, doc, fn):
            Gauge(P + name, doc, ["model_name"], registry=r).labels(**lab).set_function(fn)

        lengths = token_buckets(max_len)
        self.histograms = {
            "ttft": histogram("time_to_first_token_seconds", "Time from a request's arrival to its first token.",
                              TTFT_BUCKETS),
            "itl": histogram("inter_token_latency_seconds", "Time between a request's successive engine steps.",
                             ITL_BUCKETS),
            "e2e": histogram("e2e_request_latency_seconds", "Time from a request's arrival to its last token.",
                             E2E_BUCKETS),
            "prompt_len": histogram("request_prompt_tokens", "Prompt tokens of each finished request.", lengths),
            "gen_len": histogram("request_generation_tokens", "Generated tokens of each finished request.", lengths)}
        self._success = counter("request_success", "Finished requests, by finish reason.", ["finished_reason"])
        self.counters = {
            "prompt_tokens": counter("prompt_tokens", "Prompt tokens admitted."),
            "generation_tokens": counter("generation_tokens", "Tokens generated."),
            "errors": counter("request_errors", "Requests answered with an error (4xx/5xx)."),
            "drafts": counter("spec_decode_num_drafts", "MTP drafts verified (speculative decoding)."),
            "accepted": counter("spec_decode_num_accepted_tokens", "MTP drafts the model accepted.")}
        gauge("num_requests_running", "Requests decoding now.", lambda: state()["running"])
        gauge("num_requests_waiting", "Requests waiting for a slot.", lambda: state()["waiting"])
        gauge("kv_cache_slots_used", "KV-cache rows (slots) held by requests.", lambda: state()["slots_used"])
        gauge("kv_cache_usage_perc", "Fraction of the KV-cache slots in use (0-1).",
              lambda: state()["slots_used"] / max(1, state()["slots"]))
        self.model_name = model_name

    def observe(self, name: str, value: float) -> None:
        self.histograms[name].observe(value)

    def inc(self, name: str, n: float = 1) -> None:
        if n:
            self.counters[name].inc(n)

    def finished(self, reason: str) -> None:
        self._success.labels(model_name=self.model_name, finished_reason=reason).inc()

    def replay(self, records: list[tuple]) -> None:
        for kind, *rest in records:
            getattr(self, kind)(*rest)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
