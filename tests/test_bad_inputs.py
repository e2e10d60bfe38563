"""Every bad input is a clear error: typed study files, configs that make no model, maps with no GPU,
oversized inputs, and generated maps, cluster specs and study files thrown at the CLI.

The generated cases run in-process (`xctune.cli.main`); each must end with exit 0, 1 or 2 and no
traceback. XCTUNE_FUZZ_EXAMPLES sets how many cases each property tries (the README figure).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, two_gpu_map, write_json
from xctune.cli import main
from xctune.errors import BadInput
from xctune.models import PRESETS
from xctune.search.study import SETTINGS, load_study

EXAMPLES = int(os.environ.get("XCTUNE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
CASES: dict[str, int] = {}  # property -> cases run (printed for the README figure)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_clean(argv, code, err):
    assert code in (0, 1, 2), f"exit {code} for {argv}: {err[-500:]}"
    assert "Traceback" not in err and "internal error" not in err, f"{argv}: {err[-500:]}"
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("xctune") or "error:" in line]
        assert lines and max(len(line) for line in lines) <= 620, err[-700:]


# --- study files ------------------------------------------------------------------------------

def _study(tmp_path, text: str) -> Path:
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("line, table, expected", [
    ('headroom = "lots"', "cluster", '[cluster]: headroom = "lots": must be a number >= 0 and < 1'),
    ('seed = "abc"', "", 's.toml: seed = "abc": must be a whole number >= 0'),
    ("trials = true", "", "trials = true: must be a whole number >= 0 and <= 1,000,000 (true/false is not a number)"),
    ('skip_keys = "past_key_values"', "space", "skip_keys = \"past_key_values\": must be a list of strings (a single string is not a list"),
    ("seed = -1", "", "seed = -1: must be a whole number >= 0"),
    ("trials = 2.5", "", "trials = 2.5: must be a whole number"),
    ("images = 1.5", "workload", "[workload]: images = 1.5: must be a whole number"),
    ("batch = 0", "workload", "[workload]: batch = 0: must be a whole number >= 1"),
    ("hd_layout = [1]", "workload", "hd_layout = [1]: must be a list of two whole numbers >= 1"),
    ('dtypes = ["fp8"]', "space", "dtypes = ['fp8']: 'fp8' is not one of fp32, fp16, bf16"),
    ("mixed_precision = 1", "space", "mixed_precision = 1: must be true or false"),
    ("fidelity_floor = 2", "real", "[real]: fidelity_floor = 2: must be a number >= 0 and <= 1"),
    ("enabled = \"yes\"", "real", "enabled = \"yes\": must be true or false"),
    ('objectives = "latency"', "", 'objectives = "latency": must be a list of strings'),
    ('sampler = "grid"', "", 'sampler = "grid": must be one of auto, tpe, nsga2, random'),
    ("bogus = 1", "space", "[space]: unknown setting 'bogus'"),
    ("cluster = 3", "", "[cluster] must be a table"),
])
def test_study_settings_are_typed(tmp_path, line, table, expected):
    path = _study(tmp_path, (f"[{table}]\n" if table else "") + line + "\n")
    with pytest.raises(BadInput) as e:
        load_study(path)
    assert str(path) in str(e.value) and expected in str(e.value)
    code, _, err = run_cli(["search", "--study", str(path), "--out", str(tmp_path / "o")])
    assert code == 2 and err.count("\n") == 1 and expected in err


def test_shipped_studies_pass_and_command_line_overrides_are_checked(tmp_path):
    for p in sorted((ROOT / "studies").glob("*.toml")):
        load_study(p)
    code, _, err = run_cli(["search", "--seed", "-3", "--trials", "1", "--out", str(tmp_path / "o")])
    assert code == 2 and "--seed -3: must be a whole number >= 0" in err
    code, _, err = run_cli(["search", "--trials", "-1", "--out", str(tmp_path / "o")])
    assert code == 2 and "--trials -1" in err


def test_a_huge_value_is_never_echoed(tmp_path):
    path = _study(tmp_path, f'model = "ok"\nseed = "{"x" * 5_000_000}"\n')
    code, _, err = run_cli(["search", "--study", str(path)])
    assert code == 2 and len(err) < 400 and "5,000,000 characters" in err


def test_settings_table_names_every_key_the_loader_reads():
    # a new setting is one line in SETTINGS; the shipped studies use only keys it knows
    keys = {(t, k) for t, rules in SETTINGS.items() for k in rules}
    assert ("space", "skip_keys") in keys and ("real", "fidelity_floor") in keys and ("", "trials") in keys
    from xctune.plans.baselines import BASELINES
    from xctune.search.study import BASELINES as STUDY_BASELINES

    assert STUDY_BASELINES == BASELINES


# --- configs that make no model ------------------------------------------------------------------

IXC2_VL_CONFIG = json.loads((Path(__file__).parent / "data" / "configs" / "ixc2-vl-7b" / "config.json").read_text())


@pytest.mark.parametrize("config, expected", [
    ({"hidden_size": 0}, "bad config: config.json of m: hidden_size = 0 must be a whole number >= 1"),
    ({"num_hidden_layers": -2}, "bad config: config.json of m: num_hidden_layers = -2 must be a whole number >= 1"),
    ({"hidden_size": "big"}, "bad config: config.json of m: hidden_size = 'big' must be a whole number >= 1"),
    ({"vocab_size": True}, "bad config: config.json of m: vocab_size = True must be a whole number >= 1"),
    ({"rope_theta": -1}, "bad config 'm': rope_theta = -1.0 must be a finite number > 0"),
    # a model that is whole but not the published variant it claims to be
    ({"num_attention_heads": 7}, "num_attention_heads=7, but"),
])
def test_configs_that_make_no_model(tmp_path, config, expected):
    (tmp_path / "m").mkdir()
    write_json(tmp_path / "m", {**IXC2_VL_CONFIG, **config}, "config.json")
    code, _, err = run_cli(["check", "--model", str(tmp_path / "m"), "--baseline", "authors"])
    assert code == 2 and expected in err and err.count("\n") == 1, err


def test_xctune_config_is_checked_too(tmp_path):
    ours = {**{k: v for k, v in vars(PRESETS["tiny"]).items()}, "hd_layout": [1, 2], "num_layers": 0}
    (tmp_path / "m").mkdir()
    write_json(tmp_path / "m", ours, "xctune_config.json")
    code, _, err = run_cli(["check", "--model", str(tmp_path / "m"), "--baseline", "authors"])
    assert code == 2 and "bad config" in err and "xctune_config.json: num_layers = 0 must be a whole number >= 1" in err


# --- maps with nothing on a GPU: refused with the reason, the same in every command -------------------

@pytest.mark.parametrize("dmap, reason", [
    ({"": "cpu"}, "the map puts nothing on a GPU"),
    ({"": "disk"}, "the map puts everything on 'disk'"),
])
def test_maps_with_no_gpu_are_refused_alike(tmp_path, tiny, dmap, reason):
    path = write_json(tmp_path, dmap)
    for argv in (["check", str(path)], ["bench", "--map", str(path), "--gpus", "2x24GiB"]):
        code, _, err = run_cli([*argv, "--model", "tiny"])
        assert code == 2 and reason in err, (argv, err)
    from xctune.hardware import make_cluster
    from xctune.plans.plan import Plan
    from xctune.worlds.trace import InvalidPlan, Trace
    from xctune.workload import Workload

    with pytest.raises(InvalidPlan, match=reason):  # what a search trial records
        Trace(tiny, Workload(prompt_tokens=8, new_tokens=2)).evaluate(Plan.uniform(dmap), make_cluster("2x24GiB"))


# --- oversized inputs ----------------------------------------------------------------------------

def test_a_map_with_many_unknown_keys_is_judged_in_bounded_time(tmp_path, tiny):
    """Resolution costs lookups per parameter name, not a scan of the map per parameter (README: 2M keys)."""
    from xctune.plans.plan import resolve

    dmap = {**two_gpu_map(tiny), **{f"junk.{i}": 0 for i in range(200_000)}}
    t0 = time.perf_counter()
    res = resolve(dmap, tiny)
    small = resolve(two_gpu_map(tiny), tiny)
    assert len(res.unknown_keys) == 200_000 and res.param_device == small.param_device
    path = write_json(tmp_path, dmap)
    code, out, _ = run_cli(["check", str(path), "--model", "tiny"])
    assert code == 1 and "199,995 more unknown modules" in out and len(out) < 5000
    assert time.perf_counter() - t0 < 120  # a scan per parameter took minutes


def test_a_huge_device_value_is_cut(tmp_path):
    path = write_json(tmp_path, {"vit": "x" * 1_000_000})
    code, _, err = run_cli(["check", str(path), "--model", "tiny"])
    assert code == 2 and len(err) < 400 and "(1,000,000 characters)" in err


# --- generated inputs at the CLI -----------------------------------------------------------------

UNITS = ["", "vit", "vision_proj", "model", "model.tok_embeddings", "model.layers", "model.layers.0", "model.layers.1",
         "model.layers.2", "model.layers.3", "model.norm", "output", "vit.vision_tower", "model.layers.0.attention"]
text = st.text(max_size=12)
devices = st.one_of(st.integers(-2, 4), st.sampled_from(["cpu", "disk", "cuda:0", "cuda:1", "cuda:9", "gpu", "", "CPU"]),
                    st.none(), st.booleans(), st.floats(allow_nan=True), text, st.lists(st.integers(0, 1), max_size=2))
maps = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(UNITS), text), devices, max_size=8),
    st.builds(lambda m, d: {u: d for u in m}, st.just(UNITS[1:2] + UNITS[2:3] + UNITS[4:5] + ["model.layers", "model.norm", "output"]),
              st.sampled_from([0, 1, "cpu", "disk"])),
    st.one_of(st.lists(st.integers(), max_size=3), text, st.integers(), st.none()),
    st.fixed_dictionaries({"device_map": st.dictionaries(st.sampled_from(UNITS), devices, max_size=4),
                           "dtypes": st.one_of(st.dictionaries(st.sampled_from(["vision", "lm", "head", "x"]),
                                                               st.sampled_from(["fp32", "fp16", "bf16", "fp8", 3])),
                                               text, st.none()),
                           "skip_keys": st.one_of(st.lists(text, max_size=2), text, st.integers())}),
)
gpu_kinds = st.sampled_from(["24GiB", "rtx4090", "a100-40g", "0GiB", "-1GiB", "1e400GiB", "nanGiB", "24", "24TiB", "x", "",
                             "3MiB", "h100", "infGiB"])
gpu_specs = st.one_of(
    st.lists(st.tuples(st.one_of(st.none(), st.integers(-1, 5), st.just(10**9)), gpu_kinds), min_size=1, max_size=3)
      .map(lambda parts: ",".join(k if n is None else f"{n}x{k}" for n, k in parts)),
    text,
)
scalars = st.one_of(st.integers(-3, 10**10), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), text,
                    st.lists(st.one_of(st.integers(-1, 3), text), max_size=3))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return str(v)


@st.composite
def study_texts(draw):
    """A study file whose keys are mostly known and whose values are of any type."""
    lines = []
    for table, rules in SETTINGS.items():
        keys = draw(st.lists(st.sampled_from(sorted(rules) + ["unknown_key"]), max_size=3, unique=True))
        body = [f"{k} = {_toml_value(draw(scalars))}" for k in keys if not (table == "" and k == "name")]
        if table:
            lines += [f"[{table}]", *body]
        else:
            lines = body + lines
    return "\n".join(lines) + "\n"


def _count(name):
    CASES[name] = CASES.get(name, 0) + 1


@FUZZ
@given(dmap=maps)
def test_generated_maps(tmp_path_factory, dmap):
    _count("maps")
    path = tmp_path_factory.mktemp("m") / "map.json"
    path.write_text(json.dumps(dmap))
    argv = ["check", str(path), "--model", "tiny", "--prompt-tokens", "8", "--new-tokens", "2"]
    code, _, err = run_cli(argv)
    assert_clean(argv, code, err)


@FUZZ
@given(spec=gpu_specs, link=st.sampled_from(["pcie4", "nvlink3", "pcie9", ""]),
       headroom=st.sampled_from(["0.1", "0", "0.99", "1", "-0.5", "nan", "inf", "x"]))
def test_generated_cluster_specs(tmp_path_factory, spec, link, headroom):
    _count("cluster specs")
    path = tmp_path_factory.mktemp("c") / "map.json"
    path.write_text(json.dumps({"vit": 0, "nonexistent.module": 0}))  # judged without a dry run: specs are the subject
    argv = ["check", str(path), "--model", "tiny", f"--gpus={spec}", f"--link={link}", f"--headroom={headroom}"]
    code, _, err = run_cli(argv)
    assert_clean(argv, code, err)
    assert code != 0


@FUZZ
@given(study=study_texts())
def test_generated_study_files(tmp_path_factory, study):
    _count("study files")
    folder = tmp_path_factory.mktemp("s")
    path = folder / "study.toml"
    path.write_text(study)
    # valid files run for real, kept short from the command line (the file's own values are checked first)
    argv = ["search", "--study", str(path), "--model", "tiny", "--trials", "0", "--out", str(folder / "out"), "--json"]
    code, _, err = run_cli(argv)
    assert_clean(argv, code, err)


def test_report_generated_case_counts():
    """Runs after the properties (file order): the number of generated cases, for the README."""
    print(f"\ngenerated bad-input cases: {CASES} = {sum(CASES.values())} in all, none with a traceback")
    assert not CASES or min(CASES.values()) >= EXAMPLES  # each property ran the cases asked of it


# --- a few cases through the installed command, as users run it ------------------------------------

@pytest.mark.parametrize("argv, code", [
    (["check", "{dir}/nothing.json"], 2),
    (["check", "{dir}/cpu.json", "--model", "tiny"], 2),
    (["report", "{dir}/cpu.json", "{dir}/cpu.json", "--fail-on-regression", "nan"], 2),
    (["search", "--study", "{dir}/bad.toml"], 2),
    (["check", "{dir}/cpu.json", "--model", "tiny", "--gpus", "2xlots"], 2),
])
def test_subprocess_cases(tmp_path, argv, code):
    (tmp_path / "cpu.json").write_text('{"": "cpu"}')
    (tmp_path / "bad.toml").write_text("trials = true\n")
    argv = [a.format(dir=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, "-m", "xctune.cli", *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == code and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr[-500:]
