"""Regression benchmarks (pytest-benchmark): latency, harness speed, and the guards that hold on noisy machines.

Absolute times drift between machines and runs; they are recorded (pytest-benchmark JSON,
`--benchmark-compare` for stable machines) but not asserted. What is asserted:
- ratios measured side by side in the same run, interleaved so that drift hits both sides;
- exact counts (transfer bytes, bytes of the virtual world, number of valid trials), which do
  not depend on the machine at all.
Every benchmark stores its memory figures and its guarded figures in `extra_info`
(`guards`: lower is better), so one JSON file holds time and memory and `xctune report` can
compare two runs.

Short mode (the default, and CI's) keeps the suite to a few minutes; XCTUNE_BENCH_FULL=1 runs
more rounds and the 50-trial search.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest

from conftest import ROOT, field_map
from xctune.plans.baselines import baseline_plan
from xctune.worlds.build import host_model
from xctune.worlds.costmodel import Efficiency
from xctune.hardware import make_cluster
from xctune.models import get_config
from xctune.models.loading import resolve_model, save_checkpoint
from xctune.search.oracle import Oracle
from xctune.worlds.placement import HostWorld, dispatch, undispatch
from xctune.plans.plan import Plan, load_plan
from xctune.models.profile import profile_of
from xctune.record import TrialRecord
from xctune.worlds.real import HostExecutor, MasterWeights
from xctune.search.runner import run_search
from xctune.worlds.simulate import simulate
from xctune.search.study import load_study, with_overrides
from xctune.worlds.trace import Trace
from xctune.worlds.virtual import virtual_run
from xctune.workload import Workload

FULL = os.environ.get("XCTUNE_BENCH_FULL") == "1"
ROUNDS = 30 if FULL else 10
REAL_WORKLOAD = Workload(images=1, prompt_tokens=32, new_tokens=8)  # the real-cpu study's workload


def check_limit(name: str, value: float, limit: float, why: str) -> None:
    assert value <= limit, f"guard {name} = {value:.4g} > {limit:.4g}: {why}"


def guard(benchmark, name: str, value: float, limit: float, why: str) -> None:
    """Record a guarded figure (lower is better) in the benchmark JSON, and fail when it is over its limit."""
    benchmark.extra_info.setdefault("guards", {})[name] = value
    benchmark.extra_info.setdefault("limits", {})[name] = limit
    check_limit(name, value, limit, why)


def real_plans():
    tiny = profile_of(get_config("tiny"))
    # a fixed plan (the real-cpu study's best of 2026-12-01: bf16, 3 MiB budgets), not whatever the
    # study's latest noisy run picked: the guard below times this plan against the authors' map
    tuned = json.loads((ROOT / "tests" / "data" / "plans" / "real_cpu_tuned.json").read_text())
    cluster = make_cluster("2x3MiB", headroom=0)
    return {
        "tuned": Plan.from_dict(tuned),
        "authors": baseline_plan("authors", tiny, cluster, "fp32"),
        "single": baseline_plan("single", tiny, cluster, "fp32"),
    }


@pytest.fixture(scope="module")
def executor():
    return HostExecutor(resolve_model("tiny"), REAL_WORKLOAD, repeats=3, warmup=1)


def _placed(executor, plan):
    """The plan placed as the real executor places a trial (its `place`: offload, casts between the
    groups of a mixed-precision plan), counters off, with the workload's inputs."""
    placed = executor.place(plan)
    placed.tracker.recording = False
    return placed, executor.inputs(placed.physical_main)


