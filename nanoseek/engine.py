"""The inference engine: a latent KV cache, prefill and decode, continuous batching, sampling, thinking budgets.

The cache is MLA's: per layer and token only the normed latent c_KV (`kv_lora_rank`) and the rotated shared key k_R
(`qk_rope_head_dim`) — 576 numbers per layer for V3, where a naive cache of per-head k and v would hold
H·(qk_head_dim + v_head_dim). Decode uses the absorbed attention (MLA.forward_cached, absorb=True); the naive form
reads the same cache and is kept for checking.

Continuous batching: the cache has `max_batch` rows ("slots"). Each `step()` admits waiting requests into free slots
(prefill: the whole prompt in one forward), then decodes one token for every running request in one batched forward;
finished or aborted requests free their slot at once, so new ones join a batch that keeps running.

Per request: temperature, top-k, top-p, a seed (its own generator, so a sample does not depend on its batch), stop
strings and token ids, max tokens, logprobs, and a thinking budget: generation that starts inside `<think>` (the R1
template opens it) may think for at most `thinking_budget` tokens; then the engine cuts the thought back to its last
whole line (so it never ends mid-computation, and closes as a trained thought does, `…\n</think>`), writes `</think>`
itself, and the model goes on to answer — the serve-time knob of test-time scaling, and what `nanoseek eval --budgets`
measures. (Cut back, the answers were better than with a thought that closes mid-line: bench/RESULTS.md.) Streams
hold a budgeted thought's current line back until it is whole: `Request.stream`.

MTP speculative decoding (`speculative=True`): the MTP module (with its own latent cache) drafts the token after the
next; one forward over [next, draft] verifies it — greedy: kept if the model agrees; sampled: kept with probability
min(1, p/q), else replaced from the residual, so the output distribution is exactly the model's.
"""

import functools
import itertools
import time
import warnings
from dataclasses import dataclass, field

import torch

