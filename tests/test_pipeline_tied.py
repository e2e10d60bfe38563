"""Pipeline targets with a head tied to the token embeddings (PaliGemma, Gemma 3).

accelerate keeps one tied tensor on one device, so the head must follow the embeddings. A pipeline
engine runs the embeddings on its first stage and the head on its last, and the last stage holds
its own copy of the embedding matrix: the trace, the dry run, the memory per device, the exact
optimum and the exports model that copy. Runs on a PaliGemma twin with 4 decoder layers (seconds).
"""

from __future__ import annotations

import json

import pytest

from xctune.hardware import make_cluster
from xctune.worlds.costmodel import Efficiency
from xctune.models.hf import get_preset, twin
from xctune.models.hf.config import from_dict
from xctune.models.profile import profile_of
from xctune.plans.check import check
from xctune.plans.plan import Plan
from xctune.reports.report import layout
from xctune.search.oracle import Oracle, brute_force, feasible_e2e
from xctune.search.runner import run_search
from xctune.search.space import SearchSpace, SpaceOptions
from xctune.search.study import StudySpec
from xctune.search.targets import PIPELINE_RULES, TargetSpec, pipeline_map
from xctune.worlds.trace import InvalidPlan, Trace
from xctune.workload import Workload

W = Workload(prompt_tokens=8, new_tokens=4)
FP16 = SpaceOptions(dtypes=("fp16",), mixed_precision=False)
# 4 layers of the fp16 twin (~0.4 MiB of weights) do not fit GPU 0 alone; the last stage's copy of the
# embedding matrix (512 x 64 fp16 = 64 KiB) leaves room for one layer there, not two
GPUS = "0.4MiB,2x0.25MiB"
EMB, HEAD = "model.language_model.embed_tokens", "lm_head"
COPY = 512 * 64 * 2  # the twin's embedding matrix in fp16


def _config_data() -> dict:
    data = json.loads(json.dumps(twin(get_preset("paligemma-3b")).data))
    data["text_config"]["num_hidden_layers"] = 4
    return data


@pytest.fixture(scope="module")
def pali():
    return profile_of(from_dict(_config_data(), "paligemma-twin4"))


@pytest.fixture(scope="module")
def trace(pali):
    return Trace(pali, W)


def _space(pali, trace, cluster, target):
    return SearchSpace(pali, cluster, FP16, TargetSpec(target), embed_on_main=trace.joins_main(pali.embed_group, "fp16"))


def test_a_pipeline_stage_holds_its_own_copy_of_the_tied_weight(pali, trace):
    """accelerate refuses the split (one tensor), a pipeline engine runs it with a copy: the trace and the full
    dry run agree, and both count the embedding matrix on the first and on the last stage."""
    assert pali.tied == ((f"{EMB}.weight", f"{HEAD}.weight"),)
    (tensor,) = pali.tied_tensors
    assert (tensor.name, tensor.numel, tensor.owner, tensor.users) == (f"{EMB}.weight", 512 * 64, EMB, (HEAD,))
    cluster = make_cluster("2x0.4MiB")
    plan = Plan.uniform(pipeline_map(pali, [2, 2]), "fp16")
    with pytest.raises(InvalidPlan, match="one tied weight"):
        trace.evaluate(plan, cluster)
    trace.evaluate(plan, cluster, tied_copies=True)
    one, copied = trace.weights(plan), trace.weights(plan, tied_copies=True)
    assert copied[0] == one[0] and copied[1] - one[1] == COPY
    assert pali.by_name[EMB].param_bytes("fp16") >= COPY and pali.by_name[HEAD].params == 0  # counted once, under EMB
    # the dry run: accelerate's map fails at the tied tensor, the engine's copy runs
    assert not check(plan, pali, cluster, W).ok
    report = check(plan, pali, cluster, W, tied_copies=True)
    assert report.ok, [f.message for f in report.errors]
    assert report.dry_run.ok
    by_dev = {d.device: d.weights_bytes for d in report.devices}
    assert by_dev[1] - COPY == pytest.approx(one[1], abs=64) and by_dev[1] == pytest.approx(copied[1], abs=64)


