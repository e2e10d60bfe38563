"""Virtual GPUs: fake tensors on a Python-registered device type.

Fake tensors on `cuda:N` break on a CPU-only PyTorch build as soon as an op takes a CUDA device
guard (indexing, `.contiguous()`, `nn.Linear` init, CLIP attention). A device type registered
for the private-use backend has no such guard, so fake tensors on `vgpu:0..N-1` run every op
the model needs, and a bad map raises PyTorch's own "Expected all tensors to be on the same
device" error. Users never see `vgpu`: messages are translated to `cuda:N`.

The registration goes through a private PyTorch helper; it is isolated here and tested.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

VIRTUAL_TYPE = "vgpu"
_registered = False


def ensure_registered() -> None:
    """Register the `vgpu` device type once per process."""
    global _registered
    if _registered:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    try:
        _setup_privateuseone_for_python_backend(rename=VIRTUAL_TYPE)
    except RuntimeError as e:  # already renamed by an earlier import of this module under another name
        if VIRTUAL_TYPE not in str(e) and "already" not in str(e):
            raise
    _registered = True


class _NoDeviceInitFakeMode(FakeTensorMode):
    # With `vgpu` registered torch believes an accelerator exists, and `torch.tensor(...,
    # device=vgpu)` tries to initialise it ("Could not run 'aten::empty_strided' ... 'vgpu'").
    # Hit by transformers' DynamicCache (design.md §8); the fake mode can skip device init.
    avoid_device_init = True


def new_fake_mode(*, avoid_device_init: bool = False) -> FakeTensorMode:
    ensure_registered()
    cls = _NoDeviceInitFakeMode if avoid_device_init else FakeTensorMode
    return cls(allow_non_fake_inputs=True)


def virtual(index: int) -> torch.device:
    ensure_registered()
    return torch.device(VIRTUAL_TYPE, index)


def is_virtual(device: torch.device | str) -> bool:
    return torch.device(device).type == VIRTUAL_TYPE


def user_name(device: torch.device | str) -> str:
    """How a user sees a device: `vgpu:1` -> `cuda:1`."""
    d = torch.device(device)
    return f"cuda:{d.index}" if d.type == VIRTUAL_TYPE else str(d)


def translate(message: str) -> str:
    return re.sub(rf"\b{VIRTUAL_TYPE}:(\d+)", r"cuda:\1", message)


def materialize(model: nn.Module, device_of: Callable[[str], torch.device], mode: FakeTensorMode,
                copy_tied: bool = False) -> nn.Module:
    """Replace every parameter and buffer of a `meta` model by a fake tensor on `device_of(name)`.

    `module.to()` cannot swap fake parameters, and `mode.from_tensor(meta)` stays on meta, so
    each tensor is made afresh with `torch.empty_strided` inside the fake mode. Tied weights
    (one parameter under several names) stay one fake parameter, on the device of the first name;
    with `copy_tied`, one per device their names are placed on (a pipeline engine's own copies).
    """
    made: dict[tuple, tuple[nn.Parameter, nn.Parameter]] = {}  # (id(meta)[, device]) -> (meta, fake): meta kept alive
    with mode:
        for mod_name, module in model.named_modules(remove_duplicate=False):
            prefix = f"{mod_name}." if mod_name else ""
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                device = device_of(prefix + name)
                key = (id(p), device) if copy_tied else (id(p),)
                if key not in made:
                    t = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=device)
                    made[key] = (p, nn.Parameter(t, requires_grad=False))
                module._parameters[name] = made[key][1]
            for name, b in list(module._buffers.items()):
                if b is None:
                    continue
                module._buffers[name] = torch.empty_strided(
                    b.shape, b.stride(), dtype=b.dtype, device=device_of(prefix + name)
                )
    return model
