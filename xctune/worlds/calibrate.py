"""`xctune calibrate`: fit the virtual twin to this machine, and say how wrong it is.

1. Measure the host device's peaks with micro-benchmarks (a large matmul per dtype, a large
   copy): the "host" device the virtual executor can then describe (`--gpus host`).
2. Measure a small model (models/presets.py CALIBRATION_MODEL) for real on training workloads x training plans (single device and
   split over two logical devices, fp32, bf16 and mixed, layers and the projector offloaded to
   disk), every plan of a workload placed at once and timed in turns (interleaved rounds), so
   a change of the machine's load hits all plans alike; each sample keeps its spread.
3. Fit the twin's factors on the training samples, per phase time (least squares on relative
   errors, all factors non-negative): per dtype, the achieved fraction of peak and the fixed
   cost of a matmul-class op and of any other op (a CPU's bf16 is not its fp32: without native
   16-bit kernels each op converts); the cost of a module call (Python and accelerate's hooks);
   the cost of a move between logical devices and of a weight load from the offload folder
   (latency + bytes over bandwidth: the twin's links).
4. Predict held-out workloads *and* held-out plans with the twin itself (trace + cost model at
   the fitted factors) and report the error per phase.
5. Optionally (`--study`), rank agreement: plans of a real study measured interleaved, Kendall
   tau between the twin's end-to-end time and the measured median, beside the measurement's
   own repeat-to-repeat tau (its ceiling).
6. A probe: two small plans timed now, kept in the file; before a real study the same probe
   says whether the machine changed since (staleness).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .costmodel import DtypeEfficiency, Efficiency
from ..errors import BadInput
from ..hardware import GiB, Cluster, GPUSpec, LinkSpec, make_cluster
from ..models.loading import ModelSpec
from ..models.presets import CALIBRATION_MODEL
from ..plans.plan import Plan
from .real import HostExecutor, Prepared, host_ram_bytes, torch_threads
from .virtual import quiet_accelerate
from ..record import Spread
from ..search.space import SearchSpace, SpaceOptions
from .trace import Trace
from ..workload import Workload

PHASES = ("vision", "prefill", "decode")
CALIBRATED_DTYPES = ("fp32", "bf16")  # what the training plans run; fp16 keeps the defaults (slow on most CPUs)
TRAIN = (
    Workload(images=1, prompt_tokens=16, new_tokens=8),
    Workload(images=1, prompt_tokens=128, new_tokens=8),
    Workload(images=2, prompt_tokens=64, new_tokens=8, batch=2),
    Workload(images=0, prompt_tokens=256, new_tokens=8),
    Workload(images=4, prompt_tokens=32, new_tokens=8),
)
HELD_OUT = (
    Workload(images=1, prompt_tokens=64, new_tokens=16),
    Workload(images=2, prompt_tokens=192, new_tokens=8),
    Workload(images=1, prompt_tokens=32, new_tokens=8, batch=4),
)
STALE_BOUND = 0.20  # the probe's phases may drift apart by this much (relative) before the twin is stale
# A real study leans on the twin (seeds from it) only where the twin met issue 12's target in its
# calibration's rank agreement: tau within TAU_MARGIN of the measurement's own (its ceiling), at
# least TAU_QUIET where that ceiling reaches 0.9, and never under TAU_FLOOR (a twin that barely
# ranks is not leaned on, even on a machine too noisy to rank itself)
TAU_MARGIN, TAU_QUIET, TAU_FLOOR = 0.1, 0.8, 0.5
# ... and where its held-out error met the target in every phase (mean absolute error, percent)
HELD_OUT_TARGET_PCT = 10.0
# The fitted factors, in the order of the feature columns (seconds per unit of each feature)
FACTORS = (
    *(f"roofline_{d}" for d in ("fp32", "bf16", "fp16")),
    *(f"{k}_op_{d}" for d in ("fp32", "bf16", "fp16") for k in ("matmul", "other")),
    "module_call",
    "logical_move", "logical_byte",
    "disk_load", "disk_byte",
)


def _timed(fn, repeats: int) -> float:
    """The fastest of `repeats` runs in process CPU time (one thread): noise only ever adds time, and
    a peak measured low would make the twin price big ops too slow."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return float(min(times))


