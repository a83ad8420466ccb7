"""Decoding, side by side in one run on the same weights: nanoseek's engine (latent cache, absorbed MLA; its decode
step compiled, `Engine(compile=True)`, and eager) against `transformers`' `generate` (DynamicCache, naive MLA) at
batch 1; the KV-cache bytes per token of both forms against the formula; batched throughput of the compiled engine at
batch 1, 8 and 32. Compiling happens in a warm-up run before the timed ones; its time is printed.

    .venv/bin/python bench/decode.py
    .venv/bin/python bench/decode.py --device cuda --sizes small

Greedy, eos ignored, `--new` tokens after a `--prompt`-token prompt. Outputs are checked equal first.
"""

import argparse
import statistics
import tempfile
import time

from nanoseek.config import ModelArgs, get_preset  # first: nanoseek sets torch's CPU allocator options
from nanoseek.cost import synchronize as sync
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import build_model

import torch

SIZES = {
    "tiny": dict(),
    "cpu-large": dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, moe_intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384,
                      kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                      n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
                      first_k_dense_replace=1, max_position_embeddings=2048),
    "small": None,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", nargs="*", default=["tiny", "cpu-large"], choices=list(SIZES))
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="generated tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--checkpoint", default=None, help="a trained checkpoint with MTP: measure speculative decoding")
    ap.add_argument("--data", default=None, help="its data directory (default: CHECKPOINT/../data)")
    args = ap.parse_args()
    import transformers
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    print(f"device {device}, torch {torch.__version__}, transformers {transformers.__version__}, {dtype}, "
          f"{torch.get_num_threads()} threads; prompt {args.prompt}, new {args.new}, greedy")
    for size in args.sizes:
        base = get_preset("small").to_dict() if SIZES[size] is None else {**get_preset("tiny").to_dict(),
                                                                           **SIZES[size]}
        margs = ModelArgs.from_dict({**base, "num_nextn_predict_layers": 0, "torch_dtype": str(dtype)[6:]})
        torch.manual_seed(0)
        model = build_model(margs.validate(), device=device, dtype=dtype).eval()
        with torch.no_grad():  # sharper logits than the 0.02 init: greedy paths without near-ties
            for p in model.parameters():
                if p.ndim == 2:
                    p.mul_(3)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(3, margs.vocab_size, (args.prompt,), generator=g).tolist()
        sp = SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True)

        def ours(compile=True):
            eng = Engine(model, max_batch=1, max_len=args.prompt + args.new + 1, compile=compile)
            return eng.generate([prompt], sp)[0].output

        def theirs():
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=args.new,
                                  min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)
            return out[0, args.prompt:].tolist()

        t = time.perf_counter()
        a = ours()  # compiles the batch-1 decode step
        t_compile = time.perf_counter() - t
        b, c = theirs(), ours(compile=False)
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        agree_eager = next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), len(a))
        times = {"nanoseek engine": [], "transformers generate": [], "nanoseek eager": []}
        for _ in range(args.reps):
            for name, fn in (("nanoseek engine", ours), ("transformers generate", theirs),
                             ("nanoseek eager", lambda: ours(compile=False))):
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t)
        t_ns, t_hf, t_eager = (statistics.median(times[k]) for k in times)
        print(f"\n[{size}] greedy outputs agree on the first {agree} of {args.new} tokens (compiled vs transformers), "
              f"{agree_eager} (compiled vs eager); compiling the decode step took {t_compile:.1f} s")
        print(f"  bs=1  nanoseek engine        {args.new / t_ns:8.1f} tok/s   (prefill + {args.new} decode steps, "
              f"{t_ns:.2f} s)")
        print(f"  bs=1  transformers generate  {args.new / t_hf:8.1f} tok/s   ({t_hf:.2f} s)   -> nanoseek "
              f"{t_hf / t_ns:.2f}x")
        print(f"  bs=1  nanoseek eager         {args.new / t_eager:8.1f} tok/s   ({t_eager:.2f} s)   -> "
              f"{t_hf / t_eager:.2f}x transformers")
        eng = Engine(model, max_batch=1, max_len=args.prompt + args.new + 1)
        el = eng.cache.kv[0].element_size()
        mla = margs.num_hidden_layers * (margs.kv_lora_rank + margs.qk_rope_head_dim) * el
        naive = margs.num_hidden_layers * margs.num_attention_heads * (margs.qk_head_dim + margs.v_head_dim) * el
        from transformers import DynamicCache
        cache = DynamicCache(config=hf.config)
        with torch.no_grad():
            hf(torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True)
        hf_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
                       for t in (layer.keys, layer.values) if t is not None) / args.prompt
        print(f"  KV cache bytes/token: nanoseek {eng.cache.bytes_per_token} (formula L·(kv_lora_rank + rope)·"
              f"{el} = {mla}); naive per-head k,v formula {naive}; transformers' DynamicCache holds "
              f"{hf_bytes:.0f} ({hf_bytes / eng.cache.bytes_per_token:.1f}x ours)")
        for bs in (1, 8, 32):
            prompts = [torch.randint(3, margs.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(bs)]
            t = time.perf_counter()  # warm-up: compiles the step for batches of more than one, the first time
            Engine(model, max_batch=bs, max_len=args.prompt + args.new + 1, compile=True).generate(
                prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
            t_warm = time.perf_counter() - t
            eng = Engine(model, max_batch=bs, max_len=args.prompt + args.new + 1, compile=True)
            sync(device)
            t = time.perf_counter()
            eng.generate(prompts, sp)
            sync(device)
            dt = time.perf_counter() - t
            print(f"  batch {bs:3d}: {bs * args.new / dt:9.1f} tok/s aggregate ({dt:.2f} s for {bs} x {args.new}; "
                  f"warm-up {t_warm:.1f} s)")
    if args.checkpoint:
        speculative(args.checkpoint, args.data)



def speculative(checkpoint: str, data: str | None, n_prompts: int = 8, new: int = 64):
    """MTP speculative decoding on a trained checkpoint (its MTP module trained with it): tokens/s with and without
    drafts (both compiled: the decode step, the verify and the draft), and the share of drafts accepted."""
    import json
    from pathlib import Path

    from nanoseek import from_pretrained
    model = from_pretrained(checkpoint)
    tok = model.tokenizer
    probs = Path(data or Path(checkpoint).parent / "data") / "val_problems.jsonl"
    lines = probs.read_text().splitlines()[:: max(1, len(probs.read_text().splitlines()) // n_prompts)][:n_prompts]
    prompts = [tok.encode(f"Problem: {json.loads(l)['question'].strip()}\nSolution:\n", bos=True) for l in lines]
    for temperature in (0.0, 0.6):
        res = {}
        for spec in (False, True, False, True):  # compiled, as chat and serve decode by default
            eng = Engine(model, max_batch=1, speculative=spec, compile=True)
            eng.warm_up()
            eng.spec_stats = {"drafted": 0, "accepted": 0}
            t = time.perf_counter()
            outs = [eng.generate([p], SamplingParams(max_tokens=new, temperature=temperature, top_p=0.95, seed=i))[0]
                    .output for i, p in enumerate(prompts)]
            dt = time.perf_counter() - t
            res.setdefault(spec, []).append((sum(len(o) for o in outs) / dt, outs, dict(eng.spec_stats)))
        tps = {k: statistics.median(r[0] for r in v) for k, v in res.items()}
        st = res[True][0][2]
        same = res[False][0][1] == res[True][0][1]
        print(f"\n[speculative, {checkpoint}] {n_prompts} held-out prompts x {new} tokens, batch 1, "
              f"temperature {temperature}")
        print(f"  plain {tps[False]:.1f} tok/s, MTP speculative {tps[True]:.1f} tok/s -> "
              f"{tps[True] / tps[False]:.2f}x; drafts accepted {st['accepted']}/{st['drafted']} = "
              f"{st['accepted'] / max(1, st['drafted']):.1%}" + (f"; outputs identical: {same}" if not temperature
                                                                  else " (sampled: same distribution, other draws)"))


if __name__ == "__main__":
    main()
