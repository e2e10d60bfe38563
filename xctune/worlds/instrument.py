"""Instruments for one run of the model: what crossed devices, what each op cost, what stayed alive.

Three pieces, the same in the real and the virtual world:

- `Tracker`: the state of one run (phase, the stack of placement units being executed, the
  log of moves, and the *logical* location of tensors).
- `MoveCounter` / `StreamCounter`: accelerate hooks placed in front of the hooks that
  `dispatch_model` installs. They see every argument before accelerate moves it, so they count
  what accelerate will move, by the same rules (`skip_keys` on keyword arguments and outputs,
  outputs of the root sent back to the input's device, offloaded weights streamed per call).
- `OpRecorder`: a dispatch mode that prices every aten op (FLOPs from PyTorch's flop counter
  formulas, bytes read + written), charges it to the current unit, and tracks live tensor
  bytes (the activation + KV-cache memory) per holder.

Logical devices. A CPU-only host has one physical device, yet a plan names several GPUs; and
the trace-once evaluation (design.md §3) gives every unit a device of its own. In both cases
several logical devices share one physical device ("collapsed"): the counters then emulate a
move by a copy tagged with its logical destination, so every boundary crossing is counted
exactly as on separate devices. Where devices are physically distinct, the tensor's own device
is the truth and no tags are used.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import torch
from accelerate.hooks import ModelHook
from accelerate.utils import named_module_tensors
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
ROOT = ""  # the unit name of the model's root (top-level code)

Location = Hashable  # a logical device: a GPU index, "cpu", "disk", or (in a trace) a unit name


@dataclass(frozen=True)
class Move:
    """One tensor (or one module's weights) sent from one logical device to another."""

    phase: str
    src: Location
    dst: Location
    nbytes: int
    kind: str  # "input" (a unit's argument), "return" (the root's result sent back to the caller), "weights" (offload),
    # "model" (a copy the model's own code makes: `image_features.to(inputs_embeds.device)`)
    unit: str  # the unit whose hook made the move


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Tracker:
    """What one run knows about where things are, and what it logged."""

    def __init__(self, main: Location, *, collapsed: bool, physical_to_logical: Mapping[str, Location] | None = None):
        self.main = main
        self.collapsed = collapsed
        self.physical_to_logical = dict(physical_to_logical or {})
        self.phase = "setup"
        self.stack: list[tuple[str, Location]] = []  # (unit, execution location)
        self.moves: list[Move] = []
        self.recording = True  # False while preparing inputs that are not part of the workload
        # False in timed repeats: xctune's counters step aside and only accelerate's hooks run, so a
        # timed run costs what the user's placement costs (counting happens in one separate pass)
        self.counting = True
        self.unpriced = False  # ops that allocate but are not part of the work: emulated moves, setup
        self.move_dst: Location | None = None  # where an emulated move's copy lands
        # > 0 while accelerate's own hooks run (opened by xctune's counter in front of them, closed by the
        # hook after them): the copies made then are the hooks', counted by the counters; a copy between
        # devices outside is the model's own code moving a tensor (OpRecorder logs it)
        self.in_hooks = 0
        self._tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.listeners: list = []  # objects with enter(unit) / exit(unit), e.g. the OpRecorder
        self.timer = MoveTimer()  # enabled by the real executor on GPUs

    # --- where things are -------------------------------------------------------------------
    def location(self, t: torch.Tensor) -> Location:
        if self.collapsed:
            return self._tags.get(t, self.main)
        return self.physical_to_logical.get(str(t.device), str(t.device))

    def tag(self, t: torch.Tensor, loc: Location) -> None:
        if self.collapsed:
            self._tags[t] = loc

    def is_tagged(self, t: torch.Tensor) -> bool:
        return t in self._tags

    @property
    def current(self) -> tuple[str, Location]:
        return self.stack[-1] if self.stack else (ROOT, self.main)

    # --- unit boundaries --------------------------------------------------------------------
    def enter(self, unit: str, loc: Location) -> None:
        self.stack.append((unit, loc))
        for listener in self.listeners:
            listener.enter(unit, loc)

    def exit(self, unit: str) -> None:
        for listener in self.listeners:
            listener.exit(unit)
        popped = self.stack.pop()
        assert popped[0] == unit, f"unit stack out of order: {popped[0]} != {unit}"

    @contextlib.contextmanager
    def unpriced_ops(self):
        self.unpriced, before = True, self.unpriced
        try:
            yield
        finally:
            self.unpriced = before

    # --- moves ------------------------------------------------------------------------------
    def record(self, move: Move) -> None:
        if self.recording:
            self.moves.append(move)

    def carry(self, obj, dst: Location, skip_keys, *, kind: str, unit: str):
        """Walk `obj` as accelerate's `send_to_device` does; log each tensor not already at `dst`."""
        if isinstance(obj, torch.Tensor):
            src = self.location(obj)
            if src == dst or obj.device.type == "meta":
                return obj
            self.record(Move(self.phase, src, dst, _nbytes(obj), kind, unit))
            if self.collapsed:  # emulate the copy so the destination really holds its own tensor
                with self.unpriced_ops():
                    self.move_dst = dst
                    try:
                        obj = obj.clone()
                    finally:
                        self.move_dst = None
                self._tags[obj] = dst
            return obj
        if isinstance(obj, (tuple, list)):
            items = [self.carry(o, dst, skip_keys, kind=kind, unit=unit) for o in obj]
            return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
        if isinstance(obj, Mapping):
            skip = skip_keys or ()
            return type(obj)(
                {k: v if k in skip else self.carry(v, dst, skip_keys, kind=kind, unit=unit) for k, v in obj.items()}
            )
        return obj


def _first_tensor(obj) -> torch.Tensor | None:
    leaves, _ = tree_flatten(obj)
    return next((x for x in leaves if isinstance(x, torch.Tensor)), None)


class MoveCounter(ModelHook):
    """Runs just before accelerate's AlignDevicesHook of a map entry (or of the root)."""

    def __init__(self, tracker: Tracker, unit: str, loc: Location, skip_keys=None):
        self.tracker, self.unit, self.loc, self.skip_keys = tracker, unit, loc, skip_keys
        self.is_root = unit == ROOT
        self._input_loc: list[Location] = []

    def pre_forward(self, module, *args, **kwargs):
        tr = self.tracker
        if not tr.counting:
            return args, kwargs
        if self.is_root:
            first = _first_tensor((args, kwargs))
            self._input_loc.append(tr.location(first) if first is not None else tr.main)
        tr.enter(self.unit, self.loc)
        before = len(tr.moves)
        # accelerate moves positional args whole and honours skip_keys only on keyword args
        args = tr.carry(args, self.loc, None, kind="input", unit=self.unit)
        kwargs = tr.carry(kwargs, self.loc, self.skip_keys, kind="input", unit=self.unit)
        tr.timer.start(len(tr.moves) > before)
        tr.in_hooks += 1
        return args, kwargs

    def post_forward(self, module, output):
        tr = self.tracker
        if not tr.counting:
            return output
        if tr.collapsed and not self.is_root:
            # a unit's results live on its device (the OpRecorder tags them op by op; this covers
            # runs without it, such as timed repeats)
            for t in tree_flatten(output)[0]:
                if isinstance(t, torch.Tensor) and not tr.is_tagged(t):
                    tr.tag(t, self.loc)
        if self.is_root:
            before = len(tr.moves)
            output = tr.carry(output, self._input_loc.pop(), self.skip_keys, kind="return", unit=self.unit)
            tr.timer.start(len(tr.moves) > before)
        tr.exit(self.unit)
        tr.in_hooks += 1
        return output


class MoveTimer:
    """Times the moves accelerate makes, where devices are real GPUs (CUDA events).

    A MoveCounter starts a timing when the call has something to move; `MoveTimerEnd`, placed
    after accelerate's hook, ends it once the moves are done. Off (a no-op) unless enabled.
    """

    def __init__(self, event_factory=None):
        self.event_factory = event_factory  # e.g. lambda: torch.cuda.Event(enable_timing=True)
        self.pending: list = []
        self.done: list[tuple[str, object, object]] = []
        self.phase = ""

    def start(self, moved: bool) -> None:
        if self.event_factory is None:
            return
        event = None
        if moved:
            event = self.event_factory()
            event.record()
        self.pending.append(event)

    def end(self, phase: str) -> None:
        if self.event_factory is None or not self.pending:
            return
        start = self.pending.pop()
        if start is not None:
            end = self.event_factory()
            end.record()
            self.done.append((phase, start, end))

    def milliseconds(self) -> dict[str, float]:
        """Per phase; call after the device is synchronised."""
        out: dict[str, float] = defaultdict(float)
        for phase, start, end in self.done:
            out[phase] += start.elapsed_time(end)
        return dict(out)


class MoveTimerEnd(ModelHook):
    """Runs after accelerate's hook: the moves it made (inputs, or the root's outputs) are done."""

    def __init__(self, tracker: Tracker, is_root: bool):
        self.tracker, self.is_root = tracker, is_root

    def pre_forward(self, module, *args, **kwargs):
        self.tracker.timer.end(self.tracker.phase)
        self._close()
        return args, kwargs

    def post_forward(self, module, output):
        if self.is_root:
            self.tracker.timer.end(self.tracker.phase)
        self._close()
        return output

    def _close(self) -> None:
        """accelerate's hook in front is done moving (Tracker.in_hooks, opened by the MoveCounter)."""
        if self.tracker.counting:
            self.tracker.in_hooks -= 1


class StreamCounter(ModelHook):
    """Runs before an offloading AlignDevicesHook: the module's weights cross from host or disk."""

    def __init__(self, tracker: Tracker, unit: str, tier: str, align_hook):
        self.tracker, self.unit, self.tier = tracker, unit, tier
        self.include_buffers = align_hook.offload_buffers
        self.recurse = align_hook.place_submodules

    def pre_forward(self, module, *args, **kwargs):
        tr = self.tracker
        if not tr.counting:
            return args, kwargs
        nbytes = sum(
            _nbytes(t)
            for _, t in named_module_tensors(
                module, include_buffers=self.include_buffers, recurse=self.recurse, remove_non_persistent=True
            )
        )
        if nbytes:
            tr.record(Move(tr.phase, self.tier, tr.current[1], nbytes, "weights", tr.current[0]))
        return args, kwargs


# ------------------------------------------------------------------------------------------
# Op pricing and memory


_MATMUL_OPS = {
    aten.mm,
    aten.addmm,
    aten.bmm,
    aten.baddbmm,
    aten.convolution,
    aten._convolution,
    aten.convolution_overrideable,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_cudnn_attention,
}
_MOVE_OPS = {aten._to_copy, aten.copy_}
# Gathers read the rows they pick, not the whole table (an embedding lookup, the rotary tables)
_GATHER_OPS = {aten.embedding, aten.index, aten.index_select, aten.gather}


def _sdpa_cpu_flops(q, k, v, *args, out_val=None, **kwargs) -> int:
    # same formula as PyTorch's for the CUDA kernels: two batched matmuls, Q K^T and P V
    b, h, s_q, d = q.shape
    s_k = k.shape[-2]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * v.shape[-1]


def op_flops(func, args, kwargs, out) -> int:
    packet = func.overloadpacket
    if packet is aten._scaled_dot_product_flash_attention_for_cpu:
        return _sdpa_cpu_flops(*args[:3])
    formula = flop_registry.get(packet)
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=out))  # registry entries take tensors, read shapes


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


