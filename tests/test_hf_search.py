"""Search on transformers presets: the space, baselines, trace and exact optimum ask the profile's roles.

Twins of the presets (published configs shrunk to tiny sizes, same classes and code paths) keep
these fast; `scripts/figures/hf_table.py` runs the nine presets at full size.
"""

from __future__ import annotations

import json

import pytest

from xctune.plans.baselines import baseline_map, has_baseline, repair
from xctune.plans.check import check
from xctune.hardware import make_cluster
from xctune.models.hf import get_preset, twin
from xctune.search.oracle import Oracle, brute_force
from xctune.plans.plan import Plan, resolve
from xctune.models.profile import profile_of
from xctune.reports.report import layout
from xctune.search.runner import run_search
from xctune.search.space import SearchSpace, SpaceOptions
from xctune.search.study import StudySpec
from xctune.worlds.simulate import simulate
from xctune.worlds.trace import InvalidPlan, Trace
from xctune.worlds.virtual import virtual_run
from xctune.workload import Workload

from conftest import sampled_plans

W = Workload(prompt_tokens=8, new_tokens=4)
FP16 = SpaceOptions(dtypes=("fp16",), mixed_precision=False)
# weights of a twin in fp16 are ~0.35 MiB: three such GPUs make the search split it
GPUS = "3x0.4MiB"


def _twin_dir(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(twin(get_preset(name)).data))
    return d


@pytest.fixture(scope="module")
def pali():
    return profile_of(twin(get_preset("paligemma-3b")))


@pytest.fixture(scope="module")
def llava():
    return profile_of(twin(get_preset("llava-1.5-7b")))


def test_groups_come_from_roles(llava, pali):
    assert llava.embed_group == ("model.vision_tower", "model.multi_modal_projector",
                                 "model.language_model.embed_tokens", "model.language_model.rotary_emb")
    assert llava.projectors == ("model.multi_modal_projector",)
    assert llava.head == ("model.language_model.norm", "lm_head")
    assert not llava.head_tied_to_embeddings and pali.head_tied_to_embeddings
    # a rotary table has buffers only: it is where its buffers are
    res = resolve({u.name: 1 if u.role.value == "position table" else 0 for u in llava.units}, llava)
    assert res.device_of_unit("model.language_model.rotary_emb") == 1


def test_trace_keeps_only_joins_the_dry_run_confirms(llava, pali):
    """Inside a trace a class's own `.to(inputs_embeds.device)` is a no-op, so the image features look joined
    with the embeddings; the twin's dry runs drop that. PaliGemma's prefix mask really joins the embeddings
    with the root's tensors (the main GPU)."""
    joins, copies = {}, {}
    for name, p in (("llava", llava), ("pali", pali)):
        tr = Trace(p, W)
        tr.recording(Plan.uniform({u.name: 0 for u in p.units}, "fp16"))
        run = next(iter(tr._recordings.values())).run
        joins[name] = {locs for _, locs, _ in run.joins}
        copies[name] = {(m.src, m.dst) for m in run.moves if m.kind == "model"}
        assert tr.joins_main(p.embed_group, "fp16") == (name == "pali")
    emb, proj = "model.language_model.embed_tokens", "model.multi_modal_projector"
    assert joins["llava"] == set()
    assert joins["pali"] == {(emb, "<main>")}
    # what is not joined the model moves itself, to the embeddings' device (masked_scatter's `self`): LLaVA's
    # image features and image-token mask (the root's), PaliGemma's image features (its mask stays joined)
    assert copies["llava"] == {(proj, emb), ("<main>", emb)}
    assert copies["pali"] == {(proj, emb)}


