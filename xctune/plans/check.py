"""`xctune check`: will this map run on this cluster, and how full will each card be?

Two judges, fast then thorough:
1. static rules over the module tree (coverage, names, devices, co-location, contiguity,
   weight memory) — milliseconds, precise messages, suggested repairs;
2. the dry run (virtual.py): the real forward under fake tensors with accelerate's hooks. It
   decides what truly fails, and measures transfers and activation + KV-cache memory.
Where the two disagree, the dry run wins and the report says so.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field

from ..errors import shown
from ..hardware import GiB, Cluster
from ..worlds.placement import OFFLOAD_TIERS, exec_location, main_location, require_gpu
from . import constraints
from .plan import Plan, Resolution, resolve
from ..models.profile import DTYPE_BYTES, ModelProfile, tied_copy_bytes
from ..worlds.virtual import VirtualRun, virtual_run
from ..workload import Workload


@dataclass(frozen=True)
class Finding:
    level: str  # "error": the map will fail; "warning": it runs but wastes time or memory; "note"
    code: str
    message: str

    def to_dict(self) -> dict:
        return {"level": self.level, "code": self.code, "message": self.message}


def dev_name(d) -> str:
    return f"cuda:{d}" if isinstance(d, int) else str(d)


def _names(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ------------------------------------------------------------------------------------------
# memory: weights per device


def weight_bytes(plan: Plan, profile: ModelProfile, res: Resolution, tied_copies: bool = False) -> dict:
    """Bytes of weights per device (GPU index, "cpu", "disk").

    Parameters sit where the map puts them; buffers (rotary tables) and root-level parameters
    stay on the execution device, as accelerate's hooks leave them. `tied_copies`: a pipeline
    engine's own copy of a tied weight on each other device that uses it (profile.tied_copy_bytes).
    """
    main = main_location(plan.device_map)
    out: dict = {}
    if tied_copies:
        placed = {u.name: res.device_of_unit(u.name) for u in profile.units}
        out.update(tied_copy_bytes(profile, placed, plan.dtypes))
    root = set(profile.root_parameters)
    for name, numel in profile.param_numels:
        dev = res.param_device.get(name)
        if dev is None:
            continue
        if name in root:
            dev = main
        nbytes = numel * DTYPE_BYTES[plan.unit_dtype(name, profile)]
        out[dev] = out.get(dev, 0) + nbytes
    for name, numel in profile.buffer_numels:
        unit = profile.unit_of(name)
        devs = [d for p, d in res.param_device.items() if profile.unit_of(p) == unit]
        if not devs:
            continue
        dev = exec_location(devs[0], main)
        width = 8 if name.endswith("position_ids") else DTYPE_BYTES[plan.unit_dtype(name, profile)]
        out[dev] = out.get(dev, 0) + numel * width
    return out


# ------------------------------------------------------------------------------------------
# static rules


def static_findings(plan: Plan, profile: ModelProfile, cluster: Cluster, res: Resolution, found,
                    tied_copies: bool = False) -> list[Finding]:
    """Structural rules, then the rules `found` (constraints.ConstraintReport) discovered by dry runs.
    `tied_copies`: as a pipeline engine runs the plan (a tied weight copied to each stage that uses it)."""
    f: list[Finding] = []
    known = sorted({u.name for u in profile.units} | {n for n, _ in profile.param_numels})
    for key in res.unknown_keys[:5]:
        close = difflib.get_close_matches(key, known, n=1) if len(key) <= 200 else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        f.append(Finding("error", "unknown-module", f"unknown module {shown(key)}{hint}"))
    if len(res.unknown_keys) > 5:
        f.append(Finding("error", "unknown-module", f"{len(res.unknown_keys) - 5:,} more unknown modules"))
    if res.uncovered:
        units = list(dict.fromkeys(profile.unit_of(n) for n in res.uncovered))
        f.append(
            Finding(
                "error",
                "uncovered",
                f"{len(res.uncovered)} parameters are not placed, in {_names(units[:6])}"
                + (f" and {len(units) - 6} more" if len(units) > 6 else "")
                + "; accelerate rejects such a map",
            )
        )
    for name, keys in res.covered_twice[:5]:
        f.append(Finding("error", "covered-twice", f"{name!r} is placed twice, by {_names(shown(k) for k in keys)}"))
    if len(res.covered_twice) > 5:
        f.append(Finding("error", "covered-twice", f"{len(res.covered_twice) - 5} more parameters are placed twice"))

    n = len(cluster.gpus)
    outside: dict[int, list[str]] = {}
    for key, dev in plan.device_map.items():
        if isinstance(dev, int) and dev >= n:
            outside.setdefault(dev, []).append(key)
    for dev, keys in sorted(outside.items()):
        what = shown(keys[0]) if len(keys) == 1 else f"{len(keys):,} entries ({shown(keys[0])}, ...)"
        f.append(Finding("error", "unknown-device", f"{what} on cuda:{dev}, but the cluster has {n} GPU(s): cuda:0-{n - 1}"))
    for i in plan.gpus:
        if i < n:
            for group, dtype in plan.dtypes.items():
                if not cluster.gpus[i].supports(dtype) and any(
                    res.device_of_unit(u) == i for u in profile.units_in_group(group)
                ):
                    f.append(
                        Finding("error", "dtype", f"{group} runs in {dtype} on cuda:{i} ({cluster.gpus[i].name}), which has no {dtype} support")
                    )
    if not any(x.code in _STRUCTURAL for x in f):
        f += _discovered(plan, profile, res, found, tied_copies)
    f += _path_warnings(plan, profile, res)
    main = main_location(plan.device_map)
    for p in profile.root_parameters:
        d = res.param_device.get(p)
        if d is not None and d != main:
            f.append(
                Finding(
                    "warning",
                    "root-parameter",
                    f"{p} is mapped to {dev_name(d)}, but accelerate keeps root-level parameters on the main device {dev_name(main)}",
                )
            )
    return f


DISCOVERED = ("colocation", "main-gpu", "not-offloadable")  # the codes of the rules dry runs discovered


def _discovered(plan, profile, res, found, tied_copies: bool = False) -> list[Finding]:
    """The rules dry runs of the model's twin discovered (constraints.py), by where each unit *executes*
    (an offloaded module runs on the main GPU): units that fail when moved alone share one device;
    units that fail off the main GPU sit there; units that fail offloaded stay on a GPU. Where the
    engine copies tied weights (`tied_copies`), the users of a tied tensor other than its owner (a
    tied head) are free of the first two: what bound them there was the one tensor."""
    main = main_location(plan.device_map)
    out = []
    copied = {u for t in profile.tied_tensors for u in t.users} if tied_copies else set()
    group = [u for u in found.required_together if u in res.unit_devices and u not in copied]
    where = {u: res.unit_devices[u] for u in group}
    runs_on = {u: {exec_location(d, main) for d in ds} for u, ds in where.items()}
    if group and len(set().union(*runs_on.values())) > 1:
        anchor = res.device_of_unit(profile.embeddings)
        if anchor is None or anchor in OFFLOAD_TIERS:
            anchor = main
        movers = [u for u in group if runs_on[u] != {anchor}]
        placed = ", ".join(f"{u} on {'/'.join(dev_name(d) for d in where[u])}" for u in group)
        out.append(Finding(
            "error", "colocation",
            f"co-location group split across devices: {placed}; dry runs of the model's twin fail when "
            f"{group[0]} alone moves ({found.cause(group[0], 'other GPU')}). Repair: put {_names(movers)} on {dev_name(anchor)}"))
    off_main = [u for u in found.main_gpu if u in res.unit_devices and u not in copied
                and {exec_location(d, main) for d in res.unit_devices[u]} != {main}]
    if off_main:
        out.append(Finding(
            "error", "main-gpu",
            f"{_names(off_main)} must run on the main GPU {dev_name(main)}: dry runs of the model's twin fail "
            f"when they move off it together ({found.cause(off_main[0], constraints.GROUP)}). Repair: put them on {dev_name(main)}"))
    for u in found.not_offloadable:
        tiers = [d for d in res.unit_devices.get(u, ()) if d in OFFLOAD_TIERS]
        if tiers:
            out.append(Finding(
                "error", "not-offloadable",
                f"{u} is offloaded to {tiers[0]}, but dry runs of the model's twin fail with it offloaded "
                f"({found.cause(u, 'cpu offload')}). Repair: put it on a GPU"))
    return out


def lm_path(profile: ModelProfile) -> list[str]:
    return [profile.embeddings, *profile.layers, *profile.head]


def _path_warnings(plan, profile, res) -> list[Finding]:
    main = main_location(plan.device_map)
    path = [exec_location(res.device_of_unit(u), main) for u in lm_path(profile) if res.device_of_unit(u) is not None]
    if len(path) < 2:
        return []
    crossings = sum(1 for a, b in zip(path, path[1:]) if a != b)
    minimum = len(set(path)) - 1
    out = []
    # layers: one contiguous run per device
    runs: dict = {}
    prev = None
    for i, u in enumerate(profile.layers):
        d = res.device_of_unit(u)
        if d is not None and d != prev:
            runs.setdefault(d, []).append(i)
        prev = d
    broken = {d: r for d, r in runs.items() if len(r) > 1}
    for d, starts in broken.items():
        out.append(
            Finding(
                "warning",
                "non-contiguous",
                f"decoder layers on {dev_name(d)} form {len(starts)} separate runs (starting at layers "
                f"{', '.join(map(str, starts))}): {len(starts) - 1} extra device crossing(s) each way per forward",
            )
        )
    if crossings > minimum and not broken:
        out.append(
            Finding(
                "warning",
                "extra-hop",
                f"the language-model path crosses devices {crossings} times per forward where {minimum} would do "
                f"({' -> '.join(dev_name(d) for d in _dedupe(path))}): {crossings - minimum} extra hidden-state transfer(s) per forward",
            )
        )
    offloaded = [u for u in profile.layers if res.device_of_unit(u) in OFFLOAD_TIERS]
    if offloaded:
        out.append(
            Finding(
                "note",
                "offload",
                f"{len(offloaded)} decoder layer(s) offloaded: their weights stream to {dev_name(main)} at every token",
            )
        )
    return out


def _paths():
    from ..models.loading import loading_paths

    return loading_paths()


def _dedupe(path):
    out = []
    for d in path:
        if not out or out[-1] != d:
            out.append(d)
    return out


# ------------------------------------------------------------------------------------------
# the report


@dataclass
class DeviceUsage:
    device: object  # GPU index
    name: str
    weights_bytes: int
    activation_bytes: int  # live activations + KV cache at its peak (dry run)
    kv_bytes: int
    capacity_bytes: int  # usable: total minus headroom

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return {
            "device": dev_name(self.device),
            "gpu": self.name,
            "weights_bytes": self.weights_bytes,
            "activation_bytes": self.activation_bytes,
            "kv_bytes": self.kv_bytes,
            "total_bytes": self.total_bytes,
            "capacity_bytes": self.capacity_bytes,
        }


@dataclass
class CheckReport:
    plan: Plan
    cluster: Cluster
    workload: Workload
    findings: list[Finding]
    devices: list[DeviceUsage] = field(default_factory=list)
    offloaded_bytes: dict = field(default_factory=dict)  # "cpu"/"disk" -> bytes of weights there
    dry_run: VirtualRun | None = None
    profile: ModelProfile | None = None
    decode_by_loader: dict = field(default_factory=dict)  # loading path -> bytes per decode step (dry run)

    @property
    def model(self) -> str:
        return self.profile.config.name if self.profile else ""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def transfer_bytes(self, phase: str) -> int:
        if self.dry_run is None:
            return 0
        return sum(m.nbytes for m in self.dry_run.moves if m.phase == phase and m.kind != "weights")

    def to_dict(self) -> dict:
        dr = self.dry_run
        links: dict = {}
        if dr is not None:
            for m in dr.moves:
                if m.phase in ("vision", "prefill", "decode"):
                    key = f"{dev_name(m.src)}->{dev_name(m.dst)}"
                    links.setdefault(key, {}).setdefault(m.phase, 0)
                    links[key][m.phase] += m.nbytes
        return {
            "ok": self.ok,
            "model": self.model,
            "cluster": self.cluster.describe(),
            "dtypes": self.plan.dtypes,
            "workload": self.workload.to_dict(),
            "errors": [f.message for f in self.errors],
            "warnings": [f.message for f in self.warnings],
            "findings": [f.to_dict() for f in self.findings],
            "dry_run": None
            if dr is None
            else {"ok": dr.ok, "failure": dr.failure.describe() if dr.failure else None, "seconds": round(dr.seconds, 3), "source": "simulated"},
            "devices": [d.to_dict() for d in self.devices],
            "offloaded_bytes": {str(k): v for k, v in self.offloaded_bytes.items()},
            "transfer_bytes_per_forward": self.transfer_bytes("prefill"),
            "transfer_bytes_per_decode_step": self.transfer_bytes("decode"),
            "transfer_bytes_per_decode_step_by_loader": dict(self.decode_by_loader),
            "loaders": {name: p.description for name, p in _paths().items()},
            "skip_keys": list(self.plan.skip_keys),
            "attention": self.profile.attention if self.profile else None,
            "transfer_bytes_by_link": links,
        }

    def render(self) -> str:
        lines = [f"xctune check: {self.model} on {self.cluster.describe()}, dtypes {self.plan.dtype_label}"]
        lines.append(f"workload: {self.workload.describe(self.profile.config)}")
        if self.devices:
            lines.append("")
            lines.append(f"{'device':<8} {'gpu':<10} {'weights':>9} {'act+KV':>9} {'total':>9} {'usable':>9} {'use':>5}")
            for d in self.devices:
                use = d.total_bytes / d.capacity_bytes if d.capacity_bytes else float("inf")
                flag = "  OVER" if use > 1 else ""
                lines.append(
                    f"{dev_name(d.device):<8} {d.name:<10} {d.weights_bytes / GiB:>7.2f}Gi {d.activation_bytes / GiB:>7.2f}Gi "
                    f"{d.total_bytes / GiB:>7.2f}Gi {d.capacity_bytes / GiB:>7.2f}Gi {use:>5.0%}{flag}"
                )
            for tier, b in self.offloaded_bytes.items():
                lines.append(f"{tier:<8} {'(offload)':<10} {b / GiB:>7.2f}Gi")
            lines.append("(act+KV: live activations and KV cache at their peak, from the dry run: simulated)")
        dr = self.dry_run
        lines.append("")
        if dr is None:
            lines.append("dry run: not run (fix the errors above first)")
        elif dr.ok:
            lines.append(
                f"dry run: ran ({dr.seconds:.1f} s on fake tensors, {self.profile.attention} attention); per forward over "
                f"the prompt {self.transfer_bytes('prefill') / 1e6:.1f} MB cross devices, per decode step "
                f"{self.transfer_bytes('decode') / 1e6:.2f} MB (skip_keys {', '.join(self.plan.skip_keys) or 'none'})"
            )
            paths = _paths()
            for name, b in self.decode_by_loader.items():
                figure = "fails" if b is None else f"{b / 1e6:.2f} MB"
                lines.append(f"  per decode step, {paths[name].description}: {figure}")
        else:
            lines.append(f"dry run: FAILS: {dr.failure.describe()}")
        for f in self.findings:
            lines.append(f"{f.level}: {f.message}")
        lines.append("")
        lines.append("verdict: " + ("the map will run" if self.ok else f"the map will fail ({len(self.errors)} error(s))"))
        return "\n".join(lines)


def _decode_step_bytes(run: VirtualRun) -> int:
    return sum(m.nbytes for m in run.moves if m.phase == "decode" and m.kind != "weights")


def decode_bytes_by_loader(profile: ModelProfile, plan: Plan, workload: Workload, run: VirtualRun | None = None) -> dict:
    """Bytes crossing devices in one decode step under each loading path (models.loading_paths):
    xctune's loader and a bare `from_pretrained(device_map=...)`. Each is a dry run of the prefill
    and one decode step with that path's skip keys (`run`, a finished dry run of `plan`, is reused
    where its skip keys are the path's). Simulated, like every dry-run figure."""
    from dataclasses import replace

    from ..models.loading import loading_paths

    out = {}
    for name, path in loading_paths().items():
        if run is not None and tuple(run.plan.skip_keys) == path.skip_keys:
            out[name] = _decode_step_bytes(run)
            continue
        if len(plan.gpus) <= 1:
            out[name] = 0  # one GPU (offloaded units run on it too): nothing crosses, whatever the skip keys
            continue
        probe = virtual_run(profile, Plan(plan.device_map, plan.dtypes, path.skip_keys, plan.label), replace(workload, new_tokens=2))
        out[name] = _decode_step_bytes(probe) if probe.ok else None
    return out


