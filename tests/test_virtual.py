"""The dry run on virtual GPUs: the private device type, exact transfer counts, memory."""

import torch

from conftest import two_gpu_map
from xctune.worlds import vdevice
from xctune.plans.plan import Plan
from xctune.worlds.virtual import virtual_run
from xctune.workload import Workload

W = Workload(prompt_tokens=8, new_tokens=3)  # tiny: 16 image tokens + 8 text = 24 prompt tokens


def test_virtual_device_type_works_and_reports_cuda_names():
    mode = vdevice.new_fake_mode()
    with mode:
        a = torch.empty(2, 3, device=vdevice.virtual(0))
        b = torch.empty(2, 3, device=vdevice.virtual(1))
        assert a[:, 0].contiguous().device == vdevice.virtual(0)  # indexing works (no CUDA guard)
        try:
            a + b
        except RuntimeError as e:
            msg = vdevice.translate(str(e))
        else:
            raise AssertionError("a cross-device add must fail")
    assert "cuda:0" in msg and "cuda:1" in msg and "vgpu" not in msg
    assert vdevice.user_name("vgpu:3") == "cuda:3" and vdevice.is_virtual("vgpu:0")


def _bytes(run, phase):
    return sum(m.nbytes for m in run.moves if m.phase == phase)


def test_transfers_equal_the_analytic_count(tiny):
    cfg = tiny.config
    run = virtual_run(tiny, Plan.uniform(two_gpu_map(tiny)), W)  # layers 0-1 on GPU 0, 2-3 + head on GPU 1
    assert run.ok
    B, T, H, V, f32 = 1, W.prompt_length(cfg), cfg.hidden_size, cfg.vocab_size, 4
    assert T == 24
    hidden = B * T * H * f32  # crosses the one boundary 0 -> 1 once
    per_layer = B * T * 1 + B * T * 8  # im_mask (bool) and position_ids (int64) enter every layer on GPU 1
    logits = B * T * V * f32  # the root hook sends the fp32 logits back to GPU 0
    assert _bytes(run, "prefill") == hidden + 2 * per_layer + logits
    assert sum(1 for m in run.moves if m.phase == "prefill") == 1 + 2 * 2 + 1
    # a decode step: one token; the KV cache stays on its GPU (skip_keys)
    assert _bytes(run, "decode") == B * 1 * H * f32 + 2 * (B * 1 * 8) + B * 1 * V * f32
    assert {(m.src, m.dst) for m in run.moves if m.phase != "vision"} == {(0, 1), (1, 0)}


def test_without_skip_keys_the_cache_travels_every_step(tiny):
    cfg = tiny.config
    run = virtual_run(tiny, Plan(two_gpu_map(tiny), skip_keys=()), W)
    T, kv = W.prompt_length(cfg), 2 * cfg.num_kv_heads * cfg.head_dim * 4  # k + v bytes per position
    skipped = virtual_run(tiny, Plan.uniform(two_gpu_map(tiny)), W)
    # prefill: the two layers' caches on GPU 1 go back to GPU 0 with the output
    assert _bytes(run, "prefill") - _bytes(skipped, "prefill") == 2 * T * kv
    # decode: they come to GPU 1 again (T positions) and back (T + 1 positions)
    assert _bytes(run, "decode") - _bytes(skipped, "decode") == 2 * T * kv + 2 * (T + 1) * kv


def test_offload_streams_weights_every_call(tiny):
    run = virtual_run(tiny, Plan.uniform(two_gpu_map(tiny) | {"model.layers.3": "disk"}), W)
    assert run.ok
    layer_bytes = tiny.by_name["model.layers.3"].param_bytes("fp32")
    streamed = [m for m in run.moves if m.kind == "weights"]
    assert {m.src for m in streamed} == {"disk"} and {m.dst for m in streamed} == {0}
    assert sum(m.nbytes for m in streamed if m.phase == "prefill") == layer_bytes
    # decode steps hold no image tokens: the PLoRA branches are not called, so their weights stay on disk
    cfg = tiny.config
    H, I, QKV = cfg.hidden_size, cfg.intermediate_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    lora = 4 * sum((i + o) * cfg.plora_rank for i, o in [(H, QKV), (H, H), (H, I), (H, I), (I, H)])
    for phase in ("decode", "decode_last"):
        assert sum(m.nbytes for m in streamed if m.phase == phase) == layer_bytes - lora


def test_memory_peak_includes_the_kv_cache(tiny):
    cfg = tiny.config
    run = virtual_run(tiny, Plan.uniform({u.name: 0 for u in tiny.units}), W)
    kv_full = cfg.num_layers * 2 * (W.prompt_length(cfg) + W.new_tokens - 1) * cfg.num_kv_heads * cfg.head_dim * 4
    assert run.kv_bytes == {0: kv_full}
    assert run.peak_bytes[0] >= kv_full


def test_dry_run_of_7b_half_precision_halves_weights_traffic(vl7b):
    from conftest import field_map
    from xctune.plans.plan import load_plan

    fp32 = virtual_run(vl7b, load_plan(field_map("authors-heuristic.2gpu"), "fp32"), W)
    fp16 = virtual_run(vl7b, load_plan(field_map("authors-heuristic.2gpu"), "fp16"), W)
    assert fp32.ok and fp16.ok  # its time is a benchmark (test_dry_run_7b), not a unit-test assertion
    hidden = lambda r: sum(m.nbytes for m in r.moves if m.phase == "prefill" and m.unit == "model.layers.16" and m.nbytes > 10_000)  # noqa: E731
    assert hidden(fp32) == 2 * hidden(fp16)
