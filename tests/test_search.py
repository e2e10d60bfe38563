"""The search: valid by construction, near the exact optimum, resumable, and its outputs."""

import json

import optuna
import pytest

from conftest import ROOT, sampled_plans
from xctune.plans.check import static_findings
from xctune.plans.constraints import constraint_report
from xctune.cli import main
from xctune.hardware import make_cluster
from xctune.search.oracle import Oracle, brute_force
from xctune.plans.plan import resolve
from xctune.models.profile import profile_of
from xctune.search.runner import run_search
from xctune.search.space import SearchSpace, SpaceOptions, split_layers
from xctune.search.study import load_study, with_overrides
from xctune.worlds.trace import Trace
from xctune.models import get_config
from xctune.workload import Workload

QUIET = dict(progress=False, log=lambda m: None)


@pytest.mark.parametrize(
    "model,gpus,options",
    [
        ("ixc2-vl-7b", "2x24GiB", SpaceOptions()),
        ("ixc2-vl-7b", "rtx4090,2xrtx3060", SpaceOptions(dtypes=("fp32",), mixed_precision=False)),
        ("ixc2-4khd-7b", "4xa100-40g", SpaceOptions(offload=("cpu", "disk"))),
        ("tiny-hd", "3x1GiB", SpaceOptions(offload=("disk",), dtypes=("fp32", "bf16"))),
    ],
)
def test_no_sampled_plan_breaks_colocation_or_contiguity(model, gpus, options):
    profile = profile_of(get_config(model))
    cluster = make_cluster(gpus)
    space = SearchSpace(profile, cluster, options)
    plans = sampled_plans(space, 300)
    assert len({p.plan_id for p in plans}) > 50  # the sampler explores
    found = constraint_report(profile)
    for plan in plans:
        res = resolve(plan.device_map, profile)
        assert not res.uncovered and not res.unknown_keys and not res.covered_twice
        group = {res.device_of_unit(u) for u in ("vision_proj", "model.tok_embeddings")}
        execs = {0 if d in ("cpu", "disk") else d for d in group}
        assert len(execs) == 1, plan.device_map  # joined at top level: one device
        assert res.device_of_unit("vit") not in ("cpu", "disk")
        assert res.device_of_unit("model.tok_embeddings") not in ("cpu", "disk")
        gpu_layers = [res.device_of_unit(u) for u in profile.layers if isinstance(res.device_of_unit(u), int)]
        assert gpu_layers == sorted(gpu_layers)  # one contiguous run per GPU, in order
        codes = {f.code for f in static_findings(plan, profile, cluster, res, found) if f.level == "error"}
        assert not codes, (codes, plan.device_map)


def test_space_round_trip_and_split():
    assert split_layers(32, [1, 1]) == [16, 16] and sum(split_layers(31, [0.3, 0.2, 0.5])) == 31
    assert split_layers(5, [0, 0]) == [3, 2]
    profile = profile_of(get_config("ixc2-vl-7b"))
    space = SearchSpace(profile, make_cluster("rtx4090,2xrtx3060"), SpaceOptions())
    for plan in sampled_plans(space, 100, seed=3):
        params = space.params_of(plan)
        assert params is not None
        again = space.suggest(optuna.trial.FixedTrial(params))
        assert again.device_map == plan.device_map and again.dtypes == plan.dtypes


def test_dynamic_programme_equals_brute_force(tiny):
    W = Workload(prompt_tokens=8, new_tokens=4)
    trace = Trace(tiny, W)
    for gpus, options in [
        ("2x5MiB", SpaceOptions(dtypes=("fp32", "bf16"))),
        ("rtx4090,2xrtx3060", SpaceOptions(dtypes=("fp32", "bf16"), mixed_precision=False)),
        ("2x4MiB", SpaceOptions(dtypes=("fp32",), offload=("disk",))),
        ("3x3MiB", SpaceOptions(dtypes=("fp32",))),  # nothing fits
    ]:
        cluster = make_cluster(gpus)
        space = SearchSpace(tiny, cluster, options)
        dp, brute = Oracle(trace, space, cluster).solve(), brute_force(trace, space, cluster)
        assert dp.e2e_ms == pytest.approx(brute.e2e_ms, rel=1e-12), gpus
        if dp.plan is not None:
            assert trace.evaluate(dp.plan, cluster).e2e_s * 1e3 == pytest.approx(dp.e2e_ms, rel=1e-9)