_STRUCTURAL = {"unknown-module", "uncovered", "covered-twice", "unknown-device", "dtype"}


def check(plan: Plan, profile: ModelProfile, cluster: Cluster, workload: Workload, found=None,
          tied_copies: bool = False) -> CheckReport:
    """`found`: the model's discovered constraints (constraints.constraint_report); by default read from
    the cache, or discovered by dry runs of the model's twin the first time. `tied_copies`: judge the plan
    as a pipeline engine runs it, each stage that uses a tied weight holding its own copy
    (search/targets.PlanRules); accelerate keeps one tensor on one device."""
    if found is None:
        from .constraints import constraint_report
        from ..worlds.trace_cache import default_dir

        found = constraint_report(profile, default_dir())
    res = resolve(plan.device_map, profile)
    findings = static_findings(plan, profile, cluster, res, found, tied_copies)
    report = CheckReport(plan, cluster, workload, findings, profile=profile)
    if any(f.code in _STRUCTURAL for f in findings):
        return report  # accelerate would refuse the map before running anything
    require_gpu(plan.device_map)
    dr = virtual_run(profile, plan, workload, tied_copies=tied_copies)
    report.dry_run = dr
    predicted = [f for f in findings if f.code in DISCOVERED]
    if dr.failure is not None:
        # the dry run is the judge: it confirms a predicted split with the device error, an offload with any
        confirmed = [f for f in predicted if f.code == "not-offloadable" or dr.failure.kind == "device-mismatch"]
        if confirmed:
            findings[:] = [Finding(f.level, f.code, f"{f.message}; the dry run confirms: {dr.failure.describe()}")
                           if f in confirmed else f for f in findings]
        else:
            findings.append(Finding("error", dr.failure.kind, f"dry run fails: {dr.failure.describe()}"))
    elif predicted:
        # found on the twin, not true of this model: the dry run of the model itself wins
        findings[:] = [Finding("warning", f"{f.code}-relaxed", f"{f.message.split('. Repair:')[0]}: but the dry run "
                               f"of this model runs (the rule found on its twin does not hold here)")
                       if f in predicted else f for f in findings]
    if dr.ok:
        report.decode_by_loader = decode_bytes_by_loader(profile, plan, workload, dr)
    weights = weight_bytes(plan, profile, res, tied_copies)
    report.offloaded_bytes = {t: weights[t] for t in OFFLOAD_TIERS if t in weights}
    for i, gpu in enumerate(cluster.gpus):
        act = dr.peak_bytes.get(i, 0) if dr.ok else 0
        usage = DeviceUsage(i, gpu.name, weights.get(i, 0), act, dr.kv_bytes.get(i, 0), cluster.usable_bytes(i))
        report.devices.append(usage)
        if usage.total_bytes > usage.capacity_bytes:
            findings.append(
                Finding(
                    "error",
                    "memory",
                    f"cuda:{i} ({gpu.name}) needs {usage.total_bytes / GiB:.2f} GiB (weights {usage.weights_bytes / GiB:.2f} + "
                    f"activations/KV {usage.activation_bytes / GiB:.2f}) but has {usage.capacity_bytes / GiB:.2f} GiB usable "
                    f"({cluster.headroom:.0%} headroom)",
                )
            )
    return report


