"""Published checkpoints read right: which variant a directory is, its weights as data, the
attention its code runs, and the decode transfer under both loading paths."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from xctune.plans.check import check, static_findings
from xctune.plans.constraints import constraint_report
from xctune.cli import main
from xctune.errors import BadInput
from xctune.hardware import make_cluster
from xctune.models import PRESETS, XComposer, get_config, init_weights
from xctune.models.checkpoint import UNUSED_WEIGHTS, expected_names
from xctune.models.loading import loading_paths, resolve_model, save_checkpoint, write_shards
from xctune.plans.plan import Plan, resolve
from xctune.models.profile import profile_of
from xctune.worlds.virtual import virtual_run
from xctune.models.ixc import generate, make_inputs
from xctune.workload import Workload

CONFIGS = Path(__file__).parent / "data" / "configs"
VARIANTS = ("ixc2-vl-7b", "ixc2-4khd-7b", "ixc2d5-7b")


def published_dir(tmp_path: Path, variant: str, *, index: bool = False, drop=(), **config_changes) -> Path:
    """A directory as users download it: the shipped config.json, and (optionally) a weight index
    naming the variant's parameters (no shards: identification reads names only)."""
    d = tmp_path / variant
    d.mkdir()
    cfg = json.loads((CONFIGS / variant / "config.json").read_text())
    for k, v in config_changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    if index:
        names = sorted(expected_names(PRESETS[variant]) - set(drop))
        wmap = {n: f"pytorch_model-0000{1 + i % 2}-of-00002.bin" for i, n in enumerate(names)}
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    return d


# ------------------------------------------------------------------------------------------
# which variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_shipped_config_is_recognised_as_its_variant(tmp_path, variant):
    spec = resolve_model(str(published_dir(tmp_path, variant)))
    assert spec.config == replace(PRESETS[variant], name=variant)
    assert spec.config.attn == "eager"  # the config's attn_implementation
    assert spec.profile.total_params == profile_of(PRESETS[variant]).total_params


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_weight_index_alone_tells_the_variant(tmp_path, variant):
    # without the config's fingerprint keys, the parameter names decide
    d = published_dir(tmp_path, variant, index=True, img_size=None, max_length=None)
    spec = resolve_model(str(d))
    assert spec.config == replace(PRESETS[variant], name=variant)
    assert "weight index" in spec.notes[0]


def test_ixc2d5_preset_tree_geometry_and_groups():
    cfg = get_config("ixc2d5-7b")
    prof = profile_of(cfg)
    assert prof.total_params == 11_095_734_272
    assert cfg.image_size == 560 and cfg.image_tokens((2, 2)) == 2061  # (2*2+1)*400 + 1 + 3*20
    assert prof.root_parameters == ("plora_glb_GN", "plora_sub_GN")
    assert {"plora_glb_GN", "plora_sub_GN", "vit", "vision_proj", "model.tok_embeddings"} == set(prof.colocation)
    names = expected_names(cfg)
    # the adapters live inside every PLoRA linear of every decoder layer: they move with their layer
    for adapter, _ in cfg.extra_adapters:
        assert f"model.layers.31.feed_forward.w2.{adapter}_B.weight" in names
    assert not any(f".{a}_" in n for a, _ in cfg.extra_adapters for n in names if not n.startswith("model.layers."))


def test_config_and_weights_that_disagree_are_an_error(tmp_path):
    # an IXC2-VL config (img_size) over weights with the HD GN vectors
    d = published_dir(tmp_path, "ixc2-4khd-7b", index=True, img_size=490)
    with pytest.raises(BadInput, match="config.json says IXC2-VL-7B .* weights say IXC2-4KHD-7B"):
        resolve_model(str(d))


def test_a_config_that_differs_from_its_variant_is_an_error(tmp_path):
    d = published_dir(tmp_path, "ixc2-4khd-7b", num_hidden_layers=24)
    with pytest.raises(BadInput, match="num_hidden_layers=24, but IXC2-4KHD-7B has 32"):
        resolve_model(str(d))


def test_no_match_names_what_was_found(tmp_path):
    d = published_dir(tmp_path, "ixc2d5-7b", max_length=None)  # HD family, nothing more to go on
    with pytest.raises(BadInput, match="could be IXC2-4KHD-7B or IXC2.5-7B .*no img_size / max_length"):
        resolve_model(str(d))
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(BadInput, match="LlamaForCausalLM .* does not support .* nor an InternLM-XComposer2 checkpoint"):
        resolve_model(str(other))


