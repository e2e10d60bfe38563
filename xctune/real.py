"""The real executor: place the model by a plan on this machine's devices and measure it.

Real tensors, real compute. On a machine with enough GPUs, plan GPU i is `cuda:i`; otherwise
the plan's GPUs are *logical* devices sharing one physical device (the CPU on a machine with no
GPU): the counting hooks still count every logical boundary crossing, and the copies a move
would make are made, but transfers cost no link time (say so: `transfer_ms` is None).

One trial: placement from the master copy (timed apart) -> one instrumented run (transfers,
live-tensor memory, device-mismatch detection) -> warm-up -> timed repeats (CUDA events on
GPUs, wall clock on the CPU) -> fidelity against an fp32 single-device reference of the same
weights and inputs. A failure (OOM, device mismatch, anything else) ends the trial with a
status and a cause; memory is freed and the next trial runs.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass, field

import torch

from .errors import BadInput
from .hardware import Cluster
from .instrument import FusedAttention, MoveTimer, OpRecorder
from .models.loading import ModelSpec
from .placement import OFFLOAD_TIERS, HostWorld, dispatch, exec_location, main_location, undispatch
from .plan import Plan, resolve
from .check import weight_bytes
from .profile import DTYPES, unit_torch_dtypes
from .record import Spread, TrialRecord
from .simulate import dev, failed_record, record_header
from .virtual import quiet_accelerate, virtual_run
from .workload import Workload, generate, make_inputs


def host_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class Clock:
    """Times phases: CUDA events where the work runs on a GPU, the wall clock on the CPU."""

    def __init__(self, cuda: bool, tracker=None):
        self.cuda, self.tracker = cuda, tracker
        self.samples: dict[str, list[float]] = {}
        self._events: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.tracker is not None:
            self.tracker.phase = phase
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((phase, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.samples.setdefault(phase, []).append((time.perf_counter() - t0) * 1e3)

    def finish(self) -> dict[str, list[float]]:
        if self.cuda:
            torch.cuda.synchronize()
            for phase, start, end in self._events:
                self.samples.setdefault(phase, []).append(start.elapsed_time(end))
            self._events.clear()
        return self.samples


class MasterWeights:
    """The weights, loaded once; each trial gets them cast and on its devices.

    Tensors a plan needs (name, dtype, device) are cached between trials, so a new plan only
    moves or casts what changed; entries the current plan does not use are dropped.
    """

    def __init__(self, master: torch.nn.Module):
        self.master = master
        self.tensors = {**dict(master.named_parameters()), **dict(master.named_buffers())}
        self.cache: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}
        self.bytes_copied = 0

    def _get(self, name: str, dtype: torch.dtype, device: str) -> torch.Tensor:
        src = self.tensors[name]
        if not src.is_floating_point():
            dtype = src.dtype
        key = (name, dtype, device)
        t = self.cache.get(key)
        if t is None:
            if src.dtype == dtype and torch.device(device) == src.device:
                t = src.detach()
            else:
                t = src.detach().to(device=device, dtype=dtype)
                self.bytes_copied += t.numel() * t.element_size()
            self.cache[key] = t
        return t

    def model_for(self, plan: Plan, profile, physical_of) -> torch.nn.Module:
        """A model whose tensors sit where the plan's dispatch will want them (no copy on dispatch)."""
        self.bytes_copied = 0
        res = resolve(plan.device_map, profile)
        main = main_location(plan.device_map)
        model = profile.family.build_meta()
        used = set()
        for mod_name, module in model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for kind in ("_parameters", "_buffers"):
                for name, t in list(getattr(module, kind).items()):
                    if t is None:
                        continue
                    full = prefix + name
                    unit = profile.unit_of(full)
                    dtype = DTYPES[plan.dtypes[profile.group_of(unit)]]
                    place = res.param_device.get(full)
                    if place is None:  # buffers stay with their unit's execution device
                        place = next((d for p, d in res.param_device.items() if profile.unit_of(p) == unit), main)
                        place = exec_location(place, main)
                    device = physical_of(place)
                    tensor = self._get(full, dtype, device)
                    used.add((full, tensor.dtype, device))
                    if kind == "_parameters":
                        module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
                    else:
                        module._buffers[name] = tensor
        self.cache = {k: v for k, v in self.cache.items() if k in used}
        return model.eval()


