"""Building the model for a world: fake tensors on virtual GPUs, or real weights on the host."""

from __future__ import annotations

import torch
from torch import nn

from . import vdevice
from .models import XComposer, XComposerConfig, init_weights
from .placement import OFFLOAD_TIERS
from .plan import Plan, resolve
from .profile import DTYPES, ModelProfile, unit_of_parameter

def cast_units(model: nn.Module, plan: Plan, profile: ModelProfile) -> nn.Module:
    """Give each unit its group's dtype (on `meta` this costs nothing)."""
    for unit in profile.units:
        dtype = DTYPES[plan.dtypes[unit.group]]
        if unit.is_parameter:
            p = getattr(model, unit.name)
            if p.dtype != dtype:
                setattr(model, unit.name, nn.Parameter(p.data.to(dtype), requires_grad=False))
        else:
            model.get_submodule(unit.name).to(dtype)
    return model


def virtual_model(profile: ModelProfile, plan: Plan, mode) -> XComposer:
    """The model as fake tensors where the plan puts them: GPU i -> `vgpu:i`, offloaded -> fake host tensors."""
    with torch.device("meta"):
        model = XComposer(profile.config)
    cast_units(model, plan, profile)
    res = resolve(plan.device_map, profile)
    buffer_units = {n: unit_of_parameter(n) for n, _ in profile.buffer_numels}

    def device_of(name: str) -> torch.device:
        dev = res.param_device.get(name)
        if dev is None:  # a buffer: it sits with its unit's parameters
            unit = buffer_units.get(name, name)
            dev = next((d for p, d in res.param_device.items() if unit_of_parameter(p) == unit), 0)
        return torch.device("cpu") if dev in OFFLOAD_TIERS else vdevice.virtual(dev)

    return vdevice.materialize(model, device_of, mode)


def host_model(config: XComposerConfig, seed: int = 0) -> XComposer:
    """Real random weights on the CPU, fp32: the master copy trials are cast and placed from."""
    return init_weights(XComposer(config), seed=seed).eval()
