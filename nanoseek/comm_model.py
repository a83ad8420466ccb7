"""The communication budget of cross-node expert parallelism: one MoE layer, one micro-batch (V3 tech report §3.2).

V3 trains with 64-way expert parallelism (EP) over 8 nodes of 8 H800s (§3.2). Every MoE layer then moves each token
twice across GPUs: *dispatch* (the token's hidden state to the GPUs holding its experts, in FP8 with one FP32 scale
per 1×128 tile, §3.3.3) and *combine* (the experts' outputs back, in BF16). The report's reasoning, which this module
reproduces from the cluster's figures and the model's shape:

- **~1:1.** The forward FLOPs of a layer (MLA + shared expert + K routed experts) against the bytes of dispatch and
  combine over InfiniBand come out at roughly one to one, so communication cannot hide behind computation unless the
  schedule overlaps a forward chunk with a backward one: DualPipe (§3.2.1).
- **Node-limited routing + NVLink forwarding (§2.1.2, §3.2.2).** Each token's experts lie on at most M nodes (V3: M=4,
  the router's `topk_group`). A token crosses IB once per target node, to the GPU with the same in-node index, which
  forwards it over NVLink to the GPUs of that node holding its experts. NVLink (~160 GB/s) is ~3.2× IB (50 GB/s), so
  one IB arrival can fan out to ~3.2 GPUs in the time it took: ~3.2 experts per node "for free", 4 × 3.2 ≈ 13 experts
  per token at the cost of 8.
- **~20 SMs.** The all-to-all runs on SMs taken from computation (warp-specialised kernels, §3.2.2); the report says
  20 of the H800's 132 suffice to saturate IB and NVLink. With s SMs reserved, compute slows to (132 - s)/132 of its
  speed and communication is capped by s SMs' copy rate: step ≈ max(compute, comm) with full overlap, compute + comm
  without.

Compute assumes an MFU of the dense FP8 peak (default 40%, ~790 TFLOP/s on H800: below DeepGEMM's 1.2–1.35 PFLOP/s
grouped GEMMs at V3's shapes, above the ~386 TFLOP/s whole-run average V3's GPU-hours imply); the ratio to
communication moves as 1/MFU, so `--mfu` is the knob to try.

Traffic model (per GPU, balanced load, experts spread evenly, a token's experts drawn uniformly): with N nodes of
`gpus_per_node` GPUs, E experts and K per token, a token's experts fall on D̄ = N·(1 - P(a node holds none)) nodes;
node-limited routing caps this at M. Of those target nodes (N-1)/N are remote (one IB send each); on each, K/min(M, D̄)
experts lie on some number of distinct GPUs, of which all but the forwarding GPU (held with chance 1/gpus_per_node)
take one NVLink send. The IB and NVLink legs are pipelined in chunks (§3.2.2), so a phase takes the longest leg. Router
metadata (top-k indices and weights, ~1% of the bytes) and latency are left out.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch

from nanoseek.config import ModelArgs
from nanoseek.cost import attention_flops_per_token
from nanoseek.errors import NanoseekError
from nanoseek.model import Block

SCALE_TILE = 128  # dispatch sends FP8 activations with one FP32 scale per 1×128 tile (§3.3.2, §3.3.3)
PAPER_COMM_SMS = 20  # "20 SMs" suffice to saturate IB and NVLink on H800 (§3.2.2)
DEEPEP = {"sms": 24, "nvlink_gbps": (153, 158), "rdma_gbps": (43, 58)}  # DeepEP normal kernels on H800 (docs/legacy.md)


@dataclass(frozen=True)
class Cluster:
    """Per-GPU figures: link bandwidths are one direction, GB/s; `tflops` is the dense (no 2:4 sparsity) FP8 peak,
    the precision V3's GEMMs run in (§3.3); `sm_gbps` what one SM moves, communicating (see `calibrated_sm_gbps`)."""
    name: str
    gpus_per_node: int
    nvlink_gbps: float
    ib_gbps: float
    sms: int
    tflops: float
    sm_gbps: float
    source: str = ""