@dataclass
class HostExecutor:
    spec: ModelSpec
    workload: Workload
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    budget: Cluster | None = None  # memory per logical device, where the devices are logical
    world: HostWorld = field(default_factory=HostWorld)

    def __post_init__(self):
        self.profile = self.spec.profile
        self.workload.check_fits(self.profile.config)
        need = self.profile.total_params * 4
        ram = host_ram_bytes()
        if self.spec.checkpoint is None and ram and need > 0.6 * ram:
            raise BadInput(
                f"measuring {self.spec.source} for real needs its {need / 2**30:.0f} GiB of fp32 weights in RAM "
                f"({ram / 2**30:.0f} GiB here); use --model tiny, a checkpoint, or the virtual executor (--gpus)"
            )
        if self.repeats < 1 or self.warmup < 0:
            raise BadInput("--repeats must be at least 1 and --warmup at least 0")
        self.master = MasterWeights(self.spec.load_master(self.seed))
        self._reference = None

    # --- the fp32 single-device reference ----------------------------------------------------
    def reference(self):
        if self._reference is None:
            device = "cuda:0" if self.world.n_cuda else "cpu"
            model = self.master.master.to(device)
            inputs = make_inputs(self.profile.config, self.workload, device)
            out = generate(model, inputs, self.workload.new_tokens, layout=self.workload.hd_layout)
            self._reference = (out.tokens.cpu(), out.last_logits.float().cpu())
            self.master.master.to("cpu")
        return self._reference

    # --- one trial ---------------------------------------------------------------------------
    def run(self, plan: Plan, label: str = "") -> TrialRecord:
        collapsed = self.world.collapsed_for(plan.device_map)
        devices = self._device_names(plan, collapsed)
        n_logical = len(self.budget.gpus) if self.budget else None
        bad = [d for d in plan.gpus if n_logical is not None and d >= n_logical]
        if bad:
            return failed_record(plan, self.profile, self.workload, "measured", "invalid",
                                 f"the plan uses cuda:{bad[0]}, the budget names {n_logical} device(s)", devices, label)
        if collapsed:
            # Logical devices share one physical device, which forgives what GPUs refuse (a split
            # co-location group, an offloaded vit). The dry run on virtual GPUs says what GPUs would do.
            dry = virtual_run(self.profile, plan, Workload(prompt_tokens=2, new_tokens=2, hd_layout=self.workload.hd_layout))
            if not dry.ok and dry.failure.kind in ("device-mismatch", "meta-copy"):
                return failed_record(plan, self.profile, self.workload, "measured", "invalid",
                                     f"{dry.failure.describe()} (dry run on virtual GPUs)", devices, label)
        ref_tokens, ref_logits = self.reference()
        try:
            with quiet_accelerate():
                return self._place_and_measure(plan, collapsed, devices, ref_tokens, ref_logits, label)
        except torch.OutOfMemoryError as e:
            return failed_record(plan, self.profile, self.workload, "measured", "oom", _first_line(e), devices, label)
        except Exception as e:  # a map that fails is a result
            msg = _first_line(e)
            status = "invalid" if ("same device" in msg or "meta tensor" in msg) else "error"
            return failed_record(plan, self.profile, self.workload, "measured", status, msg, devices, label)
        finally:
            gc.collect()
            if self.world.n_cuda:
                torch.cuda.empty_cache()

    def _place_and_measure(self, plan, collapsed, devices, ref_tokens, ref_logits, label) -> TrialRecord:
        placed = None
        try:
            t0 = time.perf_counter()
            physical = lambda loc: self.world.physical(loc, collapsed) if loc != "disk" else "cpu"  # noqa: E731
            model = self.master.model_for(plan, self.profile, physical)
            placed = dispatch(
                model,
                plan.device_map,
                self.world,
                skip_keys=plan.skip_keys,
                unit_dtypes=unit_torch_dtypes(self.profile, plan) if plan.mixed else None,
                collapsed=collapsed,
            )
            placement_ms = (time.perf_counter() - t0) * 1e3
            return self._measure(plan, placed, collapsed, devices, placement_ms, ref_tokens, ref_logits, label)
        finally:
            if placed is not None:
                undispatch(placed.model)

    def _device_names(self, plan: Plan, collapsed: bool) -> dict:
        out = {}
        for d in plan.gpus:
            if collapsed:
                out[dev(d)] = f"{self.world.physical(d, collapsed)} (logical)"
            else:
                out[dev(d)] = torch.cuda.get_device_name(d)
        return out

    def _measure(self, plan, placed, collapsed, devices, placement_ms, ref_tokens, ref_logits, label) -> TrialRecord:
        cfg, w = self.profile.config, self.workload
        model, tracker = placed.model, placed.tracker
        inputs = make_inputs(cfg, w, placed.physical_main)
        cuda = placed.physical_main.startswith("cuda") and not collapsed

        # 1. the instrumented run: moves (timed with CUDA events on real GPUs), live memory, and
        #    the joins a GPU would refuse
        rec = OpRecorder(tracker, parameters=list(model.named_parameters()))
        if cuda:
            tracker.timer = MoveTimer(lambda: torch.cuda.Event(enable_timing=True))
        with rec, FusedAttention(rec):
            generate(model, inputs, w.new_tokens, Clock(False, tracker), w.hd_layout)
        if cuda:
            torch.cuda.synchronize()
        transfer_ms = sum(tracker.timer.milliseconds().values()) if cuda else None
        tracker.timer = MoveTimer()
        for op, locs, _ in rec.joins:
            if len({loc for loc in locs}) > 1:
                names = " and ".join(dev(x) for x in locs)
                return failed_record(plan, self.profile, w, "measured", "invalid",
                                     f"Expected all tensors to be on the same device, but found at least two devices, "
                                     f"{names}! (top-level {op})", devices, label)
        moves = list(tracker.moves)

        # 2. warm-up and timed repeats, uninstrumented
        tracker.recording = False
        for _ in range(self.warmup):
            generate(model, inputs, w.new_tokens, layout=w.hd_layout)
        if cuda:
            for i in plan.gpus:
                torch.cuda.reset_peak_memory_stats(i)
        vision, prefill, decode, e2e = [], [], [], []
        out = None
        for _ in range(self.repeats):
            clock = Clock(cuda)
            t0 = time.perf_counter()
            out = generate(model, inputs, w.new_tokens, clock, w.hd_layout)
            if cuda:
                torch.cuda.synchronize()
            e2e.append((time.perf_counter() - t0) * 1e3)
            s = clock.finish()
            vision.append(sum(s.get("vision", [0.0])))
            prefill.append(sum(s.get("prefill", [0.0])))
            steps = s.get("decode", [])
            decode.append(sum(steps) / len(steps) if steps else 0.0)

        # 3. memory
        weights = {dev(k): v for k, v in weight_bytes(plan, self.profile, resolve(plan.device_map, self.profile)).items()
                   if k not in OFFLOAD_TIERS}
        if cuda:
            peak = {dev(i): torch.cuda.max_memory_allocated(i) for i in plan.gpus}
            activation = {k: max(0, v - weights.get(k, 0)) for k, v in peak.items()}
            note = "measured: torch.cuda.max_memory_allocated per GPU (weights + activations + KV cache)"
        else:
            activation = {dev(k): v for k, v in rec.peak.items() if isinstance(k, int)}
            peak = {k: weights.get(k, 0) + activation.get(k, 0) for k in {*weights, *activation} if k.startswith("cuda")}
            note = ("measured on the CPU: weights (parameters + buffers) per logical device, plus the peak of "
                    "live tensor bytes allocated by the run on it (activations, KV cache, moved copies)")
        kv = {}
        for k, v in out.past_key_values:
            for t in (k, v):
                key = dev(tracker.location(t))
                kv[key] = kv.get(key, 0) + t.numel() * t.element_size()

        # 4. fidelity against the fp32 single-device reference
        tokens, logits = out.tokens.cpu(), out.last_logits.float().cpu()
        top1 = float((tokens == ref_tokens).float().mean())
        diff = (logits - ref_logits).abs()

        status, cause = "ok", ""
        if self.budget is not None:
            for i in plan.gpus:
                need = peak.get(dev(i), 0)
                if need > self.budget.usable_bytes(i):
                    status, cause = "oom", (f"{dev(i)} peaked at {need / 2**20:.1f} MiB (measured), over its budget of "
                                            f"{self.budget.usable_bytes(i) / 2**20:.1f} MiB")
                    break
        links: dict[str, int] = {}
        by_phase: dict[str, int] = {}
        count_by_phase: dict[str, int] = {}
        total = count = streamed = 0
        for m in moves:
            if m.kind == "weights":
                streamed += m.nbytes
            total += m.nbytes
            count += 1
            key = f"{dev(m.src)}->{dev(m.dst)}"
            links[key] = links.get(key, 0) + m.nbytes
            pkey = f"{m.phase} {key}"
            by_phase[pkey] = by_phase.get(pkey, 0) + m.nbytes
            count_by_phase[pkey] = count_by_phase.get(pkey, 0) + 1
        return TrialRecord(
            **record_header(plan, cfg.name, w, "measured", devices, label),
            status=status,
            cause=cause,
            vision_ms=Spread.of(vision),
            prefill_ms=Spread.of(prefill),
            decode_ms_per_token=Spread.of(decode),
            e2e_ms=Spread.of(e2e),
            transfer_bytes=total,
            transfer_count=count,
            transfer_by_link=links,
            transfer_by_phase=by_phase,
            transfer_count_by_phase=count_by_phase,
            transfer_ms=transfer_ms,  # CUDA events around accelerate's moves; None for logical devices
            streamed_weight_bytes=streamed,
            peak_bytes=peak,
            peak_bytes_max=max(peak.values(), default=0),
            weights_bytes=weights,
            activation_bytes=activation,
            kv_bytes=kv,
            fidelity_top1=top1,
            fidelity_max_abs=float(diff.max()),
            fidelity_mean_abs=float(diff.mean()),
            placement_ms=placement_ms,
            repeats=self.repeats,
            memory_note=note,
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
