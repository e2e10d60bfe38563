"""Measured runs of transformers' own VLM classes, and local checkpoint directories (with and without remote code).

Each test writes its checkpoint: a shrunk twin of a preset (same class, tiny dimensions) with random
weights, saved the way users have them (`save_pretrained`: config.json and safetensors, sharded with
`model.safetensors.index.json`), then measured with the real executor on this CPU's logical devices.
The measured world must agree with the dry run of the same map on virtual GPUs: the core claim.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xctune.cli import main
from xctune.hardware import make_cluster
from xctune.models.hf import get_preset, twin
from xctune.models.hf.family import HFFamily
from xctune.models.hf.weights import save_weights
from xctune.models.loading import resolve_model
from xctune.plans.plan import Plan
from xctune.worlds.real import HostExecutor
from xctune.worlds.simulate import simulate
from xctune.workload import Workload, no_clock

W = Workload(prompt_tokens=6, new_tokens=4)
BUDGET = "2x64MiB"  # memory budgets of the two logical devices (the CPU is one physical device)
MEASURED = ("llava-1.5-7b", "qwen2-vl-7b", "paligemma-3b")
SHARDS = {"llava-1.5-7b": 3}  # one checkpoint sharded with an index, the others one file


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """preset -> (directory, the model whose weights were saved there)."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for seed, name in enumerate(MEASURED):
        model = HFFamily(twin(get_preset(name))).build_host(seed=seed + 1)
        save_weights(model, root / name, shards=SHARDS.get(name, 1))
        out[name] = (root / name, model)
    return out


def split_map(profile, *, vision_on: int = 0) -> dict:
    """The second half of the layers, the final norm and the head on GPU 1; a tied head stays with its embeddings."""
    m = {u.name: 0 for u in profile.units}
    for name in profile.layers[len(profile.layers) // 2:]:
        m[name] = 1
    for name in profile.head:
        m[name] = 0 if name in profile.colocation else 1
    for name in profile.vision:
        m[name] = vision_on
    return m


def _agree(measured, simulated):
    assert measured.source == "measured" and simulated.source == "simulated"
    assert measured.ok and simulated.ok, (measured.cause, simulated.cause)
    assert measured.transfer_by_phase == simulated.transfer_by_phase
    assert measured.transfer_count_by_phase == simulated.transfer_count_by_phase
    assert measured.transfer_by_link == simulated.transfer_by_link
    assert measured.kv_bytes == simulated.kv_bytes and set(measured.kv_bytes) == {"cuda:0", "cuda:1"}


@pytest.mark.parametrize("name", MEASURED)
def test_measured_run_of_saved_weights_agrees_with_the_dry_run(name, checkpoints):
    path, saved = checkpoints[name]
    if name in SHARDS:
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("model-*.safetensors"))) > 1
    spec = resolve_model(str(path))
    assert spec.checkpoint == path
    ex = HostExecutor(spec, W, repeats=1, warmup=0, budget=make_cluster(BUDGET))
    # the master copy is the checkpoint's weights (read through the class's own key mapping and ties)
    master = ex.master.master.state_dict()
    assert master.keys() == saved.state_dict().keys()
    assert all(torch.equal(master[k], v) for k, v in saved.state_dict().items())

    profile = spec.profile
    plan = Plan.uniform(split_map(profile))
    measured = ex.run(plan)
    simulated = simulate(profile, plan, W, make_cluster("2x1GiB"))
    _agree(measured, simulated)
    assert {k.split()[0] for k in measured.transfer_by_phase} == {"prefill", "decode"}
    # fp32 on logical devices: the same tokens and logits as one device running the same weights
    assert measured.fidelity_top1 == 1.0 and measured.fidelity_max_abs == 0.0
    family = profile.family
    alone = family.generate(saved.eval(), family.make_inputs(W, "cpu"), W, no_clock)
    assert torch.equal(alone.tokens, ex.reference()[0]) and alone.tokens.shape == (1, W.new_tokens)
    # peak memory per device: its weights plus what the run kept alive there
    for d in ("cuda:0", "cuda:1"):
        assert measured.peak_bytes[d] > measured.weights_bytes[d] > 0
    assert measured.e2e_ms.median > 0 and measured.prefill_ms.median > 0 and measured.decode_ms_per_token.median > 0


