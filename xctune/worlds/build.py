"""Building the model for a world: fake tensors on virtual GPUs, or real weights on the host."""

from __future__ import annotations

import torch
from torch import nn

from . import vdevice
from ..models.families import family_of
from .placement import OFFLOAD_TIERS
from ..plans.plan import Plan, resolve
from ..models.profile import DTYPES, ModelProfile


def cast_units(model: nn.Module, plan: Plan, profile: ModelProfile) -> nn.Module:
    """Give each unit its group's dtype (on `meta` this costs nothing)."""
    for unit in profile.units:
        dtype = DTYPES[plan.dtypes[unit.group]]
        if unit.is_parameter:
            owner_name, _, attr = unit.name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            p = getattr(owner, attr)
            if p.dtype != dtype:
                setattr(owner, attr, nn.Parameter(p.data.to(dtype), requires_grad=False))
        else:
            model.get_submodule(unit.name).to(dtype)
    return model


def virtual_model(profile: ModelProfile, plan: Plan, mode) -> torch.nn.Module:
    """The model as fake tensors where the plan puts them: GPU i -> `vgpu:i`, offloaded -> fake host tensors."""
    model = profile.family.build_meta()
    cast_units(model, plan, profile)
    res = resolve(plan.device_map, profile)
    buffer_units = {n: profile.unit_of(n) for n, _ in profile.buffer_numels}

    def device_of(name: str) -> torch.device:
        dev = res.param_device.get(name)
        if dev is None:  # a buffer: it sits with its unit's parameters, or where the map puts its unit
            unit = buffer_units.get(name, name)
            dev = next((d for p, d in res.param_device.items() if profile.unit_of(p) == unit), None)
            if dev is None:
                dev = _map_device(plan.device_map, unit)
        return torch.device("cpu") if dev in OFFLOAD_TIERS else vdevice.virtual(dev)

    return vdevice.materialize(model, device_of, mode)


def _map_device(device_map, unit: str):
    """The device a map gives a unit with no parameters (a rotary table), by accelerate's prefix rule."""
    keys = [k for k in device_map if k == "" or unit == k or unit.startswith(k + ".")]
    return device_map[max(keys, key=len)] if keys else 0


def host_model(config, seed: int = 0) -> torch.nn.Module:
    """Real random weights on the CPU, fp32: the master copy trials are cast and placed from (`config`:
    any family's, models/families.py)."""
    return family_of(config).build_host(seed)
