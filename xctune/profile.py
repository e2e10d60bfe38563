"""What a plan may assign, and what it must respect: the placement units of a model.

A *unit* is one entry a plan may give a device: `vit`, `vision_proj`, `model.tok_embeddings`,
`model.layers.N`, `model.norm`, `output`, and in the HD variants the root parameters
`plora_glb_GN` / `plora_sub_GN`. Units come in execution order. Each belongs to a precision
group (vision, lm, head) — the granularity at which a plan chooses dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property

import torch

from .models import XComposer, XComposerConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
GROUPS = ("vision", "lm", "head")
LAYER_PREFIX = "model.layers."


@dataclass(frozen=True)
class Unit:
    name: str
    group: str  # precision group
    params: int  # parameter count
    buffer_elems: int  # floating-point buffer elements (rotary tables): they follow the dtype
    int_buffer_bytes: int = 0  # integer buffers (CLIP's position_ids) keep their width
    is_parameter: bool = False  # a root-level parameter rather than a module

    def weight_bytes(self, dtype: str) -> int:
        return self.param_bytes(dtype) + self.buffer_bytes(dtype)

    def param_bytes(self, dtype: str) -> int:
        return self.params * DTYPE_BYTES[dtype]

    def buffer_bytes(self, dtype: str) -> int:
        """Buffers stay on the execution device, offloaded or not (accelerate's default)."""
        return self.buffer_elems * DTYPE_BYTES[dtype] + self.int_buffer_bytes


@dataclass(frozen=True)
class ModelProfile:
    config: XComposerConfig
    units: tuple[Unit, ...]
    # The conservative static rule (design.md §1): these produce the embeddings that the top
    # level joins, so they must share a device. The dry run says what is truly required.
    colocation: tuple[str, ...]
    param_numels: tuple[tuple[str, int], ...]  # every parameter, as a device map must cover them
    buffer_numels: tuple[tuple[str, int], ...]

    @cached_property
    def by_name(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units}

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units if u.name.startswith(LAYER_PREFIX))

    @property
    def root_parameters(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units if u.is_parameter)

    @property
    def head(self) -> tuple[str, ...]:
        return ("model.norm", "output")

    @property
    def vision(self) -> tuple[str, ...]:
        return ("vit", "vision_proj")

    def group_of(self, unit: str) -> str:
        return self.by_name[unit].group

    def units_in_group(self, group: str) -> tuple[str, ...]:
        return tuple(u.name for u in self.units if u.group == group)

    @property
    def total_params(self) -> int:
        return sum(u.params for u in self.units)


def _group(name: str) -> str:
    if name in ("vit", "vision_proj") or name.startswith("plora_"):
        return "vision"
    if name == "output":
        return "head"
    return "lm"


def unit_of_parameter(name: str) -> str:
    """The unit a parameter or buffer name belongs to."""
    if name.startswith(LAYER_PREFIX):
        return ".".join(name.split(".")[:3])
    for prefix in ("model.tok_embeddings", "model.norm", "vit", "vision_proj", "output"):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return name  # a root-level parameter


@cache
def profile_of(config: XComposerConfig) -> ModelProfile:
    """Read the unit list off a `meta` instance of the model (no memory, milliseconds)."""
    with torch.device("meta"):
        model = XComposer(config)
    params: dict[str, int] = {}
    buffers: dict[str, int] = {}
    int_buffers: dict[str, int] = {}
    for name, p in model.named_parameters():
        u = unit_of_parameter(name)
        params[u] = params.get(u, 0) + p.numel()
    for name, b in model.named_buffers():
        u = unit_of_parameter(name)
        if b.is_floating_point():
            buffers[u] = buffers.get(u, 0) + b.numel()
        else:
            int_buffers[u] = int_buffers.get(u, 0) + b.numel() * b.element_size()
    order = ["vit", "vision_proj"]
    order += [n for n, _ in model.named_parameters(recurse=False)]  # GN vectors
    order += ["model.tok_embeddings"] + [f"{LAYER_PREFIX}{i}" for i in range(config.num_layers)]
    order += ["model.norm", "output"]
    root_params = {n for n, _ in model.named_parameters(recurse=False)}
    units = tuple(
        Unit(n, _group(n), params.get(n, 0), buffers.get(n, 0), int_buffers.get(n, 0), is_parameter=n in root_params)
        for n in order
    )
    coloc = ("vit", "vision_proj", "model.tok_embeddings", *sorted(root_params))
    return ModelProfile(
        config,
        units,
        coloc,
        tuple((n, p.numel()) for n, p in model.named_parameters()),
        tuple((n, b.numel()) for n, b in model.named_buffers()),
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
