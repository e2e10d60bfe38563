"""`xctune report`: study summaries, benchmark comparisons, and the regression exit code."""

import copy
import json
import math

import pytest

from conftest import ROOT
from xctune.cli import main

BASELINE = ROOT / "results/benchmarks/storage/Linux-CPython-3.11-64bit/0001_baseline.json"


def _variant(tmp_path, name, change):
    data = json.loads(BASELINE.read_text())
    new = copy.deepcopy(data)
    change(new)
    path = tmp_path / name
    path.write_text(json.dumps(new))
    return path


def _bench(data, name):
    return next(b for b in data["benchmarks"] if b["name"].startswith(name))


def test_identical_runs_pass(tmp_path, capsys):
    same = _variant(tmp_path, "same.json", lambda d: None)
    assert main(["report", str(BASELINE), str(same), "--fail-on-regression", "5"]) == 0
    out = capsys.readouterr().out
    assert "tuned_over_authors (guarded)" in out and "REGRESSION" not in out


def test_a_worse_guard_is_flagged_and_fails(tmp_path, capsys):
    def worse(d):
        _bench(d, "test_tuned_over_authors_ratio")["extra_info"]["guards"]["tuned_over_authors"] *= 1.2  # still under its own limit

    bad = _variant(tmp_path, "bad.json", worse)
    code = main(["report", str(BASELINE), str(bad), "--fail-on-regression", "10", "--out", str(tmp_path / "rep")])
    captured = capsys.readouterr()
    assert code == 1
    assert "**REGRESSION**" in captured.out and "regression in bad.json" in captured.err
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "report.csv").is_file()
    # the same run within a looser threshold passes
    assert main(["report", str(BASELINE), str(bad), "--fail-on-regression", "30"]) == 0


def test_slower_times_are_flagged_but_fail_only_when_asked(tmp_path, capsys):
    def slower(d):
        for b in d["benchmarks"]:
            b["stats"]["median"] *= 2

    slow = _variant(tmp_path, "slow.json", slower)
    assert main(["report", str(BASELINE), str(slow), "--fail-on-regression", "20"]) == 0
    assert "slower (time, not guarded)" in capsys.readouterr().out
    assert main(["report", str(BASELINE), str(slow), "--fail-on-regression", "20", "--include-times"]) == 1


