"""Clusters of nodes, engine targets (vllm-pp, torch-pipelining), throughput, and their exports."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import optuna
import pytest

from conftest import ROOT, sampled_plans
from xctune.plans.baselines import vllm_default_counts
from xctune.cli import main
from xctune.errors import BadInput
from xctune.export import ExportInvalid, export_plan
from xctune.hardware import LINK_PRESETS, NETWORK_PRESETS, LinkSpec, make_cluster
from xctune.worlds.costmodel import Efficiency
from xctune.search.oracle import Oracle, brute_force
from xctune.plans.plan import Plan
from xctune.reports.report import summary, write_outputs
from xctune.search.runner import run_search
from xctune.search.space import SearchSpace, SpaceOptions
from xctune.search.study import StudySpec, load_study, with_overrides
from xctune.search.targets import TargetSpec, pipeline_map, pipeline_stages, serving_estimate, throughput, tp_cluster
from xctune.worlds.trace import Trace
from xctune.workload import Workload

QUIET = dict(progress=False, log=lambda m: None)
PIPE = TargetSpec("vllm-pp")
W = Workload(prompt_tokens=8, new_tokens=4)


# --- clusters of nodes ---------------------------------------------------------------------


def test_node_specs_parse_into_nodes_links_and_a_network():
    c = make_cluster("2x[4xrtx4090]@eth-100g")
    assert len(c.gpus) == 8 and c.n_nodes == 2 and c.node_of == (0,) * 4 + (1,) * 4
    assert c.link_between(0, 3).name == "pcie4" and c.link_between(3, 4).name == "eth-100g"
    assert c.crosses_nodes(3, 4) and not c.crosses_nodes(0, 3) and not c.crosses_nodes(0, "cpu")
    assert c.describe() == "[4x rtx4090 (24.0 GiB), pcie4 x16] x2 over eth-100g"
    mixed = make_cluster("[rtx4090,2xrtx3060]+[4xa10@nvlink3]@ib-hdr")
    assert [g.name for g in mixed.gpus] == ["rtx4090", "rtx3060", "rtx3060"] + ["a10"] * 4
    assert mixed.link_between(3, 6).name == "nvlink3" and mixed.link_between(1, 2).name == "pcie4"
    assert mixed.link_between(2, 3) is NETWORK_PRESETS["ib-hdr"]
    # today's single-node syntax is unchanged
    one = make_cluster("rtx4090,2xrtx3060", link="nvlink3")
    assert one.n_nodes == 1 and one.network is None and one.link_between(0, 2).name == "nvlink3"
    assert one.describe() == "1x rtx4090 (24.0 GiB) + 2x rtx3060 (12.0 GiB), nvlink3"


@pytest.mark.parametrize("spec,words", [
    ("2x[4xa10]", "name the network"),
    ("[4xa10", "unbalanced brackets"),
    ("2x[4xa10]@wifi", "unknown network 'wifi'"),
    ("[4xa10@pcie9]+[a10]@ib-hdr", "unknown intra-node link 'pcie9'"),
    ("rtx4090@ib-hdr", "write each node in brackets"),
    ("[4xa10]x2@ib-hdr", "bad node group"),
    ("0x[a10]@ib-hdr", "node count must be >= 1"),
    ("100x[a10]@ib-hdr", "too many GPUs"),
])
def test_bad_node_specs_exit_2_with_one_line(spec, words, capsys):
    assert main(["check", "--baseline", "single", "--model", "tiny", "--gpus", spec]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_each_move_is_priced_on_the_link_it_crosses(tiny):
    """The same plan on one node of 4 GPUs and on two nodes of 2: only the moves between GPUs 0-1
    and GPUs 2-3 change link, each costing exactly the network's latency + bytes / bandwidth."""
    trace = Trace(tiny, W)
    plan = Plan.uniform(pipeline_map(tiny, [1, 1, 1, 1]), "fp32")
    nodes = make_cluster("2x[2x1GiB]@eth-100g")
    one = trace.evaluate(plan, make_cluster("4x1GiB"))
    two = trace.evaluate(plan, nodes)
    net, pcie = NETWORK_PRESETS["eth-100g"], make_cluster("4x1GiB").gpu_link
    crossing = [m for m in one.moves if nodes.crosses_nodes(m[1], m[2])]
    assert {(m[1], m[2]) for m in crossing} >= {(1, 2)}  # the hidden state, and inputs/outputs of the root
    assert len(crossing) < len(one.moves)
    weight = {"vision": 1, "prefill": 1, "decode": 1.5, "decode_last": 1.5}  # new_tokens 4: 3 steps, mean of two
    achieved = Efficiency().gpu_link  # both links at the default achieved fraction of a GPU-to-GPU copy
    extra = sum(weight[m[0]] * (net.transfer_seconds(m[3], achieved) - pcie.transfer_seconds(m[3], achieved))
                for m in crossing)
    assert two.e2e_s - one.e2e_s == pytest.approx(extra, rel=1e-9)
    assert extra > 0