def measure_host(repeats: int = 5, threads: int = 1) -> GPUSpec:
    """The CPU as a device: matmul peak per dtype and copy bandwidth, measured now."""
    tflops = {}
    with torch_threads(threads):
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            # the largest size up to 1024 whose matmul takes about 20 ms (a CPU's fp16 can be 100x slower)
            n = 128
            while n < 1024:
                a = torch.randn(n, n).to(dtype)
                t0 = time.process_time()
                torch.mm(a, a)
                if (time.process_time() - t0) * 8 > 0.02:
                    break
                n *= 2
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            secs = _timed(lambda: torch.mm(a, b), repeats)
            tflops[name] = 2 * n**3 / secs / 1e12
        src = torch.empty(32 * 2**20, dtype=torch.float32)  # 128 MiB
        dst = torch.empty_like(src)
        secs = _timed(lambda: dst.copy_(src), repeats)
    bw = 2 * src.numel() * 4 / secs / 1e9  # read + write
    return GPUSpec(
        name="host",
        memory_bytes=host_ram_bytes() or 16 * GiB,
        tflops=tflops,
        mem_bw_gbs=bw,
        source=f"measured on this machine by xctune calibrate ({threads} thread(s))",
    )


# --- the plans a calibration measures --------------------------------------------------------


def _plan_space(profile) -> SearchSpace:
    big = make_cluster("2x64GiB", headroom=0.0)
    return SearchSpace(profile, big, SpaceOptions(dtypes=("fp32", "bf16", "fp16"), offload=("disk",)))


