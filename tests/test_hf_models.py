"""transformers' own VLM classes as models under test: presets, discovery, inputs, dry runs, constraints.

Dry runs use twins (the published config shrunk to tiny dimensions, same classes and code paths);
the full-size presets are only built on `meta` (parameter counts), which takes about a second each.
"""

from __future__ import annotations

import json

import pytest
import torch

from xctune.cli import main
from xctune.errors import BadInput
from xctune.models.base import Role
from xctune.models.hf import PRESET_NAMES, from_dict, get_preset, twin
from xctune.models.hf.family import measured_image_tokens
from xctune.plans.plan import Plan
from xctune.models.profile import profile_of
from xctune.worlds.virtual import virtual_run
from xctune.workload import Workload

# The published parameter counts of the checkpoints the presets were written from (their
# safetensors metadata / model cards): a wrong preset key shows up here.
PUBLISHED_PARAMS = {
    "llava-1.5-7b": 7_063_427_072,
    "llava-v1.6-mistral-7b": 7_566_747_648,
    "qwen2-vl-7b": 8_291_375_616,
    "qwen2.5-vl-7b": 8_292_166_656,
    "paligemma-3b": 2_923_466_480,
    "gemma-3-4b": 4_300_079_472,
    "llama-3.2-11b-vision": 10_670_220_835,
}
# Model cards give these to three digits only
PUBLISHED_APPROX = {"internvl3-8b": 7.94e9, "idefics3-8b": 8.46e9}

W = Workload(prompt_tokens=6, new_tokens=4)


@pytest.fixture(scope="module")
def twins():
    return {n: profile_of(twin(get_preset(n))) for n in ("llava-1.5-7b", "qwen2-vl-7b", "paligemma-3b")}


def _map(profile, **moves):
    m = {u.name: 0 for u in profile.units}
    m.update(moves)
    return m


def test_nine_presets_have_the_published_sizes():
    assert set(PRESET_NAMES) == set(PUBLISHED_PARAMS) | set(PUBLISHED_APPROX)
    for name in PRESET_NAMES:
        total = profile_of(get_preset(name)).total_params
        if name in PUBLISHED_PARAMS:
            assert total == PUBLISHED_PARAMS[name], name
        else:
            assert abs(total - PUBLISHED_APPROX[name]) < 0.005e9, (name, total)


def test_units_roles_and_tied_weights_are_discovered(twins):
    llava, qwen, pali = twins["llava-1.5-7b"], twins["qwen2-vl-7b"], twins["paligemma-3b"]
    roles = [u.role for u in llava.units]
    assert roles[:2] == [Role.VISION_TOWER, Role.PROJECTOR] and roles[-2:] == [Role.FINAL_NORM, Role.HEAD]
    assert llava.embeddings == "model.language_model.embed_tokens"
    assert llava.layers == ("model.language_model.layers.0", "model.language_model.layers.1")
    assert llava.with_role(Role.POSITION_TABLE) == ("model.language_model.rotary_emb",)
    # Qwen2-VL's merger lives inside its vision tower: no separate projector
    assert qwen.vision == ("model.visual",)
    # precision groups follow the roles
    assert {u.group for u in llava.units if u.role in (Role.VISION_TOWER, Role.PROJECTOR)} == {"vision"}
    assert llava.by_name["lm_head"].group == "head"
    # only PaliGemma ties its head to the embeddings; the tie is the static co-location rule
    assert llava.tied == () and llava.colocation == ()
    assert pali.tied == (("model.language_model.embed_tokens.weight", "lm_head.weight"),)
    assert pali.colocation == ("model.language_model.embed_tokens", "lm_head")
    # every parameter belongs to exactly one unit
    for p in (llava, qwen, pali):
        assert all(p.unit_of(n) in p.by_name for n, _ in p.param_numels)


def test_image_tokens_are_measured_from_the_models_own_vision_path():
    # one image at the native resolution: LLaVA-1.5 24x24 patches; LLaVA-NeXT base + one anyres crop row
    # set; Qwen2-VL 448 px merged 2x2; PaliGemma 16x16; Idefics3 26x26 pixel-shuffled by 2
    expected = {"llava-1.5-7b": 576, "llava-v1.6-mistral-7b": 1176, "qwen2-vl-7b": 256, "paligemma-3b": 256,
                "idefics3-8b": 169, "llama-3.2-11b-vision": 1}
    for name, tokens in expected.items():
        assert measured_image_tokens(get_preset(name)) == tokens, name


def test_dry_runs_of_native_classes_run_anywhere(twins):
    for name in ("llava-1.5-7b", "qwen2-vl-7b"):
        p = twins[name]
        vision = p.vision[0]
        layers = p.layers
        split = _map(p, **{layers[-1]: 1, p.head[0]: 1, p.head[1]: 1, vision: 1})
        run = virtual_run(p, Plan.uniform(split), W)
        assert run.ok, (name, run.failure)
        phases = {m.phase for m in run.moves}
        assert {"prefill", "decode", "decode_last"} <= phases
        # the vision tower's output crosses to the embeddings' GPU in prefill, not in decode
        assert any(m.unit == p.embeddings or m.src == 1 for m in run.moves if m.phase == "prefill")
        assert sum(run.kv_bytes.values()) > 0 and set(run.kv_bytes) == {0, 1}


def test_tied_head_off_the_embeddings_fails_with_the_device_error(twins):
    p = twins["paligemma-3b"]
    run = virtual_run(p, Plan.uniform(_map(p, lm_head=1)), W)
    assert not run.ok and run.failure.kind == "device-mismatch"
    assert run.failure.unit == "model.language_model.embed_tokens" and "cuda:1" in run.failure.message