def test_placed_runs_a_mixed_precision_plan_with_disk_offload(executor):
    """A plan mixing precisions with a layer offloaded to disk, placed by the helper the latency
    benchmarks use, runs and gives the tokens the executor's own measured trial gives (the helper
    once mapped such a plan without the casts: "expected m1 and m2 to have the same dtype")."""
    tiny = executor.profile
    dmap = {u.name: 0 for u in tiny.units} | {tiny.layers[-1]: "disk"} | {u: 1 for u in tiny.head}
    plan = Plan(dmap, {"vision": "bf16", "lm": "fp32", "head": "bf16"})
    placed, inputs = _placed(executor, plan)
    try:
        offloaded = placed.model.get_submodule(tiny.layers[-1])
        assert {p.device.type for p in offloaded.parameters()} == {"meta"}  # on disk, streamed in at each call
        out = executor.generate(placed.model, inputs)
    finally:
        undispatch(placed.model)
    prepared = executor.prepare(plan)
    assert not isinstance(prepared, TrialRecord), prepared.cause
    try:
        trial = executor.generate(prepared.placed.model, prepared.inputs)
    finally:
        executor.release(prepared)
    assert out.tokens.shape == (REAL_WORKLOAD.batch, REAL_WORKLOAD.new_tokens)
    assert out.tokens.tolist() == trial.tokens.tolist()


@pytest.mark.parametrize("name", ["tuned", "authors", "single"])
def test_real_tiny_latency(benchmark, executor, name):
    """The tiny model measured for real on the CPU: the real study's best map against the baselines."""
    plan = real_plans()[name]
    record = executor.run(plan, name)  # phases, memory, transfers of the same plan
    assert record.ok, record.cause
    placed, inputs = _placed(executor, plan)
    try:
        benchmark.pedantic(lambda: executor.generate(placed.model, inputs), rounds=ROUNDS, warmup_rounds=2)
    finally:
        undispatch(placed.model)
    benchmark.extra_info.update(
        {
            "source": "measured",
            "prefill_ms": record.prefill_ms.median,
            "decode_ms_per_token": record.decode_ms_per_token.median,
            "peak_bytes": record.peak_bytes,
            "transfer_bytes": record.transfer_bytes,
            "memory_note": record.memory_note,
        }
    )


