"""The real executor: place the model by a plan on this machine's devices and measure it.

Real tensors, real compute. On a machine with enough GPUs, plan GPU i is `cuda:i`; otherwise
the plan's GPUs are *logical* devices sharing one physical device (the CPU on a machine with no
GPU): the counting hooks still count every logical boundary crossing, and the copies a move
would make are made, but transfers cost no link time (say so: `transfer_ms` is None).

One trial: placement from the master copy (timed apart) -> one instrumented run (transfers,
live-tensor memory, device-mismatch detection) -> warm-up -> timed repeats (CUDA events on
GPUs; on the CPU the process's CPU time with one thread, else the wall clock) -> fidelity against an fp32 single-device reference of the same
weights and inputs. A failure (OOM, device mismatch, anything else) ends the trial with a
status and a cause; memory is freed and the next trial runs.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..errors import BadInput
from ..hardware import Cluster
from .instrument import FusedAttention, MoveTimer, OpRecorder
from ..models.loading import ModelSpec
from ..models.presets import CALIBRATION_MODEL
from .placement import ONLY_DISK, OFFLOAD_TIERS, HostWorld, dispatch, exec_location, main_location, undispatch
from ..plans.plan import Plan, resolve
from ..plans.check import weight_bytes
from ..models.profile import DTYPES, unit_torch_dtypes
from ..record import Spread, TrialRecord
from .simulate import dev, failed_record, record_header
from .virtual import quiet_accelerate, virtual_run
from ..workload import Workload, no_clock


def host_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


CLOCKS = ("cuda-events", "wall", "process-cpu")


class Clock:
    """Times phases: CUDA events where the work runs on a GPU; on the CPU the wall clock, or the
    process's CPU time (`cpu_time`): with one torch thread that is the work the run did, whatever
    the neighbours on a shared machine do (the wall clock then also counts waiting for a core)."""

    def __init__(self, cuda: bool, tracker=None, cpu_time: bool = False):
        self.cuda, self.tracker = cuda, tracker
        self.now = time.process_time if cpu_time else time.perf_counter
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
            t0 = self.now()
            yield
            self.samples.setdefault(phase, []).append((self.now() - t0) * 1e3)

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
        # every name, tied ones included (a head tied to the embeddings is one tensor under two names)
        self.tensors = {**dict(master.named_parameters(remove_duplicate=False)),
                        **dict(master.named_buffers(remove_duplicate=False))}
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
        tied: dict[int, tuple] = {}  # id of a meta parameter -> (it, kept alive; its real one): ties stay ties
        # a tied tensor takes the dtype of its last unit, as the dry run's casts leave it (build.cast_units)
        order = {u.name: i for i, u in enumerate(profile.units)}
        dtype_unit = {n: max((profile.unit_of(m) for m in group), key=lambda u: order.get(u, -1))
                      for group in profile.tied for n in group}
        for mod_name, module in model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for kind in ("_parameters", "_buffers"):
                for name, t in list(getattr(module, kind).items()):
                    if t is None:
                        continue
                    if kind == "_parameters" and id(t) in tied:
                        module._parameters[name] = tied[id(t)][1]
                        continue
                    full = prefix + name
                    unit = profile.unit_of(full)
                    dtype = DTYPES[plan.dtypes[profile.group_of(dtype_unit.get(full, unit))]]
                    place = res.param_device.get(full)
                    if place is None:  # buffers stay with their unit's execution device
                        place = next((d for p, d in res.param_device.items() if profile.unit_of(p) == unit), main)
                        place = exec_location(place, main)
                    device = physical_of(place)
                    tensor = self._get(full, dtype, device)
                    used.add((full, tensor.dtype, device))
                    if kind == "_parameters":
                        # the first name of a tied group places it, as the dry run does (vdevice.materialize)
                        module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
                        tied[id(t)] = (t, module._parameters[name])
                    else:
                        module._buffers[name] = tensor
        self.cache = {k: v for k, v in self.cache.items() if k in used}
        return model.eval()


NOISE_BOUND = 0.10  # a trial whose end-to-end repeats vary by more (coefficient of variation) is measured again


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with exactly `n` intra-op threads (torch's default follows the cores, and on a shared
    machine the time then follows the neighbours' load), restoring the previous setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Prepared:
    """A plan placed and counted, ready for timed repeats (see HostExecutor.prepare)."""

    plan: Plan
    label: str
    placed: object
    inputs: object
    cuda: bool
    devices: dict
    placement_ms: float
    counted: dict  # what the counting pass found: moves, memory, transfer time, the last outputs
    samples: dict = field(default_factory=lambda: {"vision": [], "prefill": [], "decode": [], "e2e": []})


@dataclass
class HostExecutor:
    spec: ModelSpec
    workload: Workload
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    budget: Cluster | None = None  # memory per logical device, where the devices are logical
    world: HostWorld = field(default_factory=HostWorld)
    threads: int = 1  # torch intra-op threads while measuring (recorded in every record)
    noise_bound: float = NOISE_BOUND
    count: bool = True  # False: time only (calibration), no counting pass: no transfers, memory or join check
    clock: str = "auto"  # CLOCKS; auto: CUDA events on GPUs, process CPU time on the CPU with one thread, else wall

    def clock_for(self, cuda: bool) -> str:
        if cuda:
            return "cuda-events"
        if self.clock == "auto":
            return "process-cpu" if self.threads == 1 else "wall"
        return self.clock

    def __post_init__(self):
        self.profile = self.spec.profile
        self.workload.check_fits(self.profile.config)
        need = self.profile.total_params * 4
        ram = host_ram_bytes()
        if self.spec.checkpoint is None and ram and need > 0.6 * ram:
            raise BadInput(
                f"measuring {self.spec.source} for real needs its {need / 2**30:.0f} GiB of fp32 weights in RAM "
                f"({ram / 2**30:.0f} GiB here); use a small model (--model {CALIBRATION_MODEL}), a checkpoint, or the "
                f"virtual executor (--gpus)"
            )
        if self.repeats < 1 or self.warmup < 0:
            raise BadInput("--repeats must be at least 1 and --warmup at least 0")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise BadInput(f"--threads must be a positive integer, got {self.threads!r}")
        if self.clock not in ("auto", "wall", "process-cpu"):
            raise BadInput(f"unknown clock {self.clock!r}; use auto, wall or process-cpu")
        self.master = MasterWeights(self.spec.load_master(self.seed))
        self._reference = None

    # --- the model family's own workload -------------------------------------------------------
    def inputs(self, device):
        """The workload's inputs (synthetic, seeded), on `device`."""
        return self.profile.family.make_inputs(self.workload, device)

    def generate(self, model, inputs, clock=no_clock):
        """The workload run for real by the family's generate loop (phases under `clock`)."""
        return self.profile.family.generate(model, inputs, self.workload, clock)

    # --- the fp32 single-device reference ----------------------------------------------------
    def reference(self):
        if self._reference is None:
            device = "cuda:0" if self.world.n_cuda else "cpu"
            model = self.master.master.to(device)
            inputs = self.inputs(device)
            with torch_threads(self.threads):
                out = self.generate(model, inputs)
            self._reference = (out.tokens.cpu(), out.last_logits.float().cpu())
            self.master.master.to("cpu")
        return self._reference

    # --- one trial ---------------------------------------------------------------------------
    def run(self, plan: Plan, label: str = "") -> TrialRecord:
        """Place, count, warm up, time `repeats` runs (once more where they vary over the noise bound)."""
        out = self.prepare(plan, label)
        if isinstance(out, TrialRecord):
            return out
        try:
            with torch_threads(self.threads), quiet_accelerate():
                for _ in range(self.repeats):
                    self.time_once(out)
                if Spread.of(out.samples["e2e"]).cv > self.noise_bound:
                    first = out.samples
                    out.samples = {k: [] for k in first}
                    for _ in range(self.repeats):
                        self.time_once(out)
                    # keep the quieter set: the noise came from the machine, not from the plan
                    if Spread.of(first["e2e"]).cv < Spread.of(out.samples["e2e"]).cv:
                        out.samples = first
            return self.finish(out)
        except Exception as e:  # a failure in a timed run is a result, as in the counting pass
            return self._failure(plan, out.devices, label, e)
        finally:
            self.release(out)

    def measure_interleaved(self, plans, rounds: int, labels=None) -> list[tuple[TrialRecord, dict]]:
        """Every plan placed at once, then `rounds` timed runs taken in turns (plan 1, 2, ..., 1, 2, ...),
        so that a change of the machine's load hits all plans alike: the way to compare plans.
        Per plan, its record and its per-round times ({phase: [ms per round]}, empty where it failed)."""
        labels = labels or [""] * len(plans)
        prepared = [self.prepare(p, lab) for p, lab in zip(plans, labels)]
        live = [p for p in prepared if isinstance(p, Prepared)]
        try:
            with torch_threads(self.threads), quiet_accelerate():
                for _ in range(rounds):
                    for p in live:
                        self.time_once(p)
            return [(p, {}) if isinstance(p, TrialRecord) else (self.finish(p), dict(p.samples)) for p in prepared]
        finally:
            for p in live:
                self.release(p)

    def prepare(self, plan: Plan, label: str = "") -> "Prepared | TrialRecord":
        """Place the plan and run the counting pass (transfers, memory, joins) and the warm-up;
        a plan that cannot run gives its failed record instead."""
        if set(plan.device_map.values()) == {"disk"}:
            raise BadInput(ONLY_DISK)
        collapsed = self.world.collapsed_for(plan.device_map)
        devices = self._device_names(plan, collapsed)
        n_logical = len(self.budget.gpus) if self.budget else None
        bad = [d for d in plan.gpus if n_logical is not None and d >= n_logical]
        if bad:
            return failed_record(plan, self.profile, self.workload, "measured", "invalid",
                                 f"the plan uses cuda:{bad[0]}, the budget names {n_logical} device(s)", devices, label)
        if collapsed:
            # Logical devices share one physical device, which forgives what GPUs refuse (a split
            # co-location group, an offloaded vision tower). The dry run on virtual GPUs says what GPUs would do.
            refused = _gpu_refusal(self.profile, plan, self.workload.hd_layout)
            if refused:
                return failed_record(plan, self.profile, self.workload, "measured", "invalid", refused, devices, label)
        self.reference()
        placed = None
        try:
            with torch_threads(self.threads), quiet_accelerate():
                t0 = time.perf_counter()
                placed = self.place(plan, collapsed)
                placement_ms = (time.perf_counter() - t0) * 1e3
                prepared = Prepared(plan, label, placed, self.inputs(placed.physical_main),
                                    placed.physical_main.startswith("cuda") and not collapsed, devices, placement_ms, {})
                failure = self._count(prepared)
            if failure is not None:
                self.release(prepared)
                return failure
            return prepared
        except Exception as e:  # a map that fails is a result
            if placed is not None:
                undispatch(placed.model)
            return self._failure(plan, devices, label, e)

    def place(self, plan: Plan, collapsed: bool | None = None):
        """The plan's model on this machine's devices, from the master copy, behind accelerate's hooks
        plus xctune's counting hooks and, where the plan mixes precisions, the casts between its
        groups (placement.dispatch): what every trial runs. Offloaded weights start on the CPU
        (accelerate streams them to the execution device at each call). Undo with `undispatch`."""
        collapsed = self.world.collapsed_for(plan.device_map) if collapsed is None else collapsed
        physical = lambda loc: self.world.physical(loc, collapsed) if loc != "disk" else "cpu"  # noqa: E731
        model = self.master.model_for(plan, self.profile, physical)
        return dispatch(model, plan.device_map, self.world, skip_keys=plan.skip_keys,
                        unit_dtypes=unit_torch_dtypes(self.profile, plan) if plan.mixed else None, collapsed=collapsed)

    def release(self, prepared: Prepared) -> None:
        undispatch(prepared.placed.model)
        prepared.placed = prepared.inputs = None
        prepared.counted.pop("out", None)
        gc.collect()
        if self.world.n_cuda:
            torch.cuda.empty_cache()

    def _failure(self, plan, devices, label, e: BaseException) -> TrialRecord:
        msg = _first_line(e)
        if isinstance(e, torch.OutOfMemoryError):
            status = "oom"
        else:
            status = "invalid" if ("same device" in msg or "meta tensor" in msg) else "error"
        return failed_record(plan, self.profile, self.workload, "measured", status, msg, devices, label)

    def _device_names(self, plan: Plan, collapsed: bool) -> dict:
        out = {}
        for d in plan.gpus:
            if collapsed:
                out[dev(d)] = f"{self.world.physical(d, collapsed)} (logical)"
            else:
                out[dev(d)] = torch.cuda.get_device_name(d)
        return out

    def _count(self, p: Prepared) -> TrialRecord | None:
        """The counting pass (moves, timed with CUDA events on real GPUs; live memory; the joins a
        GPU would refuse), then the warm-up with the counters off."""
        plan, w = p.plan, self.workload
        model, tracker = p.placed.model, p.placed.tracker
        rec = OpRecorder(tracker, parameters=list(model.named_parameters()))
        if p.cuda:
            tracker.timer = MoveTimer(lambda: torch.cuda.Event(enable_timing=True))
        counting = contextlib.ExitStack()
        if self.count:
            counting.enter_context(rec)
            counting.enter_context(FusedAttention(rec))
        else:
            p.placed.counting(False)
        with counting:
            out = self.generate(model, p.inputs, Clock(False, tracker))
        if p.cuda:
            torch.cuda.synchronize()
        transfer_ms = sum(tracker.timer.milliseconds().values()) if p.cuda else None
        tracker.timer = MoveTimer()
        # Where logical devices share one physical device, a model's own `x.to(y.device)` is a no-op the
        # tags cannot follow (transformers' classes move image features to the embeddings' device that
        # way), so a join seen here may be one the model aligns itself: the dry run on virtual GPUs has
        # judged the plan already (prepare). On separate devices a join is what the GPUs saw.
        joins = [] if tracker.collapsed else rec.joins
        for op, locs, _ in joins:
            if len({loc for loc in locs}) > 1:
                names = " and ".join(dev(x) for x in locs)
                return failed_record(plan, self.profile, w, "measured", "invalid",
                                     f"Expected all tensors to be on the same device, but found at least two devices, "
                                     f"{names}! (top-level {op})", p.devices, p.label)
        kv = {}
        for t in self.profile.family.kv_tensors(out.past_key_values):
            key = dev(tracker.location(t))
            kv[key] = kv.get(key, 0) + t.numel() * t.element_size()
        tracker.recording = False
        p.placed.counting(False)
        if p.cuda:
            for i in plan.gpus:
                torch.cuda.reset_peak_memory_stats(i)
        for _ in range(self.warmup):
            out = self.generate(model, p.inputs)
        if p.cuda:
            torch.cuda.synchronize()
            peak = {dev(i): torch.cuda.max_memory_allocated(i) for i in plan.gpus}
        else:
            peak = None
        moves = list(tracker.moves)
        if tracker.collapsed:
            # the copies the model made to align those joins (no-ops here), as separate GPUs make them: each
            # operand to the device of the op's first operand, as the dry run logs them (kind "model")
            moves += [m for _, m in rec.join_moves]
        p.counted = {"moves": moves, "transfer_ms": transfer_ms, "kv": kv,
                     "activation": {dev(k): v for k, v in rec.peak.items() if isinstance(k, int)}, "cuda_peak": peak,
                     "out": out}
        return None

    def time_once(self, p: Prepared) -> None:
        """One timed run of the workload, counters off: phases and end to end by the executor's clock."""
        clock = Clock(p.cuda, cpu_time=self.clock_for(p.cuda) == "process-cpu")
        t0 = clock.now()
        p.counted["out"] = self.generate(p.placed.model, p.inputs, clock)
        if p.cuda:
            torch.cuda.synchronize()
        p.samples["e2e"].append((clock.now() - t0) * 1e3)
        s = clock.finish()
        p.samples["vision"].append(sum(s.get("vision", [0.0])))
        p.samples["prefill"].append(sum(s.get("prefill", [0.0])))
        steps = s.get("decode", [])
        p.samples["decode"].append(sum(steps) / len(steps) if steps else 0.0)

    def finish(self, p: Prepared) -> TrialRecord:
        """The trial record of a prepared plan and its timed runs."""
        plan, cfg, w = p.plan, self.profile.config, self.workload
        ref_tokens, ref_logits = self.reference()
        c = p.counted
        weights = {dev(k): v for k, v in weight_bytes(plan, self.profile, resolve(plan.device_map, self.profile)).items()
                   if k not in OFFLOAD_TIERS}
        if c["cuda_peak"] is not None:
            peak = c["cuda_peak"]
            activation = {k: max(0, v - weights.get(k, 0)) for k, v in peak.items()}
            note = "measured: torch.cuda.max_memory_allocated per GPU (weights + activations + KV cache)"
        else:
            activation = c["activation"]
            peak = {k: weights.get(k, 0) + activation.get(k, 0) for k in {*weights, *activation} if k.startswith("cuda")}
            note = ("measured on the CPU: weights (parameters + buffers) per logical device, plus the peak of "
                    "live tensor bytes allocated by the run on it (activations, KV cache, moved copies)"
                    if self.count else "timing only: weights per logical device; activations and transfers not counted")

        # fidelity against the fp32 single-device reference
        out = c["out"]
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
        for m in c["moves"]:
            if m.kind == "weights":
                streamed += m.nbytes
            total += m.nbytes
            count += 1
            key = f"{dev(m.src)}->{dev(m.dst)}"
            links[key] = links.get(key, 0) + m.nbytes
            pkey = f"{m.phase} {key}"
            by_phase[pkey] = by_phase.get(pkey, 0) + m.nbytes
            count_by_phase[pkey] = count_by_phase.get(pkey, 0) + 1
        e2e = Spread.of(p.samples["e2e"])
        return TrialRecord(
            **record_header(plan, cfg.name, w, "measured", p.devices, p.label),
            status=status,
            cause=cause,
            vision_ms=Spread.of(p.samples["vision"]),
            prefill_ms=Spread.of(p.samples["prefill"]),
            decode_ms_per_token=Spread.of(p.samples["decode"]),
            e2e_ms=e2e,
            transfer_bytes=total,
            transfer_count=count,
            transfer_by_link=links,
            transfer_by_phase=by_phase,
            transfer_count_by_phase=count_by_phase,
            transfer_ms=c["transfer_ms"],  # CUDA events around accelerate's moves; None for logical devices
            streamed_weight_bytes=streamed,
            peak_bytes=peak,
            peak_bytes_max=max(peak.values(), default=0),
            weights_bytes=weights,
            activation_bytes=activation,
            kv_bytes=c["kv"],
            fidelity_top1=top1,
            fidelity_max_abs=float(diff.max()),
            fidelity_mean_abs=float(diff.mean()),
            placement_ms=p.placement_ms,
            repeats=e2e.n,
            threads=self.threads,
            clock=self.clock_for(p.cuda),
            noisy=e2e.cv > self.noise_bound,
            memory_note=note,
        )