def test_paligemma_embeddings_must_be_on_the_main_gpu(twins):
    # moved together (the tie kept), they fail where the prefix mask indexes across devices:
    # fake kernels do not check index devices, datadep's check does, as CUDA would
    p = twins["paligemma-3b"]
    run = virtual_run(p, Plan.uniform(_map(p, **{p.embeddings: 1, "lm_head": 1})), W)
    assert not run.ok and run.failure.op == "index" and "indices" in run.failure.message


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_a_wrong_map_of_each_preset_fails_with_the_device_error_and_its_module(name):
    """What real GPUs refuse: a tied head away from its embeddings (PaliGemma, Gemma 3: every such map), and,
    for every class whose decoder layer adds its residual after attention without a norm in between, the
    attention of a layer split from its residual stream (why accelerate never splits a decoder layer)."""
    p = profile_of(twin(get_preset(name)))
    if p.tied:
        wrong, where = _map(p, **{p.head[-1]: 1}), p.embeddings
    else:
        layer = p.layers[0]
        children = [n for n, _ in p.family.build_meta().get_submodule(layer).named_children()]
        attention = next(c for c in children if "attn" in c)
        wrong = {u: 0 for u in p.by_name if u != layer} | {f"{layer}.{c}": 0 for c in children}
        wrong[f"{layer}.{attention}"] = 1
        where = layer
    run = virtual_run(p, Plan.uniform(wrong), Workload(prompt_tokens=6, new_tokens=2))
    assert not run.ok and run.failure.kind == "device-mismatch", (name, run.failure)
    text = run.failure.describe()
    assert "Expected all tensors to be on the same device" in text and "cuda:1" in text
    assert f"(in {where}, op" in text, text


def test_check_cli_on_a_config_directory(tmp_path, capsys):
    cfg = twin(get_preset("paligemma-3b"))
    d = tmp_path / "pali"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.data))
    p = profile_of(from_dict(cfg.data, "pali"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_map(p, **{l: 1 for l in p.layers[1:]}, **{h: 1 for h in p.head})))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_map(p, **{l: 1 for l in p.layers[1:]}, **{"model.language_model.norm": 1})))
    args = ["--model", str(d), "--gpus", "2x24GiB", "--prompt-tokens", "6", "--new-tokens", "3"]
    assert main(["check", str(good), *args]) == 0
    out = capsys.readouterr().out
    assert "the map will run" in out
    assert main(["check", str(bad), *args]) == 1
    out = capsys.readouterr().out
    assert "Expected all tensors to be on the same device" in out and "in model.language_model.embed_tokens" in out
    # the rules dry runs of the twin discovered: the tied head with its embeddings, both on the main GPU
    assert "co-location group split" in out and "Repair: put lm_head on cuda:0" in out
    assert "must run on the main GPU cuda:0" in out


def _cli_error(args, capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_bad_configs_exit_2_with_the_reason(tmp_path, capsys):
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"": 0}))
    cases = {
        "unsupported": ({"model_type": "bert", "architectures": ["BertModel"]}, "does not support"),
        "missing": ({"model_type": "mllama", "text_config": {}}, "lacks vision_config"),
        "remote": ({"model_type": "internvl_chat", "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}},
                   "--trust-remote-code"),
    }
    for name, (data, needle) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(data))
        code, err = _cli_error(["check", str(m), "--model", str(d)], capsys)
        assert code == 2 and needle in err and err.count("\n") == 1, (name, err)
    code, err = _cli_error(["check", str(m), "--model", "llava-1.5-7b", "--attn", "eager"], capsys)
    assert code == 2 and "--attn applies to the embedded" in err and err.count("\n") == 1  # not silently ignored
    code, err = _cli_error(["check", str(m), "--model", "llava-9000"], capsys)
    assert code == 2 and "llava-1.5-7b" in err and "ixc2-vl-7b" in err  # the known presets, both backends
    with pytest.raises(BadInput, match="unknown transformers preset"):
        get_preset("llava-9000")


def test_constraints_agree_with_the_feasibility_study(capsys):
    # design.md §8: PaliGemma's tied head stays with the embeddings, which must sit on the main GPU
    assert main(["constraints", "--model", "paligemma-3b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["dry_run_colocation"]) == {"model.language_model.embed_tokens", "lm_head"}
    assert set(data["main_gpu"]) == {"model.language_model.embed_tokens", "lm_head"}
    assert data["not_offloadable"] == []
    vision = [p for p in data["probes"] if p["unit"] in ("model.vision_tower", "model.multi_modal_projector")]
    assert len(vision) == 4 and all(p["runs"] for p in vision)


def test_real_copies_answer_data_dependent_ops_and_indices_are_device_checked():
    from xctune.worlds import vdevice
    from xctune.worlds.datadep import IndexDeviceError, RealShadows, fake_metadata

    mode = vdevice.new_fake_mode(avoid_device_init=True)
    shadows = RealShadows()
    ids = torch.tensor([[5, 9, 9, 2]])
    with mode, fake_metadata(shadows):
        x = shadows.fake_of(ids, vdevice.virtual(0))
        mask = x == 9
        assert int(mask.sum()) == 2  # .item() on a fake tensor, answered from the real copy
        assert mask.nonzero().shape == (2, 2)  # a data-dependent shape
        assert torch.tensor([mask.sum(), mask.sum()]).shape == (2,)  # torch.tensor of fake scalars
        table = torch.empty(10, 4, device=vdevice.virtual(1))
        with pytest.raises(IndexDeviceError, match="cuda:1 and cuda:0"):
            table[x[0]]
