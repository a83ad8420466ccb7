"""The engine: greedy decoding with the latent cache (absorbed and naive attention) equals greedy decoding by repeated
full forwards; batches of different lengths and requests that join a running batch give the same tokens as each
alone; seeded sampling is reproducible and independent of the batch; top-k/top-p keep the right tokens; stop rules;
the thinking budget closes the thought; the cache holds kv_lora_rank + qk_rope_head_dim numbers per token per layer;
the compiled decode step (torch.compile, static cache) gives the eager step's logits and tokens, and a compiler failure
falls back to eager."""

import pytest
import torch

from nanoseek import ModelArgs, build_model
from nanoseek.engine import Engine, SamplingParams
from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import Tokenizer

CFG = dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
           num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
           qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, max_position_embeddings=128,
           num_nextn_predict_layers=1, torch_dtype="float32",
           rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
                         "mscale_all_dim": 1.0})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelArgs.from_dict(CFG).validate()).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy choices are not near-ties
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(4)
    return m


def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 11, 2, 17)]


def greedy_reference(model, prompt, n):
    ids = torch.tensor([prompt])
    return model.generate(ids, n)[0, len(prompt):].tolist()


@pytest.mark.parametrize("absorb", [True, False])
def test_greedy_equals_full_forwards(model, absorb):
    eng = Engine(model, max_batch=4, absorb=absorb)
    eng.eos = -1  # random weights: never stop early
    outs = eng.generate(prompts(), SamplingParams(max_tokens=12, temperature=0))
    for p, r in zip(prompts(), outs):
        assert r.output == greedy_reference(model, p, 12)
        assert r.finish_reason == "length"


def test_absorbed_equals_naive_logits(model):
    a, b = Engine(model, max_batch=2, absorb=True), Engine(model, max_batch=2, absorb=False)
    ids = torch.tensor([prompts()[1], prompts()[3][:11]])
    slots, start = torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long)
    la, lb = a.forward(ids, slots, start, True)[0], b.forward(ids, slots, start, False)[0]
    assert torch.allclose(la, lb, atol=1e-4)
    assert torch.allclose(la, model(ids), atol=1e-4)  # and both equal the training-form forward


def test_continuous_batching_equals_alone(model):
    eng = Engine(model, max_batch=2)
    eng.eos = -1
    ps = prompts()
    reqs = [eng.add(ps[0], SamplingParams(max_tokens=9, temperature=0)),
            eng.add(ps[1], SamplingParams(max_tokens=4, temperature=0))]
    eng.step(), eng.step()
    reqs.append(eng.add(ps[2], SamplingParams(max_tokens=7, temperature=0)))  # waits for a free slot
    reqs.append(eng.add(ps[3], SamplingParams(max_tokens=5, temperature=0)))
    while eng.has_work:
        eng.step()
        assert len(eng.running) <= 2
    for p, r in zip(ps, reqs):
        assert r.output == greedy_reference(model, p, r.params.max_tokens)
    assert sorted(eng.free) == [0, 1]


def test_seeded_sampling_independent_of_batch(model):
    sp = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    alone = Engine(model, max_batch=1)
    alone.eos = -1
    a = alone.generate([prompts()[0]], sp)[0].output
    crowd = Engine(model, max_batch=4)
    crowd.eos = -1
    ps = prompts()
    outs = crowd.generate(ps[1:] + ps[:1], [SamplingParams(max_tokens=10, temperature=1.0, seed=i) for i in range(3)]
                          + [sp])
    assert outs[3].output == a
    for i in range(3):  # the plain rows share one batched softmax (Engine._sample_batch): still their own tokens
        one = Engine(model, max_batch=1)
        one.eos = -1
        assert one.generate([ps[1 + i]], SamplingParams(max_tokens=10, temperature=1.0, seed=i))[0].output == \
            outs[i].output
    again = Engine(model, max_batch=1)
    again.eos = -1
    assert again.generate([ps[0]], sp)[0].output == a


