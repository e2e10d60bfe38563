"""The command line: exit codes, JSON output, and one-line errors for any bad input."""

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, field_map, two_gpu_map, write_json
from xctune.cli import main


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_exit_codes_and_json(tmp_path, tiny, capsys):
    good = write_json(tmp_path, two_gpu_map(tiny))
    code, out, err = run_cli(["check", str(good), "--model", "tiny", "--gpus", "2x1GiB", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["ok"] is True and data["errors"] == [] and isinstance(data["warnings"], list)
    assert {"weights_bytes", "activation_bytes", "capacity_bytes"} <= set(data["devices"][0])
    assert data["transfer_bytes_per_forward"] > 0
    bad = write_json(tmp_path, two_gpu_map(tiny) | {"vision_proj": 1}, "bad.json")
    code, out, _ = run_cli(["check", str(bad), "--model", "tiny", "--gpus", "2x1GiB"], capsys)
    assert code == 1 and "verdict: the map will fail" in out and "same device" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["check", "MISSING.json", "--model", "tiny"], "cannot read"),
        (["check", "{map}", "--model", "no-such"], "unknown model"),
        (["check", "{map}", "--model", "tiny", "--gpus", "2xrtx9999"], "known:"),
        (["check", "{map}", "--model", "tiny", "--gpus", ""], "--gpus"),
        (["check", "{map}", "--model", "tiny", "--new-tokens", "0"], "new_tokens"),
        (["check", "{map}", "--model", "tiny", "--headroom", "2"], "headroom"),
        (["check", "{map}", "--model", "tiny", "--link", "carrier-pigeon"], "carrier-pigeon"),
        (["check", "{garbage}", "--model", "tiny"], "not valid JSON"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, tiny, capsys, args, needle):
    m = write_json(tmp_path, two_gpu_map(tiny))
    g = tmp_path / "garbage.json"
    g.write_text("{nope")
    args = [a.replace("{map}", str(m)).replace("{garbage}", str(g)) for a in args]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and needle in err and err.startswith("xctune: error:")


def test_constraints_command(capsys):
    code, out, _ = run_cli(["constraints", "--model", "tiny-hd", "--json"], capsys)
    data = json.loads(out)
    assert code == 0
    assert set(data["dry_run_colocation"]) == {"vision_proj", "model.tok_embeddings"}
    assert "vit" in data["not_offloadable"]
    assert any("vit may sit on another GPU" in d for d in data["disagreements"])
    assert {"op": "cat", "units": ["model.tok_embeddings", "vision_proj"]} in data["top_level_joins"]


def test_field_map_via_the_installed_console_script(tmp_path):
    path = field_map("split-vision-from-embeddings.2gpu")
    proc = subprocess.run(
        [sys.executable, "-m", "xctune.cli", "check", str(path), "--gpus", "2x24GiB", "--new-tokens", "2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "Expected all tensors to be on the same device" in proc.stdout


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_file_content_gives_a_verdict_or_one_line_error(tmp_path_factory, capsys, content):
    p = tmp_path_factory.mktemp("fuzz") / "m.json"
    p.write_bytes(content)
    code = main(["check", str(p), "--model", "tiny", "--gpus", "2x1GiB", "--new-tokens", "2"])
    err = capsys.readouterr().err
    assert code in (0, 1, 2)
    if code == 2:
        assert err.count("\n") == 1 and "Traceback" not in err


def test_bench_virtual_and_real(tmp_path, tiny, capsys):
    code, out, _ = run_cli(["bench", "--model", "tiny", "--baseline", "authors", "--gpus", "2x1GiB", "--json"], capsys)
    rec = json.loads(out)
    assert code == 0 and rec["source"] == "simulated" and rec["status"] == "ok" and rec["e2e_ms"] > 0
    m = write_json(tmp_path, two_gpu_map(tiny))
    code, out, _ = run_cli(["bench", "--model", "tiny", "--map", str(m), "--real", "--gpus", "2x64MiB",
                            "--repeats", "2", "--new-tokens", "3", "--json"], capsys)
    rec = json.loads(out)
    assert code == 0 and rec["source"] == "measured" and rec["repeats"] == 2 and rec["fidelity_top1"] == 1.0
    code, out, _ = run_cli(["bench", "--model", "tiny", "--baseline", "accelerate-balanced", "--gpus", "2x2MiB"], capsys)
    assert code in (0, 1) and "accelerate-balanced" in out


def test_bench_bad_input(capsys):
    code, _, err = run_cli(["bench", "--model", "tiny", "--baseline", "authors"], capsys)
    assert code == 2 and "--gpus" in err
    code, _, err = run_cli(["bench", "--model", "tiny", "--baseline", "nope", "--gpus", "2x1GiB"], capsys)
    assert code == 2 and "unknown baseline" in err
    code, _, err = run_cli(["bench", "--model", "ixc2-vl-7b", "--baseline", "authors", "--real", "--gpus", "2x24GiB"], capsys)
    assert code == 2 and "RAM" in err


def test_a_reader_that_goes_away_is_not_an_error():
    """`xctune presets | head -1`: the pipe closes before xctune writes; it stops quietly with 0."""
    proc = subprocess.Popen([sys.executable, "-m", "xctune.cli", "presets", "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first byte is written (imports take seconds)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "error" not in err, err
