"""The CLI: --help everywhere, the demo (the current main job) end to end, `info` on the 671B preset, convert, and
user mistakes -> one line on stderr, exit 1, no traceback, nothing overwritten."""

import json
import subprocess
import sys

import pytest

from nanoseek.cli import build_parser, main

SUBCOMMANDS = ["demo", "info", "tokenizer", "init", "generate", "convert"]


def test_help_everywhere(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    for cmd in SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: nanoseek " + cmd in capsys.readouterr().out
    assert set(SUBCOMMANDS) <= set(build_parser()._subparsers._group_actions[0].choices)


def test_info_v3(capsys):
    assert main(["info", "--preset", "v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "37.55B" in out


def test_demo_then_generate_and_convert(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--docs", "300", "--vocab-size", "512", "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "reloaded logits identical" in text
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}
    assert main(["generate", "--checkpoint", str(out), "--prompt", "1+1=", "--max-new-tokens", "3"]) == 0
    assert main(["convert", str(out), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, timeout=120)


def test_user_mistakes_one_line_no_traceback(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    bad_text = tmp_path / "latin1.txt"
    bad_text.write_bytes("caf\xe9".encode("latin-1"))
    bad_cfg = tmp_path / "config.json"
    bad_cfg.write_text(json.dumps({"hidden_size": 64}))
    cases = [
        (["info", "--checkpoint", str(tmp_path / "missing")], "does not exist"),
        (["info", "--config", str(bad_cfg)], "missing field"),
        (["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"], "does not exist"),
        (["tokenizer", "--out", str(tmp_path / "t"), "--text", str(bad_text)], "not UTF-8"),
        (["tokenizer", "--out", str(mine)], "refusing"),
        (["init", "--out", str(mine)], "refusing to overwrite"),
        (["demo", "--docs", "0"], "--docs must be >= 1"),
        (["convert", str(tmp_path / "missing"), str(tmp_path / "x")], "does not exist"),
    ]
    for args, needle in cases:
        r = run_cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and needle in lines[0], (args, r.stderr)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
