"""Tests for xctune.hardware: --gpus parsing, presets, links, clusters."""

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xctune.errors import BadInput
from xctune.hardware import (
    DEFAULT_GPU_LINK,
    GPU_PRESETS,
    LINK_PRESETS,
    MAX_GPUS,
    Cluster,
    GiB,
    GPUSpec,
    LinkSpec,
    make_cluster,
    parse_gpus,
)


def bad_input(spec):
    """Parse ``spec`` expecting BadInput; return its message after checking it is one line."""
    with pytest.raises(BadInput) as info:
        parse_gpus(spec)
    msg = str(info.value)
    assert msg and "\n" not in msg and len(msg.splitlines()) == 1
    return msg


# ---------------------------------------------------------------- parsing


def test_two_generic_gpus():
    gpus = parse_gpus("2x24GiB")
    assert len(gpus) == 2
    assert all(g.memory_bytes == 24 * GiB for g in gpus)
    assert gpus[0].name == "24GiB"
    assert "RTX 3090" in gpus[0].source and "assumption" in gpus[0].source
    # Generic GPUs borrow the RTX 3090's throughput and bandwidth.
    assert dict(gpus[0].tflops) == dict(GPU_PRESETS["rtx3090"].tflops)
    assert gpus[0].mem_bw_gbs == GPU_PRESETS["rtx3090"].mem_bw_gbs


def test_mixed_presets_keep_order():
    gpus = parse_gpus("rtx4090,2xrtx3060")
    assert [g.name for g in gpus] == ["rtx4090", "rtx3060", "rtx3060"]
    assert gpus[0] is GPU_PRESETS["rtx4090"]
    assert gpus[1].memory_bytes == 12 * GiB


def test_four_a100():
    gpus = parse_gpus("4xa100-40g")
    assert len(gpus) == 4
    assert all(g.name == "a100-40g" and g.memory_bytes == 40 * GiB for g in gpus)


@pytest.mark.parametrize(
    "spec",
    ["2 x rtx4090", "2X RTX4090", "  2x  rtx4090 ", "2xRtx4090", "rtx4090, rtx4090",
     "1x rtx4090 ,\t1 X rtx4090"],
)
def test_whitespace_and_case(spec):
    assert [g.name for g in parse_gpus(spec)] == ["rtx4090", "rtx4090"]


def test_preset_names_containing_x_are_not_split():
    # "rtx..." contains an "x"; it must not be read as a count.
    assert [g.name for g in parse_gpus("rtx3090")] == ["rtx3090"]


@pytest.mark.parametrize(
    "spec, nbytes, name",
    [
        ("24GiB", 24 * GiB, "24GiB"),
        ("24gib", 24 * GiB, "24GiB"),
        ("24GB", 24 * 10**9, "24GB"),
        ("24G", 24 * GiB, "24GiB"),  # bare G is read as GiB
        ("24 GiB", 24 * GiB, "24GiB"),
        ("23.5GiB", int(23.5 * GiB), "23.5GiB"),
        ("24.0GiB", 24 * GiB, "24GiB"),
        ("512MiB", 512 * 1024**2, "512MiB"),
        ("512MB", 512 * 10**6, "512MB"),
        ("1TiB", 1024**4, "1TiB"),
    ],
)
def test_memory_sizes(spec, nbytes, name):
    (gpu,) = parse_gpus(spec)
    assert gpu.memory_bytes == nbytes
    assert gpu.name == name


def test_gb_is_smaller_than_gib():
    (gb,) = parse_gpus("24GB")
    (gib,) = parse_gpus("24GiB")
    assert gb.memory_bytes < gib.memory_bytes


def test_generic_specs_of_equal_size_are_equal_and_hashable():
    a, b = parse_gpus("24GiB, 24.0gib")
    assert a == b and hash(a) == hash(b)


def test_sixty_four_gpus_allowed():
    assert len(parse_gpus(f"{MAX_GPUS}x24GiB")) == MAX_GPUS


# ---------------------------------------------------------------- parse errors


