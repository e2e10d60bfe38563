"""`check`: every error and warning class, the dry run as judge, and the field maps' verdicts."""

from dataclasses import replace

import pytest

from conftest import field_map, two_gpu_map
from xctune.plans.baselines import accelerate_map, authors_map, repair
from xctune.plans.check import check
from xctune.plans.constraints import Probe, constraint_report
from xctune.hardware import make_cluster
from xctune.plans.plan import Plan, load_plan
from xctune.workload import Workload

SMALL = Workload(prompt_tokens=8, new_tokens=3)


def codes(report, level=None):
    return {f.code for f in report.findings if level is None or f.level == level}


def test_valid_tiny_map_runs(tiny):
    r = check(Plan.uniform(two_gpu_map(tiny)), tiny, make_cluster("2x1GiB"), SMALL)
    assert r.ok and r.dry_run.ok and not r.findings
    assert [d.device for d in r.devices] == [0, 1]
    assert all(d.weights_bytes > 0 and d.activation_bytes > 0 for d in r.devices)
    assert r.transfer_bytes("prefill") > 0


def test_unknown_module_with_suggestion(tiny):
    m = two_gpu_map(tiny)
    m["model.layer.1"] = m.pop("model.layers.1")
    r = check(Plan.uniform(m), tiny, make_cluster("2x1GiB"), SMALL)
    assert not r.ok and r.dry_run is None
    msg = next(f.message for f in r.findings if f.code == "unknown-module")
    assert "'model.layer.1'" in msg and "did you mean 'model.layers.1'" in msg
    assert "uncovered" in codes(r)  # its parameters are now placed by no entry


def test_covered_twice(tiny):
    r = check(Plan.uniform(two_gpu_map(tiny) | {"model.layers.1.feed_forward": 1}), tiny, make_cluster("2x1GiB"), SMALL)
    assert "covered-twice" in codes(r, "error")
    assert "model.layers.1.feed_forward" in next(f.message for f in r.findings if f.code == "covered-twice")


def test_device_outside_cluster(tiny):
    r = check(Plan.uniform(two_gpu_map(tiny) | {"output": 5}), tiny, make_cluster("2x1GiB"), SMALL)
    msg = next(f.message for f in r.findings if f.code == "unknown-device")
    assert "'output' on cuda:5" in msg and "2 GPU(s)" in msg


def test_colocation_split_names_modules_devices_and_repair(tiny):
    m = two_gpu_map(tiny) | {"vit": 1, "vision_proj": 1}
    r = check(Plan.uniform(m), tiny, make_cluster("2x1GiB"), SMALL)
    assert not r.ok
    msg = next(f.message for f in r.findings if f.code == "colocation")
    # the rule discovered by dry runs of the twin: the projector and the embeddings meet in a top-level cat
    assert "vision_proj on cuda:1" in msg and "model.tok_embeddings on cuda:0" in msg and "vit on" not in msg
    assert "dry runs of the model's twin fail when" in msg and "op cat" in msg
    assert "Repair: put vision_proj on cuda:0" in msg
    assert "dry run confirms" in msg and "same device" in msg
    fixed = check(Plan.uniform(repair(m, tiny)), tiny, make_cluster("2x1GiB"), SMALL)
    assert fixed.ok


def test_the_vit_alone_on_another_gpu_is_no_finding(tiny):
    # the family's conservative rule keeps vit with the join; the discovered rule does not, and the dry run runs
    assert "vit" in tiny.colocation
    r = check(Plan.uniform(two_gpu_map(tiny) | {"vit": 1}), tiny, make_cluster("2x1GiB"), SMALL)
    assert r.ok and r.dry_run.ok and not r.findings


def test_a_discovered_rule_the_model_itself_breaks_is_relaxed_by_the_dry_run(tiny):
    # a rule found on the twin that this model's own dry run contradicts: the dry run wins, as a warning
    found = constraint_report(tiny)
    claimed = replace(found, probes=[*found.probes, Probe("vit", "other GPU", False, "claimed for this test")])
    r = check(Plan.uniform(two_gpu_map(tiny) | {"vit": 1}), tiny, make_cluster("2x1GiB"), SMALL, claimed)
    assert r.ok and "colocation-relaxed" in codes(r, "warning")
    assert "does not hold here" in next(f.message for f in r.findings if f.code == "colocation-relaxed")


def test_offloaded_vit_fails_like_upstream(tiny):
    r = check(Plan.uniform(two_gpu_map(tiny) | {"vit": "cpu"}), tiny, make_cluster("2x1GiB"), SMALL)
    assert not r.ok and "not-offloadable" in codes(r, "error")
    msg = next(f.message for f in r.findings if f.code == "not-offloadable")
    assert msg.startswith("vit is offloaded to cpu") and "dry run confirms" in msg
    assert "Cannot copy out of meta tensor" in r.dry_run.failure.message and r.dry_run.failure.unit == "vit"
    ok = check(Plan.uniform(two_gpu_map(tiny) | {"vision_proj": "cpu"}), tiny, make_cluster("2x1GiB"), SMALL)
    assert ok.ok and ok.offloaded_bytes["cpu"] == tiny.by_name["vision_proj"].param_bytes("fp32")


