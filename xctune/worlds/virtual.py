"""The dry run: the real forward pass, under fake tensors, on a virtual cluster.

The model is built as fake tensors where the plan puts them, dispatched with accelerate's
hooks, and run through the same `generate` loop the real executor runs: vision encode,
prefill, the first decode step, and the last decode step (a cache extended to the full length,
so the run costs two decode steps however many tokens the workload generates). A bad map
fails here with PyTorch's own error; a good one leaves the log of every move, every op's cost
per unit, and the live-tensor peaks per device.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

from . import vdevice
from .build import virtual_model
from .datadep import RealShadows, fake_metadata
from .instrument import ROOT, FusedAttention, Location, Move, OpRecorder, Tracker, UnitCall
from .placement import VirtualWorld, dispatch, fake_friendly_accelerate
from ..plans.plan import Plan
from ..models.profile import ModelProfile, unit_torch_dtypes
from ..workload import Workload

@dataclass(frozen=True)
class Failure:
    kind: str  # "device-mismatch" | "meta-copy" | "error"
    message: str  # one line, devices named as users see them (cuda:N)
    unit: str  # the placement unit (or "top level") where it happened
    op: str  # the aten op that raised
    module: str = ""  # the innermost module whose forward was running ("" for the model's own top-level code)

    def describe(self) -> str:
        where = self.unit
        if where in ("", ROOT, "top level"):
            # outside every placement unit, e.g. a decoder layer whose submodules the map splits: name the
            # module whose own code raised
            where = self.module or "top-level code"
        return f"{self.message} (in {where}, op {self.op})"


@dataclass
class VirtualRun:
    plan: Plan
    workload: Workload
    failure: Failure | None
    moves: list[Move] = field(default_factory=list)
    calls: list[UnitCall] = field(default_factory=list)
    peak_bytes: dict[Location, int] = field(default_factory=dict)  # activations + KV cache, live peak
    kv_bytes: dict[Location, int] = field(default_factory=dict)  # KV cache at full length
    joins: list = field(default_factory=list)  # top-level ops whose inputs came from several devices
    join_moves: list = field(default_factory=list)  # (join index, Move): its operands moved to its result's device
    main: Location = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failure is None


class ModuleStack:
    """The names of the modules whose forward is running, innermost last. A forward that raises never
    returns, so after a failure the innermost name is where it happened."""

    def __init__(self, model: torch.nn.Module):
        self.names = {id(m): n for n, m in model.named_modules() if n}
        self.stack: list[str] = []

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._hooks = (register_module_forward_pre_hook(self._enter), register_module_forward_hook(self._exit))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()

    def _enter(self, module, args):
        name = self.names.get(id(module))
        if name is not None:
            self.stack.append(name)

    def _exit(self, module, args, output):
        name = self.names.get(id(module))
        if name in self.stack:  # also drops what a forward that raised, caught by the model, left behind
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(name):]

    @property
    def innermost(self) -> str:
        return self.stack[-1] if self.stack else ""


def _failure(exc: BaseException, tracker: Tracker | None, rec: OpRecorder | None, modules: ModuleStack | None = None) -> Failure:
    msg = vdevice.translate(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if isinstance(exc, FakeTensorDeviceMismatchError) or "Expected all tensors to be on the same device" in msg:
        kind = "device-mismatch"
    elif "meta tensor" in msg:
        kind = "meta-copy"
    else:
        kind = "error"
    unit = tracker.current[0] if tracker is not None else ""
    return Failure(kind, msg, unit or "top level", rec.last_op if rec is not None else "",
                   modules.innermost if modules is not None else "")


@contextlib.contextmanager
def quiet_accelerate():
    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def virtual_run(
    profile: ModelProfile,
    plan: Plan,
    workload: Workload,
    *,
    physical_map: dict | None = None,
    locations: dict | None = None,
    main_loc: Location | None = None,
    tied_copies: bool = False,
) -> VirtualRun:
    """Run `workload` under `plan` on virtual devices.

    `physical_map`, `locations` and `main_loc` exist for the trace (trace.py): all units on one
    virtual device, each reporting a logical device of its own. `tied_copies`: run the plan as a
    pipeline engine does, a tied weight copied to each device its users sit on (accelerate keeps one).
    """
    cfg = profile.config
    workload.check_fits(cfg)
    family = profile.family
    real_metadata = family.uses_real_metadata
    mode = vdevice.new_fake_mode(avoid_device_init=real_metadata)
    dmap = physical_map or plan.device_map
    build_plan = Plan(dmap, plan.dtypes, plan.skip_keys)
    run = VirtualRun(plan, workload, None)
    tracker = rec = modules = None
    t0 = time.perf_counter()
    try:
        with quiet_accelerate(), fake_friendly_accelerate():
            model = virtual_model(profile, build_plan, mode, tied_copies)
            with mode:
                placed = dispatch(
                    model,
                    dmap,
                    VirtualWorld(),
                    skip_keys=plan.skip_keys,
                    unit_dtypes=unit_torch_dtypes(profile, plan) if plan.mixed else None,
                    collapsed=locations is not None,
                    locations=locations,
                    main_loc=main_loc,
                )
            tracker = placed.tracker
            run.main = tracker.main
            rec = OpRecorder(tracker, guard_meta_copies=True, parameters=list(model.named_parameters()))
            shadows = RealShadows()
            metadata = fake_metadata(shadows) if real_metadata else contextlib.nullcontext()
            modules = ModuleStack(model)
            with mode, metadata, rec, FusedAttention(rec), modules, torch.no_grad():
                kv = family.dry_steps(model, workload, tracker, placed.physical_main, shadows.fake_of)
                for t in kv:
                    loc = tracker.location(t)
                    run.kv_bytes[loc] = run.kv_bytes.get(loc, 0) + t.numel() * t.element_size()
                del kv
    except Exception as exc:  # a bad map is a result, not a crash
        run.failure = _failure(exc, tracker, rec, modules)
    if tracker is not None:
        run.moves = tracker.moves
    if rec is not None:
        run.calls, run.peak_bytes, run.joins, run.join_moves = rec.calls, dict(rec.peak), rec.joins, rec.join_moves
    run.seconds = time.perf_counter() - t0
    return run