@pytest.mark.parametrize("spec", ["", "   ", "\t\n"])
def test_empty_spec(spec):
    assert "empty" in bad_input(spec)


@pytest.mark.parametrize("spec", ["a10,,a10", "a10,", ","])
def test_empty_item(spec):
    assert "empty item" in bad_input(spec)


@pytest.mark.parametrize("spec, token", [("0xa10", "'0'"), ("0 x 24GiB", "'0'"),
                                         ("-1xa10", "'-1'"), ("2.5xa10", "'2.5'")])
def test_bad_count(spec, token):
    msg = bad_input(spec)
    assert "count" in msg and token in msg


def test_missing_kind_after_count():
    assert "'2x'" in bad_input("2x")


@pytest.mark.parametrize("spec", ["0GiB", "0.0GB", "-24GiB", "0MiB"])
def test_non_positive_memory(spec):
    msg = bad_input(spec)
    assert "positive" in msg and repr(spec) in msg


def test_memory_needs_unit():
    msg = bad_input("24")
    assert "'24'" in msg and "unit" in msg


def test_unknown_memory_unit():
    assert "'24KiB'" in bad_input("24KiB")


def test_unknown_name_lists_known_presets():
    msg = bad_input("rtx5090")
    assert msg.startswith("unknown GPU 'rtx5090' in --gpus; known: ")
    for name in GPU_PRESETS:
        assert name in msg
    assert "24GiB" in msg  # mentions the memory-size form too


def test_unknown_name_in_second_item_is_named():
    assert "'h200'" in bad_input("rtx4090, 2x h200")


def test_newline_in_token_keeps_message_one_line():
    bad_input("rtx\n5090")


@pytest.mark.parametrize("spec", [f"{MAX_GPUS + 1}x24GiB", f"{MAX_GPUS}xa10, a10",
                                  "10000000000000000000000xa10", "1" * 5000 + "xa10"])
def test_too_many_gpus(spec):
    assert "too many GPUs" in bad_input(spec)


@pytest.mark.parametrize("spec", ["1" * 5000 + "GiB", "2000000TiB"])
def test_absurd_memory(spec):
    assert "large" in bad_input(spec)


def test_non_string_spec():
    with pytest.raises(BadInput):
        parse_gpus(None)


# ---------------------------------------------------------------- GPU specs


def test_v100_has_no_bf16():
    v100 = GPU_PRESETS["v100-32g"]
    assert v100.supports("fp16") and v100.supports("fp32")
    assert not v100.supports("bf16")
    with pytest.raises(BadInput) as info:
        v100.peak_flops("bf16")
    msg = str(info.value)
    assert "bf16" in msg and "v100-32g" in msg and len(msg.splitlines()) == 1


def test_peak_flops_and_bandwidth_units():
    h100 = GPU_PRESETS["h100-80g"]
    assert h100.peak_flops("bf16") == pytest.approx(989.4e12)
    assert h100.peak_flops("fp32") == pytest.approx(67e12)
    assert h100.mem_bw == pytest.approx(3350e9)
    # torch-style spellings are accepted too
    assert h100.peak_flops("bfloat16") == h100.peak_flops("bf16")
    assert h100.supports("torch.float16")


def test_unknown_dtype():
    assert not GPU_PRESETS["a10"].supports("int8")
    with pytest.raises(BadInput):
        GPU_PRESETS["a10"].peak_flops("int8")


@pytest.mark.parametrize(
    "name, gib, fp32, fp16, bf16, bw",
    [
        ("rtx3060", 12, 12.7, 25.6, 25.6, 360),
        ("rtx3090", 24, 35.6, 71, 71, 936),
        ("rtx4090", 24, 82.6, 165.2, 165.2, 1008),
        ("a10", 24, 31.2, 125, 125, 600),
        ("l40s", 48, 91.6, 362.05, 362.05, 864),
        ("v100-32g", 32, 15.7, 125, None, 900),
        ("a100-40g", 40, 19.5, 312, 312, 1555),
        ("a100-80g", 80, 19.5, 312, 312, 2039),
        ("h100-80g", 80, 67, 989.4, 989.4, 3350),
    ],
)
def test_preset_numbers(name, gib, fp32, fp16, bf16, bw):
    g = GPU_PRESETS[name]
    assert g.name == name
    assert g.memory_bytes == gib * GiB
    assert g.tflops["fp32"] == fp32 and g.tflops["fp16"] == fp16
    assert g.tflops.get("bf16") == bf16
    assert g.mem_bw_gbs == bw


