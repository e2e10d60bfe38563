"""What a fake run needs beyond shapes: values of metadata, and the device checks real GPUs make.

Every data-dependent branch of a VLM's forward depends on its *inputs* (token ids, image sizes,
`grid_thw`, masks), never on its weights (design.md §8). So a fake run keeps a real CPU copy
("shadow") of each input and runs, on those copies, every op whose tensor inputs all have one;
weight-derived tensors stay fake. A data-dependent call on a fake tensor (`.item()`,
`.tolist()`, `nonzero`, boolean indexing, `unique_consecutive`, ...) is answered from the
shadows: the real result gives the value or the output shape, the fake output is made on the
device the op would have used.

Two checks real CUDA makes and fake kernels skip:
- `aten.index` / `index_put_` accept indices on the CPU or on the indexed tensor's device, never
  on another GPU (a wrong map of a model that indexes its embeddings with a mask made on the main
  GPU fails exactly there);
- `torch.tensor([...0-d tensors...])` reads values below the Python modes: it is answered from
  the shadows too (a rope index built from the image grid).
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from . import vdevice

aten = torch.ops.aten

# Shadows are metadata: masks, ids, positions. A float tensor of a million elements computed
# from shadows (a causal mask of a 1,000-token prompt) is fine; activations are never shadowed.
MAX_SHADOW_ELEMENTS = 1 << 24
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_, aten._unsafe_index, aten._unsafe_index_put}
_NO_SHADOW_OPS = {aten.empty_strided, aten.empty, aten.detach}  # values meaningless or views of the same


class IndexDeviceError(RuntimeError):
    pass


def _to_cpu_device(x):
    if isinstance(x, torch.device) and x.type != "cpu":
        return torch.device("cpu")
    return x


class RealShadows(TorchDispatchMode):
    """Runs inside a FakeTensorMode (entered after it): answers data-dependent ops from real copies."""

    def __init__(self):
        super().__init__()
        self.shadows: WeakIdKeyDictionary = WeakIdKeyDictionary()

    # --- inputs -------------------------------------------------------------------------------
    def fake_of(self, real: torch.Tensor, device) -> torch.Tensor:
        """A fake copy of a real tensor on `device`, remembered with its values (call inside the fake mode)."""
        fake = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=device)
        self.shadows[fake] = real
        return fake

    def shadow(self, t):
        return self.shadows.get(t) if isinstance(t, FakeTensor) else None

    # --- dispatch -----------------------------------------------------------------------------
    def _known(self, x) -> bool:
        return not isinstance(x, FakeTensor) or x in self.shadows

    def _real_args(self, args, kwargs):
        def real(x):
            if isinstance(x, FakeTensor):
                return self.shadows[x]
            return _to_cpu_device(x)

        args, kwargs = tree_map(real, (args, kwargs))
        if "device" in kwargs:
            kwargs["device"] = torch.device("cpu")
        return args, kwargs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        leaves = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        if packet in _INDEX_OPS:
            _check_index_devices(func, args)
        known = all(self._known(x) for x in leaves)
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            if not known:
                raise
            with unset_fake_temporarily():
                real_args, real_kwargs = self._real_args(args, kwargs)
                real = func(*real_args, **real_kwargs)
            device = next((x.device for x in leaves if isinstance(x, FakeTensor)), None)
            return self._fake_outputs(real, device)
        if known and packet not in _NO_SHADOW_OPS:
            out_leaves = [x for x in tree_flatten(out)[0] if isinstance(x, FakeTensor)]
            if out_leaves and all(o.numel() <= MAX_SHADOW_ELEMENTS for o in out_leaves):
                with unset_fake_temporarily():
                    real_args, real_kwargs = self._real_args(args, kwargs)
                    real = func(*real_args, **real_kwargs)
                for o, r in zip(tree_flatten(out)[0], tree_flatten(real)[0]):
                    if isinstance(o, FakeTensor) and isinstance(r, torch.Tensor):
                        self.shadows[o] = r
        return out

    def _fake_outputs(self, real, device):
        def fake(r):
            if not isinstance(r, torch.Tensor):
                return r
            f = torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=device or "cpu")
            self.shadows[f] = r
            return f

        return tree_map(fake, real)


def _check_index_devices(func, args) -> None:
    """Real CUDA refuses indices on another GPU than the indexed tensor; fake kernels do not check."""
    if len(args) < 2:
        return
    self_dev = args[0].device
    indices = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
    for idx in indices:
        if isinstance(idx, torch.Tensor) and idx.device.type != "cpu" and idx.device != self_dev:
            raise IndexDeviceError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{vdevice.user_name(self_dev)} and {vdevice.user_name(idx.device)}! "
                f"(indices of {func.overloadpacket.__name__} on another device than the indexed tensor)"
            )


@contextlib.contextmanager
def _tensor_from_shadows(shadows: RealShadows):
    """`torch.tensor([...0-d fake tensors...])` reads values below the modes (and `torch.tensor` is not
    overridable by a function mode): while a fake run lasts, build such tensors from the shadows."""
    original = torch.tensor

    def tensor(data, *args, **kwargs):
        if isinstance(data, (list, tuple)):
            flat, spec = tree_flatten(data)
            fakes = [x for x in flat if isinstance(x, FakeTensor)]
            if fakes:
                values = [shadows.shadow(x).item() if isinstance(x, FakeTensor) else x for x in flat]
                device = kwargs.pop("device", None)
                device = fakes[0].device if device is None else torch.device(device)
                with unset_fake_temporarily():
                    real = original(tree_unflatten(values, spec), *args, **kwargs)
                return shadows.fake_of(real, device)
        return original(data, *args, **kwargs)

    torch.tensor = tensor
    try:
        yield
    finally:
        torch.tensor = original


def real_tensors():
    """A context where tensors are real again (every Python mode off): for making the real inputs
    a fake run lifts with `RealShadows.fake_of`."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


@contextlib.contextmanager
def fake_metadata(shadows: RealShadows):
    """Enter inside the fake mode: shadows for data-dependent ops, and `torch.tensor` of fake scalars."""
    with shadows, _tensor_from_shadows(shadows):
        yield shadows
