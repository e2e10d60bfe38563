"""The virtual executor: a dry run of the plan, priced by the cost model, as a trial record."""

from __future__ import annotations

from ..plans.check import weight_bytes
from .costmodel import Efficiency, Estimate, combine, price_calls
from ..hardware import Cluster
from .instrument import UnitCall
from .placement import require_gpu
from ..plans.plan import Plan, resolve
from ..models.profile import ModelProfile
from ..record import Spread, TrialRecord, software_versions
from .virtual import VirtualRun, virtual_run
from ..workload import Workload


def estimate_run(run: VirtualRun, plan: Plan, profile: ModelProfile, cluster: Cluster, eff: Efficiency) -> Estimate:
    """Price a finished dry run: each call's ops on the GPU it ran on, each move over its link."""
    units = profile.by_name

    def dtype_of(call: UnitCall) -> str:
        return plan.dtypes[units[call.unit].group] if call.unit in units else plan.dtypes["lm"]

    compute = price_calls(run.calls, lambda c: cluster.gpus[c.loc], dtype_of, eff)
    moves = [(m.phase, m.src, m.dst, m.nbytes, m.kind) for m in run.moves if m.phase != "setup"]
    est = combine(compute, moves, cluster, run.workload.new_tokens, eff)
    est.peak_bytes, est.kv_bytes = dict(run.peak_bytes), dict(run.kv_bytes)
    return est


def dev(d) -> str:
    return f"cuda:{d}" if isinstance(d, int) else str(d)


def record_header(plan: Plan, model: str, workload: Workload, source: str, devices: dict, label: str = "") -> dict:
    """The fields every trial record starts with: what ran, where, and which world measured it."""
    return dict(
        plan_id=plan.plan_id,
        label=label or plan.label,
        device_map=dict(plan.device_map),
        dtypes=dict(plan.dtypes),
        skip_keys=tuple(plan.skip_keys),
        model=model,
        workload=workload.to_dict(),
        source=source,
        devices=devices,
        versions=software_versions(),
    )


def record_from_estimate(
    est: Estimate,
    plan: Plan,
    profile: ModelProfile,
    cluster: Cluster,
    workload: Workload,
    weights: dict,
    *,
    label: str = "",
) -> TrialRecord:
    """A simulated trial record; `oom` where weights + activations exceed a GPU's usable memory."""
    n = workload.new_tokens
    total, count, links = est.workload_transfers(n)
    by_phase = est.transfers_by_phase(n)
    streamed = sum(m[3] for m in est.moves if m[4] == "weights" and m[0] in ("vision", "prefill"))
    streamed += round(sum(m[3] for m in est.moves if m[4] == "weights" and m[0] in ("decode", "decode_last"))
                      / max(1, len({m[0] for m in est.moves if m[0] in ("decode", "decode_last")})) * max(n - 1, 0))
    transfer_ms = 1e3 * (est.transfer_s.get("vision", 0) + est.transfer_s.get("prefill", 0)
                         + _per_token(est.transfer_s, n) * max(n - 1, 0))
    gpu_ids = [i for i in range(len(cluster.gpus))]
    peak = {dev(i): weights.get(i, 0) + est.peak_bytes.get(i, 0) for i in gpu_ids if i in weights or i in est.peak_bytes}
    status, cause = "ok", ""
    for i in gpu_ids:
        need = weights.get(i, 0) + est.peak_bytes.get(i, 0)
        if need > cluster.usable_bytes(i):
            status = "oom"
            cause = (f"cuda:{i} ({cluster.gpus[i].name}) needs {need / 2**30:.2f} GiB, "
                     f"{cluster.usable_bytes(i) / 2**30:.2f} GiB usable (simulated)")
            break
    return TrialRecord(
        **record_header(plan, profile.config.name, workload, "simulated", {dev(i): g.name for i, g in enumerate(cluster.gpus)}, label),
        status=status,
        cause=cause,
        vision_ms=Spread.single(1e3 * est.phase_s["vision"]),
        prefill_ms=Spread.single(1e3 * est.phase_s["prefill"]),
        decode_ms_per_token=Spread.single(1e3 * est.decode_s_per_token),
        e2e_ms=Spread.single(1e3 * est.e2e_s),
        transfer_bytes=total,
        transfer_count=count,
        transfer_by_link={f"{dev(s)}->{dev(d)}": b for (s, d), b in sorted(links.items(), key=str)},
        transfer_by_phase={f"{p} {dev(s)}->{dev(d)}": v[0] for (p, s, d), v in by_phase.items()},
        transfer_count_by_phase={f"{p} {dev(s)}->{dev(d)}": v[1] for (p, s, d), v in by_phase.items()},
        transfer_ms=transfer_ms,
        streamed_weight_bytes=streamed,
        peak_bytes=peak,
        peak_bytes_max=max(peak.values(), default=0),
        weights_bytes={dev(k): v for k, v in weights.items()},
        activation_bytes={dev(k): v for k, v in est.peak_bytes.items()},
        kv_bytes={dev(k): v for k, v in est.kv_bytes.items()},
        repeats=1,
        memory_note="simulated: weights + the peak of live activations and KV cache on fake tensors",
    )


def _per_token(phase: dict, n: int) -> float:
    if n <= 1:
        return 0.0
    if n == 2 or "decode_last" not in phase:
        return phase.get("decode", 0.0)
    return (phase.get("decode", 0.0) + phase.get("decode_last", 0.0)) / 2


def failed_record(plan: Plan, profile: ModelProfile, workload: Workload, source: str, status: str, cause: str,
                  devices: dict, label: str = "") -> TrialRecord:
    return TrialRecord(**record_header(plan, profile.config.name, workload, source, devices, label), status=status, cause=cause)


def simulate(
    profile: ModelProfile,
    plan: Plan,
    workload: Workload,
    cluster: Cluster,
    eff: Efficiency = Efficiency(),
    label: str = "",
    tied_copies: bool = False,
) -> TrialRecord:
    """One simulated trial through the full dry run (the judge; seconds for a 7B model). `tied_copies`:
    as a pipeline engine runs the plan (check.check)."""
    require_gpu(plan.device_map)
    run = virtual_run(profile, plan, workload, tied_copies=tied_copies)
    devices = {dev(i): g.name for i, g in enumerate(cluster.gpus)}
    bad = [d for d in plan.gpus if d >= len(cluster.gpus)]
    if bad:
        return failed_record(plan, profile, workload, "simulated", "invalid",
                             f"the plan uses cuda:{bad[0]}, the cluster has {len(cluster.gpus)} GPU(s)", devices, label)
    if not run.ok:
        status = "invalid" if run.failure.kind in ("device-mismatch", "meta-copy") else "error"
        return failed_record(plan, profile, workload, "simulated", status, run.failure.describe(), devices, label)
    est = estimate_run(run, plan, profile, cluster, eff)
    weights = weight_bytes(plan, profile, resolve(plan.device_map, profile), tied_copies)
    return record_from_estimate(est, plan, profile, cluster, workload, weights, label=label)
