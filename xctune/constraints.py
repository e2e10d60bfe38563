"""The co-location rules of a model: the static rule, and what dry runs show is truly required.

The static rule (profile.colocation) is conservative: everything that feeds the top-level
join of image and text embeddings shares one device. Dry runs probe each member of the group:
moved alone to another GPU, and offloaded to the host. They run on a shrunk twin of the model
(same code, same flags, small dimensions), so the probes take a fraction of a second; device
behaviour does not depend on the dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .models import XComposerConfig
from .plan import Plan
from .profile import ModelProfile, profile_of
from .virtual import virtual_run
from .workload import Workload


def shrunk(cfg: XComposerConfig) -> XComposerConfig:
    return replace(
        cfg,
        name=f"{cfg.name}-twin",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2 if cfg.num_kv_heads < cfg.num_heads else 4,
        plora_rank=4,
        plora_rank_wqkv=4,
        max_position_embeddings=512,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_layers=1,
        vision_heads=2,
        image_size=cfg.patch_size * 4,
        hd_layout=(1, 2),
    )


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
    def not_offloadable(self) -> tuple[str, ...]:
        return tuple(p.unit for p in self.probes if p.placement == "cpu offload" and not p.runs)

    root_parameters: tuple[str, ...] = ()

    def disagreements(self) -> list[str]:
        out = []
        for p in self.probes:
            if p.placement != "other GPU" or not p.runs:
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
            "top_level_joins": [{"op": op, "units": list(units)} for op, units in self.joins],
            "probes": [p.__dict__ for p in self.probes],
            "disagreements": self.disagreements(),
            "source": "simulated (dry runs on a shrunk twin of the model)",
        }

    def render(self) -> str:
        lines = [f"co-location rules of {self.model}", ""]
        lines.append("static rule (fast pre-check): " + ", ".join(self.static_group) + " share one device")
        lines.append("dry runs (the judge), each member moved alone:")
        for p in self.probes:
            verdict = "runs" if p.runs else f"FAILS: {p.cause}"
            lines.append(f"  {p.unit:<22} {p.placement:<12} {verdict}")
        for op, units in self.joins:
            lines.append(f"top-level {op} joins outputs of: {', '.join(units)}")
        lines.append("truly required together: " + (", ".join(self.required_together) or "nothing"))
        if self.not_offloadable:
            lines.append("cannot be offloaded: " + ", ".join(self.not_offloadable))
        for d in self.disagreements():
            lines.append("static rule vs dry run: " + d)
        return "\n".join(lines)


def constraint_report(profile: ModelProfile) -> ConstraintReport:
    twin = profile_of(shrunk(profile.config))
    units = [u.name for u in twin.units]
    base = {u: 0 for u in units}
    w = Workload(prompt_tokens=4, new_tokens=2)
    probes = []
    for member in twin.colocation:
        for placement, dev in (("other GPU", 1), ("cpu offload", "cpu")):
            if placement == "cpu offload" and twin.by_name[member].is_parameter:
                continue  # root parameters always stay on the main device
            run = virtual_run(twin, Plan.uniform({**base, member: dev}), w)
            probes.append(Probe(member, placement, run.ok, run.failure.describe() if run.failure else ""))
    # the trace view: every unit on a logical device of its own shows which outputs meet at top level
    run = virtual_run(
        twin, Plan.uniform(base), w, physical_map=base, locations={u: u for u in units}, main_loc="<main>"
    )
    joins = list(dict.fromkeys((op, tuple(str(x) for x in locs)) for op, locs, _ in run.joins))
    return ConstraintReport(profile.config.name, profile.colocation, probes, joins, twin.root_parameters)