# --- targets: space, oracle, throughput ------------------------------------------------------



@pytest.mark.parametrize("model,gpus,distinct", [
    ("ixc2-vl-7b", "2x[4xrtx4090]@eth-100g", 40),
    ("tiny-hd", "[2x1GiB]+[3x1GiB]@ib-hdr", 24),  # all of it: 8 partitions of 4 layers x 3 dtypes
])
def test_pipeline_space_keeps_the_engines_fixed_placement(model, gpus, distinct):
    from xctune.models import get_config
    from xctune.models.profile import profile_of

    profile = profile_of(get_config(model))
    space = SearchSpace(profile, make_cluster(gpus), SpaceOptions(offload=("cpu",)), PIPE)
    plans = sampled_plans(space, 200)
    assert len({p.plan_id for p in plans}) >= distinct
    for plan in plans:
        stages = pipeline_stages(plan, profile)  # raises where a rule is broken
        assert sum(s.layers for s in stages) == len(profile.layers) and min(s.layers for s in stages) >= 1
        assert len(set(plan.dtypes.values())) == 1
        again = space.suggest(optuna.trial.FixedTrial(space.params_of(plan)))
        assert again.device_map == plan.device_map


def test_pipeline_rules_reject_what_the_engines_cannot_run(tiny):
    ok = Plan.uniform(pipeline_map(tiny, [2, 2]), "fp16")
    assert [(s.device, s.first_layer, s.layers) for s in pipeline_stages(ok, tiny)] == [(0, 0, 2), (1, 2, 2)]
    head_first = dict(ok.device_map, **{"model.norm": 0, "output": 0})
    with pytest.raises(BadInput, match="last stage"):
        pipeline_stages(Plan.uniform(head_first, "fp16"), tiny)
    with pytest.raises(BadInput, match="one dtype"):
        pipeline_stages(Plan(ok.device_map, {"vision": "fp32", "lm": "fp16", "head": "fp16"}), tiny)
    back_and_forth = dict(ok.device_map, **{"model.layers.1": 1, "model.layers.2": 0})
    with pytest.raises(BadInput, match="contiguous"):
        pipeline_stages(Plan.uniform(back_and_forth, "fp16"), tiny)
    assert not SearchSpace(tiny, make_cluster("2x1GiB"), SpaceOptions(), PIPE).contains(Plan.uniform(head_first, "fp16"))


def test_exact_optimum_under_pipeline_rules_equals_brute_force(tiny):
    trace = Trace(tiny, W)
    for gpus in ("3x3MiB", "4x2MiB", "rtx4090,2xrtx3060"):
        cluster = make_cluster(gpus)
        space = SearchSpace(tiny, cluster, SpaceOptions(dtypes=("fp32", "bf16")), PIPE)
        dp, brute = Oracle(trace, space, cluster).solve(), brute_force(trace, space, cluster)
        assert dp.e2e_ms == pytest.approx(brute.e2e_ms, rel=1e-12), gpus
        if dp.plan is not None:
            pipeline_stages(dp.plan, tiny)
            est = trace.evaluate(dp.plan, cluster, free_move_kinds=PIPE.rules.free_move_kinds)
            assert est.e2e_s * 1e3 == pytest.approx(dp.e2e_ms, rel=1e-9)


