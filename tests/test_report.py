"""`xctune report`: study summaries, benchmark comparisons, and the regression exit code."""

import copy
import json

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
        _bench(d, "test_tuned_over_authors_ratio")["extra_info"]["guards"]["tuned_over_authors"] *= 1.5

    bad = _variant(tmp_path, "bad.json", worse)
    code = main(["report", str(BASELINE), str(bad), "--fail-on-regression", "20", "--out", str(tmp_path / "rep")])
    captured = capsys.readouterr()
    assert code == 1
    assert "**REGRESSION**" in captured.out and "regression in bad.json" in captured.err
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "report.csv").is_file()
    # the same run within a looser threshold passes
    assert main(["report", str(BASELINE), str(bad), "--fail-on-regression", "60"]) == 0


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


def test_gains_split_into_placement_and_precision():
    """A baseline's ratio per precision; placement at the best's precision, precision on the same map;
    one that does not fit in the baseline dtype is still compared at the others."""
    from types import SimpleNamespace

    from xctune.plan import Plan
    from xctune.report import baseline_gains

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
