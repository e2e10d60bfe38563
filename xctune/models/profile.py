"""What a plan may assign, and what it must respect: the placement units of a model.

A *unit* is one entry a plan may give a device: a vision tower, a projector, a root-level
parameter, the token embeddings, a position table, each decoder layer, the final norm, the head.
Units come in execution order, each with a role (models/base.py) that gives its precision group
(vision, lm, head) — the granularity at which a plan chooses dtypes — and its placement group
in the search space (what runs before the decoder layers, the layers, what runs after them). The profile is read off the model family's own description
(models/families.py): nothing here names a family's modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, cached_property

import torch

from .base import LAYER_ROLES, ROLE_GROUP, Role
from .families import family_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
GROUPS = ("vision", "lm", "head")
# The roles that run before the decoder layers and make their input: one placement group of the
# search space (space.py), as the model's authors and accelerate's users keep them together.
EMBED_ROLES = (Role.VISION_TOWER, Role.PROJECTOR, Role.ROOT_PARAMETER, Role.EMBEDDINGS, Role.POSITION_TABLE)
# How a one-line map (report.layout) names each unit that is not a decoder layer
ROLE_SHORT = {
    Role.VISION_TOWER: "vit", Role.PROJECTOR: "proj", Role.ROOT_PARAMETER: "root", Role.EMBEDDINGS: "emb",
    Role.POSITION_TABLE: "pos", Role.FINAL_NORM: "norm", Role.HEAD: "out",
}


@dataclass(frozen=True)
class Unit:
    name: str
    group: str  # precision group
    params: int  # parameter count
    buffer_elems: int  # floating-point buffer elements (rotary tables): they follow the dtype
    int_buffer_bytes: int = 0  # integer buffers (CLIP's position_ids) keep their width
    is_parameter: bool = False  # a root-level parameter rather than a module
    role: Role | None = None

    def weight_bytes(self, dtype: str) -> int:
        return self.param_bytes(dtype) + self.buffer_bytes(dtype)

    def param_bytes(self, dtype: str) -> int:
        return self.params * DTYPE_BYTES[dtype]

    def buffer_bytes(self, dtype: str) -> int:
        """Buffers stay on the execution device, offloaded or not (accelerate's default)."""
        return self.buffer_elems * DTYPE_BYTES[dtype] + self.int_buffer_bytes


@dataclass(frozen=True)
class ModelProfile:
    config: object  # the family's config (XComposerConfig, HFConfig): frozen, hashable
    units: tuple[Unit, ...]
    # The conservative static rule (design.md §1): these must share a device, for
    # `colocation_reason`. The dry run says what is truly required (constraints.py).
    colocation: tuple[str, ...]
    param_numels: tuple[tuple[str, int], ...]  # every parameter, as a device map must cover them
    buffer_numels: tuple[tuple[str, int], ...]
    colocation_reason: str = ""
    tied: tuple[tuple[str, ...], ...] = ()  # parameter names that are one tensor
    family: object = field(default=None, compare=False, repr=False)  # models.base.ModelFamily

    @cached_property
    def by_name(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units}

    def with_role(self, *roles: Role) -> tuple[str, ...]:
        return tuple(u.name for u in self.units if u.role in roles)

    @property
    def layers(self) -> tuple[str, ...]:
        return self.with_role(*LAYER_ROLES)

    @property
    def root_parameters(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units if u.is_parameter)

    @property
    def head(self) -> tuple[str, ...]:
        """Final norm and head, in order."""
        return self.with_role(Role.FINAL_NORM, Role.HEAD)

    @property
    def vision(self) -> tuple[str, ...]:
        return self.with_role(Role.VISION_TOWER, Role.PROJECTOR)

    @property
    def embed_group(self) -> tuple[str, ...]:
        """The units that run before the decoder layers (the vision path, root parameters, token
        embeddings, position tables), in order: the search space places them as one group."""
        return self.with_role(*EMBED_ROLES)

    @property
    def projectors(self) -> tuple[str, ...]:
        return self.with_role(Role.PROJECTOR)

    @property
    def head_tied_to_embeddings(self) -> bool:
        """Whether the static rule (tied weights) binds the head group to the embedding group."""
        return bool(set(self.colocation) & set(self.head)) and bool(set(self.colocation) & set(self.embed_group))

    @property
    def embeddings(self) -> str:
        return self.with_role(Role.EMBEDDINGS)[0]

    @cached_property
    def _unit_names(self) -> frozenset[str]:
        return frozenset(u.name for u in self.units)

    def unit_of(self, name: str) -> str:
        """The unit a parameter or buffer name belongs to (the longest unit name that prefixes it);
        the name itself where no unit holds it."""
        return _owning_unit(name, self._unit_names)

    def group_of(self, unit: str) -> str:
        return self.by_name[unit].group

    def units_in_group(self, group: str) -> tuple[str, ...]:
        return tuple(u.name for u in self.units if u.group == group)

    @property
    def total_params(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def attention(self) -> str:
        """The attention implementation the model runs: the embedded model's choice (`--attn`), else
        transformers' default for its own classes (sdpa)."""
        return getattr(self.config, "attn", None) or "sdpa"


def _owning_unit(name: str, unit_names: frozenset[str]) -> str:
    """The one lookup behind `ModelProfile.unit_of` (profile_of needs it before the profile exists)."""
    probe = name
    while probe not in unit_names and "." in probe:
        probe = probe.rpartition(".")[0]
    return probe if probe in unit_names else name


@cache
def profile_of(config) -> ModelProfile:
    """Read the unit list off a `meta` instance of the model (no memory, milliseconds)."""
    family = family_of(config)
    model = family.build_meta()
    specs = family.units(model)
    names = frozenset(s.name for s in specs)
    params: dict[str, int] = {}
    buffers: dict[str, int] = {}
    int_buffers: dict[str, int] = {}
    for name, p in model.named_parameters():
        u = _owning_unit(name, names)
        params[u] = params.get(u, 0) + p.numel()
    for name, b in model.named_buffers():
        u = _owning_unit(name, names)
        if b.is_floating_point():
            buffers[u] = buffers.get(u, 0) + b.numel()
        else:
            int_buffers[u] = int_buffers.get(u, 0) + b.numel() * b.element_size()
    units = tuple(
        Unit(
            s.name, ROLE_GROUP[s.role], params.get(s.name, 0), buffers.get(s.name, 0), int_buffers.get(s.name, 0),
            is_parameter=s.role is Role.ROOT_PARAMETER, role=s.role,
        )
        for s in specs
    )
    coloc = family.static_colocation(specs, model)
    return ModelProfile(
        config,
        units,
        coloc.units if coloc else (),
        tuple((n, p.numel()) for n, p in model.named_parameters()),
        tuple((n, b.numel()) for n, b in model.named_buffers()),
        colocation_reason=coloc.reason if coloc else "",
        tied=family.tied_weights(model),
        family=family,
    )


def unit_torch_dtypes(profile: ModelProfile, plan) -> dict[str, torch.dtype]:
    """Each module unit's torch dtype under a plan (for the casting hooks of mixed-precision plans)."""
    return {u.name: DTYPES[plan.dtypes[u.group]] for u in profile.units if not u.is_parameter}


def unit_level_weights(profile: ModelProfile, placed: dict, dtypes: dict, main) -> dict:
    """Weight bytes per device for a unit-level map (the fast twin of check.weight_bytes).

    Parameters sit where the map puts them (GPU, "cpu", "disk"); buffers on the execution
    device (the main GPU for offloaded units); root parameters on the main device.
    """
    out: dict = {}
    for u in profile.units:
        dtype = dtypes[u.group]
        dev = main if u.is_parameter else placed[u.name]
        exec_dev = main if dev in ("cpu", "disk") else dev
        out[dev] = out.get(dev, 0) + u.param_bytes(dtype)
        if u.buffer_elems or u.int_buffer_bytes:
            out[exec_dev] = out.get(exec_dev, 0) + u.buffer_bytes(dtype)
    return out