# Links the cluster syntax cannot write, to make crossing a node costly or cheap at will: a slow
# network (below Ethernet's 12.5 GB/s), and one faster than any node link (crossing nodes pays off).
SLOW = LinkSpec("test-slow", 0.05, 500.0, "test only")
FAST = LinkSpec("test-fast", 900.0, 0.5, "test only")


def _nodes(gpus, network=None, inside=None):
    """A cluster of nodes from the syntax, with its network or node links replaced (tests only)."""
    cluster = make_cluster(gpus)
    if network is not None:
        cluster = replace(cluster, network=network)
    if inside is not None:
        cluster = replace(cluster, node_links=tuple(inside), gpu_link=inside[0])
    return cluster


@pytest.mark.parametrize("case", ["slow network", "fast network", "three nodes"])
def test_exact_optimum_over_nodes_equals_brute_force_under_pipeline_rules(tiny, case):
    """Each move priced on the link between its two GPUs: the pipeline's boundaries cross a node's
    link or the network, and the head's moves back to GPU 0 cross the network (tiny: 4 layers)."""
    gpus, network, inside, target = {
        "slow network": ("[2x5MiB]+[2x5MiB]@eth-100g", SLOW, None, PIPE),
        "fast network": ("[2x5MiB]+[2x5MiB]@eth-100g", FAST, [NETWORK_PRESETS["eth-100g"], SLOW], PIPE),
        "three nodes": ("[5MiB]+[5MiB]+[5MiB]@eth-100g", None, None, TargetSpec("torch-pipelining")),
    }[case]
    cluster = _nodes(gpus, network, inside)
    trace = Trace(tiny, W)
    space = SearchSpace(tiny, cluster, SpaceOptions(dtypes=("fp32",)), target)
    dp, brute = Oracle(trace, space, cluster).solve(), brute_force(trace, space, cluster)
    assert dp.plan is not None and dp.e2e_ms == pytest.approx(brute.e2e_ms, rel=1e-12)
    stages = pipeline_stages(dp.plan, tiny)
    assert len({cluster.node_of[s.device] for s in stages}) > 1  # the optimum spans nodes: the network is priced
    est = trace.evaluate(dp.plan, cluster, free_move_kinds=target.rules.free_move_kinds)
    assert est.e2e_s * 1e3 == pytest.approx(dp.e2e_ms, rel=1e-9)


@pytest.mark.parametrize("case", ["nvlink pairs over pcie", "fast network, slow nodes", "offload, slow network"])
def test_exact_optimum_over_mixed_links_equals_brute_force_for_accelerate(tiny, case):
    """accelerate's walks have gaps and put the embeddings and the head on any GPU: a run's first
    move crosses the link from the last GPU holding layers, role moves the link between their GPUs.
    A machine with NVLink pairs joined by PCIe is two "nodes" of one Cluster."""
    gpus, network, inside, options = {
        "nvlink pairs over pcie": ("[2x4MiB@nvlink3]+[2x4MiB@nvlink3]@eth-100g", LINK_PRESETS["pcie4"], None,
                                   SpaceOptions(dtypes=("fp32",))),
        "fast network, slow nodes": ("[3MiB]+[3MiB,5MiB]+[3MiB]@eth-100g", FAST,
                                     [SLOW, LINK_PRESETS["pcie3"], SLOW], SpaceOptions(dtypes=("fp32",))),
        "offload, slow network": ("[4MiB]+[4MiB]+[4MiB]@eth-100g", SLOW, [FAST, FAST, FAST],
                                  SpaceOptions(dtypes=("fp32",), offload=("cpu",))),
    }[case]
    cluster = _nodes(gpus, network, inside)
    trace = Trace(tiny, W)
    space = SearchSpace(tiny, cluster, options)
    dp, brute = Oracle(trace, space, cluster).solve(), brute_force(trace, space, cluster)
    assert brute.configs > 500 and dp.plan is not None  # (520 plans in the offload case: the space builds no offloaded projector off GPU 0)
    assert dp.e2e_ms == pytest.approx(brute.e2e_ms, rel=1e-12)
    used = {d for d in dp.plan.device_map.values() if isinstance(d, int)}
    assert len({cluster.node_of[d] for d in used}) > 1  # the optimum spans nodes
    assert trace.evaluate(dp.plan, cluster).e2e_s * 1e3 == pytest.approx(dp.e2e_ms, rel=1e-9)