def test_dynamic_programme_equals_brute_force_on_the_7b_heterogeneous_case(vl7b):
    trace = Trace(vl7b, Workload())
    cluster = make_cluster("rtx4090,2xrtx3060")
    space = SearchSpace(vl7b, cluster, SpaceOptions(dtypes=("fp32",), mixed_precision=False))
    dp, brute = Oracle(trace, space, cluster).solve(), brute_force(trace, space, cluster)
    assert brute.configs > 5000
    assert dp.e2e_ms == pytest.approx(brute.e2e_ms, rel=1e-12)


@pytest.mark.parametrize("study", ["default", "heterogeneous"])
def test_best_of_50_is_near_the_optimum_and_never_worse_than_the_authors(study, tmp_path):
    gaps = []
    for seed in (0, 1, 2):
        spec = with_overrides(load_study(ROOT / "studies" / f"{study}.toml"), seed=seed, out=str(tmp_path / f"s{seed}"))
        result = run_search(spec, **QUIET)
        assert result.best is not None and result.optimum.plan is not None
        gap = result.best["e2e_ms"] / result.optimum.e2e_ms - 1
        gaps.append(gap)
        assert -1e-9 <= gap <= 0.02, (seed, gap)
        authors = next(r for r in result.records if (r.get("baseline") or "").startswith("authors"))
        assert not authors.get("feasible") or result.best["e2e_ms"] <= authors["e2e_ms"]
    print(f"{study}: gaps to the exact optimum over seeds 0-2: {[f'{g:.3%}' for g in gaps]}")