def test_inverse_cdf_draw():
    from nanoseek.engine import draw
    p = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    u = torch.arange(10_000) / 10_000  # evenly spread: the counts are the probabilities exactly
    toks = draw(p.expand(len(u), -1), u)
    assert torch.bincount(toks, minlength=6).tolist() == [0, 5000, 0, 3000, 2000, 0]
    edge = draw(p, torch.tensor([1 - 2**-24]))  # u·S rounding up to S must not land on a weightless last token
    assert int(edge) == 4


def test_repeated_prompt_shares_prefill(model, monkeypatch):
    """A GRPO group (one prompt, n seeds) prefills once and copies the cache rows, distinct prompts prefill together
    (right-padded); outputs equal separate runs."""
    ps = prompts()
    sps = [SamplingParams(max_tokens=8, temperature=1.0, seed=s) for s in range(4)]
    alone = []
    for sp in sps:
        eng = Engine(model, max_batch=1)
        eng.eos = -1
        alone.append(eng.generate([ps[3]], sp)[0].output)
    eng = Engine(model, max_batch=6)
    eng.eos = -1
    calls = []
    fwd = eng.forward
    monkeypatch.setattr(eng, "forward", lambda ids, *a, **k: calls.append(ids.shape) or fwd(ids, *a, **k))
    outs = eng.generate([ps[3]] * 4 + [ps[1]], sps + [SamplingParams(max_tokens=8, temperature=0)])
    assert [r.output for r in outs[:4]] == alone
    assert outs[4].output == greedy_reference(model, ps[1], 8)
    prefills = [tuple(s) for s in calls if s[1] > 1]
    assert prefills == [(2, len(ps[3]))]  # one padded prefill of the two distinct prompts; the 3 copies share it


def test_top_k_top_p_by_hand(model):
    eng = Engine(model)
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0, -1.0])
    for seed in range(30):
        r = eng.add([1], SamplingParams(temperature=1.0, top_k=2, seed=seed))
        assert eng._sample(r, logits) in (1, 2)
        # probabilities 0.64, 0.24, 0.09, ...: top_p 0.7 keeps the two most likely
        r = eng.add([1], SamplingParams(temperature=1.0, top_p=0.7, seed=seed))
        assert eng._sample(r, logits) in (1, 2)
        r = eng.add([1], SamplingParams(temperature=1.0, top_p=0.5, seed=seed))
        assert eng._sample(r, logits) == 1
    r = eng.add([1], SamplingParams(temperature=0, logprobs=2))
    assert eng._sample(r, logits) == 1
    lp = logits.log_softmax(-1)
    assert abs(r.logprobs[0]["logprob"] - lp[1].item()) < 1e-6 and [t for t, _ in r.logprobs[0]["top"]] == [1, 2]


@pytest.fixture(scope="module")
def tok():
    from nanoseek.data.corpus import reasoning_texts
    return Tokenizer.train(reasoning_texts(200, seed=1), vocab_size=300)


def test_thinking_budget_and_stops(model, tok):
    """A thinking budget closes the thought within budget tokens, cutting an unfinished line back to the last whole
    one (as eval --budgets measures it); streams hold a budgeted thought's line back until it is whole."""
    eng = Engine(model, tokenizer=tok, max_batch=2)
    eng.eos = -1
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])  # ends inside <think>
    nl, cut_back = tok.newline_id, 0
    for seed in range(8):
        for budget in (0, 3, 7):
            r = eng.add(prompt, SamplingParams(max_tokens=15, temperature=1.0, seed=seed, thinking_budget=budget))
            streamed = []
            while eng.has_work:
                eng.step()
                streamed += r.stream()
            assert streamed == r.output  # a stream never hands out a token that the budget later cuts back
            assert r.starts_thinking and not r.thinking  # where it started stays known (a stream's splitter needs it)
            closes = [i for i, t in enumerate(r.output) if t == tok.end_think_id]
            assert closes, r.output
            thought = r.output[:closes[0]]
            assert r.thinking_tokens == len(thought) <= budget  # closed within the budget
            # closed by the model itself (before the budget ran out), or cut back to its last whole line
            assert len(thought) < budget or not thought or thought[-1] == nl