def test_throughput_formula(tiny):
    """At one request in flight every target gives batch * new_tokens / e2e; with M in flight a
    pipeline's round is max(sum of stage times, M x the slowest stage); accelerate's is M x the sum."""
    trace = Trace(tiny, W)
    cluster = make_cluster("[2x1GiB]+[2x1GiB]@eth-100g")
    plan = Plan.uniform(pipeline_map(tiny, [1, 1, 1, 1]), "fp32")
    est = trace.evaluate(plan, cluster, free_move_kinds=("return",))
    stages = {d: 0.0 for d in range(4)}
    for (phase, d), s in est.device_phase_s.items():
        assert d in stages
    total = sum(est.device_phase_s.values())
    assert total == pytest.approx(sum(est.phase_s.values()), rel=1e-9)  # every second belongs to a stage
    one = throughput(est, TargetSpec("vllm-pp", requests_in_flight=1), W.batch, W.new_tokens)
    assert one.tokens_per_s == pytest.approx(W.new_tokens / est.e2e_s, rel=1e-9)
    four = throughput(est, TargetSpec("vllm-pp", requests_in_flight=4), W.batch, W.new_tokens)
    dec = list(four.stage_decode_ms.values())
    first = list(four.stage_first_ms.values())
    T = max(sum(first), 4 * max(first)) + (W.new_tokens - 1) * max(sum(dec), 4 * max(dec))
    assert four.tokens_per_s == pytest.approx(4 * W.new_tokens / (T / 1e3), rel=1e-9)
    assert four.tokens_per_s > 1.5 * one.tokens_per_s
    seq = throughput(est, TargetSpec("accelerate", requests_in_flight=4), W.batch, W.new_tokens)
    assert seq.tokens_per_s == pytest.approx(one.tokens_per_s, rel=1e-9)  # no overlap: no gain


def test_several_requests_in_flight_need_their_kv_caches(tiny):
    trace = Trace(tiny, W)
    cluster = make_cluster("2x1GiB")
    plan = Plan.uniform(pipeline_map(tiny, [2, 2]), "fp32")
    base = trace.evaluate(plan, cluster)
    more = serving_estimate(trace.evaluate(plan, cluster), TargetSpec("vllm-pp", requests_in_flight=5), plan, tiny, W)
    for d, kv in base.kv_bytes.items():
        assert kv > 0 and more.kv_bytes[d] == 5 * kv
        assert more.peak_bytes[d] == base.peak_bytes[d] + 4 * kv


def test_tensor_parallel_stages_split_memory_and_pay_all_reduces(tiny):
    full = make_cluster("2x[4xrtx4090@nvlink4]@ib-hdr")
    stage = tp_cluster(full)
    assert len(stage.gpus) == 2 and stage.gpus[0].memory_bytes == 4 * full.gpus[0].memory_bytes
    assert stage.link_between(0, 1).name == "ib-hdr"
    from xctune.search.targets import TensorParallel, allreduce_seconds

    trace = Trace(tiny, W)
    plan = Plan.uniform(pipeline_map(tiny, [2, 2]), "fp32")
    target = TargetSpec("vllm-pp", tensor_parallel="node")
    plain = trace.evaluate(plan, stage, free_move_kinds=("return",))
    with_tp = serving_estimate(trace.evaluate(plan, stage, free_move_kinds=("return",)), target, plan, tiny, W,
                               TensorParallel(4, full.node_links[0]))
    hidden = 4 * tiny.config.hidden_size
    one_step = 4 * 2 * allreduce_seconds(hidden, 4, full.node_links[0])  # 4 layers, 2 all-reduces each
    prefill = 4 * 2 * allreduce_seconds(hidden * W.prompt_length(tiny.config), 4, full.node_links[0])
    assert with_tp.e2e_s - plain.e2e_s == pytest.approx(prefill + (W.new_tokens - 1) * one_step, rel=1e-9)
    with pytest.raises(BadInput, match="same number of the same GPU"):
        tp_cluster(make_cluster("[4xa10]+[2xa10]@ib-hdr"))