def overhead_ratios(executor: HostExecutor, plan: Plan, rounds: int) -> dict[str, dict[str, float]]:
    """What measuring costs, per phase: the same loop (a) plain (the executor's fp32 master, no hooks),
    (b) placed by accelerate's `dispatch_model` alone (what a user's `from_pretrained(device_map=...)`
    runs), (c) timed by the executor (its counters installed, switched off). Interleaved round by
    round; the median of the per-round ratios, so that drift of the machine cancels."""
    from accelerate import dispatch_model

    if plan.mixed:
        raise BadInput("the overhead comparison takes a plan in one precision (accelerate alone does not cast between groups)")
    plain = executor.master.master.eval()
    accelerated = executor.master.model_for(plan, executor.profile, lambda loc: "cpu")
    dispatch_model(accelerated, {k: "cpu" for k in plan.device_map}, main_device="cpu",
                   skip_keys=list(plan.skip_keys), force_hooks=True)
    inputs = executor.inputs("cpu")
    prepared = executor.prepare(plan)
    if not isinstance(prepared, Prepared):
        undispatch(accelerated)
        raise RuntimeError(f"the plan does not run: {prepared.cause}")

    def timed(model):
        clock = Clock(False, cpu_time=executor.clock_for(False) == "process-cpu")
        executor.generate(model, inputs, clock)
        s = clock.finish()
        return {p: sum(s.get(p, [0.0])) for p in ("vision", "prefill")} | {"decode": statistics.fmean(s["decode"])}

    def by_executor():
        n = len(prepared.samples["e2e"])
        executor.time_once(prepared)
        return {p: prepared.samples[p][n] for p in ("vision", "prefill", "decode")}

    pairs = {"xctune_over_accelerate": (2, 1), "accelerate_over_plain": (1, 0), "xctune_over_plain": (2, 0)}
    phases = ("vision", "prefill", "decode")
    times: list = [{p: [] for p in phases} for _ in range(3)]
    runners = (lambda: timed(plain), lambda: timed(accelerated), by_executor)
    try:
        with torch_threads(executor.threads), quiet_accelerate(), torch.no_grad():
            for r in range(rounds + 2):  # two warm-up rounds; the order alternates, so neither side always goes first
                order = (0, 1, 2) if r % 2 else (2, 1, 0)
                runs = {i: runners[i]() for i in order}
                for i in range(3):
                    for p in phases:
                        if r >= 2:
                            times[i][p].append(runs[i][p])
    finally:
        executor.release(prepared)
        undispatch(accelerated)
    out: dict = {"median": {}, "fastest": {}}
    for k, (num, den) in pairs.items():
        out["median"][k] = {p: statistics.median(a / b for a, b in zip(times[num][p], times[den][p]) if b > 0)
                            for p in phases if any(times[den][p])}
        out["fastest"][k] = {p: min(times[num][p]) / min(times[den][p]) for p in phases if min(times[den][p]) > 0}
    return out


_REFUSALS: dict = {}


def _gpu_refusal(profile, plan: Plan, hd_layout) -> str:
    """What real GPUs would refuse of this plan ("" for nothing), by a minimal dry run; the verdict
    depends on the model and the plan only, so it is kept per process."""
    key = (profile.config, plan.plan_id, hd_layout)
    if key not in _REFUSALS:
        dry = virtual_run(profile, plan, Workload(prompt_tokens=2, new_tokens=2, hd_layout=hd_layout))
        bad = not dry.ok and dry.failure.kind in ("device-mismatch", "meta-copy")
        _REFUSALS[key] = f"{dry.failure.describe()} (dry run on virtual GPUs)" if bad else ""
    return _REFUSALS[key]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