from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # eos, stop_token_ids and stop strings do not end generation before this many tokens (vLLM's)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely alternatives
    thinking_budget: int | None = None  # max tokens inside <think> ... </think>

    def validate(self) -> "SamplingParams":
        if self.max_tokens < 1:
            raise NanoseekError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 10:
            raise NanoseekError(f"temperature must be in [0, 10], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise NanoseekError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise NanoseekError(f"top_k must be >= 0, got {self.top_k}")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise NanoseekError(f"thinking_budget must be >= 0, got {self.thinking_budget}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise NanoseekError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        return self


@dataclass(eq=False)  # identity: the scheduler looks requests up in its lists
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    slot: int | None = None
    thinking: bool = False  # inside <think> ... </think> right now
    starts_thinking: bool = False  # the prompt left a thought open (fixed at add(); `thinking` changes as it runs)
    thinking_tokens: int = 0
    generator: torch.Generator | None = None
    line_start: int = 0  # index in output where the thought's current line began (a budget cuts back to it)
    streamed: int = 0  # output tokens already handed out by stream()
    speculative: bool = False  # decoded with MTP drafts (an engine with speculative=True; no logprobs or budget)
    draft: int | None = None  # the MTP module's guess of the token after output[-1]
    draft_probs: torch.Tensor | None = None  # the distribution the draft was sampled from (temperature > 0)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def stream(self) -> list[int]:
        """The output tokens not handed out yet that are final. Inside a thought under a thinking budget, the line
        being written may still be cut back when the budget runs out, so it waits for its line break."""
        end = len(self.output)
        if self.thinking and self.params.thinking_budget is not None and not self.done:
            end = self.line_start
        new = self.output[self.streamed:end]
        self.streamed = max(self.streamed, end)
        return new


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i of probs [n, V] (any non-negative weights) at the uniform u[i] in [0, 1) -> token
    ids [n]. One batched cumsum + searchsorted; each row's u comes from its own request's generator, so a row gets the
    same token alone or in a batch (torch.multinomial per row costs ~100 µs on CPU, most of a rollout's sampling)."""
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    V = probs.shape[-1]
    if bool((idx >= V).any()):  # u·S rounded up to S: take the row's last token with weight
        last = V - 1 - (probs.flip(-1) > 0).int().argmax(-1)
        idx = torch.minimum(idx, last)
    return idx


def uniform(generator) -> float:
    return float(torch.rand(1, generator=generator, device=generator.device if generator is not None else "cpu"))


def draw_one(probs: torch.Tensor, generator) -> int:
    """draw for one distribution [V], its uniform from `generator`."""
    return int(draw(probs[None], torch.tensor([uniform(generator)], device=probs.device))[0])


def speculative_choice(p: torch.Tensor, q: torch.Tensor, draft: int, generator=None) -> tuple[int, bool]:
    """Speculative sampling (Leviathan et al., Chen et al.): keep the draft d ~ q with probability min(1, p(d)/q(d)),
    else sample from the residual max(0, p − q), renormalised. The token returned is distributed exactly as p."""
    u = float(torch.rand(1, generator=generator, device=p.device))
    if q[draft] > 0 and u < min(1.0, float(p[draft] / q[draft])):
        return draft, True
    residual = (p - q).clamp(min=0)
    residual = residual / residual.sum() if residual.sum() > 0 else p
    return int(torch.multinomial(residual, 1, generator=generator)), False


class KVCache:
    """Latent cache rows, per layer: kv[l] [slots, max_len, kv_lora_rank] and pe[l] [slots, max_len,
    qk_rope_head_dim]. One tensor per layer, not one stacked tensor, so that a compiled step writes each in place
    (a write into a view of a stacked graph input is copied back whole)."""

    def __init__(self, args, slots: int, max_len: int, device, dtype, layers: int | None = None):
        L = args.num_hidden_layers if layers is None else layers
        self.kv = [torch.zeros(slots, max_len, args.kv_lora_rank, device=device, dtype=dtype) for _ in range(L)]
        self.pe = [torch.zeros(slots, max_len, args.qk_rope_head_dim, device=device, dtype=dtype) for _ in range(L)]
        self.max_len, self.dtype = max_len, dtype

    @property
    def bytes_per_token(self) -> int:
        return len(self.kv) * (self.kv[0].shape[-1] + self.pe[0].shape[-1]) * self.kv[0].element_size()


@functools.cache
def compiled_draft():
    """The MTP module's cached forward (`Transformer.mtp_forward_cached`) through torch.compile: speculative decoding's
    drafts after each verify (1 or 2 new tokens: two graphs)."""
    return torch.compile(Transformer.mtp_forward_cached, options={"cpp_wrapper": True})


@functools.cache
def compiled_forward():
    """The model's cached forward (`Transformer.forward_cached`) through torch.compile, once per process; it compiles
    on the first call per new shape. The C++ wrapper (inductor's cpp_wrapper) runs the graph's ~40 kernels without a
    Python line between them: at a decode step's size that overhead is what is left to cut."""
    return torch.compile(Transformer.forward_cached, options={"cpp_wrapper": True})


def sample_seed(seed: int, step: int, index: int) -> int:
    """The seed of sample `index` drawn at `step` of a run seeded `seed` (GRPO's rollouts, eval's samples, distillation's
    teacher): a sample never depends on its batch, on the ranks or on resuming."""
    return (((seed * 1_000_003) + step) * 1_000_033 + index) % (2**62)


def generate_all(model, tok, prompts: list[list[int]], params: list[SamplingParams], max_batch: int = 256):
    """Run prompts to completion on a throwaway engine sized for them (rollouts, evaluation, rejection sampling);
    each prompt with its own SamplingParams. Returns the Requests in order."""
    max_len = min(max(len(p) + q.max_tokens for p, q in zip(prompts, params)) + 2, model.args.max_position_embeddings)
    return Engine(model, tok, max_batch=min(max_batch, len(prompts)), max_len=max_len).generate(prompts, params)


def output_text(tok, output: list[int], eos: int) -> str:
    """A request's generated text, without its closing end-of-sequence token."""
    return tok.decode(output[:-1] if output and output[-1] == eos else output)


def make_request(rid: int, prompt: list[int], params: SamplingParams | None, max_len: int, vocab_size: int,
                 tok=None) -> Request:
    """A checked Request (NanoseekError says what is wrong), with whether the prompt leaves a thought open. Needs no
    model: the server's front end checks requests with it before they reach the engine's process."""
    params = (params or SamplingParams()).validate()
    if not prompt:
        raise NanoseekError("the prompt is empty")
    if len(prompt) >= max_len:
        raise NanoseekError(f"the prompt has {len(prompt)} tokens; the context holds {max_len}")
    if any(not 0 <= t < vocab_size for t in prompt):
        raise NanoseekError("the prompt holds token ids outside the vocabulary")
    if params.stop and tok is None:
        raise NanoseekError("stop strings need a tokenizer")
    r = Request(rid, list(prompt), params)
    if tok is not None and tok.think_id is not None:  # does generation start inside a thought?
        last_open = max((i for i, t in enumerate(prompt) if t == tok.think_id), default=-1)
        last_close = max((i for i, t in enumerate(prompt) if t == tok.end_think_id), default=-1)
        r.thinking = r.starts_thinking = last_open > last_close
    return r


class Engine:
    def __init__(self, model, tokenizer=None, max_batch: int = 8, max_len: int | None = None, absorb: bool = True,
                 dtype=None, speculative: bool = False, compile: bool = False):
        self.model = model.eval()
        self.tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.args = model.args
        self.max_len = min(max_len or self.args.max_position_embeddings, self.args.max_position_embeddings)
        self.device = model.lm_head.weight.device
        self.cache = KVCache(self.args, max_batch, self.max_len, self.device, dtype or model.lm_head.weight.dtype)
        self.absorb = absorb
        self.compile = compile and absorb  # decode steps through torch.compile (see `decode`)
        self.compile_error: str | None = None  # why compiling failed (then the engine decodes eagerly)
        if speculative and not len(model.mtp):
            raise NanoseekError("speculative decoding needs the MTP module, and this checkpoint has none")
        self.speculative = speculative
        if speculative:  # the MTP block attends over its own latent cache
            self.mtp_cache = KVCache(self.args, max_batch, self.max_len, self.device, self.cache.dtype, layers=1)
        self.spec_stats = {"drafted": 0, "accepted": 0}
        self.prefill_batch = 32  # distinct prompts per prefill forward
        self.free = list(range(max_batch))
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.eos = self.tok.eos_id if self.tok is not None else self.args.eos_token_id

    # ---- requests ----
    def add(self, prompt: list[int], params: SamplingParams | None = None) -> Request:
        """Queue a prompt; it is admitted at the next step with a free cache slot."""
        r = self.request(prompt, params)
        self.waiting.append(r)
        return r

    def request(self, prompt: list[int], params: SamplingParams | None = None) -> Request:
        """A checked Request, not queued yet (the server makes it in its handler, the engine loop queues it)."""
        r = make_request(next(self._ids), prompt, params, self.max_len, self.args.vocab_size, self.tok)
        r.speculative = self.speculative and r.params.logprobs is None and r.params.thinking_budget is None
        if r.params.seed is not None:
            r.generator = torch.Generator(device=self.device).manual_seed(r.params.seed)
        return r

    def abort(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        self._finish(request, "abort")

    def _finish(self, r: Request, reason: str) -> None:
        if r.finish_reason is None:
            r.finish_reason = reason
        if r in self.running:
            self.running.remove(r)
        if r.slot is not None:
            self.free.append(r.slot)
            r.slot = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the model ----
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, absorb: bool,
                length: int | None = None):
        """ids [n, T] at positions start[i] + t of cache rows `slots` -> logits [n, T, V] and the final normed hidden
        states [n, T, D] (writes the cache). length: attend over that many cache positions (see MLA.forward_cached)."""
        return self.model.forward_cached(ids, self.cache.kv, self.cache.pe, slots, start, absorb, length)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, slots: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """One token for each of n sequences (ids [n, 1]) -> logits [n, V]. compile=True: the compiled step, which
        attends over the whole cache (masked) so that its shapes do not change from token to token; batch 1 gets
        one graph, other batch sizes share one with a dynamic batch dim. If compiling fails: eager from then on.
        Compiled, each token reads its K experts' weights (Experts.gathered): past n·K = 2·E expert reads the eager
        grouped GEMM, which reads each expert once, is faster (measured on cpu-large), so larger batches stay eager."""
        E, K = self.args.n_routed_experts or 0, self.args.num_experts_per_tok or 0
        if self.compile and (not E or len(ids) * K <= 2 * E):
            if len(ids) > 1:  # continuous batching changes n every few steps: one graph for all n > 1
                for t in (ids, slots, start):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            return self._forward_step(ids, slots, start)[0][:, -1]
        return self.forward(ids, slots, start, absorb=self.absorb)[0][:, -1]

    def warm_up(self) -> float:
        """Compile the decode step's graphs now (batch 1, and the dynamic-batch graph where the cache has more rows),
        so that the first user does not wait for it; a short throwaway generation per shape. Returns the seconds
        taken. If compiling fails, the engine decodes eagerly and `compile_error` says why."""
        if not self.compile:
            return 0.0
        t = time.perf_counter()
        busy, self.waiting, self.running = (self.waiting, self.running), [], []
        try:
            params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=0)  # plain decode steps
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a failure is in compile_error; the caller says it in one line
                for n in sorted({1, min(2, len(self.free))}):
                    self.generate([[self.eos if self.eos >= 0 else 0] * 2] * n, params)
                if self.speculative:  # the verify graph, and the draft's after one and two accepted tokens
                    self.generate([[0, 1, 2]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
                    for n in (1, 2):  # (into rows a request's prefill overwrites before anything reads them)
                        self.draft(torch.zeros(n, self.args.hidden_size, device=self.device, dtype=self.cache.dtype),
                                   torch.zeros(n, dtype=torch.long, device=self.device), 0, 0)
        finally:
            self.waiting, self.running = busy
        return time.perf_counter() - t

    @torch.no_grad()
    def draft(self, h: torch.Tensor, next_ids: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        """MTP depth 1 over positions start.. (inputs h_t and Emb(x_{t+1})), writing its cache; returns its logits
        [V] for the token after the last of next_ids. Compiled (compile=True) for the 1 or 2 tokens after a verify;
        the prompt's draft after prefill runs eagerly."""
        # h copied: a view of the verify's output would make the compiled draft recompile (a guard on its base)
        args = (h[None].clone(), next_ids[None], self.mtp_cache.kv, self.mtp_cache.pe,
                torch.tensor([slot], device=self.device), torch.tensor([start], device=self.device))
        if self.compile and len(next_ids) <= 2:
            torch._dynamo.mark_static(args[1], 1)
            try:
                return compiled_draft()(self.model, *args, True, self.max_len)[0]
            except Exception as e:
                self._compile_failed(e)
        return self.model.mtp_forward_cached(*args, self.absorb)[0]

    @torch.no_grad()
    def _forward_step(self, ids: torch.Tensor, slots: torch.Tensor, start: torch.Tensor):
        """A few tokens per sequence (a decode step, or speculative verify: [next, draft]) -> logits [n, T, V] and h
        [n, T, D]; compiled (one static graph per T) when compile=True, eager if compiling fails."""
        if self.compile:
            torch._dynamo.mark_static(ids, 1)  # a graph per T, not a dynamic T (which the MoE's branches refuse)
            try:
                return compiled_forward()(self.model, ids, self.cache.kv, self.cache.pe, slots, start, True,
                                          self.max_len)
            except Exception as e:
                self._compile_failed(e)
        return self.forward(ids, slots, start, absorb=self.absorb)

    def _compile_failed(self, e: Exception) -> None:
        """The compiler is optional: say why once, then run eagerly."""
        self.compile, self.compile_error = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0]:.200}"
        warnings.warn(f"nanoseek: the compiled decode step failed, decoding eagerly from now on ({self.compile_error})")

    def _verify(self, r: Request) -> None:
        """One speculative step: run [x_L, draft] in one forward; keep the draft if the model agrees (two tokens
        this step), else take the model's token (one); then draft again with MTP."""
        L = len(r.prompt) + len(r.output) - 1  # cache length; output[-1] is not in it yet
        ids = torch.tensor([[r.output[-1], r.draft]], device=self.device)
        logits, h = self._forward_step(ids, torch.tensor([r.slot], device=self.device),
                                       torch.tensor([L], device=self.device))
        self.spec_stats["drafted"] += 1
        first = self._ban_stops(r, logits[0, 0].float())
        if r.params.temperature == 0:
            y = int(first.argmax())
            hit = y == r.draft
        else:
            y, hit = speculative_choice(self.probs(r, first), r.draft_probs, r.draft, r.generator)
        self.spec_stats["accepted"] += hit
        new = [y]
        self._accept(r, y)
        if hit and not r.done:
            z = self._sample(r, logits[0, 1])
            new.append(z)
            self._accept(r, z)
        if not r.done:
            self._redraft(r, h[0, :len(new)], new, L)

    def _redraft(self, r: Request, h: torch.Tensor, next_ids: list[int], start: int) -> None:
        r.draft = None
        if len(r.prompt) + len(r.output) + 1 < self.max_len:  # room to verify two tokens next step
            logits = self.draft(h, torch.tensor(next_ids, device=self.device), r.slot, start)
            if r.params.temperature == 0:
                r.draft = int(logits.argmax())
            else:  # sample the draft from the MTP head's own distribution q, kept for the acceptance test
                r.draft_probs = self.probs(r, logits)
                r.draft = draw_one(r.draft_probs, r.generator)

    # ---- sampling ----
    @staticmethod
    def probs(r: Request, logits: torch.Tensor) -> torch.Tensor:
        """The distribution sampled from: logits / temperature, restricted by top-k and top-p."""
        p = r.params
        z = logits.float() / p.temperature
        if p.top_k:
            kth = z.topk(min(p.top_k, z.numel())).values[-1]
            z = z.masked_fill(z < kth, float("-inf"))
        if p.top_p < 1:
            sz, si = z.sort(descending=True)
            mass = sz.softmax(-1)
            cut = mass.cumsum(-1) - mass >= p.top_p  # drop tokens once the mass before them reaches top_p
            z = z.index_fill(0, si[cut], float("-inf"))
        return z.softmax(-1)

    def _ban_stops(self, r: Request, logits: torch.Tensor) -> torch.Tensor:
        """Before min_tokens: eos and the stop token ids cannot be drawn (logits [..., V], returned masked)."""
        p = r.params
        if len(r.output) >= p.min_tokens:
            return logits
        banned = [t for t in (self.eos, *p.stop_token_ids) if 0 <= t < logits.shape[-1]]
        return logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf")) if banned else logits

    def _sample(self, r: Request, logits: torch.Tensor, masked: bool = False) -> int:
        """One token for r from its logits [V] (masked: _ban_stops was applied already)."""
        p = r.params
        if r.thinking and p.thinking_budget is not None and r.thinking_tokens >= p.thinking_budget:
            self._cut_thought(r)
            return self.tok.end_think_id  # the budget is spent: close the thought
        logits = logits.float() if masked else self._ban_stops(r, logits.float())
        tok = int(logits.argmax()) if p.temperature == 0 else \
            draw_one(self.probs(r, logits), r.generator)
        if p.logprobs is not None:
            lp = logits.log_softmax(-1)
            top = lp.topk(p.logprobs) if p.logprobs else None
            r.logprobs.append({"token": tok, "logprob": float(lp[tok]),
                               "top": [(int(i), float(v)) for v, i in zip(*top)] if top else []})
        return tok

    @staticmethod
    def _cut_thought(r: Request) -> None:
        """Drop the thought's unfinished line (its tokens stay in the cache rows, beyond the new length, where nothing
        attends to them before they are overwritten)."""
        cut = len(r.output) - r.line_start
        if cut:
            del r.output[r.line_start:]
            del r.logprobs[len(r.output):]
            r.thinking_tokens -= cut

    def _sample_batch(self, batch: list[Request], logits: torch.Tensor) -> list[int]:
        """_sample for each row of logits [n, V]; the plain rows (temperature only, no logprobs or budget) share one
        softmax, then each draws from its own generator as _sample would (the same tokens: a test checks)."""
        logits = logits.float()
        early = [i for i, r in enumerate(batch) if len(r.output) < r.params.min_tokens]
        if early and self.eos >= 0:  # before min_tokens: no eos (one write for the batch)
            logits[torch.tensor(early, device=logits.device), self.eos] = float("-inf")
        for i in early:
            if batch[i].params.stop_token_ids:
                logits[i] = self._ban_stops(batch[i], logits[i])
        plain = [i for i, r in enumerate(batch) if r.params.temperature > 0 and not r.params.top_k
                 and r.params.top_p >= 1 and r.params.logprobs is None
                 and not (r.thinking and r.params.thinking_budget is not None)]
        out = [None] * len(batch)
        if len(plain) > 1:
            idx = torch.tensor(plain, device=logits.device)
            temp = torch.tensor([batch[i].params.temperature for i in plain], device=logits.device)
            u = torch.tensor([uniform(batch[i].generator) for i in plain], device=logits.device)
            for i, t in zip(plain, draw((logits[idx] / temp[:, None]).softmax(-1), u).tolist()):
                out[i] = t
        for i, r in enumerate(batch):
            if out[i] is None:
                out[i] = self._sample(r, logits[i], masked=True)
        return out

    def _accept(self, r: Request, tok: int) -> None:
        """Append a sampled token; apply the stop rules."""
        r.output.append(tok)
        if r.thinking:
            if tok == self.tok.end_think_id:
                r.thinking = False
            else:
                r.thinking_tokens += 1
                if tok == self.tok.newline_id:
                    r.line_start = len(r.output)
        p = r.params
        if (tok == self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            return self._finish(r, "stop")
        if p.stop and len(r.output) >= p.min_tokens:
            r.text = self.tok.decode(r.output)
            hits = [i for i in (r.text.find(s) for s in p.stop) if i >= 0]
            if hits:
                r.text = r.text[:min(hits)]
                return self._finish(r, "stop")
        if len(r.output) >= p.max_tokens or len(r.prompt) + len(r.output) >= self.max_len:
            self._finish(r, "length")

    # ---- scheduling ----
    def step(self) -> list[Request]:
        """Admit waiting requests (prefill), then decode one token for all running ones. Returns the requests that
        got tokens or finished in this step."""
        touched, admitted = [], []
        while self.waiting and self.free:
            r = self.waiting.pop(0)
            r.slot = self.free.pop(0)
            self.running.append(r)  # before the forward: if it fails, abort() still finds and frees the request
            admitted.append(r)
        touched += self._prefill(admitted)
        seen = {id(r) for r in touched}
        for r in [r for r in self.running if id(r) not in seen and r.draft is not None]:
            self._verify(r)
            touched.append(r)
            seen.add(id(r))
        batch = [r for r in self.running if id(r) not in seen]
        if batch:
            ids = torch.tensor([[r.output[-1]] for r in batch], device=self.device)
            slots = torch.tensor([r.slot for r in batch], device=self.device)
            start = torch.tensor([len(r.prompt) + len(r.output) - 1 for r in batch], device=self.device)
            for r, tok in zip(batch, self._sample_batch(batch, self.decode(ids, slots, start))):
                self._accept(r, tok)
                touched.append(r)
        for r in touched:
            if r.done and self.tok is not None and not r.text:
                r.text = self.text(r)
        return touched

    def _prefill(self, admitted: list[Request]) -> list[Request]:
        """Prefill newly admitted requests and sample their first tokens. Distinct prompts go through the model
        together (right-padded: the causal mask keeps padding out of every real position, and a pad's cache entries
        lie beyond the prompt, overwritten by decode before anything attends to them); a repeated prompt (GRPO's
        group, n > 1) copies its first copy's cache rows. Speculative requests prefill alone (their draft needs h)."""
        firsts, distinct = {}, []
        for r in admitted:
            if r.speculative:
                logits, h = self.forward(torch.tensor([r.prompt], device=self.device),
                                         torch.tensor([r.slot], device=self.device),
                                         torch.zeros(1, dtype=torch.long, device=self.device), absorb=False)
                self._accept(r, self._sample(r, logits[0, -1]))
                if not r.done:
                    self._redraft(r, h[0], r.prompt[1:] + [r.output[-1]], 0)
            elif tuple(r.prompt) not in firsts:
                firsts[tuple(r.prompt)] = r
                distinct.append(r)
        last = {}
        for i in range(0, len(distinct), self.prefill_batch):
            chunk = distinct[i:i + self.prefill_batch]
            L = max(len(r.prompt) for r in chunk)
            ids = torch.tensor([r.prompt + [0] * (L - len(r.prompt)) for r in chunk], device=self.device)
            logits = self.forward(ids, torch.tensor([r.slot for r in chunk], device=self.device),
                                  torch.zeros(len(chunk), dtype=torch.long, device=self.device), absorb=False)[0]
            for j, r in enumerate(chunk):
                last[id(r)] = logits[j, len(r.prompt) - 1]
        plain = [(r, firsts[tuple(r.prompt)]) for r in admitted if not r.speculative]
        for r, src in plain:  # copies first: a source that finishes on its first token frees its slot below
            if src is not r:
                n = len(r.prompt)
                for kv, pe in zip(self.cache.kv, self.cache.pe):
                    kv[r.slot, :n] = kv[src.slot, :n]
                    pe[r.slot, :n] = pe[src.slot, :n]
        for r, src in plain:
            self._accept(r, self._sample(r, last[id(src)]))
        return admitted

    def text(self, r: Request) -> str:
        return output_text(self.tok, r.output, self.eos)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None):
        """Run prompts to completion (batched, continuous); returns their Requests in order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add(p, sp) for p, sp in zip(prompts, params)]
        while self.has_work:
            self.step()
        for r in reqs:
            if self.tok is not None and not r.text:
                r.text = self.text(r)
        return reqs