def test_four_bit_variants_are_recognised_and_refused(tmp_path):
    awq = published_dir(tmp_path, "ixc2d5-7b", quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(BadInput, match="is IXC2.5-7B quantized \\(awq, 4-bit\\).*--model ixc2d5-7b"):
        resolve_model(str(awq))
    gptq = published_dir(tmp_path, "ixc2-vl-7b")
    (gptq / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    with pytest.raises(BadInput, match="is IXC2-VL-7B quantized \\(GPTQ"):
        resolve_model(str(gptq))


def test_4khd_gn_maps_get_the_same_verdicts_from_the_config_dir_as_from_the_preset(tmp_path):
    from_dir = resolve_model(str(published_dir(tmp_path, "ixc2-4khd-7b", index=True))).profile
    preset = profile_of(get_config("ixc2-4khd-7b"))
    cluster = make_cluster("2x24GiB")
    layers = {f"model.layers.{i}": 0 if i < 16 else 1 for i in range(32)}
    without_gn = {"vit": 0, "vision_proj": 0, "model.tok_embeddings": 0, **layers, "model.norm": 1, "output": 1}
    with_gn = {**without_gn, "plora_glb_GN": 0, "plora_sub_GN": 0}
    for dmap in (without_gn, with_gn):
        plan = Plan.uniform(dmap, "fp16")
        verdicts = []
        for prof in (from_dir, preset):
            found = static_findings(plan, prof, cluster, resolve(plan.device_map, prof), constraint_report(prof))
            verdicts.append(sorted((f.level, f.code) for f in found))
        assert verdicts[0] == verdicts[1]
    # accelerate rejects the map without the root parameters; the right one has no error
    bad = check(Plan.uniform(without_gn, "fp16"), from_dir, cluster, Workload())
    assert not bad.ok and any(f.code == "uncovered" and "plora_glb_GN" in f.message for f in bad.errors)
    good = static_findings(Plan.uniform(with_gn, "fp16"), from_dir, cluster, resolve(with_gn, from_dir),
                           constraint_report(from_dir))
    assert not [f for f in good if f.level == "error"]


def test_check_on_a_misread_checkpoint_is_exit_2(tmp_path, capsys):
    d = published_dir(tmp_path, "ixc2d5-7b", max_length=None)
    m = tmp_path / "map.json"
    m.write_text(json.dumps({"": 0}))
    assert main(["check", str(m), "--model", str(d), "--gpus", "2x24GiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could be IXC2-4KHD-7B or IXC2.5-7B" in err[0]


# ------------------------------------------------------------------------------------------
# weights as data


@pytest.fixture(scope="module")
def tiny_hd_model():
    return init_weights(XComposer(get_config("tiny-hd")), seed=3).eval()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_sharded_checkpoints_load_through_their_index(tmp_path, tiny_hd_model, fmt):
    save_checkpoint(tiny_hd_model, tmp_path / "ck", format=fmt, shards=3)
    index = json.loads((tmp_path / "ck" / f"{'pytorch_model.bin' if fmt == 'bin' else 'model.safetensors'}.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    loaded = resolve_model(str(tmp_path / "ck")).load_master()
    for (n1, p1), (n2, p2) in zip(tiny_hd_model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_a_pickle_that_is_not_tensors_is_refused_and_never_runs(tmp_path, tiny_hd_model, capsys):
    d = tmp_path / "ck"
    save_checkpoint(tiny_hd_model, d, format="bin", shards=2)
    marker = tmp_path / "pwned"

    class Payload:  # unpickling this would create `marker`
        def __reduce__(self):
            return (Path.touch, (marker,))

    shard = sorted(d.glob("pytorch_model-*.bin"))[0]
    state = torch.load(shard, weights_only=True)
    state["model.norm.weight"] = Payload()
    torch.save(state, shard)
    m = tmp_path / "map.json"
    m.write_text(json.dumps({"": 0}))
    code = main(["bench", "--model", str(d), "--map", str(m), "--real", "--repeats", "1", "--warmup", "0",
                 "--prompt-tokens", "4", "--new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "not a plain file of tensors, refused without running it" in err[-1]
    assert not marker.exists()


def test_missing_unexpected_and_omitted_weights(tmp_path, tiny_hd_model):
    state = {k: v.contiguous() for k, v in tiny_hd_model.state_dict().items()}

    def ckpt(name, st):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads(json.dumps(__import__("dataclasses").asdict(tiny_hd_model.cfg)))
        (d / "xctune_config.json").write_text(json.dumps(cfg))
        write_shards(st, d, format="bin", shards=2)
        return d

    extra = ckpt("extra", {**state, "model.layers.0.attention.wqkv.lora_x_A.weight": torch.zeros(2, 2)})
    with pytest.raises(BadInput, match="does not have, e.g. 'model.layers.0.attention.wqkv.lora_x_A.weight'"):
        resolve_model(str(extra)).load_master()
    short = ckpt("short", {k: v for k, v in state.items() if k != "output.weight"})
    with pytest.raises(BadInput, match="missing from the checkpoint, e.g. 'output.weight'"):
        resolve_model(str(short)).load_master()
    # CLIP's post_layernorm: never used by the forward, left out of the 4KHD shards: accepted
    omitted = ckpt("omitted", {k: v for k, v in state.items() if k not in UNUSED_WEIGHTS})
    loaded = resolve_model(str(omitted)).load_master()
    w = Workload(prompt_tokens=5, new_tokens=3)
    a = generate(tiny_hd_model, make_inputs(tiny_hd_model.cfg, w, "cpu"), 3, layout=(1, 2))
    b = generate(loaded, make_inputs(loaded.cfg, w, "cpu"), 3, layout=(1, 2))
    assert torch.equal(a.last_logits, b.last_logits)


def test_the_index_note_names_omitted_unused_weights(tmp_path):
    d = published_dir(tmp_path, "ixc2-4khd-7b", index=True, drop=UNUSED_WEIGHTS)
    notes = resolve_model(str(d)).notes
    assert any("omits vit.vision_tower.vision_model.post_layernorm.weight" in n for n in notes)


def test_bench_real_measures_bin_shards_without_trust_remote_code(tmp_path, tiny_hd_model, capsys):
    save_checkpoint(tiny_hd_model, tmp_path / "ck", format="bin", shards=3)
    m = tmp_path / "map.json"
    m.write_text(json.dumps({"": 0}))
    code = main(["bench", "--model", str(tmp_path / "ck"), "--map", str(m), "--real", "--repeats", "1",
                 "--warmup", "0", "--prompt-tokens", "4", "--new-tokens", "2", "--json"])
    rec = json.loads(capsys.readouterr().out)
    assert code == 0 and rec["status"] == "ok" and rec["source"] == "measured"
    assert rec["model"] == "tiny-hd"


# ------------------------------------------------------------------------------------------
# attention


def test_eager_attention_computes_what_sdpa_computes():
    eager = init_weights(XComposer(replace(get_config("tiny"), attn="eager")), seed=1).eval()
    sdpa = init_weights(XComposer(get_config("tiny")), seed=1).eval()
    w = Workload(prompt_tokens=7, new_tokens=4)
    a = generate(eager, make_inputs(eager.cfg, w, "cpu"), 4)
    b = generate(sdpa, make_inputs(sdpa.cfg, w, "cpu"), 4)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.last_logits, b.last_logits, atol=1e-4)


def _two_gpu(profile):
    m = {u.name: 0 for u in profile.units}
    for i, name in enumerate(profile.layers):
        m[name] = 0 if i < len(profile.layers) // 2 else 1
    m["model.norm"] = m["output"] = 1
    return m


def test_eager_dry_run_counts_the_mask_copies_and_the_scores():
    w = Workload(prompt_tokens=300, new_tokens=2)  # long enough for the scores to dominate a layer
    runs = {}
    for attn in ("eager", "sdpa"):
        prof = profile_of(replace(get_config("tiny"), attn=attn))
        runs[attn] = virtual_run(prof, Plan.uniform(_two_gpu(prof), "fp32"), w)
        assert runs[attn].ok
    cfg = get_config("tiny")
    T = w.prompt_length(cfg)
    on_gpu1 = len(profile_of(cfg).layers) // 2

    def moved(run, phase):
        return [m for m in run.moves if m.phase == phase and m.unit.startswith("model.layers.")]

    # prefill: the [1, 1, T, T] fp32 mask reaches every layer on GPU 1, one copy each
    extra = sum(m.nbytes for m in moved(runs["eager"], "prefill")) - sum(m.nbytes for m in moved(runs["sdpa"], "prefill"))
    assert extra == on_gpu1 * 4 * T * T
    # decode: the [1, 1, 1, T + 1] mask and the all-False [1, 1] im_mask, per layer on GPU 1
    extra = sum(m.nbytes for m in moved(runs["eager"], "decode")) - sum(m.nbytes for m in moved(runs["sdpa"], "decode"))
    assert extra == on_gpu1 * (4 * (T + 1) + 1)
    # the score tensors [1, heads, T, T] are live activation memory in eager only
    def layer_transient(run):
        return max(c.peak_inside - c.live_at_entry.get(c.loc, 0) for c in run.calls
                   if c.phase == "prefill" and c.unit.startswith("model.layers."))

    assert layer_transient(runs["eager"]) - layer_transient(runs["sdpa"]) >= cfg.num_heads * T * T * 4


# ------------------------------------------------------------------------------------------
# both loading paths


def test_check_json_carries_the_decode_transfer_of_both_loaders(tmp_path, capsys):
    prof = profile_of(get_config("tiny"))
    m = tmp_path / "map.json"
    m.write_text(json.dumps(_two_gpu(prof)))
    assert main(["check", str(m), "--model", "tiny", "--gpus", "2x1GiB", "--prompt-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by = out["transfer_bytes_per_decode_step_by_loader"]
    assert set(by) == {"xctune", "from_pretrained"} and set(out["loaders"]) == set(by)
    cfg = get_config("tiny")
    T = 8 + cfg.image_tokens()
    layers_on_1 = len(prof.layers) // 2
    kv = cfg.num_kv_heads * cfg.head_dim * 4  # bytes per position of k (or v), fp32
    # a bare from_pretrained: the cache of GPU 1's layers goes back to GPU 0 with the output and
    # comes back to GPU 1 as the next step's input (the prompt's positions, then one more)
    assert by["from_pretrained"] - by["xctune"] == layers_on_1 * 2 * kv * (T + 1) + layers_on_1 * 2 * kv * T
    assert loading_paths()["from_pretrained"].skip_keys != ("past_key_values",)  # transformers 5: letters


def test_the_authors_2gpu_map_moves_what_their_code_moves():
    """design.md §7, measured on the authors' code: 2-GPU map, 1355-token prompt, fp16 — 501.6 MB
    of fp32 logits back to GPU 0 in prefill; 177.7 MB of KV cache per decode step with no skip
    keys; 0.07-0.46 MB with them."""
    prof = profile_of(get_config("ixc2-vl-7b"))  # eager, as the checkpoint's config says
    dmap = json.loads((Path(__file__).parent / "data" / "field" / "ixc2-vl-7b.authors-heuristic.2gpu.json").read_text())
    w = Workload(prompt_tokens=130, new_tokens=2)
    T = w.prompt_length(prof.config)
    assert T == 1355
    runs = {name: virtual_run(prof, Plan.uniform(dmap, "fp16", skip_keys=p.skip_keys), w) for name, p in loading_paths().items()}
    logits = [m for m in runs["xctune"].moves if m.phase == "prefill" and m.kind == "return"]
    assert sum(m.nbytes for m in logits) == 4 * 92544 * T == 501_588_480
    decode = {k: sum(m.nbytes for m in r.moves if m.phase == "decode") for k, r in runs.items()}
    assert 0.07e6 <= decode["xctune"] <= 0.46e6
    cache = decode["from_pretrained"] - decode["xctune"]
    # 16 layers on GPU 1: their cache (k and v, 8 heads x 128, fp16) out at T + 1 and in at T positions
    assert cache == 16 * 2 * 8 * 128 * 2 * ((T + 1) + T)
    assert round(cache / 1e6, 1) == 177.7


def test_study_files_choose_attention_and_loader(tmp_path):
    from xctune.search.study import load_study

    spec = load_study(Path(__file__).parent.parent / "studies" / "ixc2d5.toml")
    assert spec.model == "ixc2d5-7b" and spec.loader == "xctune" and spec.attn is None
    assert spec.workload.image_tokens(get_config("ixc2d5-7b")) == 2061
    f = tmp_path / "s.toml"
    f.write_text('model = "tiny"\nattn = "eager"\nloader = "from_pretrained"\n')
    spec = load_study(f)
    assert (spec.attn, spec.loader) == ("eager", "from_pretrained")
    f.write_text('loader = "pipeline"\n')
    with pytest.raises(BadInput, match='loader = "pipeline": must be one of xctune, from_pretrained'):
        load_study(f)


def test_search_optimises_the_loader_the_study_names(tmp_path):
    """A bare from_pretrained study: every trial's plan carries that path's skip keys."""
    from xctune.search.runner import run_search
    from xctune.search.study import StudySpec

    spec = StudySpec(name="bare", model="tiny", gpus="2x1GiB", trials=3, loader="from_pretrained",
                     workload=Workload(prompt_tokens=8, new_tokens=2), out=str(tmp_path / "out"),
                     baselines=("authors",))
    result = run_search(spec, progress=False, log=lambda m: None)
    keys = {tuple(t.user_attrs["plan"]["skip_keys"]) for t in result.study.trials if "plan" in t.user_attrs}
    assert keys == {loading_paths()["from_pretrained"].skip_keys}