def test_discovered_constraints_are_cached_per_model_and_versions(tiny, tmp_path, monkeypatch):
    from xctune.plans import constraints

    first = constraint_report(tiny, tmp_path)
    entries = list(tmp_path.glob("constraints-*.json"))
    assert len(entries) == 1
    monkeypatch.setattr(constraints, "_probe_twin", lambda cfg: pytest.fail("probed again despite the cache"))
    again = constraint_report(tiny, tmp_path)
    assert again.probes == first.probes and again.joins == first.joins
    assert again.required_together == ("vision_proj", "model.tok_embeddings")
    assert again.not_offloadable == ("vit", "model.tok_embeddings")
    # another library version is another key: the entry is not used
    monkeypatch.setattr("xctune.worlds.trace_cache.library_versions", lambda: {"torch": "0.0"})
    with pytest.raises(pytest.fail.Exception, match="probed again"):
        constraint_report(tiny, tmp_path)


def test_memory_over_capacity(tiny):
    r = check(Plan.uniform(two_gpu_map(tiny)), tiny, make_cluster("2x4MiB"), SMALL)
    assert "memory" in codes(r, "error")
    msg = next(f.message for f in r.findings if f.code == "memory")
    assert "cuda:0" in msg and "usable" in msg


def test_dtype_unsupported(tiny):
    r = check(Plan.uniform(two_gpu_map(tiny), "bf16"), tiny, make_cluster("2xv100-32g"), SMALL)
    assert "dtype" in codes(r, "error")


def test_non_contiguous_layers_warn_with_extra_crossings(tiny):
    m = two_gpu_map(tiny) | {"model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 0, "model.layers.3": 1}
    r = check(Plan.uniform(m), tiny, make_cluster("2x1GiB"), SMALL)
    assert r.ok
    msg = next(f.message for f in r.findings if f.code == "non-contiguous")
    assert "2 separate runs" in msg and "1 extra device crossing" in msg


def test_extra_hop_warns(tiny):
    # embeddings on GPU 1, first layers on GPU 0: the hidden state goes 1 -> 0 -> 1
    m = two_gpu_map(tiny) | {"vit": 1, "vision_proj": 1, "model.tok_embeddings": 1}
    r = check(Plan.uniform(m), tiny, make_cluster("2x1GiB"), SMALL)
    assert r.ok
    assert "extra-hop" in codes(r, "warning")


def test_root_parameter_mapped_elsewhere_warns(tiny_hd):
    m = two_gpu_map(tiny_hd) | {"plora_glb_GN": 1}
    r = check(Plan.uniform(m), tiny_hd, make_cluster("2x1GiB"), SMALL)
    assert "root-parameter" in codes(r, "warning")


# --- the done-when of the foundation issue, on the 7B tree ---------------------------------


def test_authors_maps_pass(vl7b):
    r2 = check(load_plan(field_map("authors-heuristic.2gpu"), "fp32"), vl7b, make_cluster("2x24GiB"), Workload())
    assert r2.ok, r2.render()
    # weights: vit 1.13 + proj 0.08 + embeddings 1.41 + 16 layers x 0.88 GiB + rotary tables (design.md §4)
    assert 17.0 < r2.devices[0].weights_bytes / 2**30 < 17.5
    r4 = check(load_plan(field_map("authors-heuristic.4gpu"), "fp16"), vl7b, make_cluster("4x24GiB"), Workload())
    assert r4.ok, r4.render()


def test_split_vision_map_fails_with_device_mismatch(vl7b):
    r = check(load_plan(field_map("split-vision-from-embeddings.2gpu"), "fp32"), vl7b, make_cluster("2x24GiB"), Workload())
    assert not r.ok
    assert r.dry_run.failure.kind == "device-mismatch"
    assert "cuda:0 and cuda:1" in r.dry_run.failure.message and r.dry_run.failure.op == "cat"


def test_accelerates_own_map_fails_the_same_way(vl7b):
    cluster = make_cluster("2x22GiB", headroom=0)
    dmap = accelerate_map(vl7b, cluster, "fp32", "balanced")
    assert dmap["vit"] == dmap["vision_proj"] == 1 and dmap["model.tok_embeddings"] == 0
    r = check(Plan.uniform(dmap, "fp32"), vl7b, cluster, Workload())
    assert not r.ok and r.dry_run.failure.kind == "device-mismatch"
    assert check(Plan.uniform(repair(dmap, vl7b), "fp32"), vl7b, cluster, Workload()).dry_run.ok


def test_authors_heuristic_reproduces_the_field_maps(vl7b):
    import json

    for n in (2, 4):
        assert authors_map(vl7b, n) == json.loads(field_map(f"authors-heuristic.{n}gpu").read_text())