def test_exact_optimum_counts_the_copy_and_equals_brute_force(pali, trace):
    cluster = make_cluster(GPUS)
    space = _space(pali, trace, cluster, "vllm-pp")
    dp, bf = Oracle(trace, space, cluster).solve(), brute_force(trace, space, cluster)
    assert dp.plan is not None and dp.e2e_ms == pytest.approx(bf.e2e_ms, rel=1e-12)
    assert layout(dp.plan, pali) == "emb:0 L0:0 L1-2:1 L3:2 head:2"
    assert trace.weights(dp.plan, True)[2] - trace.weights(dp.plan)[2] == COPY
    # the plan the optimum would take on larger last GPUs (two layers there) fits without the copy, not with it
    roomy = make_cluster("3x0.35MiB")
    two_last = Oracle(trace, _space(pali, trace, roomy, "vllm-pp"), roomy).solve().plan
    assert layout(two_last, pali) == "emb:0 L0:0 L1:1 L2-3:2 head:2"
    assert feasible_e2e(trace, two_last, cluster, Efficiency(), PIPELINE_RULES) is None
    est = trace.evaluate(two_last, cluster, tied_copies=True)
    without_copy = trace.weights(two_last)[2] + est.peak_bytes[2]
    assert without_copy <= cluster.usable_bytes(2) < without_copy + COPY


def test_accelerate_still_keeps_the_head_with_the_embeddings(pali, trace):
    cluster = make_cluster(GPUS)
    space = _space(pali, trace, cluster, "accelerate")
    assert space.head_with_embed and not _space(pali, trace, cluster, "torch-pipelining").head_with_embed
    dp, bf = Oracle(trace, space, cluster).solve(), brute_force(trace, space, cluster)
    assert dp.plan is not None and dp.e2e_ms == pytest.approx(bf.e2e_ms, rel=1e-12)
    assert dp.plan.device_map[HEAD] == dp.plan.device_map[EMB] == 0
    assert trace.weights(dp.plan, True) == trace.weights(dp.plan)  # nothing apart: no copy


@pytest.mark.parametrize("target", ["vllm-pp", "torch-pipelining"])
def test_pipeline_study_ends_with_the_embedding_counted_twice(tmp_path, target):
    model = tmp_path / "paligemma-twin4"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(_config_data()))
    out = tmp_path / "out"
    spec = StudySpec(model=str(model), gpus=GPUS, trials=6, out=str(out), workload=W, space=FP16,
                     baseline_dtype="fp16", target=TargetSpec(target), baselines=("vllm-default", "single"))
    r = run_search(spec, progress=False, log=lambda m: None)
    assert r.best is not None and r.verified.startswith("passes xctune check"), r.verified
    assert r.best["e2e_ms"] == pytest.approx(r.optimum.e2e_ms, rel=1e-9)
    stages = sorted({d for d in r.best_plan.device_map.values()})
    assert stages == [0, 1, 2] and r.best_plan.device_map[HEAD] == 2 and r.best_plan.device_map[EMB] == 0
    weights = {k.split(".", 1)[1]: v for k, v in r.best.items() if k.startswith("weights_bytes.") and v is not None}
    emb = r.profile.by_name[EMB].param_bytes("fp16")
    assert weights["cuda:2"] >= COPY + r.profile.by_name[r.profile.layers[-1]].weight_bytes("fp16")
    assert sum(weights.values()) == pytest.approx(sum(u.weight_bytes("fp16") for u in r.profile.units) + COPY, abs=64)
    assert emb >= COPY
    from xctune.reports.report import write_outputs

    write_outputs(r)
    folder = {"vllm-pp": out / "vllm" / "vllm_plan.json", "torch-pipelining": out / "torch_pipelining" / "pipeline_plan.json"}
    for name, path in folder.items():
        doc = json.loads(path.read_text())
        assert doc["validated"] and doc["tied_weight_copies"] == [
            {"tensor": f"{EMB}.weight", "owner": EMB, "used_by": HEAD, "stage": 2, "bytes": COPY}], name
        assert "its own copy" in (path.parent / "README.md").read_text()


def test_check_judges_a_pipeline_map_as_its_target_runs_it(tmp_path, pali, capsys):
    from xctune.cli import main

    model = tmp_path / "paligemma-twin4"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(_config_data()))
    dmap = tmp_path / "map.json"
    dmap.write_text(json.dumps(pipeline_map(pali, [2, 2])))
    args = ["check", str(dmap), "--model", str(model), "--gpus", "2x0.4MiB", "--dtype", "fp16",
            "--prompt-tokens", "8", "--new-tokens", "4", "--json"]
    assert main(args) == 1  # accelerate: one tied tensor cannot be on both GPUs
    refused = json.loads(capsys.readouterr().out)
    assert not refused["ok"] and HEAD in json.dumps(refused["findings"])
    assert main([*args, "--target", "vllm-pp"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"]
