"""The co-location rules of a model: the static rule, and what dry runs show is truly required.

The static rule (profile.colocation) is conservative, as the family states it (models/base.py
`static_colocation`: e.g. everything that feeds a top-level join of image and text embeddings,
or weights tied into one tensor). Dry runs probe the parts the field gets wrong — vision tower, projector, root
parameters, token embeddings, head — each moved alone to another GPU and offloaded to the host,
and the static group moved together off the main GPU. They run on a shrunk twin of the model
(same code, same flags, small dimensions: the family's `twin()`), so the probes take seconds;
device behaviour does not depend on the dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from ..models.base import Role
from .plan import Plan
from ..models.profile import ModelProfile, profile_of
from ..worlds.virtual import virtual_run
from ..workload import Workload

PROBED_ROLES = (Role.VISION_TOWER, Role.PROJECTOR, Role.ROOT_PARAMETER, Role.EMBEDDINGS, Role.HEAD)
GROUP = "group on other GPU"


@dataclass(frozen=True)
class Probe:
    unit: str
    placement: str  # "other GPU" or "cpu offload"
    runs: bool
    cause: str


@dataclass
class ConstraintReport:
    model: str
    static_group: tuple[str, ...]
    probes: list[Probe]
    joins: list[tuple[str, tuple[str, ...]]]

    @property
    def required_together(self) -> tuple[str, ...]:
        """Units that must share a device by the dry runs: those that fail when moved alone."""
        return tuple(p.unit for p in self.probes if p.placement == "other GPU" and not p.runs)

    @property
    def main_gpu(self) -> tuple[str, ...]:
        """Units that must sit on the main GPU: the static group fails even when moved off it together."""
        return tuple(u for p in self.probes if p.placement == GROUP and not p.runs for u in p.unit.split(" + "))

    @property
    def not_offloadable(self) -> tuple[str, ...]:
        return tuple(p.unit for p in self.probes if p.placement == "cpu offload" and not p.runs)

    root_parameters: tuple[str, ...] = ()
    static_reason: str = ""

    def cause(self, unit: str, placement: str) -> str:
        """The error of the failing probe of `unit` at `placement` (a member of a group probe counts)."""
        for p in self.probes:
            if p.placement == placement and not p.runs and unit in p.unit.split(" + "):
                return p.cause
        return ""

    def disagreements(self) -> list[str]:
        out = []
        for p in self.probes:
            if p.placement != "other GPU" or not p.runs or p.unit not in self.static_group:
                continue
            if p.unit in self.root_parameters:
                out.append(f"{p.unit} may be mapped anywhere: accelerate keeps root-level parameters on the main device")
            else:
                out.append(f"{p.unit} may sit on another GPU (the static rule keeps it with the group): its output is moved instead")
        return out

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "static_colocation": list(self.static_group),
            "dry_run_colocation": list(self.required_together),
            "not_offloadable": list(self.not_offloadable),
            "main_gpu": list(self.main_gpu),
            "top_level_joins": [{"op": op, "units": list(units)} for op, units in self.joins],
            "probes": [p.__dict__ for p in self.probes],
            "disagreements": self.disagreements(),
            "source": "simulated (dry runs on a shrunk twin of the model)",
        }

    def render(self) -> str:
        lines = [f"co-location rules of {self.model}", ""]
        if self.static_group:
            lines.append("static rule (fast pre-check): " + ", ".join(self.static_group) + " share one device"
                         + (f": {self.static_reason}" if self.static_reason else ""))
        else:
            lines.append("static rule (fast pre-check): none")
        lines.append("dry runs (the judge), each part moved alone:")
        for p in self.probes:
            verdict = "runs" if p.runs else f"FAILS: {p.cause}"
            lines.append(f"  {p.unit:<34} {p.placement:<18} {verdict}")
        for op, units in self.joins:
            lines.append(f"top-level {op} joins outputs of: {', '.join(units)}")
        lines.append("truly required together: " + (", ".join(self.required_together) or "nothing"))
        if self.not_offloadable:
            lines.append("cannot be offloaded: " + ", ".join(self.not_offloadable))
        if self.main_gpu:
            lines.append("must sit on the main GPU: " + ", ".join(self.main_gpu))
        for d in self.disagreements():
            lines.append("static rule vs dry run: " + d)
        return "\n".join(lines)


FORMAT = "xctune-constraints/1"  # the probes of every unit but decoder layers and root parameters


def constraint_report(profile: ModelProfile, cache_dir=None, log=None) -> ConstraintReport:
    """The constraints of `profile`'s model, found by dry runs of its twin, or read from `cache_dir`
    where the same twin was probed with the same library versions (trace_cache.py: plain JSON with
    its key). `log` hears about the dry runs before they start (they take seconds to a minute)."""
    from dataclasses import asdict

    from ..worlds import trace_cache

    twin_config = profile.family.twin()
    key = {"format": FORMAT, "twin": asdict(twin_config), "versions": trace_cache.library_versions()}

    def probe():
        if log is not None:
            log(f"discovering the constraints of {profile.config.name}: dry runs of its twin, each part moved "
                f"(once per model and library versions)...")
        return _probe_twin(twin_config)

    probes, joins = trace_cache.cached_json(
        cache_dir, "constraints", key, probe,
        encode=lambda pj: {"probes": [p.__dict__ for p in pj[0]], "joins": [list(j) for j in pj[1]]},
        decode=lambda d: ([Probe(str(p["unit"]), str(p["placement"]), bool(p["runs"]), str(p["cause"])) for p in d["probes"]],
                          [(str(op), tuple(str(u) for u in units)) for op, units in d["joins"]]),
    )
    return _report(profile, probes, joins)


def _report(profile: ModelProfile, probes, joins) -> ConstraintReport:
    # the twin has the model's module tree (fewer, smaller layers): its root parameters are the model's
    return ConstraintReport(
        profile.config.name, profile.colocation, list(probes), list(joins), profile.root_parameters, profile.colocation_reason
    )


@cache
def _probe_twin(twin_config) -> tuple[list[Probe], list[tuple[str, tuple[str, ...]]]]:
    twin = profile_of(twin_config)
    units = [u.name for u in twin.units]
    base = {u: 0 for u in units}
    w = Workload(prompt_tokens=4, new_tokens=2)
    probes = []
    moved = twin.with_role(*PROBED_ROLES)
    # root parameters always stay on the main device; decoder layers stream their weights like any module
    offloaded = [u.name for u in twin.units if not u.is_parameter and u.name not in twin.layers]
    for member in dict.fromkeys([*moved, *offloaded]):
        for placement, dev in (("other GPU", 1), ("cpu offload", "cpu")):
            if (placement == "other GPU" and member not in moved) or (placement == "cpu offload" and member not in offloaded):
                continue
            run = virtual_run(twin, Plan.uniform({**base, member: dev}), w)
            probes.append(Probe(member, placement, run.ok, run.failure.describe() if run.failure else ""))
    group = [u for u in twin.colocation if not twin.by_name[u].is_parameter]
    if len(group) > 1:
        run = virtual_run(twin, Plan.uniform({**base, **{u: 1 for u in group}}), w)
        probes.append(Probe(" + ".join(group), GROUP, run.ok, run.failure.describe() if run.failure else ""))
    # the trace view: every unit on a logical device of its own shows which outputs meet at top level
    run = virtual_run(
        twin, Plan.uniform(base), w, physical_map=base, locations={u: u for u in units}, main_loc="<main>"
    )
    joins = list(dict.fromkeys((op, tuple(str(x) for x in locs)) for op, locs, _ in run.joins))
    return probes, joins


def confirmed_joins(profile: ModelProfile, joins: list) -> list:
    """The top-level joins of a trace, each keeping only the units a dry run confirms.

    A trace runs every unit on one physical device (trace.py), so a model's own
    `.to(other.device)` is a no-op there: an op that takes outputs of several units looks like a
    join even where the code moves them onto one device first (transformers' native classes move
    the image features to the embeddings' device). The judge is the twin with that unit alone on
    another GPU (with the units its weights are tied to): where that runs, the unit is not joined.
    The top level and root parameters run on the main device whatever the map says: never probed.
    Joins left with one location are dropped."""
    return [(op, kept, phase) for (op, _, phase), kept in zip(joins, confirmed_locations(profile, joins))
            if len(kept) > 1]


def confirmed_locations(profile: ModelProfile, joins: list) -> list[tuple]:
    """Per join of a trace, the locations a dry run confirms are joined (see `confirmed_joins`); the
    others' tensors the model moves itself (trace.py prices those copies)."""
    if not joins:
        return []
    twin = profile_of(profile.family.twin())

    def joined(unit: str) -> bool:
        if unit not in twin.by_name or twin.by_name[unit].is_parameter:
            return True  # the top level, a root parameter, or a unit the twin lacks: kept as recorded
        return _fails_alone(twin.config, unit)

    return [tuple(x for x in locs if joined(str(x))) for _, locs, _ in joins]


@cache
def _fails_alone(twin_config, unit: str) -> bool:
    """Whether the twin fails with `unit` (and the units its weights are tied to) on GPU 1, the rest on GPU 0."""
    twin = profile_of(twin_config)
    moved = {unit}
    for group in twin.tied:
        units = {twin.unit_of(p) for p in group}
        if unit in units:
            moved |= units
    plan = Plan.uniform({u.name: (1 if u.name in moved else 0) for u in twin.units})
    return not virtual_run(twin, plan, Workload(prompt_tokens=4, new_tokens=2)).ok


def offloadable(profile: ModelProfile, unit: str) -> bool:
    """Whether `unit`'s weights may be offloaded (`cpu`), by the dry run of the twin with that unit alone
    offloaded (the constraint report: a vision tower or embeddings that read the device of their own
    weights see `meta` while offloaded). Decoder layers and root parameters are not probed: layers
    stream their weights like any module, root parameters stay on the main device."""
    spec = profile.by_name.get(unit)
    if spec is None or spec.is_parameter or unit in profile.layers:
        return True
    return unit not in _not_offloadable(profile)


@cache
def _not_offloadable(profile: ModelProfile) -> frozenset:
    from ..worlds.trace_cache import default_dir

    return frozenset(constraint_report(profile, default_dir()).not_offloadable)
