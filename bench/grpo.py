"""One GRPO step, timed by part — rollout, reward, training — and the rollout's tokens/s against `transformers`
`generate` producing the same number of samples from the same checkpoint, side by side in one run.

    .venv/bin/python bench/grpo.py --checkpoint out/speedrun/sft/model
    .venv/bin/python bench/grpo.py --checkpoint out/speedrun/sft/model --prompts 16 --group 8 --device cuda

Rollouts: `--prompts` problems × `--group` samples at temperature 1, up to `--new` tokens each (eos ends a sample).
nanoseek: the engine (latent cache, continuous batching of all samples, per-sample seeds). transformers: one batched
`generate` call over the same prompts (left-padded, do_sample, DynamicCache). Both from the same weights (the
checkpoint is in the format transformers reads). The step itself is `nanoseek rl` run for one step (its own timers).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanoseek import from_pretrained  # first: nanoseek sets torch's CPU allocator options
from nanoseek.cost import synchronize as sync

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="an SFT checkpoint (model directory with tokenizer)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=96, help="max new tokens per sample")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    import transformers
    from nanoseek.data.tasks import RL_FAMILIES, problem_pool
    from nanoseek.engine import sample_seed
    from nanoseek.train.rl import rollout
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = from_pretrained(args.checkpoint, device=device, dtype=dtype)
    tok = model.tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to(device).eval()
    problems = problem_pool(RL_FAMILIES, -(-args.prompts // len(RL_FAMILIES)), 7, 600)[:args.prompts]
    prompts = [tok.prompt_ids(p) for p in problems]
    n = args.prompts * args.group
    print(f"device {device}, torch {torch.__version__}, transformers {transformers.__version__}, {dtype}, "
          f"{torch.get_num_threads()} threads; {args.prompts} prompts x G={args.group}, <= {args.new} new tokens, "
          f"temperature 1")

    def ours():
        reqs = rollout(model, tok, prompts, args.group, dict(max_tokens=args.new, temperature=1.0, top_p=1.0),
                       [sample_seed(0, 0, i) for i in range(n)])
        return sum(len(r.output) for r in reqs)

    def theirs():
        L = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.eos_id] * (L - len(p)) + p for p in prompts for _ in range(args.group)],
                           device=device)
        att = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts for _ in range(args.group)],
                           device=device)
        torch.manual_seed(0)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=att, max_new_tokens=args.new, do_sample=True, temperature=1.0,
                              top_p=1.0, top_k=0, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
        gen = out[:, L:]
        # tokens up to and including the first eos of each row (what the engine counts)
        lengths = [(row == tok.eos_id).nonzero()[0].item() + 1 if (row == tok.eos_id).any() else len(row)
                   for row in gen]
        return sum(lengths)

    res = {"nanoseek engine": [], "transformers generate": []}
    for _ in range(args.reps):
        for name, fn in (("nanoseek engine", ours), ("transformers generate", theirs)):
            sync(device)
            t = time.perf_counter()
            tokens = fn()
            sync(device)
            res[name].append((tokens / (time.perf_counter() - t), tokens, time.perf_counter() - t))
    print("\nrollout throughput (median of reps):")
    tps = {}
    for name, rows in res.items():
        tps[name] = statistics.median(r[0] for r in rows)
        print(f"  {name:22} {tps[name]:9.1f} tok/s  ({statistics.median(r[1] for r in rows):.0f} tokens in "
              f"{statistics.median(r[2] for r in rows):.2f} s)")
    print(f"  -> nanoseek {tps['nanoseek engine'] / tps['transformers generate']:.2f}x transformers")

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "nanoseek", "rl", "--init", args.checkpoint, "--out", f"{tmp}/rl",
               "--prompts", str(args.prompts), "--group", str(args.group), "--max-new-tokens", str(args.new),
               "--max-steps", "2", "--eval-every", "1000", "--problems", "50", "--device", args.device]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows = [json.loads(l) for l in (Path(tmp) / "rl" / "metrics.jsonl").read_text().splitlines()]
    r = rows[-1]  # the second step: warm
    print(f"\none GRPO step ({args.prompts} x {args.group} samples, β 0.001 so a reference forward too), "
          f"{r['step_seconds']:.2f} s:")
    for part in ("rollout", "reward", "train"):
        print(f"  {part:8} {r[part + '_seconds']:7.2f} s  {100 * r[part + '_seconds'] / r['step_seconds']:5.1f}%")
    print(f"  rollout {r['rollout_tokens_per_s']:.0f} tok/s, mean response {r['response_length']:.1f} tokens")


if __name__ == "__main__":
    main()