@dataclass(frozen=True)
class Verdict:
    """What `check` said of a plan, kept so that a warm search need not run the same dry run again."""

    ok: bool
    errors: tuple[str, ...]
    cached: bool = False


def check_verdict(plan: Plan, profile: ModelProfile, cluster: Cluster, workload: Workload, cache_dir=None,
                  tied_copies: bool = False) -> Verdict:
    """`check`'s verdict, from `cache_dir` when the same plan, model, cluster, workload and versions were
    checked before. The verdict is a pure function of those, as a trace is (trace.py keeps those the same way)."""
    from dataclasses import asdict

    from ..worlds import trace_cache

    key = {"format": "xctune-verdict/2", "model": json.loads(json.dumps(asdict(profile.config), default=repr)),
           "workload": workload.to_dict(), "cluster": repr(cluster), "plan": plan.to_dict(),
           "versions": trace_cache.library_versions(),
           **({"tied_copies": True} if tied_copies else {})}  # absent otherwise: earlier verdicts stay valid

    def judge() -> Verdict:
        report = check(plan, profile, cluster, workload, tied_copies=tied_copies)
        return Verdict(report.ok, tuple(f.message for f in report.errors))

    return trace_cache.cached_json(
        cache_dir, "verdict", key, judge,
        encode=lambda v: {"ok": v.ok, "errors": list(v.errors)},
        decode=lambda d: Verdict(bool(d["ok"]), tuple(str(e) for e in d["errors"]), cached=True),
    )