def test_vllm_default_partition():
    assert vllm_default_counts(32, 8) == [4] * 8
    assert vllm_default_counts(32, 5) == [6, 6, 7, 7, 6]  # 2 left over: to the middle stages
    assert vllm_default_counts(30, 4) == [7, 8, 8, 7]
    assert vllm_default_counts(11, 4) == [3, 3, 3, 2]  # 3 left over: every stage but the last
    assert vllm_default_counts(5, 2) == [3, 2]  # the last stage carries the head: it gets no extra layer


# --- exports -----------------------------------------------------------------------------------


def test_vllm_export_invariants_and_round_trip(tiny, tmp_path):
    cluster = make_cluster("[2x1GiB]+[1GiB]@eth-100g")
    plan = Plan.uniform(pipeline_map(tiny, [1, 2, 1]), "fp16")
    exp = export_plan("vllm-pp", plan, tiny, cluster, W, tmp_path, serving=TargetSpec("vllm-pp", requests_in_flight=2))
    script = (tmp_path / "vllm" / "launch_vllm.sh").read_text()
    assert 'export VLLM_PP_LAYER_PARTITION="1,2,1"' in script
    assert "--pipeline-parallel-size 3" in script and "--tensor-parallel-size 1" in script
    assert "--distributed-executor-backend ray" in script and "--dtype float16" in script
    assert "--max-num-seqs 2" in script and "ray start --head" in script
    assert not exp.supported and "does not support tiny" in exp.statement
    assert "XCTUNE_FORCE" in script  # the script says so too, and stops
    doc = json.loads((tmp_path / "vllm" / "vllm_plan.json").read_text())
    assert doc["env"]["VLLM_PP_LAYER_PARTITION"] == "1,2,1" and sum(s["layers"] for s in doc["stages"]) == 4
    assert [s["node"] for s in doc["stages"]] == [0, 0, 1]
    assert len(doc["validated"]) == 3 and any("xctune check" in c for c in exp.checks)
    res = subprocess.run(["bash", str(tmp_path / "vllm" / "launch_vllm.sh")], capture_output=True, text=True)
    assert res.returncode == 1 and "does not support" in res.stderr


def test_torch_pipelining_export_invariants(tiny, tmp_path):
    cluster = make_cluster("3x1GiB")
    plan = Plan.uniform(pipeline_map(tiny, [2, 1, 1]), "fp32")
    exp = export_plan("torch-pipelining", plan, tiny, cluster, W, tmp_path)
    spec = json.loads((tmp_path / "torch_pipelining" / "split_spec.json").read_text())
    assert spec == {"model.layers.2": "BEGINNING", "model.layers.3": "BEGINNING"}
    assert exp.supported and (tmp_path / "torch_pipelining" / "run_pipeline.py").is_file()
    assert "torchrun --nproc-per-node 3" in (tmp_path / "torch_pipelining" / "README.md").read_text()


def test_exports_are_refused_or_fail_validation_where_they_must(tiny, tmp_path):
    mixed = Plan(pipeline_map(tiny, [2, 2]), {"vision": "fp32", "lm": "fp16", "head": "fp16"})
    with pytest.raises(BadInput, match="one dtype"):
        export_plan("vllm-pp", mixed, tiny, make_cluster("2x1GiB"), W, tmp_path)
    plan = Plan.uniform(pipeline_map(tiny, [2, 2]), "fp32")
    with pytest.raises(ExportInvalid, match="xctune check rejects"):  # a stage does not fit 1 MiB
        export_plan("torch-pipelining", plan, tiny, make_cluster("2x1MiB"), W, tmp_path)
    with pytest.raises(BadInput, match="one node"):
        export_plan("accelerate", plan, tiny, make_cluster("2x[1GiB]@eth-100g"), W, tmp_path)
    acc = export_plan("accelerate", plan, tiny, make_cluster("2x1GiB"), W, tmp_path / "acc")
    assert json.loads((tmp_path / "acc" / "best_map.json").read_text()) == plan.device_map
    assert 'PATH = "/path/to/your/tiny-checkpoint"' in (tmp_path / "acc" / "load_best_map.py").read_text()
    assert len(acc.checks) == 2


