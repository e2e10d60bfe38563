"""Placing a model by a device map: accelerate's `dispatch_model`, plus xctune's counters.

The one placement mechanism is accelerate's (the hooks `from_pretrained(device_map=...)`
installs). xctune adds hooks of its own in front of accelerate's, never instead of them:
`MoveCounter` on every map entry and on the root, `StreamCounter` before every offloading hook,
and `CastInputs` after them where a plan mixes precisions.

A *world* says what a plan's devices are physically:
- `VirtualWorld`: GPU i is the fake device `vgpu:i`; offloaded weights are fake host tensors.
- `HostWorld`: GPU i is `cuda:i` where it exists; on a host with fewer GPUs than the plan
  names, the plan's GPUs are logical devices sharing the CPU ("collapsed": moves are emulated
  and counted, not timed).
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from accelerate import dispatch_model
from accelerate import hooks as accel_hooks
from accelerate.hooks import ModelHook, SequentialHook, remove_hook_from_submodules
from torch._subclasses.fake_tensor import FakeTensor

from . import vdevice
from .instrument import ROOT, Location, MoveCounter, MoveTimerEnd, StreamCounter, Tracker

OFFLOAD_TIERS = ("cpu", "disk")


def main_location(device_map: Mapping[str, object]) -> Location:
    """The device accelerate executes the root on: the lowest GPU index, as `from_pretrained` gets it."""
    gpus = [d for d in device_map.values() if isinstance(d, int)]
    return min(gpus) if gpus else "cpu"


ONLY_DISK = "the map puts everything on 'disk': accelerate needs a GPU or the CPU to execute on"


def require_gpu(device_map: Mapping[str, object]) -> None:
    """The virtual world prices GPUs: a map with no GPU entry is refused with the reason (check, bench, search alike).

    accelerate runs such a map on the CPU alone (`{"": "cpu"}`), or not at all (only "disk": nothing to
    execute on); `xctune bench --real` measures the first on this machine.
    """
    if main_location(device_map) != "cpu":
        return
    from ..errors import BadInput

    if set(device_map.values()) == {"disk"}:
        raise BadInput(ONLY_DISK)
    raise BadInput("the map puts nothing on a GPU: accelerate would run the whole model on the CPU, which a virtual "
                   "cluster does not model; measure it with `xctune bench --real`, or place a module on a GPU")


def exec_location(device, main: Location) -> Location:
    """Offloaded modules execute on the main device; their weights stream in per call."""
    return main if device in OFFLOAD_TIERS else device


class VirtualWorld:
    collapsed = False
    fake = True

    def physical(self, loc: Location) -> str:
        return "cpu" if loc in OFFLOAD_TIERS else f"{vdevice.VIRTUAL_TYPE}:{loc}"

    def physical_to_logical(self, n: int) -> dict[str, Location]:
        return {f"{vdevice.VIRTUAL_TYPE}:{i}": i for i in range(n)} | {"cpu": "cpu"}


class HostWorld:
    fake = False

    def __init__(self):
        self.n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0

    def collapsed_for(self, device_map) -> bool:
        gpus = {d for d in device_map.values() if isinstance(d, int)}
        return any(g >= self.n_cuda for g in gpus)

    def physical(self, loc: Location, collapsed: bool) -> str:
        if isinstance(loc, int) and not collapsed:
            return f"cuda:{loc}"
        return "cpu" if loc != "disk" else "disk"

    def physical_to_logical(self) -> dict[str, Location]:
        return {f"cuda:{i}": i for i in range(self.n_cuda)} | {"cpu": "cpu"}


def _fake_aware_setter(original):
    """accelerate re-wraps parameters as `type(param)(value)`, which a FakeTensor cannot be: assign directly."""

    def setter(module, tensor_name, device, value=None, dtype=None, **kwargs):
        owner, name = module, tensor_name
        if "." in tensor_name:
            *path, name = tensor_name.split(".")
            for p in path:
                owner = getattr(owner, p)
        old = owner._parameters[name] if name in owner._parameters else owner._buffers.get(name)
        if not isinstance(old, FakeTensor) and not isinstance(value, FakeTensor):
            return original(module, tensor_name, device, value=value, dtype=dtype, **kwargs)
        new = (value if value is not None else old).to(device)
        if name in owner._parameters:
            # a Parameter still, so that accelerate can re-tie tied weights with setattr
            owner._parameters[name] = new if isinstance(new, torch.nn.Parameter) else torch.nn.Parameter(new, requires_grad=False)
        else:
            owner._buffers[name] = new

    return setter


@contextlib.contextmanager
def fake_friendly_accelerate():
    """Let accelerate's hooks move fake parameters (virtual world only)."""
    original = accel_hooks.set_module_tensor_to_device
    accel_hooks.set_module_tensor_to_device = _fake_aware_setter(original)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*data pointer.*")
            warnings.filterwarnings("ignore", message=".*data_ptr.*")
            yield
    finally:
        accel_hooks.set_module_tensor_to_device = original