def test_study_folders_and_bad_input(tmp_path, capsys):
    assert main(["report", str(ROOT / "results" / "default")]) == 0
    out = capsys.readouterr().out
    assert "| default | ixc2-vl-7b |" in out and "authors" in out
    (tmp_path / "x.json").write_text("{}")
    assert main(["report", str(tmp_path / "x.json")]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2


# --- the gate cannot pass by accident --------------------------------------------------------

def _gate(tmp_path, capsys, change, pct="50"):
    run = _variant(tmp_path, "run.json", change)
    code = main(["report", str(BASELINE), str(run), "--fail-on-regression", pct])
    return code, capsys.readouterr().err


def _drop_benchmark(name):
    return lambda d: d["benchmarks"].remove(_bench(d, name))


def _set_guard(name, guard, value):
    def change(d):
        _bench(d, name)["extra_info"]["guards"][guard] = value
    return change


@pytest.mark.parametrize("change, expected", [
    (_drop_benchmark("test_virtual_trial_rate"), "test_virtual_trial_rate: missing from this run"),
    (_drop_benchmark("test_dry_run_7b"), "test_dry_run_7b: missing from this run"),  # no guards: its time is still watched
    (lambda d: d["benchmarks"].clear(), "test_search_wall_time: missing from this run"),
    (lambda d: _bench(d, "test_search_wall_time").update(name="test_search_wall_time_renamed"),
     "missing from this run: renamed or not run (new in this run: test_search_wall_time_renamed)"),
    (lambda d: _bench(d, "test_redispatch_vs_cold_load")["extra_info"]["guards"].clear(),
     "guard redispatch_over_cold missing from this run"),
    (lambda d: _bench(d, "test_redispatch_vs_cold_load")["extra_info"].pop("guards"),
     "guard redispatch_over_cold missing from this run"),
    (lambda d: _bench(d, "test_redispatch_vs_cold_load")["extra_info"]["guards"].update(
        renamed=d and _bench(d, "test_redispatch_vs_cold_load")["extra_info"]["guards"].pop("redispatch_over_cold")),
     "guard redispatch_over_cold missing from this run"),
    (_set_guard("test_redispatch_vs_cold_load", "redispatch_over_cold", math.nan), "redispatch_over_cold = nan is not a finite number"),
    (_set_guard("test_redispatch_vs_cold_load", "redispatch_over_cold", math.inf), "is not a finite number"),
    (_set_guard("test_redispatch_vs_cold_load", "redispatch_over_cold", "0.4"), "redispatch_over_cold = '0.4' is not a finite number"),
    (_set_guard("test_redispatch_vs_cold_load", "redispatch_over_cold", None), "is not a finite number"),
    (_set_guard("test_redispatch_vs_cold_load", "redispatch_over_cold", True), "is not a finite number"),
    (_set_guard("test_search_wall_time", "gap_to_optimum", 0.2), "gap_to_optimum = 0.2 is over its own limit 0.02"),
    (lambda d: _bench(d, "test_dry_run_7b")["stats"].update(median=math.nan), "test_dry_run_7b: median time = nan is not"),
])
def test_the_gate_fails_on_what_it_cannot_judge(tmp_path, capsys, change, expected):
    code, err = _gate(tmp_path, capsys, change)
    assert code == 1
    assert expected in err and err.startswith("xctune: gate: ") and "run.json" in err
    assert "Traceback" not in err


def test_the_gate_reports_a_nan_in_the_baseline_too(tmp_path, capsys):
    base = _variant(tmp_path, "base.json", _set_guard("test_tuned_over_authors_ratio", "tuned_over_authors", "NaN"))
    assert main(["report", str(base), str(BASELINE), "--fail-on-regression", "50"]) == 1
    assert "base.json: test_tuned_over_authors_ratio: guard tuned_over_authors = 'NaN' is not a finite number" in capsys.readouterr().err


def test_new_benchmarks_alone_do_not_fail(tmp_path, capsys):
    def add(d):
        extra = copy.deepcopy(_bench(d, "test_dry_run_7b"))
        extra["name"] = "test_brand_new"
        d["benchmarks"].append(extra)

    code, err = _gate(tmp_path, capsys, add)
    assert code == 0 and err == ""


@pytest.mark.parametrize("pct", ["nan", "NaN", "inf", "-5", "-0.1", "lots", "", "1e999"])
def test_the_threshold_must_be_a_finite_percentage(tmp_path, capsys, pct):
    assert main(["report", str(BASELINE), str(BASELINE), "--fail-on-regression", pct]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xctune: error: --fail-on-regression takes") and err.count("\n") == 1


def test_the_gate_needs_something_to_compare(tmp_path, capsys):
    assert main(["report", str(BASELINE), "--fail-on-regression", "5"]) == 2
    assert "needs a baseline and at least one run" in capsys.readouterr().err
    empty = _variant(tmp_path, "empty.json", lambda d: d["benchmarks"].clear())
    assert main(["report", str(empty), str(BASELINE), "--fail-on-regression", "5"]) == 2
    assert "holds no benchmarks" in capsys.readouterr().err
    assert main(["report", str(BASELINE), str(empty)]) == 0  # without the gate, a report is only a report


def test_malformed_benchmark_entries_are_bad_input(tmp_path, capsys):
    dup = _variant(tmp_path, "dup.json", lambda d: d["benchmarks"].append(copy.deepcopy(d["benchmarks"][0])))
    assert main(["report", str(BASELINE), str(dup)]) == 2
    assert "appears twice" in capsys.readouterr().err
    odd = _variant(tmp_path, "odd.json", lambda d: _bench(d, "test_dry_run_7b")["extra_info"].update(guards=[1, 2]))
    assert main(["report", str(BASELINE), str(odd)]) == 2
    assert "extra_info.guards must be an object" in capsys.readouterr().err


def test_gains_split_into_placement_and_precision():
    """A baseline's ratio per precision; placement at the best's precision, precision on the same map;
    one that does not fit in the baseline dtype is still compared at the others."""
    from types import SimpleNamespace

    from xctune.plans.plan import Plan
    from xctune.reports.report import baseline_gains

    best = {"e2e_ms": 100.0}
    records = [
        best,
        {"baseline": "authors @ fp32", "baseline_keys": ["authors @ fp32"], "status": "ok", "feasible": True, "e2e_ms": 180.0},
        {"baseline": "authors = single @ fp16", "baseline_keys": ["authors @ fp16", "single @ fp16"], "status": "ok",
         "feasible": True, "e2e_ms": 102.0},
        {"baseline": "single @ fp32", "baseline_keys": ["single @ fp32"], "status": "oom", "cause": "cuda:0 needs more"},
    ]
    result = SimpleNamespace(best=best, best_plan=Plan({"": 0}, {"vision": "bf16", "lm": "fp16", "head": "fp16"}),
                             records=records, spec=SimpleNamespace(objectives=["latency"], baseline_dtype="fp32"),
                             space=SimpleNamespace(dtypes=("fp32", "fp16", "bf16")))
    gains = {g["baseline"]: g for g in baseline_gains(result)}
    authors, single = gains["authors"], gains["single"]
    assert list(authors["ratios"]) == ["fp32", "fp16"]  # the baseline dtype first
    assert authors["total"] == 1.8 and authors["placement"] == 1.02
    assert authors["precision"] == 180.0 / 102.0
    assert single["status"] == {"fp32": "oom", "fp16": "ok"} and single["placement"] == 1.02
    assert single["total"] is None and single["precision"] is None


def test_relative_change_reads_lower_as_better_on_both_sides_of_zero():
    from xctune.reports.compare import Change

    assert Change("b", "g", 2.0, 3.0, True).change == pytest.approx(0.5)
    assert Change("b", "g", -0.2, -0.1, True).change == pytest.approx(0.5)  # a negative guard rising: worse
    assert Change("b", "g", -0.2, -0.3, True).change == pytest.approx(-0.5)
    assert Change("b", "g", 0.0, -1e-16, True).change == 0.0  # from zero, down: no regression
    assert math.isinf(Change("b", "g", 0.0, 1e-9, True).change)