def test_search_writes_everything_and_the_map_passes_check(tmp_path, capsys):
    out = tmp_path / "default"
    code = main(["search", "--trials", "50", "--out", str(out), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and not data["interrupted"]
    for name in ("best_map.json", "best_plan.json", "leaderboard.csv", "leaderboard.md", "history.png", "memory.png",
                 "load_best_map.py", "study.db"):
        assert (out / name).is_file(), name
    import pandas as pd

    board = pd.read_csv(out / "leaderboard.csv")
    sampled = board[board.baseline.isna() & board.trial.notna()]
    assert len(sampled) == 50
    # every baseline at every precision the study allows, fp32 (the baseline dtype) first
    assert set(board.baseline.dropna()) >= {"authors = accelerate-balanced (repaired) @ fp32", "accelerate-balanced @ fp32",
                                            "single @ fp32", "authors = accelerate-balanced (repaired) @ fp16"}
    assert (board.source.dropna() == "simulated").all()
    # the product: a bare map that from_pretrained takes, and that xctune check passes
    best_map = json.loads((out / "best_map.json").read_text())
    assert all(isinstance(v, (int, str)) for v in best_map.values())
    code = main(["check", str(out / "best_map.json"), "--gpus", "2x24GiB", "--dtype",
                 json.loads((out / "best_plan.json").read_text())["plan"]["dtypes"]["lm"]])
    assert code == 0
    doc = json.loads((out / "best_plan.json").read_text())
    assert doc["verified"].startswith("passes xctune check") and doc["optimum"]["gap"] <= 0.02
    assert {b["baseline"] for b in doc["baselines"]} >= {"single", "accelerate-sequential"}
    # the gain over the authors' map, split: placement at the best's precision, precision on the same map
    authors = next(g for g in doc["gains"] if g["baseline"] == "authors")
    best_dtype = doc["plan"]["dtypes"]["lm"]
    assert set(authors["ratios"]) == {"fp32", "fp16", "bf16"} and authors["best_precision"] == best_dtype
    assert authors["placement"] == authors["ratios"][best_dtype] and authors["total"] == authors["ratios"]["fp32"]
    assert authors["placement"] * authors["precision"] == pytest.approx(authors["total"], rel=1e-12)
    assert 1.0 <= authors["placement"] < 1.1 < authors["precision"]  # in 16 bit, the authors' map is nearly as fast
    single = next(g for g in doc["gains"] if g["baseline"] == "single")
    assert single["status"]["fp32"] == "oom" and single["ratios"]["fp16"]  # does not fit in fp32, compared in fp16


def test_resume_adds_trials_and_an_interruption_keeps_finished_ones(tmp_path, monkeypatch):
    spec = with_overrides(load_study(ROOT / "studies" / "heterogeneous.toml"), trials=4, out=str(tmp_path / "h"))
    first = run_search(spec, **QUIET)
    n1 = len(first.study.trials)
    second = run_search(with_overrides(spec, trials=3), **QUIET)
    assert len(second.study.trials) == n1 + 3  # baselines are not queued twice
    # interrupt the next run after two trials: both stay in the study, outputs are written
    from xctune.search import runner as search_mod

    calls = {"n": 0}
    real_call = search_mod.VirtualEvaluator.__call__

    def flaky(self, plan, label):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_call(self, plan, label)

    monkeypatch.setattr(search_mod.VirtualEvaluator, "__call__", flaky)
    third = run_search(with_overrides(spec, trials=10), **QUIET)
    assert third.interrupted
    done = [t for t in third.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == n1 + 3 + 2
    reopened = optuna.load_study(study_name=spec.name, storage=spec.storage_url)
    assert len([t for t in reopened.trials if t.state == optuna.trial.TrialState.COMPLETE]) == len(done)


def test_multi_objective_pareto_front(tmp_path, capsys):
    code = main(["search", "--study", str(ROOT / "studies" / "heterogeneous.toml"), "--trials", "20",
                 "--objectives", "latency,peak_mem", "--out", str(tmp_path / "mo"), "--json"])
    assert code == 0
    assert (tmp_path / "mo" / "pareto.png").is_file()
    board = (tmp_path / "mo" / "leaderboard.csv").read_text()
    assert "pareto" in board.splitlines()[0]


def test_real_cpu_search_end_to_end(tmp_path, capsys):
    code = main(["search", "--study", str(ROOT / "studies" / "real-cpu.toml"), "--out", str(tmp_path / "real"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0, data
    import pandas as pd

    board = pd.read_csv(tmp_path / "real" / "leaderboard.csv")
    assert (board.source.dropna() == "measured").all()
    assert len(board[board.trial.notna()]) >= 20
    # the virtual world's best plans, enqueued first, where the twin has earned it (calibrate.twin_trust)
    twin = optuna.load_study(study_name="real-cpu", storage=f"sqlite:///{tmp_path / 'real' / 'study.db'}").user_attrs["twin"]
    assert board.seed_plan.notna().sum() == (3 if twin["trusted"] else 0), twin
    assert data["best"]["source"] == "measured" and data["best"]["fidelity_top1"] >= 0.5
    best_map = json.loads((tmp_path / "real" / "best_map.json").read_text())
    assert set(best_map.values()) <= {0, 1, "disk"}


@pytest.mark.parametrize(
    "args,needle",
    [
        (["search", "--objectives", "speed"], "unknown objective"),
        (["search", "--study", "missing.toml"], "cannot read study"),
        (["search", "--trials", "-1"], "trials"),
        (["search", "--storage", "nosuchdb://x"], "storage"),
    ],
)
def test_search_bad_input(args, needle, tmp_path, capsys):
    code = main(args + ["--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1


def test_bad_study_files(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("name = 'x'\n[cluster]\ngpus = '2x24GiB'\ncolor = 'red'\n")
    with pytest.raises(Exception, match="unknown setting 'color'"):
        load_study(p)
    p.write_text("name = [")
    with pytest.raises(Exception, match="not valid TOML"):
        load_study(p)
    p.write_text("[space]\ndtypes = ['fp8']\n")
    with pytest.raises(Exception, match="'fp8' is not one of fp32, fp16, bf16"):
        load_study(p)


def test_resuming_refuses_a_different_model_or_cluster(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["search", "--model", "tiny", "--gpus", "2x1GiB", "--trials", "2", "--out", out, "--json"]) == 0
    capsys.readouterr()
    assert main(["search", "--model", "tiny", "--gpus", "3x1GiB", "--trials", "2", "--out", out, "--json"]) == 2
    err = capsys.readouterr().err
    assert "another cluster" in err and "--study-name" in err
    assert main(["search", "--model", "tiny", "--gpus", "2x1GiB", "--trials", "2", "--out", out, "--json"]) == 0