class CastInputs(ModelHook):
    """Casts floating-point inputs to the unit's dtype, where a plan mixes precisions."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def _cast(self, obj):
        if isinstance(obj, torch.Tensor):
            return obj.to(self.dtype) if obj.is_floating_point() and obj.dtype != self.dtype else obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(self._cast(o) for o in obj)
        if isinstance(obj, Mapping):
            return type(obj)({k: self._cast(v) for k, v in obj.items()})
        return obj

    def pre_forward(self, module, *args, **kwargs):
        return self._cast(args), self._cast(kwargs)


def _prepend(module, hook: ModelHook) -> None:
    module._hf_hook = SequentialHook(hook, module._hf_hook)


def _append(module, hook: ModelHook) -> None:
    module._hf_hook = SequentialHook(module._hf_hook, hook)


@dataclass
class Placed:
    """A model dispatched by a map, with the tracker its counters report to."""

    model: torch.nn.Module
    device_map: dict
    tracker: Tracker
    main: Location
    physical_main: str
    offload_dir: str | None = None
    hooks: list = field(default_factory=list)  # (module, hook with xctune's counters, accelerate's hook alone)

    def counting(self, on: bool) -> None:
        """Install xctune's counters (on) or leave only accelerate's hooks (and the casts a mixed
        plan needs): timed runs then cost what the user's placement costs."""
        self.tracker.counting = on
        for module, full, lean in self.hooks:
            module._hf_hook = full if on else lean


def dispatch(
    model: torch.nn.Module,
    device_map: Mapping[str, object],
    world,
    *,
    skip_keys=("past_key_values",),
    offload_dir: str | None = None,
    unit_dtypes: Mapping[str, torch.dtype] | None = None,
    collapsed: bool | None = None,
    locations: Mapping[str, Location] | None = None,
    main_loc: Location | None = None,
) -> Placed:
    """Dispatch `model` by `device_map` in `world` and install the counters.

    `device_map` is in the user's format (GPU ints, "cpu", "disk"). For the real world the
    model's weights must be real tensors on the CPU (or already where the map puts them);
    for the virtual world, fake tensors as `build.virtual_model` makes them.
    """
    main = main_location(device_map)
    if isinstance(world, VirtualWorld):
        is_collapsed = bool(collapsed)
        phys = {k: world.physical(v) for k, v in device_map.items()}
        p2l = world.physical_to_logical(1 + max((v for v in device_map.values() if isinstance(v, int)), default=0))
        physical_main = world.physical(main) if main != "cpu" else "cpu"
        ctx = fake_friendly_accelerate()
    else:
        is_collapsed = world.collapsed_for(device_map) if collapsed is None else collapsed
        phys = {k: world.physical(v, is_collapsed) for k, v in device_map.items()}
        p2l = world.physical_to_logical()
        physical_main = world.physical(main, is_collapsed)
        ctx = contextlib.nullcontext()
        if "disk" in phys.values() and offload_dir is None:
            # A fresh folder per placement: accelerate silently reuses a stale index.json.
            offload_dir = tempfile.mkdtemp(prefix="xctune-offload-")
    # `locations` / `main_loc` override the logical devices the counters report (the trace gives
    # every unit a logical device of its own while all of them share one physical device)
    logical_main = main if main_loc is None else main_loc
    tracker = Tracker(logical_main, collapsed=is_collapsed, physical_to_logical=p2l)
    with ctx:
        dispatch_model(
            model,
            phys,
            main_device=physical_main,
            skip_keys=list(skip_keys) if skip_keys else None,
            offload_dir=offload_dir,
            force_hooks=True,
        )
    locs = {k: exec_location(v, main) for k, v in device_map.items()} | dict(locations or {})
    hooks = _install_counters(model, device_map, tracker, locs, skip_keys, unit_dtypes)
    return Placed(model, dict(device_map), tracker, logical_main, physical_main, offload_dir, hooks)


def _install_counters(model, device_map, tracker, locs, skip_keys, unit_dtypes) -> list:
    """Install xctune's hooks; return (module, full hook, accelerate's hook alone [+ casts]) per module."""
    skip = list(skip_keys) if skip_keys else None
    modules = dict(model.named_modules())
    hooks = []
    for key, dev in device_map.items():
        module = modules.get(key)
        if module is None or not hasattr(module, "_hf_hook"):
            continue  # a parameter entry (the GN vectors): the root hook handles it
        lean = module._hf_hook  # accelerate's own, before xctune adds any
        if dev in OFFLOAD_TIERS:
            for sub in module.modules():
                hook = getattr(sub, "_hf_hook", None)
                if hook is not None and getattr(hook, "offload", False):
                    _prepend(sub, StreamCounter(tracker, key, dev, hook))
                    hooks.append((sub, sub._hf_hook, hook))
        _append(module, MoveTimerEnd(tracker, is_root=False))
        if unit_dtypes and key in unit_dtypes:
            cast = CastInputs(unit_dtypes[key])
            _append(module, cast)
            lean = SequentialHook(lean, cast)
        _prepend(module, MoveCounter(tracker, key, locs[key], skip))
        hooks.append((module, module._hf_hook, lean))
    lean = model._hf_hook
    _append(model, MoveTimerEnd(tracker, is_root=True))
    _prepend(model, MoveCounter(tracker, ROOT, tracker.main, skip))
    hooks.append((model, model._hf_hook, lean))
    return hooks


def undispatch(model: torch.nn.Module) -> None:
    """Remove every hook (ours and accelerate's), so the model can be placed again."""
    remove_hook_from_submodules(model)
    for attr in ("to", "cuda"):
        if attr in model.__dict__:
            del model.__dict__[attr]