def calibrated_sm_gbps(nvlink_gbps: float = 160.0, ib_gbps: float = 50.0, sms: int = PAPER_COMM_SMS) -> float:
    """Bytes per second one SM moves when it communicates, calibrated on V3's H800 statement.

    The evidence only bounds it from below: V3 (§3.2.2) saturates IB (50 GB/s) and NVLink (160 GB/s) at once with
    20 SMs; DeepEP's V3-setting kernels reach 153–158 GB/s over NVLink (intranode EP8) and 43–58 GB/s over RDMA
    (internode EP16–64) with 24 SMs, i.e. saturated too. The smallest rate consistent with all three is the report's:
    (160 + 50) GB/s over 20 SMs = 10.5 GB/s per SM, every byte on either link being driven by one SM (IB sends,
    IB→NVLink forwards, NVLink receives are warp roles inside the same channels). It is a property of the kernel, not
    of the SM: DeepEP V2 (GPU-initiated networking) brought V3-like training from 24 SMs to 4–6.
    """
    return (nvlink_gbps + ib_gbps) / sms


CLUSTERS = {
    "h800": Cluster("h800", gpus_per_node=8, nvlink_gbps=160.0, ib_gbps=50.0, sms=132, tflops=1979.0,
                    sm_gbps=calibrated_sm_gbps(),
                    source="V3 tech report §3.1, §3.2.2, §3.5.1 (8 GPUs/node, NVLink ~160 GB/s, IB 50 GB/s, "
                           "132 SMs); DeepEP docs/legacy.md (CX7 400 Gb/s ~50 GB/s); FP8 dense peak of the H100 die"),
    "h100": Cluster("h100", gpus_per_node=8, nvlink_gbps=450.0, ib_gbps=50.0, sms=132, tflops=1979.0,
                    sm_gbps=calibrated_sm_gbps(),
                    source="NVLink 900 GB/s bidirectional = 450 per direction (NVIDIA H100 SXM5 spec, not a measured "
                           "rate); one 400 Gb/s CX7 NIC per GPU assumed as on H800; per-SM rate calibrated on H800"),
}


def cluster(name: str, **overrides) -> Cluster:
    """A built-in cluster with the given figures replaced (None keeps the built-in one); every figure must be > 0."""
    if name not in CLUSTERS:
        raise NanoseekError(f"unknown --cluster {name!r}; choose from {', '.join(CLUSTERS)}")
    c = dataclasses.replace(CLUSTERS[name], **{k: v for k, v in overrides.items() if v is not None})
    for field in ("gpus_per_node", "nvlink_gbps", "ib_gbps", "sms", "tflops", "sm_gbps"):
        if not getattr(c, field) > 0:
            raise NanoseekError(f"--{field.replace('_', '-')} must be > 0, got {getattr(c, field)}")
    return c


# ---- the layer's computation ----------------------------------------------------------------------------------------

def moe_layer_flops(args: ModelArgs, seq_len: int = 4096) -> float:
    """Forward FLOPs per token of one MoE decoder layer: 2 × its matmul weights a token touches (MLA's projections, the
    router, the shared experts, K of the E routed experts) + the attention core over a causal sequence of seq_len.
    Counted on a block built on the meta device, so it follows the model's own code."""
    moe_id = next((i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)), None)
    if moe_id is None:
        raise NanoseekError("the model has no MoE layer: --cluster budgets expert parallelism's all-to-all")
    with torch.device("meta"):
        block = Block(args, moe_id)
    routed_share = args.num_experts_per_tok / args.n_routed_experts
    weights = sum(p.numel() * (routed_share if name.startswith("mlp.experts.") else 1)
                  for name, p in block.named_parameters() if p.ndim >= 2)  # norms and biases are not matmuls
    return 2 * weights + attention_flops_per_token(args, seq_len)


# ---- routing and traffic --------------------------------------------------------------------------------------------

def p_none(total: float, held: float, k: float) -> float:
    """Chance that k draws without replacement from `total` items miss all `held` of them, C(total-held, k)/C(total, k)
    (through lgamma, so a fractional k, an average, works)."""
    if total - held - k + 1 <= 0:
        return 0.0
    return math.exp(math.lgamma(total - held + 1) + math.lgamma(total - k + 1)
                    - math.lgamma(total - held - k + 1) - math.lgamma(total + 1))


