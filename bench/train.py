"""One training step (forward + backward + AdamW) of the whole model: nanoseek against `transformers`'
DeepseekV3ForCausalLM on the same config, weights and batch, side by side in one run; tokens/s and MFU against the
dense matmul peak of this machine measured in the same run.

    .venv/bin/python bench/train.py                    # CPU: tiny and cpu-large
    .venv/bin/python bench/train.py --device cuda --sizes small

transformers has no MTP and no sequence-wise balance loss, so the side-by-side rows run nanoseek without them
(`num_nextn_predict_layers=0`, α=0); a last row per size shows nanoseek's full objective (MTP + balance loss).
Losses are checked equal before timing.
"""

import argparse
import statistics
import tempfile
import time

from nanoseek.config import ModelArgs, get_preset  # first: nanoseek sets torch's CPU allocator options
from nanoseek.cost import flops_per_token, measure_matmul_peak as peak, synchronize as sync
from nanoseek.model import build_model

import torch

SIZES = {
    "tiny": (dict(), 256, 16),  # preset overrides, seq_len, batch
    "cpu-large": (dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, moe_intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384,
                       kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                       n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
                       first_k_dense_replace=1, max_position_embeddings=2048), 512, 8),
    "small": (None, 2048, 8),  # the `small` preset as is
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--sizes", nargs="*", default=["tiny", "cpu-large"], choices=list(SIZES), help="model sizes")
    ap.add_argument("--reps", type=int, default=7, help="timed steps per path (median)")
    args = ap.parse_args()
    import transformers
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    pk = peak(device, dtype)
    print(f"device {device}, torch {torch.__version__}, transformers {transformers.__version__}, {dtype}, "
          f"{torch.get_num_threads()} threads; dense matmul peak {pk / 1e9:.1f} GFLOP/s")
    print(f"{'size':10} {'path':36} {'ms/step':>9} {'tok/s':>9} {'MFU':>6} {'vs transformers':>16}")
    for size in args.sizes:
        over, T, B = SIZES[size]
        base = dict(get_preset("small").to_dict()) if over is None else {**get_preset("tiny").to_dict(), **over}
        torch.manual_seed(0)
        cmp_args = ModelArgs.from_dict({**base, "num_nextn_predict_layers": 0, "seq_aux": False,
                                        "torch_dtype": "float32"}).validate()
        full_args = ModelArgs.from_dict({**base, "torch_dtype": "float32"}).validate()
        ours = build_model(cmp_args, device=device)
        with tempfile.TemporaryDirectory() as tmp:
            ours.save_pretrained(tmp)
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device)
        full = build_model(full_args, device=device)
        x = torch.randint(0, cmp_args.vocab_size, (B, T + 1), device=device, generator=None)
        inp, lab = x[:, :-1], x[:, 1:]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

        def step_fn(model, kind):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            model.train()

            def run():
                with (autocast or torch.autocast("cpu", enabled=False)):
                    if kind == "hf":
                        loss = model(input_ids=inp, labels=inp).loss  # transformers shifts the labels itself
                    else:
                        loss = model(inp, labels=lab).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss
            return run

        with torch.no_grad():  # same weights, same loss
            a = ours(inp, labels=lab).lm_loss.item()
            b = hf(input_ids=inp, labels=inp).loss.item()
        assert abs(a - b) < 1e-3 * abs(a), (a, b)
        paths = [("nanoseek (no MTP, α=0)", step_fn(ours, "ns"), cmp_args),
                 ("transformers DeepseekV3ForCausalLM", step_fn(hf, "hf"), cmp_args),
                 ("nanoseek full objective (MTP + bal.)", step_fn(full, "ns"), full_args)]
        times = {name: [] for name, _, _ in paths}
        for _, fn, _ in paths:
            fn()  # warm-up
        for _ in range(args.reps):  # round-robin against drift
            for name, fn, _ in paths:
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t)
        pk = max(pk, peak(device, dtype))
        ref = statistics.median(times["transformers DeepseekV3ForCausalLM"])
        for name, _, margs in paths:
            t = statistics.median(times[name])
            fpt = flops_per_token(margs, T)["training"]
            tps = B * T / t
            print(f"{size:10} {name:36} {t * 1e3:9.1f} {tps:9.0f} {100 * fpt * tps / pk:5.1f}% {ref / t:15.2f}x")
        print(f"{size:10} (batch {B} x seq {T}; MFU against the best dense GEMM measured so far: {pk / 1e9:.1f} "
              f"GFLOP/s; last column: transformers' time / this path's)")


if __name__ == "__main__":
    main()
