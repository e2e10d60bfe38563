"""Calibration: fitted factors, the held-out error, and the file the virtual executor reads back."""

import json

import pytest

from xctune.calibrate import calibrate, load_host_device
from xctune.cli import main
from xctune.costmodel import Efficiency
from xctune.errors import BadInput
from xctune.models.loading import resolve_model
from xctune.workload import Workload


@pytest.fixture(scope="module")
def calibration():
    train = (Workload(prompt_tokens=16, new_tokens=4), Workload(images=2, prompt_tokens=96, new_tokens=4))
    held = (Workload(prompt_tokens=48, new_tokens=4),)
    return calibrate(resolve_model("tiny"), repeats=2, train_set=train, held_out=held)


def test_fit_and_errors(calibration):
    eff = calibration.efficiency
    assert 0 < eff.matmul <= 1 and 0 < eff.memory <= 1
    assert eff.op_overhead_us >= 0 and eff.module_overhead_us >= 0
    assert eff.op_overhead_us + eff.module_overhead_us > 0  # a tiny model on a CPU is overhead-bound
    assert set(calibration.held_out_error) == {"vision", "prefill", "decode"}
    for phase, e in calibration.held_out_error.items():
        assert e["n"] == 1 and e["mean_abs_pct"] >= 0
    d = calibration.device
    assert d.tflops["fp32"] > 0 and d.mem_bw_gbs > 0
    assert "measured" in d.source


def test_calibration_file_round_trip(calibration, tmp_path, tiny, capsys):
    path = tmp_path / "host.json"
    calibration.save(path)
    data = json.loads(path.read_text())
    assert data["held_out_error_pct"] == calibration.held_out_error
    assert Efficiency.load(path).matmul == calibration.efficiency.matmul
    assert load_host_device(path).mem_bw_gbs == pytest.approx(calibration.device.mem_bw_gbs)
    # the virtual executor can now simulate this machine: --gpus host
    code = main(["bench", "--model", "tiny", "--baseline", "single", "--gpus", "host", "--calibration", str(path),
                 "--prompt-tokens", "48", "--new-tokens", "4", "--json"])
    rec = json.loads(capsys.readouterr().out)
    assert code == 0 and rec["source"] == "simulated" and rec["devices.cuda:0"] == "host"


def test_bad_calibration_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"efficiency": {"matmul": 2}}')
    with pytest.raises(BadInput):
        Efficiency.load(p)
    with pytest.raises(BadInput, match="cannot read"):
        load_host_device(tmp_path / "missing.json")
    with pytest.raises(BadInput, match="tiny"):
        calibrate(resolve_model("ixc2-vl-7b"))