def routing(args: ModelArgs, c: Cluster, gpus: int, node_limit: int | None = None) -> dict:
    """Where a token's K experts lie on `gpus` GPUs of cluster c, and the IB and NVLink sends that costs per token.
    node_limit (M) defaults to the model's `topk_nodes`, else its `topk_group` when it routes by groups (V3: 4 of 8
    groups, one per node), else no limit; it is capped at the nodes there are."""
    if gpus < 1:
        raise NanoseekError(f"--gpus must be > 0, got {gpus}")
    gpn = min(gpus, c.gpus_per_node)  # GPUs per node in use
    if gpus % gpn:
        raise NanoseekError(f"--gpus {gpus} is not a whole number of {c.gpus_per_node}-GPU nodes")
    nodes = gpus // gpn
    if node_limit is None:  # the config's M (`topk_nodes`), else V3's way: groups = nodes, M = topk_group
        m = args.topk_nodes or (args.topk_group if (args.n_group or 1) > 1 else None)
        node_limit = min(m or nodes, nodes)
    elif not 1 <= node_limit <= nodes:
        raise NanoseekError(f"--node-limit must be in [1, {nodes}] (the nodes of {gpus} GPUs), got {node_limit}")
    E, K = args.n_routed_experts, args.num_experts_per_tok
    nodes_with = min(nodes, E)  # nodes holding experts
    nodes_hit = nodes_with * (1 - p_none(E, E / nodes_with, K))  # distinct nodes of K uniform experts
    nodes_per_token = min(node_limit, nodes_hit)  # node-limited routing (§2.1.2)
    experts_per_node = K / nodes_per_token
    node_experts = E / nodes_with
    gpus_with = min(gpn, node_experts)  # GPUs of a node holding experts
    gpus_hit = gpus_with * (1 - p_none(node_experts, node_experts / gpus_with, experts_per_node))
    ib_sends = nodes_per_token * (nodes - 1) / nodes  # the source's own node needs no IB
    nvlink_sends = nodes_per_token * gpus_hit * (gpn - 1) / gpn  # the forwarding GPU may hold one itself
    return {"n_routed_experts": E, "num_experts_per_tok": K, "nodes": nodes, "gpus_per_node": gpn,
            "node_limit": node_limit, "nodes_hit_unlimited": nodes_hit,
            "nodes_per_token": nodes_per_token, "experts_per_node": experts_per_node, "gpus_per_node_hit": gpus_hit,
            "ib_sends_per_token": ib_sends, "nvlink_sends_per_token": nvlink_sends}


def token_bytes(args: ModelArgs) -> dict[str, float]:
    """Bytes of one token's hidden state: dispatch in FP8 + FP32 scales per 1×128 tile, combine in BF16 (§3.3.3)."""
    h = args.hidden_size
    return {"dispatch": h * 1 + math.ceil(h / SCALE_TILE) * 4, "combine": h * 2}


def phase_ms(ib_bytes: float, nvlink_bytes: float, c: Cluster, comm_sms: float | None = None) -> float:
    """One all-to-all phase in ms, its legs pipelined: the slowest of IB, NVLink and (given comm_sms) the SMs'
    copying."""
    t = max(ib_bytes / c.ib_gbps, nvlink_bytes / c.nvlink_gbps)
    if comm_sms is not None:
        t = max(t, (ib_bytes + nvlink_bytes) / (comm_sms * c.sm_gbps))
    return t / 1e6  # bytes / (GB/s) = ns


# ---- the budget -----------------------------------------------------------------------------------------------------

def comm_ms(traffic: dict, c: Cluster, comm_sms: float | None = None) -> float:
    """Dispatch then combine (one after the other in a chunk: the experts' MLP lies between them)."""
    return sum(phase_ms(traffic[p]["ib_bytes"], traffic[p]["nvlink_bytes"], c, comm_sms)
               for p in ("dispatch", "combine"))


def step_row(compute_ms: float, traffic: dict, c: Cluster, s: int) -> dict:
    """s SMs communicate: the other sms - s compute (slower by sms/(sms - s)); DualPipe overlaps, else they add."""
    comp, comm = compute_ms * c.sms / (c.sms - s), comm_ms(traffic, c, s)
    return {"comm_sms": s, "compute_ms": comp, "comm_ms": comm, "overlapped_ms": max(comp, comm),
            "serial_ms": comp + comm}