def test_image_path_on_another_gpu_is_measured_like_the_dry_run(checkpoints):
    """transformers moves image features to the embeddings' device itself (a no-op between logical devices
    of one CPU): the executor leaves that verdict to the dry run, counts what accelerate moves, and counts
    the model's own copy as GPUs make it (from the join it aligns), as the dry run logs it."""
    path, _ = checkpoints["llava-1.5-7b"]
    spec = resolve_model(str(path))
    ex = HostExecutor(spec, W, repeats=1, warmup=0, budget=make_cluster(BUDGET))
    plan = Plan.uniform(split_map(spec.profile, vision_on=1))
    measured = ex.run(plan)
    _agree(measured, simulate(spec.profile, plan, W, make_cluster("2x1GiB")))
    pixels = ex.inputs("cpu")["pixel_values"]
    assert measured.transfer_by_phase["prefill cuda:0->cuda:1"] >= pixels.numel() * pixels.element_size()
    bf16 = ex.run(Plan.uniform(split_map(spec.profile, vision_on=1), "bf16"))
    assert bf16.ok and bf16.fidelity_max_abs > 0  # reported against the fp32 reference


def test_a_map_gpus_refuse_is_a_measured_failure_and_the_next_trial_runs(checkpoints):
    path, _ = checkpoints["paligemma-3b"]
    spec = resolve_model(str(path))
    ex = HostExecutor(spec, W, repeats=1, warmup=0, budget=make_cluster(BUDGET))
    wrong = split_map(spec.profile) | {"lm_head": 1}  # the tied head away from its embeddings
    bad = ex.run(Plan.uniform(wrong))
    assert bad.status == "invalid" and "Expected all tensors to be on the same device" in bad.cause
    assert "in model.language_model.embed_tokens" in bad.cause and "dry run on virtual GPUs" in bad.cause
    assert ex.run(Plan.uniform(split_map(spec.profile))).ok


def test_a_tied_head_in_another_precision_than_its_embeddings(checkpoints):
    """One tensor, two precision groups: it takes the head's dtype in both worlds (the last cast wins)."""
    path, _ = checkpoints["paligemma-3b"]
    spec = resolve_model(str(path))
    ex = HostExecutor(spec, W, repeats=1, warmup=0, budget=make_cluster(BUDGET))
    plan = Plan(split_map(spec.profile), {"vision": "bf16", "lm": "bf16", "head": "fp32"})
    measured = ex.run(plan)
    _agree(measured, simulate(spec.profile, plan, W, make_cluster("2x1GiB")))
    assert 0 < measured.fidelity_max_abs < 1


def _plan_file(tmp_path: Path, profile, **kw) -> str:
    f = tmp_path / "map.json"
    f.write_text(json.dumps(split_map(profile, **kw)))
    return str(f)