@pytest.mark.parametrize("name", ["llava-1.5-7b", "paligemma-3b"])
def test_space_and_trace_agree_with_dry_runs(name, llava, pali):
    """Every sampled plan is one the trace calls valid, and a full dry run of a few of them runs; a plan that
    splits PaliGemma's tied head from its embeddings, or puts the embeddings off the main GPU, is refused by
    both the trace and the dry run."""
    profile = {"llava-1.5-7b": llava, "paligemma-3b": pali}[name]
    cluster = make_cluster(GPUS)
    tr = Trace(profile, W)
    space = SearchSpace(profile, cluster, FP16, embed_on_main=tr.joins_main(profile.embed_group, "fp16"))
    plans = sampled_plans(space, 60)
    assert len({p.plan_id for p in plans}) > 3
    for plan in plans:
        tr.evaluate(plan, cluster)  # InvalidPlan would fail the test
        assert space.params_of(plan) is not None
        if profile.head_tied_to_embeddings:
            assert plan.device_map["lm_head"] == plan.device_map["model.language_model.embed_tokens"] == 0
    for plan in plans[:3]:
        assert virtual_run(profile, plan, W).ok
    if profile.head_tied_to_embeddings:
        emb, head = profile.embeddings, "lm_head"
        for moves in ({head: 1}, {emb: 1, head: 1}):
            bad = Plan.uniform({**{u.name: 0 for u in profile.units}, **moves}, "fp16")
            with pytest.raises(InvalidPlan):
                tr.evaluate(bad, cluster)
            assert not virtual_run(profile, bad, W).ok
    else:  # the native class moves image features itself: the vision path may sit anywhere
        free = Plan.uniform({**{u.name: 0 for u in profile.units}, "model.multi_modal_projector": 1,
                             profile.embeddings: 2}, "fp16")
        tr.evaluate(free, cluster)
        assert virtual_run(profile, free, W).ok


def _bytes_per_phase(moves) -> dict[str, int]:
    out: dict[str, int] = {}
    for phase, _, _, nbytes, _ in moves:
        out[phase] = out.get(phase, 0) + nbytes
    return out


@pytest.mark.parametrize("name", ["llava-1.5-7b", "qwen2-vl-7b"])
def test_trace_prices_the_copy_of_the_image_features_as_the_dry_run(name, llava):
    """A native class moves the image features to the embeddings' GPU itself (`.to(inputs_embeds.device)`):
    a copy on GPUs, a no-op inside a trace (one physical device). With the image path's last unit (LLaVA's
    projector; Qwen2-VL's vision tower, its merger inside) on GPU 1 and the embeddings on GPU 0, the trace
    prices the copy as the full dry run logs it: the same bytes per phase, the same end-to-end time."""
    profile = llava if name == "llava-1.5-7b" else profile_of(twin(get_preset(name)))
    plan = Plan.uniform({**{u.name: 0 for u in profile.units}, profile.vision[-1]: 1}, "fp16")
    cluster = make_cluster("2x1GiB")
    run = virtual_run(profile, plan, W)
    est = Trace(profile, W).evaluate(plan, cluster)
    cfg = profile.config
    features = cfg.image_tokens() * cfg.data.get("text_config", cfg.data)["hidden_size"] * 2  # fp16
    assert [(m.phase, m.src, m.dst, m.nbytes) for m in run.moves if m.kind == "model"] == [("prefill", 1, 0, features)]
    assert [m[:4] for m in est.moves if m[4] == "model"] == [("prefill", 1, 0, features)]
    assert _bytes_per_phase(est.moves) == _bytes_per_phase([(m.phase, m.src, m.dst, m.nbytes, m.kind) for m in run.moves])
    assert est.e2e_s * 1e3 == pytest.approx(simulate(profile, plan, W, cluster).e2e_ms.median, rel=1e-9)


@pytest.mark.parametrize("name,gpus", [("llava-1.5-7b", GPUS), ("paligemma-3b", GPUS),
                                       ("paligemma-3b", "0.3MiB,2x0.4MiB")])