def calibration_plans(profile) -> tuple[list[Plan], list[Plan]]:
    """(training plans, held-out plans): dtypes, splits over two logical devices, disk offload."""
    L = len(profile.layers)
    if L < 3:
        raise BadInput(f"calibration needs a model with at least 3 decoder layers ({profile.config.name} has {L})")
    s = _plan_space(profile)
    f32 = {"vision": "fp32", "lm": "fp32", "head": "fp32"}
    b16 = {"vision": "bf16", "lm": "bf16", "head": "bf16"}
    train = [
        s.build([L], 0, 0, f32, label="single fp32"),
        s.build([L], 0, 0, b16, label="single bf16"),
        s.build([L // 2, L - L // 2], 0, 1, f32, label="split fp32"),
        s.build([1, L - 1], 0, 1, {"vision": "bf16", "lm": "fp32", "head": "bf16"}, label="split mixed"),
        s.build([L - 2], 0, 0, f32, 2, "disk", label="2 layers on disk, fp32"),
        s.build([1, L - 2], 0, 1, b16, 1, "disk", "disk", label="1 layer + projector on disk, bf16, split"),
    ]
    held = [
        s.build([L - 1, 1], 1, 0, {"vision": "fp32", "lm": "bf16", "head": "fp32"}, label="split, lm bf16"),
        s.build([1, L - 2], 0, 1, {"vision": "bf16", "lm": "bf16", "head": "fp32"}, 1, "disk", label="1 layer on disk, split"),
        s.build([L], 0, 0, {"vision": "fp32", "lm": "fp32", "head": "bf16"}, 0, None, "disk", label="projector on disk"),
    ]
    return train, held


# --- features: what the twin charges, per factor ------------------------------------------------


_UNIT_CLUSTER = make_cluster("2x64GiB", headroom=0.0)  # only its moves are read: the moves do not depend on links


def phase_features(trace: Trace, plan: Plan, host: GPUSpec) -> dict[str, np.ndarray]:
    """Per phase, the amount of each factor (FACTORS) the twin charges for `plan`: roofline seconds at
    peak per dtype, op counts per dtype and class, module calls, moves and bytes per link kind.
    The twin's time of a phase is exactly this vector dotted with the factors (see `_efficiency`)."""
    rec = trace.recording(plan)
    at_peak = Efficiency(1.0, 1.0, 0.0, 0.0)
    col = {name: i for i, name in enumerate(FACTORS)}
    raw: dict[str, np.ndarray] = {}
    for call, table, dtype in zip(rec.run.calls, rec.tables, trace.call_dtypes(plan)):
        f = raw.setdefault(call.phase, np.zeros(len(FACTORS)))
        f[col[f"roofline_{dtype}"]] += table.roofline_seconds(host, dtype, at_peak)
        n_mm, n_other, n_mod = table.overhead_counts()
        f[col[f"matmul_op_{dtype}"]] += n_mm
        f[col[f"other_op_{dtype}"]] += n_other
        f[col["module_call"]] += n_mod
    for phase, src, dst, nbytes, kind in trace.evaluate(plan, _UNIT_CLUSTER).moves:
        f = raw.setdefault(phase, np.zeros(len(FACTORS)))
        link = "disk" if "disk" in (src, dst) else "logical" if isinstance(src, int) and isinstance(dst, int) else None
        if link == "disk":
            f[col["disk_load"]] += 1
            f[col["disk_byte"]] += nbytes
        elif link == "logical":
            f[col["logical_move"]] += 1
            f[col["logical_byte"]] += nbytes
    zero = np.zeros(len(FACTORS))
    decode = [raw[p] for p in ("decode", "decode_last") if p in raw]
    return {
        "vision": raw.get("vision", zero),
        "prefill": raw.get("prefill", zero),
        # the measurement is the mean decode step; the twin's is the mean of the first and the last
        "decode": sum(decode) / len(decode) if decode else zero,
    }


@dataclass
class Sample:
    workload: Workload
    plan: Plan
    phase: str
    measured_ms: float
    cv: float  # spread of the interleaved repeats (coefficient of variation)
    features: np.ndarray


def collect(spec: ModelSpec, host: GPUSpec, sets, rounds: int, threads: int = 1, cache_dir=None,
            progress=None) -> list[list[Sample]]:
    """Every plan measured on every workload, for each (workloads, plans) set: all of them placed at
    once and timed in turns over `rounds` rounds, training and held-out alike, so that a change of
    the machine's load during the calibration hits every sample the same way."""
    jobs = []  # (set index, workload, plan, executor, prepared)
    for k, (workloads, plans) in enumerate(sets):
        for w in workloads:
            ex = HostExecutor(spec, w, repeats=rounds, threads=threads, count=False)
            for plan in plans:
                p = ex.prepare(plan, plan.label)
                if not isinstance(p, Prepared):
                    raise RuntimeError(f"calibration run of {plan.label} failed: {p.cause}")
                jobs.append((k, w, plan, ex, p))
    if progress:
        progress(f"{len(jobs)} (workload, plan) pairs placed; {rounds} interleaved rounds")
    try:
        with torch_threads(threads), quiet_accelerate():
            for _ in range(rounds):
                for _, _, _, ex, p in jobs:
                    ex.time_once(p)
        records = [ex.finish(p) for _, _, _, ex, p in jobs]
    finally:
        for _, _, _, ex, p in jobs:
            ex.release(p)
    out: list[list[Sample]] = [[] for _ in sets]
    traces: dict = {}
    for (k, w, plan, _, _), rec in zip(jobs, records):
        trace = traces.setdefault(w, Trace(spec.profile, w, cache_dir=cache_dir))
        feats = phase_features(trace, plan, host)
        measured = {"vision": rec.vision_ms, "prefill": rec.prefill_ms, "decode": rec.decode_ms_per_token}
        for ph in PHASES:
            if w.images == 0 and ph == "vision":
                continue
            out[k].append(Sample(w, plan, ph, measured[ph].median, measured[ph].cv, feats[ph]))
    return out


# --- the fit ----------------------------------------------------------------------------------


def nnls(A: np.ndarray, b: np.ndarray, iters: int = 200) -> np.ndarray:
    """min ||A x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    m, n = A.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(iters):
        w = A.T @ (b - A @ x)
        if passive.all() or (w[~passive] <= 1e-12 * max(1.0, np.abs(w).max())).all():
            break
        j = np.argmax(np.where(passive, -np.inf, w))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x


ROOFLINE = [i for i, name in enumerate(FACTORS) if name.startswith("roofline_")]


def fit(samples: list[Sample]) -> np.ndarray:
    """The factors (seconds per unit of each feature) that minimise the relative error of every
    training sample; a factor no sample exercises stays 0 (not calibrated). A roofline factor is at
    least 1: no op runs faster than the measured peak (so the twin can price it as a fraction of peak)."""
    meas = np.array([s.measured_ms * 1e-3 for s in samples])
    A = np.array([s.features for s in samples]) / meas[:, None]
    b = np.ones(len(samples)) - A[:, ROOFLINE].sum(axis=1)  # the roofline at peak is charged anyway
    used = np.abs(A).sum(axis=0) > 0
    scale = np.where(used, np.abs(A).max(axis=0), 1.0)  # columns of very different magnitudes
    x = np.zeros(len(FACTORS))
    x[used] = nnls(A[:, used] / scale[used], b) / scale[used]
    x[ROOFLINE] += 1.0
    return x


def _efficiency(x: np.ndarray, dtypes, source: str) -> Efficiency:
    """The fitted factors as the cost model's Efficiency (its roofline takes a fraction of peak:
    1 / the roofline factor, at most 1)."""
    f = dict(zip(FACTORS, x))
    by_dtype = []
    for d in dtypes:
        frac = 1.0 / max(1.0, f[f"roofline_{d}"])
        by_dtype.append(DtypeEfficiency(d, frac, frac, f[f"matmul_op_{d}"] * 1e6, f[f"other_op_{d}"] * 1e6))
    # the calibrated links (`_links`) are the rates copies achieved here: no further fraction of them
    return Efficiency(module_overhead_us=f["module_call"] * 1e6, source=source, by_dtype=tuple(by_dtype),
                      gpu_link=1.0, host_pinned=1.0, host_pageable=1.0, disk=1.0)


def _links(x: np.ndarray) -> dict[str, LinkSpec]:
    f = dict(zip(FACTORS, x))

    def link(name, per_move, per_byte):
        bw = 1e9 if per_byte <= 0 else min(1e9, 1.0 / per_byte / 1e9)  # GB/s; no byte cost: "infinite"
        return LinkSpec(name, bw, per_move * 1e6, "calibrated on this machine by xctune calibrate")

    return {"logical": link("logical (same host)", f["logical_move"], f["logical_byte"]),
            "disk": link("offload folder (host)", f["disk_load"], f["disk_byte"])}


def host_twin(budgets: Cluster, device: GPUSpec, links: dict[str, LinkSpec] | None) -> Cluster:
    """Logical devices of a real study as the twin sees them: each budget's memory, this host's
    measured speed, and (where calibrated) the cost of a move between logical devices and of a
    weight load from the offload folder."""
    gpus = tuple(replace(device, name=f"host ({g.name})", memory_bytes=g.memory_bytes) for g in budgets.gpus)
    # node_links=(): the cluster derives its one node's link from gpu_link again
    extra = {"gpu_link": links["logical"], "disk_link": links["disk"], "node_links": ()} if links else {}
    return replace(budgets, gpus=gpus, **extra)


def errors(samples: list[Sample], predicted: list[float]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for p in PHASES:
        rel = [(pr - s.measured_ms) / s.measured_ms for s, pr in zip(samples, predicted) if s.phase == p]
        noise = [s.cv for s in samples if s.phase == p]
        if rel:
            out[p] = {
                "mean_abs_pct": 100 * float(np.mean(np.abs(rel))),
                "max_abs_pct": 100 * float(np.max(np.abs(rel))),
                "mean_signed_pct": 100 * float(np.mean(rel)),
                "measurement_cv_pct": 100 * float(np.median(noise)),  # the noise the error stands against
                "n": len(rel),
            }
    return out


def twin_phase_ms(trace: Trace, plan: Plan, twin: Cluster, eff: Efficiency) -> dict[str, float]:
    """The twin's own prediction (trace + cost model), per phase; decode per token."""
    est = trace.evaluate(plan, twin, eff)
    return {"vision": 1e3 * est.phase_s["vision"], "prefill": 1e3 * est.phase_s["prefill"],
            "decode": 1e3 * est.decode_s_per_token, "e2e": 1e3 * est.e2e_s}


# --- rank agreement over a real study's plans ---------------------------------------------------


def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties counted as neither concordant nor discordant)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    iu = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[:, None] - x[None, :])[iu], np.sign(y[:, None] - y[None, :])[iu]
    den = np.sqrt(float((dx != 0).sum()) * float((dy != 0).sum()))
    return float((dx * dy).sum() / den) if den else float("nan")


