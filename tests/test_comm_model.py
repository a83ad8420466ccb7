"""The communication budget (`nanoseek cost --cluster`, nanoseek/comm_model.py): V3's reasoning comes out of the model
(~1:1 compute to communication, NVLink/IB ≈ 3.2 experts per node free, ~13 experts per token at the same cost, ~20
SMs, DeepEP's 24-SM bandwidths), its pieces agree with hand-computed values, it moves the right way when a figure
changes, `--json` carries the per-layer keys, and every impossible input is one line on stderr with exit 1."""

import json
import math
import subprocess
import sys

import pytest

from nanoseek import comm_model as cm
from nanoseek.cli import main
from nanoseek.config import get_preset

V3 = get_preset("v3")
H800 = cm.cluster("h800")


@pytest.fixture(scope="module")
def v3():
    return cm.budget(V3, H800, gpus=64, tokens=4096, mfu=0.4)


def test_v3_reasoning_comes_out(v3):
    L = v3["layer"]
    assert 0.7 <= L["compute_to_comm"] <= 1.5  # "approximately 1:1" (§3.2.1)
    assert L["node_limit"] == 4 and L["nodes_per_token"] == pytest.approx(4)  # M = 4 (§4.2)
    assert L["experts_per_node_free"] == pytest.approx(3.2)  # 160 / 50 (§3.2.2)
    assert round(L["experts_per_token_free"]) == 13  # 4 x 3.2 (§3.2.2)
    assert L["comm_sms"] == 20  # of 132 (§3.2.2)
    assert L["comm_sms_layer"] <= L["comm_sms"]  # V3's 2 experts per node do not fill NVLink
    assert L["dispatch"]["ib_ms"] > L["dispatch"]["nvlink_ms"]  # IB is the bottleneck
    dp = v3["deepep"]  # DeepEP on H800 with 24 SMs: NVLink 153-158 GB/s, RDMA 43-58 GB/s
    assert 0.95 * dp["nvlink_gbps_measured"][0] <= dp["nvlink_gbps_model"] <= 1.05 * dp["nvlink_gbps_measured"][1]
    assert dp["rdma_gbps_measured"][0] <= dp["rdma_gbps_model"] <= dp["rdma_gbps_measured"][1]
    s = {r["comm_sms"]: r for r in v3["step_table"]}
    assert s[20]["overlapped_ms"] < s[20]["serial_ms"] < 2.2 * s[20]["overlapped_ms"]  # what DualPipe buys


def test_pieces_against_hand_computed_values(v3):
    # one V3 MoE layer, forward, per token: MLA projections + router + (1 shared + 8 routed) SwiGLU experts, + QK^T/AV
    mla = 7168 * 1536 + 1536 * 128 * 192 + 7168 * (512 + 64) + 512 * 128 * 256 + 128 * 128 * 7168
    ffn = 256 * 7168 + 9 * 3 * 7168 * 2048
    assert cm.moe_layer_flops(V3, 4096) == 2 * (mla + ffn) + 2 * 128 * (192 + 128) * 4096 / 2
    assert cm.p_none(256, 32, 8) == pytest.approx(math.comb(224, 8) / math.comb(256, 8))
    assert cm.token_bytes(V3) == {"dispatch": 7168 + 56 * 4, "combine": 7168 * 2}
    L = v3["layer"]
    assert L["ib_sends_per_token"] == pytest.approx(4 * 7 / 8)  # 4 nodes, one of 8 is the source's own
    gpus_hit = 8 * (1 - 28 * 27 / (32 * 31))  # 2 of a node's 32 experts, 4 per GPU
    assert L["nvlink_sends_per_token"] == pytest.approx(4 * gpus_hit * 7 / 8)
    assert L["dispatch"]["ib_ms"] == pytest.approx(4096 * 3.5 * 7392 / 50e9 * 1e3)
    assert L["compute_ms"] == pytest.approx(4096 * L["flops_per_token"] / (1979e12 * 0.4) * 1e3)
    assert L["comm_ms"] == pytest.approx(L["dispatch_ms"] + L["combine_ms"])


def test_monotone():
    def comm(**kw):
        return cm.budget(V3, cm.cluster("h800", **kw.pop("over", {})), **kw)["layer"]["comm_ms"]
    rows = cm.budget(V3, H800, sm_counts=list(range(1, 132)))["step_table"]
    for a, b in zip(rows, rows[1:]):
        assert b["comm_ms"] <= a["comm_ms"] and b["compute_ms"] > a["compute_ms"]  # more SMs: faster comm, slower math
    for r in rows:
        assert r["overlapped_ms"] == max(r["compute_ms"], r["comm_ms"]) <= r["serial_ms"]
    assert comm(over={"ib_gbps": 100}) < comm() < comm(over={"ib_gbps": 25})
    assert comm(node_limit=2) < comm(node_limit=4) < comm(node_limit=8)  # node-limited routing cuts IB traffic
    assert comm(tokens=8192) == pytest.approx(2 * comm(tokens=4096))
    assert comm(gpus=8) < comm(gpus=16) < comm(gpus=64)  # one node: NVLink only
    one = cm.budget(V3, H800, gpus=8)
    assert one["layer"]["ib_sends_per_token"] == 0 and one["deepep"]["rdma_gbps_model"] is None
    faster = cm.budget(V3, cm.cluster("h800", nvlink_gbps=320))["layer"]
    assert faster["experts_per_node_free"] == pytest.approx(6.4) and faster["comm_sms"] > 20