def budget(args: ModelArgs, c: Cluster, gpus: int = 64, tokens: int = 4096, mfu: float = 0.4, seq_len: int = 4096,
           node_limit: int | None = None, sm_counts=None) -> dict:
    """Per micro-batch of `tokens` tokens per GPU and per MoE layer: compute, dispatch and combine times, the SMs the
    communication needs, and the step time against the SMs reserved for it (rows of `sm_counts`)."""
    if not tokens > 0:
        raise NanoseekError(f"--tokens-per-microbatch must be > 0, got {tokens}")
    if not 0 < mfu <= 1:
        raise NanoseekError(f"--mfu is a fraction in (0, 1], got {mfu}")
    if c.sms < 2:
        raise NanoseekError(f"--sms must be >= 2 (some to communicate, the rest to compute), got {c.sms}")
    for s in sm_counts or ():
        if not 1 <= s < c.sms:
            raise NanoseekError(f"--comm-sms {s}: SMs reserved for communication must be in [1, {c.sms - 1}] "
                                f"(the GPU has {c.sms})")
    r = routing(args, c, gpus, node_limit)
    tb = token_bytes(args)
    traffic = {}
    for phase, b in tb.items():
        ib, nvl = tokens * r["ib_sends_per_token"] * b, tokens * r["nvlink_sends_per_token"] * b
        traffic[phase] = {"bytes_per_token": b, "ib_bytes": ib, "nvlink_bytes": nvl,
                          "ib_ms": ib / c.ib_gbps / 1e6, "nvlink_ms": nvl / c.nvlink_gbps / 1e6,
                          "ms": phase_ms(ib, nvl, c)}
    flops = moe_layer_flops(args, seq_len)
    compute = flops * tokens / (c.tflops * 1e12 * mfu) * 1e3
    link_ms = comm_ms(traffic, c)
    sm_bytes = sum(t["ib_bytes"] + t["nvlink_bytes"] for t in traffic.values())
    sms_needed = sm_bytes / (c.sm_gbps * link_ms * 1e6) if link_ms else 0.0  # fewer, and the SMs are the bottleneck
    sms_saturate = math.ceil((c.ib_gbps + c.nvlink_gbps) / c.sm_gbps - 1e-9)
    # GPUs per node one IB arrival reaches over NVLink in the IB send's time: the paper's "3.2 experts per node"
    per_ib = r["ib_sends_per_token"] / r["nodes_per_token"]
    free = c.nvlink_gbps / c.ib_gbps * per_ib / ((r["gpus_per_node"] - 1) / r["gpus_per_node"]) \
        if per_ib and r["gpus_per_node"] > 1 else None
    layer = {"flops_per_token": flops, "compute_ms": compute, "dispatch_ms": traffic["dispatch"]["ms"],
             "combine_ms": traffic["combine"]["ms"], "comm_ms": link_ms, "compute_to_comm": compute / link_ms
             if link_ms else None, "comm_sms": sms_saturate, "comm_sms_layer": math.ceil(sms_needed - 1e-9),
             "experts_per_node_free": free, "experts_per_token_free": free * r["node_limit"] if free else None,
             **r, "dispatch": traffic["dispatch"], "combine": traffic["combine"]}
    default = {4, 8, 12, 16, 20, 24, 32, 40, 48, layer["comm_sms_layer"], sms_saturate, DEEPEP["sms"]}
    rows = sorted(set(sm_counts) if sm_counts else {s for s in default if 1 <= s < c.sms})
    table = [step_row(compute, traffic, c, s) for s in rows]
    best = min(range(1, c.sms), key=lambda s: step_row(compute, traffic, c, s)["overlapped_ms"])
    return {"model_layers": args.num_hidden_layers,
            "moe_layers": sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers)),
            "cluster": dataclasses.asdict(c), "gpus": gpus, "tokens_per_microbatch": tokens, "mfu": mfu,
            "seq_len": seq_len, "peak": "dense FP8" if c.tflops == CLUSTERS[c.name].tflops else "as given",
            "layer": layer, "step_table": table,
            "best_overlapped": step_row(compute, traffic, c, best), "deepep": deepep_check(args, c, gpus, node_limit)}