@dataclass
class Agreement:
    """How well the twin ranks a real study's plans, beside how well the measurement ranks itself."""

    n_plans: int
    rounds: int
    tau_twin: float  # twin e2e vs the median over all rounds
    tau_ceiling: float  # median of the even rounds vs median of the odd rounds (the measurement vs itself)
    tau_single: float  # one round vs another, mean over pairs (what a single measurement reaches)
    e2e_cv_median: float
    rows: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def sample_plans(space: SearchSpace, n: int, seed: int = 0, accept=None) -> list[Plan]:
    """`n` distinct plans of the space, drawn by Optuna's random sampler through the space's own
    parameters (so they are plans the study could sample); `accept(plan)` filters."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    plans: dict[str, Plan] = {}
    for _ in range(50 * n):
        if len(plans) >= n:
            break
        trial = study.ask()
        plan = space.suggest(trial)
        study.tell(trial, 0.0)
        if plan.plan_id not in plans and (accept is None or accept(plan)):
            plans[plan.plan_id] = plan
    return list(plans.values())


def rank_agreement(model_spec: ModelSpec, study, calibration_path, n_plans: int = 18, rounds: int = 10,
                   threads: int = 1, cache_dir=None, plans=None) -> Agreement:
    """`n_plans` plans of a real study (those it would measure: not pruned by the memory estimate),
    measured interleaved for `rounds` rounds, ranked by the twin and by the measurement."""
    from ..search.runner import build_cluster

    budgets = build_cluster(study)
    space = SearchSpace(model_spec.profile, budgets, study.space)
    twin = twin_cluster(budgets, calibration_path)
    eff = Efficiency.load(calibration_path)
    trace = Trace(model_spec.profile, study.workload, cache_dir=cache_dir)

    def measurable(plan: Plan) -> bool:
        try:
            est = trace.evaluate(plan, twin, eff)
        except Exception:
            return False
        w = trace.weights(plan)
        return all(w.get(i, 0) + est.peak_bytes.get(i, 0) <= 1.25 * budgets.usable_bytes(i) for i in range(len(budgets.gpus)))

    plans = plans or sample_plans(space, n_plans, seed=study.seed or 0, accept=measurable)
    ex = HostExecutor(model_spec, study.workload, repeats=rounds, threads=threads, count=False)
    records = ex.measure_interleaved(plans, rounds)
    rows = []
    for plan, (rec, per_round) in zip(plans, records):
        if rec.e2e_ms is None or rec.e2e_ms.n < rounds:
            continue
        rows.append({"plan": plan.plan_id, "dtypes": "/".join(plan.dtypes[g] for g in ("vision", "lm", "head")),
                     "twin_ms": twin_phase_ms(trace, plan, twin, eff)["e2e"], "measured_ms": rec.e2e_ms.median,
                     "cv": rec.e2e_ms.cv, "rounds_ms": per_round["e2e"]})
    per_round = np.array([r.pop("rounds_ms") for r in rows])  # [plans, rounds]
    med = np.median(per_round, axis=1)
    pairs = [(i, j) for i in range(rounds) for j in range(i + 1, rounds)]
    return Agreement(
        n_plans=len(rows),
        rounds=rounds,
        tau_twin=kendall_tau([r["twin_ms"] for r in rows], med),
        tau_ceiling=kendall_tau(np.median(per_round[:, 0::2], axis=1), np.median(per_round[:, 1::2], axis=1)),
        tau_single=float(np.mean([kendall_tau(per_round[:, i], per_round[:, j]) for i, j in pairs])),
        e2e_cv_median=float(np.median([r["cv"] for r in rows])),
        rows=rows,
    )


# --- staleness --------------------------------------------------------------------------------


def probe(spec: ModelSpec, rounds: int = 7, threads: int = 1) -> dict:
    """A short fixed measurement (about a second): the first training workload on the first two
    training plans (fp32 and bf16), interleaved; per plan and phase the median in ms."""
    plans = calibration_plans(spec.profile)[0][:2]
    recs = HostExecutor(spec, TRAIN[0], repeats=rounds, threads=threads, count=False).measure_interleaved(plans, rounds)
    return {p.label: {"vision": r.vision_ms.median, "prefill": r.prefill_ms.median, "decode": r.decode_ms_per_token.median}
            for p, (r, _) in zip(plans, recs)}


@dataclass(frozen=True)
class Staleness:
    ratios: dict  # "plan phase" -> now / at calibration
    stale: bool
    message: str


def staleness(calibration: dict, now: dict) -> Staleness:
    """Has the machine changed since calibration? A uniform change of speed (the whole machine
    slower) does not change how plans rank; phases or dtypes drifting apart does: stale."""
    then = calibration.get("probe")
    if not then:
        return Staleness({}, True, "the calibration has no probe (made by an older xctune): recalibrate")
    ratios = {f"{plan} {ph}": now[plan][ph] / then[plan][ph]
              for plan in then if plan in now for ph in then[plan] if then[plan][ph] > 0 and now[plan].get(ph)}
    if not ratios:
        return Staleness({}, True, "the probe measured nothing comparable: recalibrate")
    spread = max(ratios.values()) / min(ratios.values()) - 1
    speed = float(np.median(list(ratios.values())))
    stale = spread > STALE_BOUND
    msg = (f"probe: this machine runs at {speed:.2f}x the calibration's times; phases and dtypes drifted apart "
           f"by {spread:.0%} (bound {STALE_BOUND:.0%})")
    return Staleness(ratios, stale, msg + (": the calibration is stale, run `xctune calibrate`" if stale else ""))


# --- the calibration --------------------------------------------------------------------------


@dataclass
class Calibration:
    device: GPUSpec
    efficiency: Efficiency
    links: dict
    factors: dict
    train_error: dict
    held_out_error: dict
    model: str
    threads: int
    rounds: int
    seconds: float
    probe: dict
    agreement: Agreement | None = None
    samples: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "device": {
                "name": self.device.name,
                "memory_bytes": self.device.memory_bytes,
                "tflops": dict(self.device.tflops),
                "mem_bw_gbs": self.device.mem_bw_gbs,
                "source": self.device.source,
            },
            "efficiency": self.efficiency.to_dict(),
            "links": {k: {"bandwidth_gbs": v.bandwidth_gbs, "latency_us": v.latency_us, "name": v.name}
                      for k, v in self.links.items()},
            "factors": self.factors,
            "model": self.model,
            "threads": self.threads,
            "rounds": self.rounds,
            "train_error_pct": self.train_error,
            "held_out_error_pct": self.held_out_error,
            "probe": self.probe,
            "agreement": self.agreement.to_dict() if self.agreement else None,
            "seconds": round(self.seconds, 1),
            "samples": self.samples,
        }

    def render(self) -> str:
        d, e = self.device, self.efficiency
        lines = [
            f"host device (measured, {self.threads} thread(s)): fp32 {d.tflops['fp32'] * 1e3:.1f} GFLOP/s, "
            f"bf16 {d.tflops['bf16'] * 1e3:.1f}, fp16 {d.tflops['fp16'] * 1e3:.1f}; copy bandwidth {d.mem_bw_gbs:.1f} GB/s",
            f"fitted: {e.module_overhead_us:.1f} us per module call; per dtype:",
        ]
        for x in e.by_dtype:
            lines.append(f"  {x.dtype}: {x.matmul:.3f} of peak, {x.matmul_op_us:.1f} us per matmul op, "
                         f"{x.other_op_us:.1f} us per other op")
        for k, v in self.links.items():
            lines.append(f"  {k} move: {v.latency_us:.1f} us + bytes at {v.bandwidth_gbs:.3g} GB/s")
        lines += [
            f"prediction error of the twin against measurements of {self.model} on this machine:",
            f"  {'phase':<8} {'held-out mean |err|':>20} {'max |err|':>10} {'train mean |err|':>17} {'noise (cv)':>11}",
        ]
        for p in PHASES:
            h, t = self.held_out_error.get(p), self.train_error.get(p)
            if h:
                lines.append(f"  {p:<8} {h['mean_abs_pct']:>19.1f}% {h['max_abs_pct']:>9.1f}% "
                             f"{t['mean_abs_pct']:>16.1f}% {h['measurement_cv_pct']:>10.1f}%")
        if self.agreement:
            a = self.agreement
            lines.append(f"rank agreement over {a.n_plans} plans, {a.rounds} interleaved rounds: Kendall tau twin vs "
                         f"measured {a.tau_twin:.2f}; measured vs itself {a.tau_ceiling:.2f} (halves), "
                         f"{a.tau_single:.2f} (single rounds)")
        lines.append(f"({self.seconds:.0f} s)")
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        from ..atomic import write_text

        write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")


def calibrate(spec: ModelSpec, repeats: int = 5, progress=None, train_set=TRAIN, held_out=HELD_OUT, threads: int = 1,
              plans=None, agreement_study=None, agreement_plans: int = 18, agreement_rounds: int = 10,
              cache_dir=None, out: Path | None = None) -> Calibration:
    if spec.profile.total_params > 50_000_000:
        raise BadInput(f"calibrate measures a small model for real: use --model {CALIBRATION_MODEL} (or a small checkpoint)")
    if repeats < 2:
        raise BadInput("--repeats must be at least 2 (the spread of the repeats is part of the result)")
    t0 = time.perf_counter()
    if cache_dir is None:
        from .trace_cache import default_dir

        cache_dir = default_dir()
    host = measure_host(threads=threads)
    train_plans, held_plans = plans or calibration_plans(spec.profile)
    train, test = collect(spec, host, [(train_set, train_plans), (held_out, held_plans)], repeats, threads, cache_dir,
                          progress)
    x = fit(train)
    dtypes = [d for d in CALIBRATED_DTYPES if any(p.dtypes[g] == d for p in train_plans for g in p.dtypes)]
    eff = _efficiency(x, dtypes, "calibrated on this machine")
    links = _links(x)

    # predictions by the twin itself, at the fitted factors
    predicted = []
    traces: dict = {}
    for s in train + test:
        tr = traces.setdefault(s.workload, Trace(spec.profile, s.workload, cache_dir=cache_dir))
        twin = host_twin(make_cluster("2x64GiB", headroom=0.0), host, links)
        predicted.append(twin_phase_ms(tr, s.plan, twin, eff)[s.phase])
    rows = [
        {"workload": s.workload.to_dict(), "plan": s.plan.label, "phase": s.phase, "measured_ms": s.measured_ms,
         "cv": s.cv, "predicted_ms": pr, "set": "train" if i < len(train) else "held-out"}
        for i, (s, pr) in enumerate(zip(train + test, predicted))
    ]
    if progress:
        progress("probe (the staleness check's reference)")
    cal = Calibration(host, eff, links, {k: float(v) for k, v in zip(FACTORS, x)},
                      errors(train, predicted[:len(train)]), errors(test, predicted[len(train):]),
                      spec.config.name, threads, repeats, 0.0, probe(spec, threads=threads), None, rows)
    if agreement_study is not None:
        if out is None:
            raise BadInput("the rank agreement needs the calibration written first (give out=)")
        cal.save(out)
        if progress:
            progress(f"rank agreement: {agreement_plans} plans of {agreement_study.name}, {agreement_rounds} rounds")
        cal.agreement = rank_agreement(spec, agreement_study, out, agreement_plans, agreement_rounds, threads, cache_dir)
    cal.seconds = time.perf_counter() - t0
    if out is not None:
        cal.save(out)
    return cal


# --- reading a calibration file back -----------------------------------------------------------


def _read(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise BadInput(f"cannot read calibration {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise BadInput(f"{path} is not a calibration file ({type(e).__name__}: {e})") from None


def load_host_device(path) -> GPUSpec:
    """The `host` device a calibration file describes (for `--gpus host`)."""
    try:
        d = _read(path)["device"]
        return GPUSpec(d["name"], int(d["memory_bytes"]), dict(d["tflops"]), float(d["mem_bw_gbs"]), d["source"])
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path} is not a calibration file ({type(e).__name__}: {e})") from None


def load_links(path) -> dict[str, LinkSpec] | None:
    """The calibrated links between logical devices and from the offload folder (None in older files)."""
    links = _read(path).get("links")
    if not links:
        return None
    try:
        return {k: LinkSpec(v["name"], float(v["bandwidth_gbs"]), float(v["latency_us"]),
                            f"calibrated: {path}") for k, v in links.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path}: bad links ({type(e).__name__}: {e})") from None


def twin_cluster(budgets: Cluster, calibration: str | None) -> Cluster:
    """Logical devices of a real study as the virtual twin sees them (see host_twin); the budgets
    themselves where no calibration is given."""
    if not calibration:
        return budgets
    return host_twin(budgets, load_host_device(calibration), load_links(calibration))


def twin_trust(calibration: str | None, spec: ModelSpec | None = None, threads: int = 1) -> tuple[bool, str]:
    """Whether a real study may seed from the twin, and why (not): a calibration must exist, its
    rank agreement must meet the target (TAU_MARGIN, TAU_QUIET, TAU_FLOOR), its held-out error
    must be within HELD_OUT_TARGET_PCT in every phase, and (with `spec`) the probe must say the
    calibration is not stale."""
    if not calibration:
        return False, "no calibration: the twin prices this host at default factors"
    data = _read(calibration)
    a = data.get("agreement")
    if not a:
        return False, "the calibration has no rank agreement (xctune calibrate --study ...)"
    twin, ceiling = a["tau_twin"], a["tau_ceiling"]
    said = f"the twin ranked {a['n_plans']} measured plans at Kendall tau {twin:.2f} (the measurement itself: {ceiling:.2f})"
    if not (ceiling - twin <= TAU_MARGIN and twin >= TAU_FLOOR and (ceiling < 0.9 or twin >= TAU_QUIET)):
        return False, said + f": under the target (within {TAU_MARGIN} of it, >= {TAU_QUIET} where it reaches 0.9, >= {TAU_FLOOR})"
    held_out = data.get("held_out_error_pct") or {}
    missed = {ph: e["mean_abs_pct"] for ph, e in held_out.items() if e["mean_abs_pct"] > HELD_OUT_TARGET_PCT}
    if not held_out or missed:
        errors = ", ".join(f"{ph} {pct:.1f}%" for ph, pct in missed.items()) or "none recorded"
        return False, said + f", but its held-out error is over {HELD_OUT_TARGET_PCT:.0f}% ({errors})"
    if spec is not None:
        st = staleness(data, probe(spec, threads=threads))
        if st.stale:
            return False, st.message
        return True, f"{said}; {st.message}"
    return True, said