def _interleaved(fns: dict, rounds: int, stat=statistics.median) -> dict[str, float]:
    """Seconds of each callable (the median of its rounds, or `stat`), run in turns so that machine
    drift hits all of them."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: stat(v) for k, v in times.items()}


MEASURE_ATTEMPTS = 3  # a timed ratio over its limit is measured again, at most this many times in all


def lowest_of_attempts(measure, over_limit) -> tuple:
    """`measure()` again while `over_limit(result)` holds, at most MEASURE_ATTEMPTS times; the attempt
    with the lowest figure and how many were taken. Other jobs on a shared machine only ever add time
    (ratios of 2.26 and 1.28 for the same plans within minutes, 2026-12-02); a real regression is over
    its limit in every attempt and still fails."""
    results = []
    for _ in range(MEASURE_ATTEMPTS):
        results.append(measure())
        if not over_limit(results[-1]):
            break
    return results, len(results)


def test_tuned_over_authors_ratio(benchmark, executor):
    """Guard: the tuned map, which fits the 3 MiB budgets, costs at most 1.6x the authors' fp32 map,
    which does not fit them. Measured side by side: the tuned map is bf16 (casts, and this CPU's
    bf16 kernels are slower on tiny matrices) and splits the vision path from layers 0-2; on this
    machine the ratio measures ~1.1-1.3. An extra device hop or a lost skip_keys pushes it past 1.6."""
    plans = real_plans()
    placed = {k: _placed(executor, plans[k]) for k in ("tuned", "authors")}
    fns = {k: (lambda p=p, i=i: executor.generate(p.model, i)) for k, (p, i) in placed.items()}
    try:
        # the fastest round of each: other jobs only add time, and their load moved the medians'
        # ratio between 1.47 and 2.93 in two runs of the same code (2026-12-02, load average ~3)
        def measure():
            fastest = _interleaved(fns, ROUNDS, min)
            return fastest["tuned"] / fastest["authors"], fastest

        attempts, n = benchmark.pedantic(lowest_of_attempts, args=(measure, lambda r: r[0] > 1.6), rounds=1, iterations=1)
    finally:
        for p, _ in placed.values():
            undispatch(p.model)
    ratio, fastest = min(attempts, key=lambda r: r[0])
    benchmark.extra_info.update({"source": "measured", "tuned_ms": fastest["tuned"] * 1e3, "attempts": n,
                                 "authors_ms": fastest["authors"] * 1e3, "ratios": [r[0] for r in attempts]})
    guard(benchmark, "tuned_over_authors", ratio, 1.6, "the tuned map got slower relative to the authors' map")


# --- the harness itself -------------------------------------------------------------------------

# The authors' 2-GPU map of IXC2-VL-7B in fp16, default workload: 1225 image + 64 text tokens,
# 32 new tokens. Bytes that cross devices, written out:
T, H, V, LAYERS_ON_1, STEPS = 1225 + 64, 4096, 92544, 16, 31
# the checkpoint's eager attention: its [1, 1, T, S] fp16 mask is copied to every layer on GPU 1
# hidden fp16, im_mask + position_ids + mask per layer, fp32 logits back
PREFILL = T * H * 2 + LAYERS_ON_1 * (T * 1 + T * 8 + T * T * 2) + T * V * 4
# one token, im_mask + position_ids per layer, logits back; the KV cache stays put (skip_keys)
DECODE_STEP = H * 2 + LAYERS_ON_1 * (1 + 8) + V * 4
DECODE_MASKS = LAYERS_ON_1 * 2 * sum(T + k for k in range(1, STEPS + 1))  # [1, 1, 1, T + k] fp16 at step k
AUTHORS_7B_TRANSFER = PREFILL + STEPS * DECODE_STEP + DECODE_MASKS  # 554,099,072 bytes


@pytest.fixture(scope="module")
def vl7b_trace():
    profile = profile_of(get_config("ixc2-vl-7b"))
    trace = Trace(profile, Workload())
    plan = load_plan(field_map("authors-heuristic.2gpu"), "fp16")
    trace.evaluate(plan, make_cluster("2xrtx4090"))  # records the trace once
    return profile, trace, plan


def test_virtual_trial_rate(benchmark, vl7b_trace):
    """Trials per second once the trace exists (design.md §3: arithmetic, not a forward pass)."""
    profile, trace, plan = vl7b_trace
    cluster = make_cluster("2xrtx4090")
    est = benchmark(trace.evaluate, plan, cluster, Efficiency())
    transfer = est.workload_transfers(32)[0]
    benchmark.extra_info.update(
        {
            "source": "simulated",
            "trials_per_second": 1.0 / benchmark.stats.stats.mean,
            "peak_bytes": {f"cuda:{d}": b for d, b in est.peak_bytes.items()},
            "transfer_bytes": transfer,
        }
    )
    # exact: any change in what crosses devices is a change in the model, the hooks or the counters
    assert transfer == AUTHORS_7B_TRANSFER
    guard(benchmark, "transfer_bytes_authors_7b", transfer, AUTHORS_7B_TRANSFER, "more bytes cross devices")


def test_offload_decode_over_link_bound(benchmark, vl7b_trace):
    """A cpu-offload 7B plan (16 layers streamed from host memory at every step, fp16, one RTX 4090): its
    simulated decode step against the bound of the bytes it streams over the host link at the achieved
    rate of a *pinned* copy (the faster host path; offloaded weights are pageable and slower still)."""
    from xctune.worlds.costmodel import DECODE_PHASES

    profile, trace, authors = vl7b_trace
    cluster = make_cluster("rtx4090")
    plan = Plan({**{u.name: 0 for u in profile.units}, **{f"model.layers.{i}": "cpu" for i in range(16)}},
                authors.dtypes, authors.skip_keys)
    eff = Efficiency()
    est = benchmark(trace.evaluate, plan, cluster, eff)
    streamed = {p: sum(n for ph, src, dst, n, _ in est.moves if ph == p and src == "cpu") for p in DECODE_PHASES}
    per_step = sum(streamed.values()) / len(streamed)
    bound_s = per_step / (cluster.host_link.bandwidth * eff.host_pinned)
    benchmark.extra_info.update({"source": "simulated", "decode_ms_per_token": est.decode_s_per_token * 1e3,
                                 "link_bound_ms": bound_s * 1e3, "streamed_bytes_per_step": per_step})
    assert per_step >= 16 * 0.4e9  # sixteen fp16 decoder layers (~0.47 GB each) stream in per step
    guard(benchmark, "link_bound_over_simulated_decode", bound_s / est.decode_s_per_token, 1.0,
          "a simulated decode step is faster than its bytes over the host link allow")


def test_dry_run_7b(benchmark, vl7b_trace):
    """One full dry run of a 7B map (fake tensors, accelerate's hooks): seconds."""
    profile, _, plan = vl7b_trace
    run = benchmark.pedantic(virtual_run, args=(profile, plan, Workload()), rounds=1 if not FULL else 3)
    assert run.ok
    benchmark.extra_info.update(
        {"source": "simulated", "peak_bytes": {f"cuda:{d}": b for d, b in run.peak_bytes.items()},
         "kv_bytes": {f"cuda:{d}": b for d, b in run.kv_bytes.items()}}
    )
    # exact: the KV cache at full length, fp16, 16 layers a GPU: 2 x 8 heads x 128 x (1289 + 31) x 2 bytes
    assert run.kv_bytes == {0: 16 * 2 * 8 * 128 * 1320 * 2, 1: 16 * 2 * 8 * 128 * 1320 * 2}


def reference_workload() -> None:
    """A fixed in-process workload, the yardstick of the search's time: Python-level work and small numpy
    arrays, the search's own mix. ~0.41 s of CPU on this project's 2-core machine."""
    import random

    import numpy as np

    rng = random.Random(0)
    xs = [rng.random() for _ in range(200_000)]
    for _ in range(6):
        sorted(xs)
    a = np.random.default_rng(0).random((64, 64))
    for _ in range(6000):
        a = np.tanh(a @ a.T / 64)


# The warm default search may cost this many reference workloads: 10 s on this machine, where the
# reference takes 0.41 s of CPU (measured 2026-12-01; the warm search took 4.6 s of CPU, about 11
# references: scripts/figures/search_speed.py).
SEARCH_OVER_REFERENCE = 24.0


def test_search_wall_time(benchmark, tmp_path):
    """The default study end to end, 50 trials, warm (traces and the best plan's verdict cached):
    its CPU time as a ratio to a fixed in-process reference workload measured beside it, and how good the best is."""
    spec = with_overrides(load_study(ROOT / "studies" / "default.toml"), trials=50, out=str(tmp_path / "cold"))
    first = run_search(spec, progress=False, log=lambda m: None)  # records traces and the verdict (cold)
    runs = iter(range(100))

    def warm():
        return run_search(with_overrides(spec, out=str(tmp_path / f"warm{next(runs)}")), progress=False, log=lambda m: None)

    def cpu(fn):
        t0 = time.process_time()
        out = fn()
        return time.process_time() - t0, out

    def side_by_side():
        ref1, _ = cpu(reference_workload)
        search, result = cpu(warm)
        ref2, _ = cpu(reference_workload)
        return search, (ref1 + ref2) / 2, result

    search_s, ref_s, result = benchmark.pedantic(side_by_side, rounds=1, iterations=1)
    sampled = [r for r in result.records if r.get("trial") is not None and not r.get("baseline")]
    valid = [r for r in sampled if r.get("status") in ("ok", "oom")]
    gap = result.best["e2e_ms"] / result.optimum.e2e_ms - 1
    benchmark.extra_info.update({"source": "simulated", "trials": 50, "valid_trials": len(valid),
                                 "search_cpu_s": search_s, "reference_cpu_s": ref_s, "cold_search_s": first.seconds,
                                 "best_e2e_ms": result.best["e2e_ms"], "optimum_e2e_ms": result.optimum.e2e_ms})
    assert "kept from an earlier run" in result.verified  # warm: the dry run of the best plan was not repeated
    guard(benchmark, "invalid_trials", len(sampled) - len(valid), 0, "the space produced a plan that cannot run")
    guard(benchmark, "gap_to_optimum", gap, 0.02, "the search lands farther from the optimum")
    guard(benchmark, "warm_search_over_reference", search_s / ref_s, SEARCH_OVER_REFERENCE,
          "a warm default search costs more than 10 s on the reference machine")


ORACLE_CLUSTERS = {
    "16 GPUs": ("16x24GiB", 10.0),
    "64 mixed GPUs": ("16xa100-40g,16xrtx4090,16xl40s,16xa10", 60.0),
}


@pytest.fixture(scope="module")
def vl7b_all_widths():
    """The 7B trace at every element width a mixed fp32/fp16/bf16 space needs (recorded once, cached)."""
    from xctune.worlds.trace_cache import default_dir as trace_cache_dir
    from xctune.search.space import SearchSpace, SpaceOptions

    profile = profile_of(get_config("ixc2-vl-7b"))
    trace = Trace(profile, Workload(), cache_dir=trace_cache_dir())
    cluster = make_cluster("2x24GiB")
    small = Oracle(trace, SearchSpace(profile, cluster, SpaceOptions()), cluster).solve()  # records every width
    return profile, trace, small


@pytest.mark.parametrize("name", list(ORACLE_CLUSTERS))
def test_oracle_time(benchmark, vl7b_all_widths, name):
    """The exact optimum over fp32/fp16/bf16 per group, 7B: seconds, at 16 GPUs and at a 64-GPU mixed cluster."""
    from xctune.search.space import SearchSpace, SpaceOptions

    profile, trace, small = vl7b_all_widths
    gpus, limit = ORACLE_CLUSTERS[name]
    cluster = make_cluster(gpus)
    space = SearchSpace(profile, cluster, SpaceOptions())
    times = []

    def solve():
        t0 = time.perf_counter()
        out = Oracle(trace, space, cluster).solve()
        times.append(time.perf_counter() - t0)
        return out

    opt = benchmark.pedantic(solve, rounds=5, iterations=1)
    seconds = min(times)  # the fastest of five: a busy machine only ever adds time
    benchmark.extra_info.update({"source": "simulated", "gpus": gpus, "optimum_e2e_ms": opt.e2e_ms,
                                 "programmes": opt.configs, "seconds": seconds})
    # the optimum is a plan of the space, priced as the trace prices it
    assert opt.plan is not None and space.contains(opt.plan)
    assert trace.evaluate(opt.plan, cluster).e2e_s * 1e3 == pytest.approx(opt.e2e_ms, rel=1e-9)
    if gpus == "16x24GiB":  # more identical cards than the model needs: the 2-card optimum, exactly
        assert opt.e2e_ms == pytest.approx(small.e2e_ms, rel=1e-12)
    guard(benchmark, "oracle_seconds", seconds, limit, f"the exact optimum at {name} got slower")


def test_redispatch_vs_cold_load(benchmark, tmp_path):
    """Placement between trials (cast/move from the master copy) against a cold load from disk."""
    cfg = get_config("tiny")
    save_checkpoint(host_model(cfg), tmp_path / "ckpt")
    spec = resolve_model(str(tmp_path / "ckpt"))
    profile = spec.profile
    plan_a = baseline_plan("authors", profile, make_cluster("2x1GiB"), "fp32")
    plan_b = Plan(plan_a.device_map, {"vision": "bf16", "lm": "fp32", "head": "fp32"})
    master = MasterWeights(spec.load_master())

    def cold():
        m = MasterWeights(spec.load_master())  # reads the safetensors again
        placed = dispatch(m.model_for(plan_a, profile, lambda loc: "cpu"), plan_a.device_map, HostWorld(), collapsed=True)
        undispatch(placed.model)

    def warm():
        for plan in (plan_a, plan_b):  # a new plan each time: only what changed is cast
            placed = dispatch(master.model_for(plan, profile, lambda loc: "cpu"), plan.device_map, HostWorld(), collapsed=True)
            undispatch(placed.model)

    med = benchmark.pedantic(lambda: _interleaved({"cold": cold, "warm": warm}, ROUNDS), rounds=1, iterations=1)
    per_placement = med["warm"] / 2
    benchmark.extra_info.update({"cold_ms": med["cold"] * 1e3, "redispatch_ms": per_placement * 1e3})
    # a re-dispatch builds the module tree and installs hooks like a cold load, but reads nothing
    # from disk; for the tiny model that saves at least a quarter
    guard(benchmark, "redispatch_over_cold", per_placement / med["cold"], 0.75, "placement no longer reuses the master copy")


def test_guard_trips_on_a_deliberately_slowed_plan(benchmark):
    """The ratio guard catches a plan with extra device hops (simulated, 7B, deterministic)."""
    profile = profile_of(get_config("ixc2-vl-7b"))
    cluster = make_cluster("2xrtx4090")
    authors = load_plan(field_map("authors-heuristic.2gpu"), "fp16")
    hopping = Plan({**authors.device_map, **{f"model.layers.{i}": i % 2 for i in range(32)}}, authors.dtypes)
    trace = Trace(profile, Workload())
    base = trace.evaluate(authors, cluster).e2e_s
    slowed = benchmark(trace.evaluate, hopping, cluster).e2e_s
    ratio = slowed / base
    benchmark.extra_info["slowed_over_authors"] = ratio
    # the cost model is deterministic: 1% leaves room for a recalibration, not for 31 extra hops
    # (each a 10.6 MB hidden state in prefill and a PCIe round of latency per decode step: +1.7%)
    with pytest.raises(AssertionError, match="guard"):
        check_limit("slowed_over_authors", ratio, 1.01, "31 extra hidden-state hops per forward")
    assert ratio > 1.01
    assert simulate(profile, hopping, Workload(new_tokens=2), cluster).ok  # slow, but it runs


# --- measurement overhead and the twin's ranking (issue 12) -----------------------------------------


def test_measurement_overhead(benchmark, executor):
    """xctune's timed runs against the same loop without xctune, per phase, interleaved round by round
    (`xctune.worlds.real.overhead_ratios`: plain model, accelerate's `dispatch_model` alone, xctune's executor).
    Guard: xctune / accelerate <= 1.05 per phase, fastest runs. accelerate / plain is accelerate's own hook cost,
    which users pay too: recorded, not guarded."""
    from xctune.worlds.real import overhead_ratios

    rounds = 10 * ROUNDS  # ~10 s: with 30 rounds the fastest decode ratio read 1.053 on a quiet machine (2026-12-02)
    phases = ("vision", "prefill", "decode")

    def worst(r) -> float:
        return max(r["fastest"]["xctune_over_accelerate"][p] for p in phases)

    attempts, n = benchmark.pedantic(
        lowest_of_attempts, args=(lambda: overhead_ratios(executor, real_plans()["authors"], rounds), lambda r: worst(r) > 1.05),
        rounds=1, iterations=1)
    ratios = min(attempts, key=worst)
    benchmark.extra_info.update({"source": "measured", "rounds": rounds, "threads": executor.threads, "ratios": ratios,
                                 "attempts": n, "worst_ratio_per_attempt": [worst(r) for r in attempts]})
    # guarded: the fastest runs (a loaded machine moves the per-round medians by +-10% either way)
    for p in phases:
        guard(benchmark, f"xctune_over_accelerate_{p}", ratios["fastest"]["xctune_over_accelerate"][p], 1.05,
              "xctune's timed runs cost more than accelerate's own hooks")


def test_twin_rank_agreement(benchmark, tmp_path):
    """The twin, calibrated on this machine now, ranks plans of the real CPU study as the measurement
    does. Kendall tau over >= 15 plans measured interleaved, beside the measurement's own tau between
    halves of its rounds (its ceiling). Guards: ceiling - twin <= 0.1; and where the ceiling reaches
    0.9, twin >= 0.8 (as 0.8 - twin <= 0)."""
    from xctune.worlds.calibrate import HELD_OUT, TRAIN, calibrate

    study = load_study(ROOT / "studies" / "real-cpu.toml")
    spec = resolve_model("tiny")

    def run():
        cal = calibrate(spec, repeats=5 if FULL else 3, train_set=TRAIN if FULL else TRAIN[:3],
                        held_out=HELD_OUT if FULL else HELD_OUT[:2], agreement_study=study,
                        agreement_plans=18 if FULL else 16, agreement_rounds=12 if FULL else 8,
                        out=tmp_path / "host.json")
        return cal

    cal = benchmark.pedantic(run, rounds=1, iterations=1)
    a = cal.agreement
    benchmark.extra_info.update({"source": "measured", "n_plans": a.n_plans, "rounds": a.rounds, "tau_twin": a.tau_twin,
                                 "tau_ceiling": a.tau_ceiling, "tau_single": a.tau_single,
                                 "held_out_error_pct": {p: e["mean_abs_pct"] for p, e in cal.held_out_error.items()}})
    assert a.n_plans >= 15
    # Asserted here, not recorded as a guard: a difference of two rank statistics sits near zero and
    # moves by +-0.15 between runs, which no relative comparison with a baseline run can judge.
    check_limit("tau_ceiling_minus_twin", a.tau_ceiling - a.tau_twin, 0.1,
                "the twin ranks this machine's plans worse than the measurement ranks itself")
    if a.tau_ceiling >= 0.9:
        check_limit("tau_0.8_minus_twin", 0.8 - a.tau_twin, 0.0, "the twin's tau fell under 0.8 on a quiet machine")


WRITE_SHRUNK = """
import sys
from dataclasses import replace
from pathlib import Path
from xctune.models import XComposer, get_config, init_weights
from xctune.models.loading import save_checkpoint

cfg = replace(get_config("tiny"), name="shrunk-7b-shape", vocab_size=32000, hidden_size=1024,
              intermediate_size=2816, num_layers=8, num_heads=8, num_kv_heads=2, plora_rank=64,
              plora_rank_wqkv=64, max_position_embeddings=2048, vision_hidden_size=256,
              vision_intermediate_size=1024, vision_layers=4, image_size=112)
save_checkpoint(init_weights(XComposer(cfg), seed=0), Path(sys.argv[1]), format="bin", shards=8)
"""

LOAD_PROBE = """
import json, resource, sys
from xctune.models.loading import resolve_model

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

spec = resolve_model(sys.argv[1])
before = rss()
model = spec.load_master()
# VmHWM: this process image's peak (ru_maxrss would carry the forking parent's over exec)
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"before": before, "peak": peak, "model_bytes": size}))
"""


def test_sharded_load_host_memory(benchmark, tmp_path):
    """Host memory while reading a sharded .bin checkpoint: about one copy of the model.

    A 7B-shaped tree shrunk to ~690 MB of random fp32 weights (8 layers, hidden 1024, vocab
    32000), written as pickled `.bin` shards of ~85-180 MB with an index, read in a fresh
    process: peak RSS over the RSS before loading, divided by the bytes of the loaded model
    (parameters + buffers). One copy plus the largest shard is ~1.26."""
    import subprocess
    import sys

    # written by another process, as a downloaded checkpoint is
    subprocess.run([sys.executable, "-c", WRITE_SHRUNK, str(tmp_path / "ck")], check=True, cwd=ROOT)

    def load():
        out = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(tmp_path / "ck")], capture_output=True,
                             text=True, check=True, cwd=ROOT)
        return json.loads(out.stdout.strip().splitlines()[-1])

    probe = benchmark.pedantic(load, rounds=1, iterations=1)
    ratio = (probe["peak"] - probe["before"]) / probe["model_bytes"]
    shards = len(set(json.loads((tmp_path / "ck" / "pytorch_model.bin.index.json").read_text())["weight_map"].values()))
    benchmark.extra_info.update({"source": "measured", "model_bytes": probe["model_bytes"],
                                 "peak_rss_over_start": probe["peak"] - probe["before"], "shards": shards})
    guard(benchmark, "load_peak_rss_over_model_bytes", ratio, 1.3, "loading holds more than one copy of the model")