def test_budget_cuts_back_to_the_last_whole_line(model, tok, monkeypatch):
    """With decode steered to write lines of three tokens and never close the thought itself, a budget of 7 keeps
    the two whole lines (6 tokens), drops the unfinished third, closes the thought and answers."""
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])
    nl, P = tok.newline_id, len(prompt)
    decode = Engine.decode

    def steered(self, ids, slots, start):
        logits = decode(self, ids, slots, start).clone()
        logits[:, tok.end_think_id] = float("-inf")
        for i, s in enumerate(start.tolist()):
            if (s - P + 1) % 3 == 2:  # the output token being sampled is the third of its line
                logits[i, nl] = 1e4
            else:
                logits[i, nl] = float("-inf")
        return logits
    monkeypatch.setattr(Engine, "decode", steered)
    eng = Engine(model, tokenizer=tok, max_batch=1)
    eng.eos = -1
    for budget, kept in ((7, 6), (6, 6), (5, 3), (2, 0)):
        r = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=1, thinking_budget=budget))[0]
        assert r.output.index(tok.end_think_id) == kept == r.thinking_tokens, (budget, r.output)
        assert all(r.output[i] == nl for i in range(2, kept, 3))
        assert len(r.output) == 12  # the answer follows
    r = eng.generate([prompt], SamplingParams(max_tokens=15, temperature=0, stop_token_ids=(tok.end_think_id,),
                                              thinking_budget=2))[0]
    assert r.output[-1] == tok.end_think_id and r.finish_reason == "stop" and len(r.output) <= 3
    free = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    text = tok.decode(free.output)
    stop = text[3:6]
    if stop.strip():
        r = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))[0]
        assert r.finish_reason == "stop" and stop not in r.text and text.startswith(r.text)


def test_cache_size_and_bad_requests(model):
    eng = Engine(model, max_batch=2)
    a = model.args
    assert eng.cache.bytes_per_token == a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * 4
    with pytest.raises(NanoseekError):
        eng.add([], SamplingParams())
    with pytest.raises(NanoseekError):
        eng.add([1] * 200, SamplingParams())
    with pytest.raises(NanoseekError):
        eng.add([1], SamplingParams(top_p=0))
    with pytest.raises(NanoseekError):
        eng.add([1], SamplingParams(temperature=-1))
    with pytest.raises(NanoseekError):
        eng.add([5000], SamplingParams())
    r = eng.add([1, 2, 3], SamplingParams(max_tokens=50))
    eng.step()
    eng.abort(r)
    assert r.finish_reason == "abort" and sorted(eng.free) == [0, 1] and not eng.has_work


def test_mtp_speculative_equals_plain_greedy(model):
    """Drafting with the MTP module and verifying in one forward changes nothing in greedy output; the acceptance
    counts are reported. (A model whose MTP head copies the main head accepts every draft it can.)"""
    plain = Engine(model, max_batch=4)
    plain.eos = -1
    spec = Engine(model, max_batch=4, speculative=True)
    spec.eos = -1
    sp = SamplingParams(max_tokens=15, temperature=0)
    a = plain.generate(prompts(), sp)
    b = spec.generate(prompts(), sp)
    assert [r.output for r in a] == [r.output for r in b]
    st = spec.spec_stats
    assert st["drafted"] > 0 and 0 <= st["accepted"] <= st["drafted"]
    steps = st["drafted"]
    assert steps < 4 * 14 or st["accepted"] == 0  # accepted drafts save forwards
    with pytest.raises(NanoseekError):
        Engine(build_model(ModelArgs.from_dict({**CFG, "num_nextn_predict_layers": 0})), speculative=True)


def test_speculative_choice_keeps_the_target_distribution():
    from nanoseek.engine import speculative_choice
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1])
    counts = torch.zeros(5)
    accepted = 0
    n = 20000
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        y, hit = speculative_choice(p, q, d, g)
        counts[y] += 1
        accepted += hit
    assert (counts / n - p).abs().max() < 0.015  # the output follows p, not q
    assert abs(accepted / n - torch.minimum(p, q).sum().item()) < 0.015  # acceptance = Σ min(p, q)
    assert speculative_choice(p, p.clone(), 2, g) == (2, True)  # q == p: always kept