def test_exact_optimum_is_the_brute_force_one(name, gpus, llava, pali):
    """Also where GPU 0 is the smallest card: PaliGemma's embeddings still belong on it (the root's GPU)."""
    profile = {"llava-1.5-7b": llava, "paligemma-3b": pali}[name]
    cluster = make_cluster(gpus)
    tr = Trace(profile, W)
    space = SearchSpace(profile, cluster, FP16, embed_on_main=tr.joins_main(profile.embed_group, "fp16"))
    dp, bf = Oracle(tr, space, cluster).solve(), brute_force(tr, space, cluster)
    assert dp.plan is not None and dp.e2e_ms == pytest.approx(bf.e2e_ms, rel=1e-9)
    assert len({d for d in dp.plan.device_map.values()}) > 1  # the budget makes it split


def test_exact_optimum_prices_the_copies_the_model_makes(llava):
    """GPU 0 too small for the embedding group and a layer: the optimum puts the embeddings on GPU 1 and the
    head on GPU 0 (the root's GPU), so LLaVA copies the image-token mask its root builds on GPU 0 to the
    embeddings' GPU itself. The dynamic programme prices that copy as the trace does (a move between the
    main and embedding roles) and lands on the brute force's optimum."""
    cluster = make_cluster("0.2MiB,0.4MiB")
    tr = Trace(llava, W)
    space = SearchSpace(llava, cluster, FP16)
    dp, bf = Oracle(tr, space, cluster).solve(), brute_force(tr, space, cluster)
    assert dp.plan is not None and dp.e2e_ms == pytest.approx(bf.e2e_ms, rel=1e-9)
    est = tr.evaluate(dp.plan, cluster)
    assert est.e2e_s * 1e3 == pytest.approx(dp.e2e_ms, rel=1e-9)
    assert [m[:3] for m in est.moves if m[4] == "model"] == [("prefill", 0, 1)]


def test_internvl_publishes_its_split_and_repair_keeps_the_embedding_group():
    internvl = profile_of(get_preset("internvl3-8b"))
    m = baseline_map("authors", internvl, make_cluster("2x24GiB"))
    layers = [m[u] for u in internvl.layers]
    # split_model: GPU 0 is half a GPU (ceil(ceil(28 / 1.5) / 2) = 10 layers) and also takes the last layer
    assert layers == [0] * 10 + [1] * 17 + [0]
    assert {m[u] for u in (*internvl.embed_group, *internvl.head)} == {0}
    llava = profile_of(get_preset("llava-1.5-7b"))
    assert has_baseline("authors", internvl) and not has_baseline("authors", llava)
    broken = {**{u.name: 0 for u in llava.units}, "model.vision_tower": 1, "model.language_model.rotary_emb": 1}
    fixed = repair(broken, llava)
    assert {fixed[u] for u in llava.embed_group} == {0}


@pytest.mark.parametrize("name", ["llava-1.5-7b", "paligemma-3b"])
def test_search_ends_with_a_checked_map_and_a_gap(tmp_path, name):
    spec = StudySpec(model=str(_twin_dir(tmp_path, name)), gpus=GPUS, trials=8, out=str(tmp_path / "out"),
                     workload=W, space=FP16, baseline_dtype="fp16")
    r = run_search(spec, progress=False, log=lambda m: None)
    assert r.best is not None and r.verified.startswith("passes xctune check"), r.verified
    assert r.optimum is not None and r.optimum.plan is not None
    assert r.best["e2e_ms"] >= r.optimum.e2e_ms * (1 - 1e-9)
    # valid by construction: no sampled trial was refused for where it put things
    assert not [x for x in r.records if x.get("trial") is not None and x.get("status") in ("invalid", "pruned")]
    rep = check(r.best_plan, r.profile, r.cluster, W)
    assert rep.ok and rep.dry_run.ok
    assert layout(r.best_plan, r.profile).startswith("emb:")


def test_presets_list_the_transformers_presets(capsys):
    from xctune.cli import main
    from xctune.models.hf import PRESET_NAMES

    assert main(["presets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["transformers"]
    assert set(listed) == set(PRESET_NAMES)
    assert listed["paligemma-3b"]["params"] == 2_923_466_480
    assert listed["qwen2-vl-7b"]["architecture"] == "Qwen2VLForConditionalGeneration"
    assert main(["presets"]) == 0
    assert "llava-v1.6-mistral-7b" in capsys.readouterr().out