def deepep_check(args: ModelArgs, c: Cluster, gpus: int, node_limit: int | None) -> dict:
    """The bandwidths this model gives with DeepEP's 24 SMs, beside DeepEP's H800 measurements: NVLink on one node
    (intranode EP8) and IB on `gpus` GPUs (internode; None on a single node)."""
    s, b = DEEPEP["sms"], token_bytes(args)["dispatch"]
    one = routing(args, c, c.gpus_per_node)
    nvl = one["nvlink_sends_per_token"] * b
    out = {"sms": s, "nvlink_gbps_model": nvl / phase_ms(0, nvl, c, s) / 1e6 if nvl else None,
           "nvlink_gbps_measured": list(DEEPEP["nvlink_gbps"]), "rdma_gbps_model": None,
           "rdma_gbps_measured": list(DEEPEP["rdma_gbps"])}
    r = routing(args, c, gpus, node_limit)
    ib, nvl = r["ib_sends_per_token"] * b, r["nvlink_sends_per_token"] * b
    if ib:
        out["rdma_gbps_model"] = ib / phase_ms(ib, nvl, c, s) / 1e6
    return out


# ---- output ---------------------------------------------------------------------------------------------------------

def _num(x, fmt=".1f", none="-"):
    return none if x is None else format(x, fmt)


def _bound(t: dict) -> str:
    slow, fast = ("IB", "NVLink") if t["ib_ms"] >= t["nvlink_ms"] else ("NVLink", "IB")
    if not t["ms"]:
        return "no traffic"
    if not t[fast.lower() + "_ms"]:
        return f"{slow} only"
    return f"{slow}-bound; {fast} busy {100 * t[fast.lower() + '_ms'] / t['ms']:.0f}% of the time"


