"""Calibration: the fit, the twin pricing exactly what was fitted, the file, staleness, rank agreement."""

import json

import numpy as np
import pytest

from xctune.worlds.calibrate import (FACTORS, Sample, _efficiency, _links, calibrate, calibration_plans, fit, host_twin,
                              kendall_tau, load_host_device, nnls, phase_features, staleness, twin_cluster,
                              twin_phase_ms, twin_trust)
from xctune.cli import main
from xctune.worlds.costmodel import Efficiency
from xctune.errors import BadInput
from xctune.hardware import GPUSpec, make_cluster
from xctune.models.loading import resolve_model
from xctune.worlds.trace import Trace
from xctune.workload import Workload

W = Workload(prompt_tokens=16, new_tokens=4)
HOST = GPUSpec("host", 2**34, {"fp32": 0.05, "bf16": 0.02, "fp16": 0.001}, 10.0, "made up for the test")


def test_nnls_matches_the_constrained_optimum():
    rng = np.random.default_rng(0)
    A = rng.random((40, 5))
    x_true = np.array([2.0, 0.0, 0.5, 3.0, 0.0])
    assert nnls(A, A @ x_true) == pytest.approx(x_true, abs=1e-9)
    b = A @ np.array([1.0, -2.0, 0.0, 1.0, 0.0])  # the free optimum has a negative part
    x = nnls(A, b)
    assert (x >= 0).all() and x[1] == 0.0
    for j in range(5):  # no feasible step along any coordinate improves it
        for step in (1e-4, -1e-4):
            y = x.copy()
            y[j] = max(0.0, y[j] + step)
            assert np.linalg.norm(A @ y - b) >= np.linalg.norm(A @ x - b) - 1e-12


@pytest.fixture(scope="module")
def priced(tiny):
    """Every calibration plan's features on one workload, and factors that exercise every term."""
    train, held = calibration_plans(tiny)
    trace = Trace(tiny, W)
    x = np.zeros(len(FACTORS))
    f = dict(zip(FACTORS, range(len(FACTORS))))
    for name, v in {"roofline_fp32": 1.5, "roofline_bf16": 3.0, "matmul_op_fp32": 20e-6, "other_op_fp32": 5e-6,
                    "matmul_op_bf16": 60e-6, "other_op_bf16": 9e-6, "module_call": 30e-6, "logical_move": 15e-6,
                    "logical_byte": 1e-10, "disk_load": 200e-6, "disk_byte": 2e-9}.items():
        x[f[name]] = v
    return trace, train + held, x


def test_the_twin_prices_exactly_what_was_fitted(priced):
    """The fit works on feature vectors; the twin prices plans with the trace and the cost model.
    Both must be the same function, or a good fit would make a bad twin."""
    trace, plans, x = priced
    eff = _efficiency(x, ("fp32", "bf16"), "test")
    twin = host_twin(make_cluster("2x64GiB", headroom=0), HOST, _links(x))
    kinds = set()
    for plan in plans:
        feats = phase_features(trace, plan, HOST)
        twin_ms = twin_phase_ms(trace, plan, twin, eff)
        for phase in ("vision", "prefill", "decode"):
            assert twin_ms[phase] == pytest.approx(1e3 * feats[phase] @ x, rel=1e-9), (plan.label, phase)
        kinds |= {FACTORS[i] for p in feats.values() for i in np.nonzero(p)[0]}
    # the plans exercise every factor the real study's space can (fp16 is not in it)
    assert kinds == {n for n in FACTORS if not n.endswith("fp16")}


def test_fit_recovers_the_factors_it_was_made_from(priced):
    trace, plans, x = priced
    samples = [Sample(W, p, ph, 1e3 * v @ x, 0.0, v) for p in plans for ph, v in phase_features(trace, p, HOST).items()]
    got = fit(samples)
    predicted = np.array([s.features @ got for s in samples])
    measured = np.array([s.measured_ms * 1e-3 for s in samples])
    assert np.abs(predicted / measured - 1).max() < 1e-6  # an exact model is fitted exactly
    assert got[FACTORS.index("roofline_fp32")] >= 1.0 and got[FACTORS.index("roofline_bf16")] >= 1.0


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant


def test_staleness_sees_dtypes_drifting_apart_not_a_uniformly_slower_machine():
    then = {"probe": {"a": {"prefill": 10.0, "decode": 2.0}, "b": {"prefill": 20.0, "decode": 4.0}}}
    slower = {"a": {"prefill": 15.0, "decode": 3.0}, "b": {"prefill": 30.0, "decode": 6.0}}
    assert not staleness(then, slower).stale and "1.50x" in staleness(then, slower).message
    drift = {"a": {"prefill": 10.0, "decode": 2.0}, "b": {"prefill": 30.0, "decode": 6.0}}
    assert staleness(then, drift).stale and "xctune calibrate" in staleness(then, drift).message
    assert staleness({}, slower).stale


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, tiny):
    train, held = calibration_plans(tiny)
    out = tmp_path_factory.mktemp("cal") / "host.json"
    cal = calibrate(resolve_model("tiny"), repeats=2, train_set=(W,), held_out=(Workload(prompt_tokens=24, new_tokens=3),),
                    plans=(train[:3], held[:1]), out=out)
    return cal, out


def test_calibration_end_to_end(calibration, capsys):
    cal, path = calibration
    assert cal.threads == 1 and cal.rounds == 2
    assert set(cal.held_out_error) == {"vision", "prefill", "decode"}
    for e in cal.held_out_error.values():
        assert e["n"] == 1 and e["mean_abs_pct"] >= 0 and e["measurement_cv_pct"] >= 0
    assert {d.dtype for d in cal.efficiency.by_dtype} == {"fp32", "bf16"}  # the three plans run both
    assert cal.efficiency.module_overhead_us + sum(d.matmul_op_us + d.other_op_us for d in cal.efficiency.by_dtype) > 0
    assert set(cal.probe) == {"single fp32", "single bf16"}
    data = json.loads(path.read_text())
    assert data["held_out_error_pct"] == cal.held_out_error and data["threads"] == 1
    loaded = Efficiency.load(path)
    assert loaded.of("bf16").matmul_op_us == pytest.approx(cal.efficiency.of("bf16").matmul_op_us)
    assert loaded.of("fp16") == Efficiency().of("fp16")  # not calibrated: the defaults
    assert load_host_device(path).mem_bw_gbs == pytest.approx(cal.device.mem_bw_gbs)
    twin = twin_cluster(make_cluster("2x3MiB", headroom=0), str(path))
    assert twin.gpus[1].memory_bytes == 3 * 2**20 and twin.gpu_link.source.startswith("calibrated")
    # no rank agreement in this file: a real study does not lean on the twin
    trusted, why = twin_trust(str(path))
    assert not trusted and "agreement" in why
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
    with pytest.raises(BadInput, match="repeats"):
        calibrate(resolve_model("tiny"), repeats=1)


def test_a_real_study_leans_on_the_twin_only_where_it_ranked_well(tmp_path):
    path = tmp_path / "cal.json"
    held_out = {ph: {"mean_abs_pct": 6.0} for ph in ("vision", "prefill", "decode")}
    for twin, ceiling, trusted in ((0.79, 0.83, True), (0.6, 0.83, False), (0.85, 0.95, True), (0.78, 0.85, True),
                                   (0.79, 0.92, False), (0.4, 0.45, False)):
        path.write_text(json.dumps({"agreement": {"tau_twin": twin, "tau_ceiling": ceiling, "n_plans": 18},
                                    "held_out_error_pct": held_out}))
        ok, why = twin_trust(str(path))
        assert ok == trusted and f"{twin:.2f}" in why, (twin, ceiling)
    # ranks alone are not enough: a phase over the held-out target, or none recorded, and it is not leaned on
    for errors, named in (({**held_out, "vision": {"mean_abs_pct": 12.9}}, "vision 12.9%"), ({}, "none recorded")):
        path.write_text(json.dumps({"agreement": {"tau_twin": 0.84, "tau_ceiling": 0.82, "n_plans": 18},
                                    "held_out_error_pct": errors}))
        ok, why = twin_trust(str(path))
        assert not ok and named in why and "over 10%" in why
    assert twin_trust(None) == (False, "no calibration: the twin prices this host at default factors")