def _hf_bench_presets():
    from xctune.models.hf import PRESET_NAMES

    return PRESET_NAMES  # every preset, one round each (two with XCTUNE_BENCH_FULL=1)


@pytest.mark.parametrize("name", _hf_bench_presets())
def test_transformers_dry_run_vs_ixc(benchmark, vl7b_trace, name):
    """A full-size dry run of a transformers preset against the embedded IXC2-VL-7B dry run, side by side.

    Both: one image at the model's native size + 64 text tokens, prefill and the first and last of
    32 decode steps, fp16, two virtual GPUs with the decoder layers split in half."""
    from xctune.models.hf import get_preset

    ixc_profile, _, ixc_plan = vl7b_trace
    profile = profile_of(get_preset(name))
    m = {u.name: 0 for u in profile.units}
    for layer in profile.layers[len(profile.layers) // 2:]:
        m[layer] = 1
    plan = Plan.uniform(m, "fp16")
    ratios = []

    def both():
        t0 = time.perf_counter()
        ixc = virtual_run(ixc_profile, ixc_plan, Workload())
        t1 = time.perf_counter()
        run = virtual_run(profile, plan, Workload())
        t2 = time.perf_counter()
        assert ixc.ok and run.ok, run.failure
        ratios.append((t2 - t1) / (t1 - t0))
        return run

    run = benchmark.pedantic(both, rounds=1 if not FULL else 2)
    ratio = statistics.median(ratios)
    benchmark.extra_info.update(
        {"source": "simulated", "model": name, "ratio_to_ixc_dry_run": ratio,
         "kv_bytes": {f"cuda:{d}": b for d, b in run.kv_bytes.items()}}
    )
    # asserted, not compared with the baseline run: one round of each under other jobs' load moved
    # the PaliGemma ratio by 60% between two runs of the same code
    check_limit(f"dry_run_ratio_{name}", ratio, 4.0, "the transformers dry run got slower than 4x the IXC one")


def test_transformers_search_trial_time(benchmark):
    """A search trial on a transformers preset once its trace exists (LLaVA-1.5-7B at full size, 2x24GiB,
    fp16): a plan sampled from the space, evaluated by arithmetic over the trace — milliseconds, as for
    the embedded model. Guarded: the fastest of the timed trials (a busy machine only adds time)."""
    from conftest import sampled_plans
    from xctune.models.hf import get_preset
    from xctune.search.space import SearchSpace, SpaceOptions

    profile = profile_of(get_preset("llava-1.5-7b"))
    cluster = make_cluster("2x24GiB")
    trace = Trace(profile, Workload())
    space = SearchSpace(profile, cluster, SpaceOptions(dtypes=("fp16",), mixed_precision=False),
                        embed_on_main=trace.joins_main(profile.embed_group, "fp16"))  # records the trace once
    plans = sampled_plans(space, 40)
    times = []

    def trials():
        for plan in plans:
            t0 = time.perf_counter()
            trace.evaluate(plan, cluster)
            times.append(time.perf_counter() - t0)

    benchmark.pedantic(trials, rounds=3 if not FULL else 10)
    fastest_ms = min(times) * 1e3
    benchmark.extra_info.update({"source": "simulated", "model": "llava-1.5-7b", "trials_timed": len(times),
                                 "median_trial_ms": statistics.median(times) * 1e3, "trace_seconds": trace.seconds})
    # asserted, not compared with the baseline run: a sub-millisecond figure moved 75% between two runs
    benchmark.extra_info["fastest_trial_ms"] = fastest_ms
    check_limit("hf_trial_ms_fastest", fastest_ms, 5.0, "a search trial after the trace takes over 5 ms")