@pytest.mark.parametrize("name", sorted(GPU_PRESETS))
def test_every_gpu_preset_is_sane(name):
    g = GPU_PRESETS[name]
    assert g.memory_bytes > 0 and g.mem_bw_gbs > 0
    assert g.tflops and all(v > 0 for v in g.tflops.values())
    assert set(g.tflops) <= {"fp32", "fp16", "bf16"}
    assert g.source.strip()
    # tensor-core half precision is never slower than plain FP32
    assert g.tflops["fp16"] >= g.tflops["fp32"]


def test_gpu_presets_are_read_only_and_picklable():
    g = GPU_PRESETS["rtx4090"]
    with pytest.raises(TypeError):
        g.tflops["fp16"] = 1.0  # type: ignore[index]
    assert pickle.loads(pickle.dumps(g)) == g


def test_gpuspec_validates():
    with pytest.raises(BadInput):
        GPUSpec("x", 0, {"fp32": 1.0}, 100.0, "s")
    with pytest.raises(BadInput):
        GPUSpec("x", GiB, {"int8": 1.0}, 100.0, "s")
    with pytest.raises(BadInput):
        GPUSpec("x", GiB, {"fp32": -1.0}, 100.0, "s")


# ---------------------------------------------------------------- links


@pytest.mark.parametrize("name", sorted(LINK_PRESETS))
def test_every_link_preset_is_sane(name):
    lk = LINK_PRESETS[name]
    assert lk.name == name
    assert lk.bandwidth_gbs > 0 and lk.latency_us >= 0
    assert lk.source.strip()


def test_required_link_presets():
    expected = {"pcie3": 15.75, "pcie4": 31.5, "pcie5": 63.0, "nvlink2": 150.0,
                "nvlink3": 300.0, "nvlink4": 450.0, "nvme-pcie3": 3.5,
                "nvme-pcie4": 7.0, "sata-ssd": 0.55}
    for name, gbs in expected.items():
        assert LINK_PRESETS[name].bandwidth_gbs == gbs
    assert DEFAULT_GPU_LINK == "pcie4"


def test_transfer_seconds_arithmetic():
    lk = LinkSpec("test", bandwidth_gbs=10.0, latency_us=5.0, source="unit test")
    assert lk.bandwidth == 10e9
    assert lk.transfer_seconds(0) == 0.0
    assert lk.transfer_seconds(10**9) == pytest.approx(5e-6 + 0.1)
    assert lk.transfer_seconds(1) == pytest.approx(5e-6 + 1e-10)
    pcie4 = LINK_PRESETS["pcie4"]
    assert pcie4.transfer_seconds(31_500_000_000) == pytest.approx(1.0 + 10e-6)
    with pytest.raises(ValueError):
        lk.transfer_seconds(-1)


# ---------------------------------------------------------------- clusters


def test_make_cluster_defaults():
    c = make_cluster("rtx4090,2xrtx3060")
    assert len(c) == 3
    assert c.gpu_link.name == "pcie4"
    assert c.host_link.name == "pcie4"
    assert c.disk_link.name == "nvme-pcie4"
    assert c.headroom == 0.10


def test_usable_bytes_with_headroom():
    c = make_cluster("2x24GiB", headroom=0.25)
    assert c.usable_bytes(0) == int(24 * GiB * 0.75)
    assert c.usable_bytes(1) == 18 * GiB
    assert make_cluster("24GiB", headroom=0).usable_bytes(0) == 24 * GiB
    assert make_cluster("24GiB").usable_bytes(0) == int(24 * GiB * 0.9)