def test_export_command(tiny, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(Plan.uniform(pipeline_map(tiny, [3, 1]), "fp32").to_dict()))
    assert main(["export", str(plan), "--target", "vllm-pp", "--model", "tiny", "--gpus", "2x[1GiB]@ib-hdr",
                 "--prompt-tokens", "8", "--new-tokens", "4", "--out", str(tmp_path / "x"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "vllm-pp" and len(out["checks"]) == 3 and not out["supported"]
    assert main(["export", str(plan), "--target", "vllm-pp", "--model", "tiny"]) == 2  # no cluster
    assert main(["export", str(plan), "--target", "vllm-pp", "--model", "tiny", "--gpus", "2x1MiB",
                 "--out", str(tmp_path / "y")]) == 1  # does not fit: the validation fails


def test_torch_pipelining_export_runs_in_two_processes_with_the_tokens_of_one(tiny, tmp_path):
    """The exported script on this CPU: two processes (gloo, 127.0.0.1) against the same greedy
    loop in one process, and against xctune's own generate loop with its KV cache."""
    import torch

    from xctune.worlds.build import host_model
    from xctune.models.ixc import generate, make_inputs

    w = Workload(prompt_tokens=6, new_tokens=4)
    plan = Plan.uniform(pipeline_map(tiny, [2, 2]), "fp32")
    exp = export_plan("torch-pipelining", plan, tiny, make_cluster("[1GiB]+[1GiB]@eth-100g"), w, tmp_path)
    script = exp.files["run_pipeline.py"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def run(*args):
        res = subprocess.run([sys.executable, str(script), *args, "--cpu"], capture_output=True, text=True,
                             env=env, timeout=500)
        assert res.returncode == 0, res.stderr[-2000:]
        lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
        assert len(lines) == 1
        return lines[0]

    two = run("--nproc", "2")
    one = run("--reference")
    assert two["stages"] == 2 and two["backend"] == "gloo"
    assert two["tokens"] == one["tokens"] and len(two["tokens"][0]) == 4
    model = host_model(tiny.config)
    with torch.no_grad():
        cached = generate(model, make_inputs(tiny.config, w, "cpu"), w.new_tokens)
    assert cached.tokens.tolist() == two["tokens"]


def test_torch_pipelining_runner_refuses_a_family_without_pipeline_parts(tmp_path):
    """What the runner runs of a model comes from its family (models/base.py pipeline_parts): a
    transformers class provides none, and the runner says so in one line (exit 2) before loading
    any weights, in one process and in spawned ones."""
    import shutil

    from xctune.export import run_pipeline

    shutil.copy(run_pipeline.__file__, tmp_path / "run_pipeline.py")
    (tmp_path / "split_spec.json").write_text(json.dumps({"model.language_model.layers.16": "BEGINNING"}))
    (tmp_path / "pipeline_plan.json").write_text(json.dumps(
        {"model": "llava-1.5-7b", "dtype": "fp16", "stages": [{"stage": 0}, {"stage": 1}], "workload": Workload(prompt_tokens=6, new_tokens=2).to_dict()}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for args in (["--reference"], ["--nproc", "2"]):
        res = subprocess.run([sys.executable, str(tmp_path / "run_pipeline.py"), *args, "--cpu"], capture_output=True,
                             text=True, env=env, timeout=300)
        assert res.returncode == 2, res.stderr[-2000:]
        ours = [line for line in res.stderr.splitlines() if line.startswith("run_pipeline.py: error: ")]
        assert ours and all("the torch pipelining runner" in line and "llava-1.5-7b does not" in line for line in ours)
        assert "Traceback" not in res.stderr


# --- studies -----------------------------------------------------------------------------------


def test_two_node_study_on_the_tiny_model(tmp_path):
    """A vllm-pp study over two nodes: a plan, its inter-node bytes per token, both exports; with
    4 requests in flight the throughput study's plan beats the batch-1 (latency) plan's tokens/s."""
    base = StudySpec(name="tn", model="tiny", gpus="2x[2x5MiB]@eth-100g", workload=W, trials=12,
                     space=SpaceOptions(dtypes=("fp32",)), target=TargetSpec("vllm-pp"),
                     baselines=("authors", "vllm-default", "single"), out=str(tmp_path / "lat"))
    lat = run_search(base, **QUIET)
    one_node = make_cluster("[2x5MiB]")
    assert Oracle(lat.evaluator.trace, SearchSpace(lat.profile, one_node, base.space, PIPE), one_node).solve().plan is None
    assert lat.best is not None and lat.optimum.plan is not None  # the exact optimum over both nodes' links
    assert lat.best["e2e_ms"] >= lat.optimum.e2e_ms * (1 - 1e-9)
    assert "exact optimum of the cost model" in summary(lat)
    pipeline_stages(lat.best_plan, lat.profile)
    assert lat.best["internode_bytes_per_token"] > 0
    files = write_outputs(lat)
    assert "vllm/launch_vllm.sh" in files and "torch_pipelining/split_spec.json" in files
    assert "between nodes (eth-100g)" in summary(lat)
    # the study folder carries model, cluster, workload and target: `xctune export` needs nothing else
    assert main(["export", str(tmp_path / "lat"), "--target", "torch-pipelining", "--out", str(tmp_path / "again"),
                 "--json"]) == 0
    again = json.loads((tmp_path / "again" / "torch_pipelining" / "split_spec.json").read_text())
    assert again == json.loads((tmp_path / "lat" / "torch_pipelining" / "split_spec.json").read_text())
    thr = run_search(with_overrides(base, objectives=("throughput",), target=TargetSpec("vllm-pp", requests_in_flight=4),
                                    out=str(tmp_path / "thr")), **QUIET)
    assert thr.best["tokens_per_s"] > lat.best["tokens_per_s"]
    assert thr.optimum is None  # the DP's sum does not price a max over stages: not claimed


def test_study_files_name_their_target(tmp_path):
    spec = load_study(ROOT / "studies" / "two-node.toml")
    assert spec.target.name == "vllm-pp" and "@" in spec.gpus
    bad = tmp_path / "bad.toml"
    bad.write_text('target = "tensorrt"\n')
    with pytest.raises(BadInput, match="target = \"tensorrt\": must be one of accelerate, vllm-pp, torch-pipelining"):
        load_study(bad)
    bad.write_text('target = "torch-pipelining"\n[serving]\ntensor_parallel = "node"\n')
    with pytest.raises(BadInput, match="for target vllm-pp"):
        load_study(bad)


def test_vllm_export_of_tensor_parallel_stages_and_of_a_supported_model(tiny, tmp_path, monkeypatch):
    full = make_cluster("2x[4x1GiB@nvlink3]@ib-hdr")
    stages = tp_cluster(full)
    plan = Plan.uniform(pipeline_map(tiny, [3, 1]), "bf16")
    serving = TargetSpec("vllm-pp", tensor_parallel="node")
    exp = export_plan("vllm-pp", plan, tiny, stages, W, tmp_path / "tp", serving=serving, tp_size=4)
    script = exp.files["launch_vllm.sh"].read_text()
    assert "--pipeline-parallel-size 2" in script and "--tensor-parallel-size 4" in script
    assert 'VLLM_PP_LAYER_PARTITION="3,1"' in script and "4 GPUs (tensor parallel)" in script
    with pytest.raises(BadInput, match="stage per GPU"):
        export_plan("torch-pipelining", plan, tiny, stages, W, tmp_path / "tp", tp_size=4)
    # where vLLM implements the model, the script runs the command with no guard
    from xctune.models.engines import EngineSupport
    import xctune.export.vllm as vllm_export

    monkeypatch.setattr(vllm_export, "vllm_support", lambda cfg: EngineSupport("vllm", True, "X", "supported"))
    exp = export_plan("vllm-pp", plan, tiny, stages, W, tmp_path / "ok", serving=serving, tp_size=4)
    assert exp.supported and "XCTUNE_FORCE" not in exp.files["launch_vllm.sh"].read_text()