def test_speculative_sampling_reproducible(model):
    sp = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=11)
    runs = []
    for _ in range(2):
        eng = Engine(model, max_batch=2, speculative=True)
        eng.eos = -1
        runs.append([r.output for r in eng.generate(prompts()[:2], sp)])
        assert eng.spec_stats["drafted"] > 0
    assert runs[0] == runs[1] and all(len(o) == 12 for o in runs[0])


def test_compiled_decode_equals_eager(model):
    """Engine(compile=True) decodes through torch.compile (batch 1, then a dynamic batch); same tokens as eager."""
    ps, sp = prompts(), [SamplingParams(max_tokens=n, temperature=0) for n in (6, 9, 4, 7)]
    outs = {}
    for compile in (False, True):
        eng = Engine(model, max_batch=2, compile=compile)
        eng.eos = -1
        outs[compile] = [r.output for r in eng.generate(ps, sp)]
        assert eng.compile == compile  # compiled all the way: no fallback
    assert outs[True] == outs[False]
    eng = Engine(model, max_batch=2, compile=True)
    eng.forward(torch.tensor([ps[1]]), torch.tensor([1]), torch.zeros(1, dtype=torch.long), absorb=False)  # prefill
    ids, slots, start = torch.tensor([[7]]), torch.tensor([1]), torch.tensor([len(ps[1])])
    compiled = eng.decode(ids, slots, start)
    eng.compile = False
    assert torch.allclose(compiled, eng.decode(ids, slots, start), atol=1e-5)


def test_compile_failure_falls_back_to_eager(model, monkeypatch):
    import nanoseek.engine as engine

    def broken():
        def fail(*args):
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(engine, "compiled_forward", broken)
    eng = Engine(model, max_batch=1, compile=True)
    eng.eos = -1
    with pytest.warns(UserWarning, match="decoding eagerly"):
        out = eng.generate([prompts()[0]], SamplingParams(max_tokens=5, temperature=0))[0].output
    assert out == greedy_reference(model, prompts()[0], 5) and not eng.compile


def test_min_tokens_and_ignore_eos(model):
    """vLLM's min_tokens: eos and stop token ids cannot end generation before min_tokens (they are masked, so the
    sample differs from an unmasked one only there); ignore_eos: generation runs past eos to max_tokens."""
    eng = Engine(model, max_batch=2)
    prompt = [5, 6, 7, 8]
    free = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].output
    eng.eos = free[2]  # make the third greedy token the end of the sequence
    stop_early = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    assert stop_early.output[-1] == eng.eos and len(stop_early.output) <= 3 and stop_early.finish_reason == "stop"
    for params in (SamplingParams(max_tokens=12, temperature=0, min_tokens=6),
                   SamplingParams(max_tokens=12, temperature=1.0, seed=3, min_tokens=6),
                   SamplingParams(max_tokens=12, temperature=0, min_tokens=6, stop_token_ids=(free[4],))):
        r = eng.generate([prompt], params)[0]
        assert len(r.output) >= 6 and eng.eos not in r.output[:5] and set(params.stop_token_ids).isdisjoint(r.output[:5])
    r = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert len(r.output) == 12 and r.output[:3] == free[:3] and r.finish_reason == "length"
    with pytest.raises(NanoseekError):
        SamplingParams(max_tokens=4, min_tokens=5).validate()


def test_compiled_speculative_equals_plain_greedy(model):
    """MTP speculative decoding with the verify and the draft compiled gives plain greedy decoding's tokens."""
    ps, sp = prompts()[:2], SamplingParams(max_tokens=14, temperature=0)
    plain = Engine(model, max_batch=2)
    plain.eos = -1
    ref = [r.output for r in plain.generate(ps, sp)]
    eng = Engine(model, max_batch=2, speculative=True, compile=True)
    eng.eos = -1
    eng.warm_up()
    assert [r.output for r in eng.generate(ps, sp)] == ref
    assert eng.compile and eng.spec_stats["drafted"] > 0  # compiled all the way: no fallback
