"""Plans: accelerate's device-map format in and out, and the resolution of a map against the tree."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import field_map, two_gpu_map, write_json
from xctune.errors import BadInput
from xctune.plans.plan import Plan, load_plan, parse_device, resolve, write_device_map


@pytest.mark.parametrize("name", ["authors-heuristic.2gpu", "authors-heuristic.4gpu", "split-vision-from-embeddings.2gpu"])
def test_field_maps_load(name, vl7b):
    plan = load_plan(field_map(name))
    res = resolve(plan.device_map, vl7b)
    assert not res.uncovered and not res.unknown_keys and not res.covered_twice
    assert all(isinstance(d, int) for d in plan.device_map.values())


def test_json_round_trip(tmp_path, tiny):
    plan = Plan(two_gpu_map(tiny) | {"vision_proj": "cpu", "model.layers.3": "disk"}, {"vision": "fp16", "lm": "bf16", "head": "fp32"})
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.plan_id == plan.plan_id
    write_device_map(plan, tmp_path / "best_map.json")
    carried = json.loads((tmp_path / "best_map.json").read_text())
    assert carried == plan.device_map  # ints stay ints: from_pretrained(device_map=...) takes it as-is
    assert {type(v) for v in carried.values()} == {int, str}
    assert load_plan(tmp_path / "best_map.json").device_map == plan.device_map


def test_dtype_override_and_mixed_labels(tiny):
    plan = Plan(two_gpu_map(tiny), {"vision": "fp16", "lm": "fp32", "head": "fp32"})
    assert plan.mixed and plan.dtype_label == "fp16/fp32/fp32"
    assert plan.unit_dtype("vit", tiny) == "fp16"
    assert plan.unit_dtype("model.layers.1.attention.wqkv.weight", tiny) == "fp32"
    assert Plan.from_dict(plan.to_dict(), dtype="bf16").dtypes == {"vision": "bf16", "lm": "bf16", "head": "bf16"}


@pytest.mark.parametrize(
    "value,expected", [(0, 0), (3, 3), ("cpu", "cpu"), ("disk", "disk"), ("cuda:2", 2), (" CPU ", "cpu")]
)
def test_parse_device_accepts(value, expected):
    assert parse_device(value, "vit") == expected


@pytest.mark.parametrize("value", [True, -1, 1.5, "gpu", "cuda", None, [0], "auto"])
def test_parse_device_rejects(value):
    with pytest.raises(BadInput, match="vit"):
        parse_device(value, "vit")


@pytest.mark.parametrize(
    "text,message",
    [
        ("{", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("{}", "empty"),
        ('"balanced"', "strategy 'balanced'"),
        ('{"vit": "gpu0"}', "device for 'vit'"),
        ('{"device_map": {"vit": 0}, "dtypes": {"vision": "fp8"}}', "unknown dtype"),
        ('{"device_map": {"vit": 0}, "dtypes": {"eyes": "fp16"}}', "unknown precision group"),
    ],
)
def test_malformed_maps_are_one_line_bad_input(tmp_path, text, message):
    p = tmp_path / "m.json"
    p.write_text(text)
    with pytest.raises(BadInput, match=message) as e:
        load_plan(p)
    assert "\n" not in str(e.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(BadInput, match="cannot read"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BadInput):
        load_plan(tmp_path / "bin.json")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=5),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_json_is_a_plan_or_bad_input(value):
    try:
        plan = Plan.from_dict(value)
    except BadInput as e:
        assert "\n" not in str(e)
    else:
        assert plan.device_map


def test_resolution_rules(tiny):
    coarse = resolve({"": 0}, tiny)
    assert not coarse.uncovered and set(coarse.unit_devices.values()) == {(0,)}
    by_model = resolve({"model": 1, "output": 1, "vit": 0, "vision_proj": 0}, tiny)
    assert not by_model.uncovered and by_model.device_of_unit("model.layers.2") == 1
    partial = resolve({"vit": 0, "vision_proj": 0}, tiny)
    assert partial.uncovered and any(n.startswith("output") for n in partial.uncovered)
    unknown = resolve(two_gpu_map(tiny) | {"model.layer.1": 0}, tiny)
    assert unknown.unknown_keys == ("model.layer.1",)
    twice = resolve(two_gpu_map(tiny) | {"model.layers.1.attention": 1}, tiny)
    assert twice.covered_twice and set(twice.unit_devices["model.layers.1"]) == {0, 1}
    assert twice.device_of_unit("model.layers.1") is None  # split inside a unit


def test_unit_of_is_the_longest_unit_prefix_by_whole_names(tiny):
    """The one lookup of a parameter's unit (profile.unit_of), which the profile's own counts use too."""
    assert tiny.unit_of("model.layers.1.attention.wqkv.weight") == "model.layers.1"
    assert tiny.unit_of(tiny.layers[1]) == tiny.layers[1]
    assert tiny.unit_of("model.layers.10.attention.wo.weight") == "model.layers.10.attention.wo.weight"  # no layer 10
    assert tiny.unit_of("model") == "model"  # above every unit: itself
    counted = {}
    for name, n in tiny.param_numels:
        counted[tiny.unit_of(name)] = counted.get(tiny.unit_of(name), 0) + n
    assert counted == {u.name: u.params for u in tiny.units if u.params}


def test_write_then_check_field_map_is_byte_compatible(tmp_path, vl7b):
    plan = load_plan(field_map("authors-heuristic.2gpu"))
    write_device_map(plan, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(field_map("authors-heuristic.2gpu").read_text())
    assert write_json(tmp_path, plan.device_map, "again.json").exists()