def test_bench_real_on_a_checkpoint_directory(checkpoints, tmp_path, capsys):
    path, _ = checkpoints["qwen2-vl-7b"]
    spec = resolve_model(str(path))
    args = ["bench", "--map", _plan_file(tmp_path, spec.profile), "--model", str(path), "--gpus", BUDGET,
            "--prompt-tokens", "6", "--new-tokens", "3", "--repeats", "1", "--warmup", "0"]
    assert main([*args, "--real", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["source"] == "measured" and rec["status"] == "ok" and rec["fidelity_top1"] == 1.0
    assert rec["model"] == "qwen2-vl-7b" and rec["transfer_bytes"] > 0 and rec["peak_bytes.cuda:1"] > 0
    assert main([*args, "--json"]) == 0  # the same map simulated: the same transfers
    sim = json.loads(capsys.readouterr().out)
    assert sim["source"] == "simulated" and sim["transfer_bytes"] == rec["transfer_bytes"]


def test_a_config_without_weights_runs_dry_and_refuses_real(tmp_path, capsys):
    cfg = twin(get_preset("llava-1.5-7b"))
    d = tmp_path / "config-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.data))
    profile = resolve_model(str(d)).profile
    plan = _plan_file(tmp_path, profile)
    args = ["--model", str(d), "--gpus", BUDGET, "--prompt-tokens", "6", "--new-tokens", "3"]
    assert main(["check", plan, *args]) == 0
    assert "the map will run" in capsys.readouterr().out
    assert main(["bench", "--map", plan, *args, "--real", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress line, one line of error
    assert err.startswith("xctune: error:") and "holds no weights" in err and "--real" in err


def test_weights_that_do_not_fit_the_config_are_bad_input(checkpoints, tmp_path, capsys):
    src, _ = checkpoints["paligemma-3b"]
    d = tmp_path / "mismatch"
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    data = json.loads((d / "config.json").read_text())
    data["text_config"]["intermediate_size"] *= 2  # the saved MLP weights are half that wide
    (d / "config.json").write_text(json.dumps(data))
    spec = resolve_model(str(d))
    args = ["bench", "--map", _plan_file(tmp_path, spec.profile), "--model", str(d), "--gpus", BUDGET,
            "--prompt-tokens", "6", "--new-tokens", "3", "--repeats", "1", "--real"]
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("xctune: error:") and str(d) in err and "mlp" in err


# --- remote code ------------------------------------------------------------------------------


def _remote_dir(root: Path, *, base: str = "LlavaForConditionalGeneration", auto_model: str | None = None) -> tuple[Path, Path]:
    """A checkpoint directory with its own code: a config class and a model class (a subclass of `base`) in
    .py files named by auto_map. Importing the model's module writes a sentinel file."""
    d = root / "remote-llava"
    d.mkdir()
    sentinel = root / "remote-code-ran.txt"
    data = dict(twin(get_preset("llava-1.5-7b")).data)
    data |= {"model_type": "tiny_remote_llava", "architectures": ["TinyRemoteLlava"],
             "auto_map": {"AutoConfig": "configuration_tiny.TinyRemoteConfig",
                          "AutoModelForImageTextToText": auto_model or "modeling_tiny.TinyRemoteLlava"}}
    (d / "config.json").write_text(json.dumps(data))
    (d / "configuration_tiny.py").write_text(
        "from transformers import LlavaConfig\n\n\nclass TinyRemoteConfig(LlavaConfig):\n    model_type = 'tiny_remote_llava'\n")
    (d / "modeling_tiny.py").write_text(
        "from pathlib import Path\n\n"
        f"Path({str(sentinel)!r}).write_text('the directory code ran')\n\n"
        f"import transformers\n\nfrom .configuration_tiny import TinyRemoteConfig\n\n\n"
        f"class TinyRemoteLlava(transformers.{base} if hasattr(transformers, {base!r}) else transformers.PreTrainedModel):\n"
        "    config_class = TinyRemoteConfig\n")
    return d, sentinel


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory):
    """transformers copies remote code into its modules cache and imports it from there as the package
    `transformers_modules`: for these tests, a cache of their own (and that package imported afresh)."""
    import sys

    import transformers.dynamic_module_utils as dyn

    def ours(name):
        return name == "transformers_modules" or name.startswith("transformers_modules.")

    saved_cache, saved_modules = dyn.HF_MODULES_CACHE, {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved_modules:
        del sys.modules[k]
    dyn.HF_MODULES_CACHE = str(tmp_path_factory.mktemp("hf-modules"))
    yield Path(dyn.HF_MODULES_CACHE)
    for k in [k for k in sys.modules if ours(k)]:
        del sys.modules[k]
    sys.modules.update(saved_modules)
    dyn.HF_MODULES_CACHE = saved_cache


def test_remote_code_never_runs_without_the_flag(tmp_path, modules_cache, capsys):
    d, sentinel = _remote_dir(tmp_path)
    m = tmp_path / "all-on-0.json"
    m.write_text(json.dumps({"": 0}))
    args = ["check", str(m), "--model", str(d), "--gpus", BUDGET, "--prompt-tokens", "6", "--new-tokens", "3"]
    for command in (args, ["constraints", "--model", str(d)], ["bench", "--map", str(m), "--model", str(d), "--real"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "--trust-remote-code" in err and "code execution" in err and err.count("\n") == 1
        assert not sentinel.exists()  # nothing of the directory was imported
    # with the flag, the directory's own class is built and dry-run like the native ones
    assert main([*args, "--trust-remote-code"]) == 0
    assert "the map will run" in capsys.readouterr().out
    assert sentinel.exists()
    spec = resolve_model(str(d), trust_remote_code=True)
    model = spec.profile.family.build_meta()
    assert type(model).__name__ == "TinyRemoteLlava" and type(model).__module__.startswith("transformers_modules")
    assert spec.config.base_type == "llava" and spec.profile.embeddings == "model.language_model.embed_tokens"


def test_remote_code_class_is_measured_from_its_weights(tmp_path, modules_cache):
    d, _ = _remote_dir(tmp_path)
    saved = resolve_model(str(d), trust_remote_code=True).profile.family.build_host(seed=7)
    save_weights(saved, d)  # save_pretrained of the directory's class: its config and code stay with it
    spec = resolve_model(str(d), trust_remote_code=True)
    ex = HostExecutor(spec, W, repeats=1, warmup=0, budget=make_cluster(BUDGET))
    assert type(ex.master.master).__name__ == "TinyRemoteLlava"
    assert torch.equal(ex.master.master.lm_head.weight, saved.lm_head.weight)
    plan = Plan.uniform(split_map(spec.profile))
    _agree(ex.run(plan), simulate(spec.profile, plan, W, make_cluster("2x1GiB")))


@pytest.mark.parametrize("case,needle", [
    ("foreign-base", "derives from none of the supported"),
    ("other-repo", "downloads nothing"),
    ("missing-file", "does not hold"),
])
def test_remote_code_that_cannot_be_fed_is_bad_input(case, needle, tmp_path, modules_cache, capsys):
    if case == "foreign-base":
        d, _ = _remote_dir(tmp_path, base="BertModel")
    elif case == "other-repo":
        d, sentinel = _remote_dir(tmp_path, auto_model="someone/elsewhere--modeling_tiny.TinyRemoteLlava")
    else:
        d, sentinel = _remote_dir(tmp_path, auto_model="modeling_absent.TinyRemoteLlava")
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"": 0}))
    assert main(["check", str(m), "--model", str(d), "--gpus", BUDGET, "--trust-remote-code"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    if case != "foreign-base":
        assert not sentinel.exists()


def test_search_real_measures_every_trial_of_a_checkpoint(checkpoints, tmp_path, capsys):
    path, _ = checkpoints["llava-1.5-7b"]
    study = tmp_path / "real.toml"
    study.write_text(
        'name = "hf-real"\nmodel = "tiny"\ntrials = 2\nobjectives = ["latency"]\nseed = 0\nbaseline_dtype = "fp32"\n'
        f'[cluster]\ngpus = "{BUDGET}"\nheadroom = 0.0\n'
        "[workload]\nprompt_tokens = 6\nnew_tokens = 3\n"
        '[space]\ndtypes = ["fp32", "bf16"]\n'
        "[real]\nenabled = true\nrepeats = 1\nthreads = 1\nseed_plans = 1\n")
    out = tmp_path / "out"
    assert main(["search", "--study", str(study), "--model", str(path), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["best"]["source"] == "measured" and result["best"]["status"] == "ok"
    import csv

    with open(out / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 3 and {r["source"] for r in rows} == {"measured"}
    assert main(["check", str(out / "best_map.json"), "--model", str(path), "--gpus", BUDGET,
                 "--prompt-tokens", "6", "--new-tokens", "3"]) == 0