def test_cli_text_and_plot(tmp_path, capsys):
    png = tmp_path / "budget.png"
    assert main(["cost", "--cluster", "h800", "--gpus", "64", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "compute : comm" in out and "153–158" in out and "43–58" in out and "overlapped" in out
    assert png.stat().st_size > 10_000
    assert main(["cost", "--tokens", "14.8e12", "--preset", "v3", "--gpu", "h800", "--json"]) == 0  # unchanged mode
    assert json.loads(capsys.readouterr().out)["gpus"] == 1


BAD = [
    (["--cluster", "h900"], "unknown --cluster"),
    (["--cluster", "h800", "--gpus", "0"], "--gpus must be > 0"),
    (["--cluster", "h800", "--gpus", "-8"], "--gpus must be > 0"),
    (["--cluster", "h800", "--gpus", "60"], "not a whole number of 8-GPU nodes"),
    (["--cluster", "h800", "--gpus", "64", "--gpus-per-node", "0"], "--gpus-per-node must be > 0"),
    (["--cluster", "h800", "--nvlink-gbps", "0"], "--nvlink-gbps must be > 0"),
    (["--cluster", "h800", "--ib-gbps", "-50"], "--ib-gbps must be > 0"),
    (["--cluster", "h800", "--sms", "0"], "--sms must be > 0"),
    (["--cluster", "h800", "--sms", "1"], "--sms must be >= 2"),
    (["--cluster", "h800", "--tflops", "0"], "--tflops must be > 0"),
    (["--cluster", "h800", "--sm-gbps", "0"], "--sm-gbps must be > 0"),
    (["--cluster", "h800", "--node-limit", "9"], "--node-limit must be in [1, 8]"),
    (["--cluster", "h800", "--gpus", "16", "--node-limit", "4"], "--node-limit must be in [1, 2]"),
    (["--cluster", "h800", "--comm-sms", "132"], "--comm-sms 132"),
    (["--cluster", "h800", "--sms", "100", "--comm-sms", "20", "100"], "--comm-sms 100"),
    (["--cluster", "h800", "--mfu", "0"], "--mfu"),
    (["--cluster", "h800", "--tokens-per-microbatch", "0"], "--tokens-per-microbatch must be > 0"),
    (["--cluster", "h800", "--tokens", "1e12"], "separate modes"),
    ([], "give --tokens"),
    (["--tokens", "1e12", "--ib-gbps", "50"], "only with --cluster"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) or "nothing" for a, _ in BAD])
def test_bad_input_one_line(args, needle, capsys):
    assert main(["cost", *args]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0], err


def run_all(cases):
    """`python -m nanoseek cost ...` for each case, side by side; [(stdout, stderr, returncode)]."""
    procs = [subprocess.Popen([sys.executable, "-m", "nanoseek", "cost", *a], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in cases]
    return [(*p.communicate(timeout=300), p.returncode) for p in procs]


def check_one_line(results, cases):
    for (out, err, rc), (args, needle) in zip(results, cases):
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 1 and "Traceback" not in err and len(lines) == 1 and needle in lines[0], (args, err)


def test_subprocess_json_and_bad_input():
    """The real entry point: one JSON object on stdout; an impossible figure -> one line, exit 1, no traceback. (Each
    process spends ~3 CPU-seconds importing every subcommand, so the full sweep of BAD is the slow test below; main()
    above is the same code path.)"""
    (out, err, rc), *bad = run_all([["--cluster", "h800", "--gpus", "64", "--json"], BAD[3][0]])
    assert rc == 0, err
    b = json.loads(out)
    assert {"compute_ms", "comm_ms", "comm_sms", "dispatch_ms", "combine_ms", "nodes_per_token",
            "experts_per_node_free"} <= set(b["layer"])
    assert b["step_table"] and {"comm_sms", "compute_ms", "comm_ms", "overlapped_ms", "serial_ms"} <= set(
        b["step_table"][0])
    check_one_line(bad, [BAD[3]])


@pytest.mark.slow
def test_every_bad_input_via_subprocess():
    check_one_line(run_all([a for a, _ in BAD]), BAD)