@pytest.mark.parametrize("headroom", [-0.01, 0.91, 1.0, float("nan"), "0.1", True])
def test_bad_headroom(headroom):
    with pytest.raises(BadInput) as info:
        make_cluster("24GiB", headroom=headroom)
    assert "headroom" in str(info.value)


def test_headroom_bounds_inclusive():
    assert make_cluster("24GiB", headroom=0.9).headroom == 0.9
    assert make_cluster("24GiB", headroom=0.0).headroom == 0.0


@pytest.mark.parametrize("kw, what", [({"link": "nvlink9"}, "'nvlink9'"),
                                      ({"host_link": "usb"}, "'usb'"),
                                      ({"disk": "floppy"}, "'floppy'")])
def test_unknown_link(kw, what):
    with pytest.raises(BadInput) as info:
        make_cluster("24GiB", **kw)
    msg = str(info.value)
    assert what in msg and len(msg.splitlines()) == 1
    for name in LINK_PRESETS:
        assert name in msg


def test_link_names_case_insensitive():
    assert make_cluster("a100-80g", link=" NVLink3 ").gpu_link.name == "nvlink3"


def test_link_between():
    c = make_cluster("4xa100-80g", link="nvlink3", host_link="pcie4", disk="nvme-pcie3")
    assert c.link_between(0, 1) is LINK_PRESETS["nvlink3"]
    assert c.link_between(3, 0) is LINK_PRESETS["nvlink3"]
    assert c.link_between(0, "cpu") is LINK_PRESETS["pcie4"]
    assert c.link_between("cpu", 2) is LINK_PRESETS["pcie4"]
    assert c.link_between("disk", 1) is LINK_PRESETS["nvme-pcie3"]
    assert c.link_between(1, "disk") is LINK_PRESETS["nvme-pcie3"]
    assert c.link_between("cpu", "disk") is LINK_PRESETS["nvme-pcie3"]
    assert c.link_between("cuda:0", "cuda:2") is LINK_PRESETS["nvlink3"]
    with pytest.raises(ValueError):
        c.link_between(1, 1)
    with pytest.raises(ValueError):
        c.link_between("cpu", "cpu")
    with pytest.raises(ValueError):
        c.link_between(0, 4)  # out of range
    with pytest.raises(ValueError):
        c.link_between(0, "tpu")


def test_describe():
    assert make_cluster("2xrtx4090").describe() == "2x rtx4090 (24.0 GiB), pcie4 x16"
    d = make_cluster("rtx4090, 2x rtx3060", link="pcie3").describe()
    assert d == "1x rtx4090 (24.0 GiB) + 2x rtx3060 (12.0 GiB), pcie3 x16"
    assert "\n" not in d
    assert make_cluster("2xh100-80g", link="nvlink4").describe().endswith(", nvlink4")


def test_cluster_validates_and_pickles():
    with pytest.raises(BadInput):
        Cluster((), LINK_PRESETS["pcie4"], LINK_PRESETS["pcie4"], LINK_PRESETS["sata-ssd"])
    c = make_cluster("rtx4090,24GiB")
    assert pickle.loads(pickle.dumps(c)) == c
    assert hash(c) == hash(make_cluster("rtx4090,24GiB"))


# ---------------------------------------------------------------- property

_FRAGMENTS = st.sampled_from(
    ["", " ", ",", "x", "X", "2", "0", "-", ".", "5", "64", "65", "GiB", "gb", "G", "MiB",
     "T", "rtx4090", "a100-40g", "v100-32g", "24", "23.5", "\n", "é", "\u2028", "İ"]
)


@settings(max_examples=400)
@given(st.one_of(st.text(), st.lists(_FRAGMENTS, max_size=8).map("".join)))
def test_parse_gpus_total(spec):
    """Any text either parses to a non-empty tuple of GPUSpec or raises BadInput."""
    try:
        gpus = parse_gpus(spec)
    except BadInput as e:
        assert len(str(e).splitlines()) == 1
        return
    assert isinstance(gpus, tuple) and 1 <= len(gpus) <= MAX_GPUS
    assert all(isinstance(g, GPUSpec) and g.memory_bytes > 0 for g in gpus)