@dataclass
class OpCost:
    flops: int
    nbytes: int
    matmul: bool
    name: str = ""


@dataclass
class UnitCall:
    """One call of a placement unit within a phase: its ops, and memory around it."""

    unit: str
    phase: str
    loc: Location
    ops: list[OpCost] = field(default_factory=list)
    live_at_entry: dict = field(default_factory=dict)  # holder -> bytes alive when the call began
    peak_inside: int = 0  # the most bytes this call's holder had alive during the call
    weight_chunks: list = field(default_factory=list)  # bytes of parameters read, per owning module (one offload load each)
    module_calls: int = 0  # nn.Module forward calls inside (each costs Python and hook overhead)


class OpRecorder(TorchDispatchMode):
    """Prices ops per unit call and tracks live tensor bytes per holder (the unit's location)."""

    def __init__(self, tracker: Tracker, *, guard_meta_copies: bool = False, parameters=()):
        """`parameters`: (name, tensor) pairs, as `model.named_parameters()` gives them."""
        super().__init__()
        self.tracker = tracker
        # parameters by storage (ops see views of them: a Linear multiplies by weight.t()), with the
        # module that owns each: accelerate's offload hooks load one module's parameters at a time
        self._params = {p.untyped_storage()._cdata: (_nbytes(p), name.rpartition(".")[0]) for name, p in parameters}
        self._touched: list[dict] = []  # per open call: owner module -> index into its weight_chunks
        self.guard_meta_copies = guard_meta_copies
        self.calls: list[UnitCall] = []
        self._open: list[UnitCall] = []
        self.live: dict[Location, int] = defaultdict(int)
        self.peak: dict[Location, int] = defaultdict(int)
        self.joins: list[tuple[str, tuple[Location, ...], str]] = []  # (op, locations, phase) at top level
        # per join (its index): the copies the model makes where its own code aligns the operands (`x.to(
        # inputs_embeds.device)`), each operand from its location to the result's (the first operand's)
        self.join_moves: list[tuple[int, Move]] = []
        self._top: dict = {}
        self.last_op = ""
        tracker.listeners.append(self)

    # unit boundaries (called by the Tracker)
    def enter(self, unit, loc):
        call = UnitCall(unit, self.tracker.phase, loc, live_at_entry=dict(self.live))
        call.peak_inside = self.live[loc]
        self.calls.append(call)
        self._open.append(call)
        self._touched.append({})

    def exit(self, unit):
        self._open.pop()
        self._touched.pop()

    def _in_unit(self) -> bool:
        """Inside a placement unit; code of the root itself runs where its inputs are."""
        return bool(self._open) and self._open[-1].unit != ROOT

    def _top_call(self, loc) -> UnitCall:
        """Top-level ops are charged to one pseudo-call per (phase, location)."""
        key = (self.tracker.phase, loc)
        call = self._top.get(key)
        if call is None:
            call = UnitCall(ROOT, self.tracker.phase, loc, live_at_entry=dict(self.live))
            call.peak_inside = self.live[loc]
            self._top[key] = call
            self.calls.append(call)
        return call

    def _alloc(self, t: torch.Tensor, holder: Location) -> None:
        n = _nbytes(t)
        if n == 0 or t.device.type == "meta":
            return
        self.live[holder] += n
        if self.live[holder] > self.peak[holder]:
            self.peak[holder] = self.live[holder]
        weakref.finalize(t, self._free, holder, n)

    def _free(self, holder, n):
        self.live[holder] -= n

    def fused_op(self, name: str, inputs: list[torch.Tensor], out: torch.Tensor, flops: int) -> None:
        """Charge one fused op (see FusedAttention) to the current call."""
        call = self._open[-1] if self._in_unit() else self._top_call(self.tracker.location(inputs[0]))
        self.tracker.tag(out, call.loc)
        self._alloc(out, self.tracker.location(out))
        if self.live[call.loc] > call.peak_inside:
            call.peak_inside = self.live[call.loc]
        nbytes = sum(_nbytes(x) for x in inputs) + _nbytes(out)
        call.ops.append(OpCost(flops, nbytes, True, name))

    def __enter__(self):
        self._module_hook = torch.nn.modules.module.register_module_forward_pre_hook(self._count_module)
        return super().__enter__()

    def __exit__(self, *exc):
        self._module_hook.remove()
        return super().__exit__(*exc)

    def _count_module(self, module, args):
        if self.tracker.recording:
            call = self._open[-1] if self._in_unit() else self._top_call(self.tracker.main)
            call.module_calls += 1

    def _model_move(self, packet, args, out) -> None:
        """Log a copy between two devices that the model's own code makes (accelerate's hooks are not
        running: Tracker.in_hooks), e.g. `image_features.to(inputs_embeds.device)`. Where logical devices
        share one physical device (a trace, a CPU run) such a `.to` is a no-op and nothing is seen here:
        the trace adds these moves from its joins instead (trace.py)."""
        src, dst = (args[1], args[0]) if packet is aten.copy_ else (args[0], out)
        if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)) or src.device == dst.device:
            return
        tr = self.tracker
        src_loc, dst_loc = tr.location(src), tr.location(dst)
        # GPUs only: a copy from the host is the model building a small tensor there (or this dry run's real
        # copies of data-dependent values, datadep.py), whatever the map; offloaded weights (StreamCounter)
        # come from the host too
        if isinstance(src_loc, int) and isinstance(dst_loc, int):
            tr.record(Move(tr.phase, src_loc, dst_loc, _nbytes(dst), "model", tr.current[0]))

    def _join_moves(self, join: int, operands: list[torch.Tensor], dst: Location) -> None:
        """The moves of a join's operands to where its result lives, one per tensor (one `.to` each), as
        the model's code makes them where a dry run shows it aligns them itself (trace.py decides)."""
        tr, seen = self.tracker, set()
        for x in operands:
            loc = tr.location(x)
            if loc == dst or x.device.type == "meta" or id(x) in seen:
                continue
            seen.add(id(x))
            self.join_moves.append((join, Move(tr.phase, loc, dst, _nbytes(x), "model", ROOT)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tr = self.tracker
        packet = func.overloadpacket
        if self.guard_meta_copies and packet in _MOVE_OPS:
            # Real tensors refuse this; fake ones would not notice (an offloaded vision tower, design.md §4).
            src = args[1] if packet is aten.copy_ else args[0]
            dst_dev = args[0].device if packet is aten.copy_ else kwargs.get("device")
            if src.device.type == "meta" and dst_dev is not None and torch.device(dst_dev).type != "meta":
                raise NotImplementedError("Cannot copy out of meta tensor; no data!")
        self.last_op = str(packet.__name__)
        out = func(*args, **kwargs)
        if not tr.recording:
            return out
        if packet in _MOVE_OPS and not tr.collapsed and not tr.in_hooks and not tr.unpriced:
            self._model_move(packet, args, out)
        in_leaves = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        out_leaves = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]

        if tr.move_dst is not None:
            loc = tr.move_dst
            call = self._open[-1] if self._in_unit() else self._top_call(loc)
        elif self._in_unit():
            call = self._open[-1]
            loc = call.loc
        else:
            # Outside any unit, results live where their inputs are; inputs from two devices
            # meeting here is the co-location requirement (the image/text torch.cat).
            locs = tuple(dict.fromkeys(tr.location(x) for x in in_leaves if x.device.type != "meta"))
            if len(locs) > 1 and not tr.unpriced:
                self.joins.append((str(func.overloadpacket.__name__), locs, tr.phase))
                self._join_moves(len(self.joins) - 1, in_leaves, locs[0])
            loc = locs[0] if locs else tr.main
            call = self._top_call(loc)
        for o in out_leaves:
            tr.tag(o, loc)
        if _is_view(func):
            return out
        if packet is not aten.copy_:  # copy_ writes into storage that exists already
            for o in out_leaves:
                self._alloc(o, tr.location(o))
        if self.live[call.loc] > call.peak_inside:
            call.peak_inside = self.live[call.loc]
        is_move = packet in _MOVE_OPS and bool(in_leaves) and any(o.device != in_leaves[0].device for o in out_leaves)
        if tr.unpriced or is_move or all(o.device.type == "meta" for o in out_leaves):
            return out  # moves are priced as transfers, not as compute
        if self._touched and self._params:
            owners = self._touched[-1]
            for x in in_leaves:
                key = x.untyped_storage()._cdata
                hit = self._params.get(key)
                if hit is not None and key not in owners:
                    owners[key] = True
                    n, owner = hit
                    if owner not in owners:
                        owners[owner] = len(call.weight_chunks)
                        call.weight_chunks.append(0)
                    call.weight_chunks[owners[owner]] += n
        if packet in _GATHER_OPS:
            out_bytes = sum(_nbytes(x) for x in out_leaves)
            nbytes = 2 * out_bytes + sum(_nbytes(x) for x in in_leaves if not x.is_floating_point())
        else:
            nbytes = sum(_nbytes(x) for x in in_leaves) + sum(_nbytes(x) for x in out_leaves)
        call.ops.append(OpCost(op_flops(func, args, kwargs, out), nbytes, packet in _MATMUL_OPS, self.last_op))
        return out


class FusedAttention(TorchFunctionMode):
    """Prices `scaled_dot_product_attention` as the one fused kernel a GPU runs.

    On the virtual device (and on the CPU) SDPA decomposes into its math path: fp32 upcasts
    and a [T, T] score matrix that flash / memory-efficient kernels never materialise. The
    recorder is paused while it runs, and one op is charged instead: FLOPs 2*B*Hq*Sq*Sk*(D+Dv)
    (Q K^T and P V, as PyTorch's flop counter counts them), bytes q + k + v + output.
    """

    def __init__(self, recorder: "OpRecorder"):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        tr = self.recorder.tracker
        was = tr.recording
        tr.recording = False
        try:
            out = func(*args, **kwargs)
        finally:
            tr.recording = was
        if was:
            q, k, v = args[:3]
            B, H, Sq, D = q.shape
            flops = 2 * B * H * Sq * k.shape[-2] * (D + v.shape[-1])
            self.recorder.fused_op("scaled_dot_product_attention", [q, k, v], out, flops)
        return out