def format_budget(b: dict, model_name: str) -> str:
    c, L, dp = b["cluster"], b["layer"], b["deepep"]
    mb = 1e6
    lines = [
        f"communication budget of one MoE layer, one micro-batch (V3 tech report §3.2): {model_name} on {b['gpus']} x "
        f"{c['name'].upper()} ({L['nodes']} node{'s' * (L['nodes'] > 1)} of {L['gpus_per_node']})",
        f"  cluster   NVLink {c['nvlink_gbps']:g} GB/s, IB {c['ib_gbps']:g} GB/s per GPU; {c['sms']} SMs; "
        f"{c['tflops']:g} TFLOP/s peak ({b['peak']}) at {100 * b['mfu']:.0f}% MFU",
        f"  routing   {L['num_experts_per_tok']} of {L['n_routed_experts']} experts on <= {L['node_limit']} "
        f"node{'s' * (L['node_limit'] > 1)} "
        f"(node-limited, §2.1.2): {L['nodes_per_token']:.2f} nodes per token ({L['nodes_hit_unlimited']:.2f} "
        f"without the limit),",
        f"            {L['experts_per_node']:.2f} experts on {L['gpus_per_node_hit']:.2f} GPUs per node -> "
        f"{L['ib_sends_per_token']:.2f} IB + {L['nvlink_sends_per_token']:.2f} NVLink sends per token (§3.2.2)",
        f"  compute   {b['tokens_per_microbatch']} tokens x {L['flops_per_token'] / 1e9:.3f} GFLOP = "
        f"{b['tokens_per_microbatch'] * L['flops_per_token'] / 1e12:.2f} TFLOP (seq {b['seq_len']}) -> "
        f"{L['compute_ms']:.2f} ms",
    ]
    for phase, dtype in (("dispatch", "FP8 + scales"), ("combine", "BF16")):
        t = L[phase]
        lines.append(f"  {phase:9} {dtype}, {t['bytes_per_token']:,} B/token: IB {t['ib_bytes'] / mb:.1f} MB "
                     f"{t['ib_ms']:.2f} ms, NVLink {t['nvlink_bytes'] / mb:.1f} MB {t['nvlink_ms']:.2f} ms -> "
                     f"{t['ms']:.2f} ms")
    lines += [
        f"  comm      {L['comm_ms']:.2f} ms; compute : comm = {_num(L['compute_to_comm'], '.2f')} : 1",
        f"  SMs       {c['sm_gbps']:.1f} GB/s per SM (calibrated: 20 SMs saturate IB + NVLink on H800): "
        f"{L['comm_sms']} SMs saturate both links;",
        f"            this layer's traffic needs {L['comm_sms_layer']} to run at link speed ({_bound(L['dispatch'])})",
        "",
        f"  {'':34}{'this model':>14}   V3 report / DeepEP (H800)",
        f"  {'compute : comm per MoE layer':34}{_num(L['compute_to_comm'], '.2f') + ' : 1':>14}   "
        "~1:1 -> DualPipe (§3.2.1)",
        f"  {'NVLink / IB':34}{c['nvlink_gbps'] / c['ib_gbps']:>14.2f}   160 / 50 = 3.2 (§3.2.2)",
        f"  {'experts per node, free per IB send':34}{_num(L['experts_per_node_free'], '.2f'):>14}   ~3.2 (§3.2.2)",
        f"  {'experts per token at the same cost':34}{_num(L['experts_per_token_free'], '.1f'):>14}   "
        "4 x 3.2 ~ 13 (§3.2.2)",
        f"  {'SMs to saturate IB + NVLink':34}{L['comm_sms']:>14}   20 of 132 (§3.2.2); DeepEP V1 used 24",
        f"  {'NVLink GB/s at 24 SMs (EP8)':34}{_num(dp['nvlink_gbps_model'], '.0f'):>14}   "
        f"{dp['nvlink_gbps_measured'][0]}–{dp['nvlink_gbps_measured'][1]} (DeepEP intranode)",
        f"  {'RDMA GB/s at 24 SMs (this EP)':34}{_num(dp['rdma_gbps_model'], '.0f'):>14}   "
        f"{dp['rdma_gbps_measured'][0]}–{dp['rdma_gbps_measured'][1]} (DeepEP internode EP16–64)",
        "",
        "  step time per MoE layer against the SMs reserved for communication (compute on the rest)",
        f"  {'SMs':>5} {'compute ms':>11} {'comm ms':>9} {'overlapped ms':>14} {'serial ms':>10}",
    ]
    rows = b["step_table"] + ([b["best_overlapped"]] if b["best_overlapped"]["comm_sms"] not in
                              {r["comm_sms"] for r in b["step_table"]} else [])
    for r in sorted(rows, key=lambda r: r["comm_sms"]):
        mark = "  <- best overlapped" if r["comm_sms"] == b["best_overlapped"]["comm_sms"] else ""
        lines.append(f"  {r['comm_sms']:>5} {r['compute_ms']:>11.2f} {r['comm_ms']:>9.2f} {r['overlapped_ms']:>14.2f} "
                     f"{r['serial_ms']:>10.2f}{mark}")
    lines.append("  overlapped = max(compute, comm) with DualPipe's full overlap (§3.2.1); serial = compute + comm")
    return "\n".join(lines)


def plot(b: dict, path) -> None:
    """Step time against the SMs reserved for communication, as a PNG."""
    import matplotlib  # heavy, and only for the plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c, L = b["cluster"], b["layer"]
    cl = Cluster(**c)
    traffic = {p: L[p] for p in ("dispatch", "combine")}
    xs = list(range(1, min(c["sms"] - 1, max(48, 2 * L["comm_sms"])) + 1))
    rows = [step_row(L["compute_ms"], traffic, cl, s) for s in xs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("compute_ms", f"compute (on the other {c['sms']} - s SMs)"),
                       ("comm_ms", "dispatch + combine (on s SMs)"),
                       ("overlapped_ms", "step, full overlap (DualPipe)"), ("serial_ms", "step, no overlap")):
        ax.plot(xs, [r[key] for r in rows], label=label, lw=2 if key.startswith(("over", "serial")) else 1.2)
    ax.axvline(L["comm_sms"], color="gray", ls="--", lw=1, label=f"{L['comm_sms']} SMs saturate IB + NVLink")
    ax.set_xlabel("SMs reserved for communication, s")
    ax.set_ylabel("ms per MoE layer per micro-batch")
    ax.set_ylim(0, 1.6 * (L["compute_ms"] + L["comm_ms"]))
    ax.set_title(f"{b['gpus']} x {c['name'].upper()}, {b['tokens_per_microbatch']} tokens/GPU, "
                 f"{100 * b['mfu']:.0f}% MFU")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
