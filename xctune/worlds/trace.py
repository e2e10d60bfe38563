"""Trace once, evaluate many (design.md §3).

A dry run costs seconds; a search wants thousands of evaluations. The trace of one workload
through the model depends on a plan only through *where* each unit runs. So the model is run
once per element width (fp32, and 16-bit for fp16/bf16) with every unit on a logical device of
its own (all sharing one virtual GPU): the counters then log every tensor that crosses a unit
boundary, the recorder prices every op per unit call and samples live memory per unit at every
call boundary, and the top-level ops that join outputs of several units are noted.

Evaluating a plan is then arithmetic over that record:
- a join whose inputs come from units on different devices is the device-mismatch error;
- a logged move is a transfer exactly when its two units sit on different devices (this includes
  the copies a model makes itself to align a top-level op's operands, where a dry run shows it does);
- an offloaded unit streams the weights its call reads, and runs on the main device;
- time: each call's ops priced on its device (cached per call, GPU kind and dtype);
- memory: per device, the most live bytes over the call boundaries of the units it holds.

The full dry run (virtual.py) stays the judge; tests check that this arithmetic gives the same
transfers as a dry run of the plan itself, and memory within a stated tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..plans.constraints import offloadable
from .costmodel import Efficiency, Estimate, OpTable, combine
from ..hardware import Cluster
from ..errors import BadInput
from .placement import OFFLOAD_TIERS, main_location, require_gpu
from ..plans.plan import Plan, resolve
from ..models.profile import DTYPE_BYTES, GROUPS, ModelProfile, unit_level_weights
from .virtual import VirtualRun, virtual_run
from ..workload import Workload

MAIN = "<main>"  # the logical device of the root (top-level code) in a trace
WIDTH_DTYPE = {4: "fp32", 2: "fp16"}


class InvalidPlan(Exception):
    """The plan cannot run; `kind` and the message say why (as a dry run would)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class _Recording:
    """One traced run (one width per precision group) as arrays."""

    run: VirtualRun
    tables: list[OpTable]
    holder: np.ndarray  # [calls]: index of the holder each call runs as
    live: np.ndarray  # [calls, holders]: bytes alive per holder when each call began
    transient: np.ndarray  # [calls]: extra bytes the call's own holder reached inside it
    weight_bytes: np.ndarray  # [calls]: parameter bytes each call read (its offload streams, summed)
    weight_chunk_max: np.ndarray  # [calls]: the largest one module's parameters (held at once when offloaded)
    move_src: np.ndarray
    move_dst: np.ndarray
    move_bytes: np.ndarray
    kv: np.ndarray  # [holders]: KV cache bytes at full length


class Trace:
    def __init__(
        self,
        profile: ModelProfile,
        workload: Workload,
        cache_dir: Path | None = None,
    ):
        self.profile, self.workload = profile, workload
        self.cache_dir = cache_dir
        self.units = [u.name for u in profile.units]
        self.holders = [MAIN, *self.units]
        self.holder_index = {h: i for i, h in enumerate(self.holders)}
        # units whose weights are one tied tensor (a head tied to the embeddings): one device, or a real run fails
        self.tied_units = [tuple(dict.fromkeys(profile.unit_of(p) for p in group)) for group in profile.tied]
        self.tied_units = [g for g in self.tied_units if len(g) > 1 and all(u in self.holder_index for u in g)]
        self._recordings: dict[tuple, _Recording] = {}
        self._price_cache: dict[tuple, np.ndarray] = {}
        self.seconds = 0.0  # spent recording

    # --- recording --------------------------------------------------------------------------
    def recording(self, plan: Plan) -> _Recording:
        """The trace for the plan's widths (fp16 and bf16 share one: same shapes, same bytes) and skip keys."""
        widths = tuple(DTYPE_BYTES[plan.dtypes[g]] for g in GROUPS)
        key = (widths, tuple(plan.skip_keys))
        if key not in self._recordings:
            self._recordings[key] = self._cached(key, lambda: self._record(
                {g: WIDTH_DTYPE[w] for g, w in zip(GROUPS, widths)}, plan.skip_keys))
        return self._recordings[key]

    def _cached(self, key, make):
        """Recordings are pure functions of (model, workload, widths, skip keys, versions): keep them on disk,
        as data only (trace_cache.py); a file there that is not a valid entry is ignored and recorded again."""
        if self.cache_dir is None:
            return make()
        from . import trace_cache

        trace_cache.warn_foreign_files(self.cache_dir)
        ident = trace_cache.cache_key(self.profile.config, self.workload, *key)
        path = trace_cache.entry_path(self.cache_dir, ident)
        run = trace_cache.load(path, ident, self.workload)
        if run is not None:
            try:
                return self._arrays(run)
            except (KeyError, IndexError, ValueError, TypeError) as e:
                trace_cache.log.warning(f"xctune: warning: ignoring {path}: its run does not fit this model ({e!r:.120}); recording it again")
        rec = make()
        try:
            trace_cache.save(path, ident, rec.run)
        except OSError as e:  # a cache that cannot be written costs time, not the answer
            trace_cache.log.warning(f"xctune: warning: cannot write the trace cache {path}: {e.strerror or e}")
        return rec

    def _record(self, dtypes: dict[str, str], skip_keys) -> _Recording:
        units = {u: 0 for u in self.units}
        run = virtual_run(
            self.profile,
            Plan(units, dtypes, tuple(skip_keys)),
            self.workload,
            physical_map=units,
            locations={u: u for u in self.units},
            main_loc=MAIN,
        )
        if not run.ok:
            raise RuntimeError(f"the trace itself failed: {run.failure.describe()}")
        self.seconds += run.seconds
        run.calls = [c for c in run.calls if c.phase != "setup"]
        from ..plans.constraints import confirmed_locations

        # A join a dry run does not confirm is the model aligning the operands itself (transformers' native
        # classes: `image_features.to(inputs_embeds.device)`), a no-op here where every unit shares one
        # physical device: its copies become logged moves, from each operand's unit to the result's, priced
        # like any other where the two sit on different GPUs. What the model copies without a join (a mask
        # sent to the embeddings' GPU, a tensor sent to `self.device`) a trace cannot see: README, Known limits.
        kept = [k if len(k) > 1 else () for k in confirmed_locations(self.profile, run.joins)]
        aligned = [m for j, m in run.join_moves if m.src not in kept[j]]  # a joined operand stays: one device
        run.moves = [m for m in run.moves + aligned if m.phase != "setup"]
        run.joins = [(op, k, phase) for (op, _, phase), k in zip(run.joins, kept) if len(k) > 1]
        run.join_moves = []  # now moves or joins
        return self._arrays(run)

    def _arrays(self, run: VirtualRun) -> _Recording:
        """The recording's arrays, from a run (fresh, or read back from the cache)."""
        calls, moves = run.calls, run.moves
        live = np.zeros((len(calls), len(self.holders)))
        transient = np.zeros(len(calls))
        for i, c in enumerate(calls):
            for h, n in c.live_at_entry.items():
                live[i, self.holder_index[h]] = n
            transient[i] = c.peak_inside - c.live_at_entry.get(c.loc, 0)
        kv = np.zeros(len(self.holders))
        for h, n in run.kv_bytes.items():
            kv[self.holder_index[h]] = n
        return _Recording(
            run,
            [OpTable.of(c) for c in calls],
            np.array([self.holder_index[c.loc] for c in calls], dtype=int),
            live,
            transient,
            np.array([sum(c.weight_chunks) for c in calls], dtype=np.float64),
            np.array([max(c.weight_chunks, default=0) for c in calls], dtype=np.float64),
            np.array([self.holder_index[m.src] for m in moves], dtype=int),
            np.array([self.holder_index[m.dst] for m in moves], dtype=int),
            np.array([m.nbytes for m in moves], dtype=np.int64),
            kv,
        )

    def joins_main(self, units, dtype: str) -> bool:
        """Whether a top-level join ties one of `units` to the root's own tensors (the main device):
        then they must sit on the main GPU (embeddings indexed by a mask the root made, design.md §8). Joins do not depend
        on widths: the trace of `dtype` answers."""
        probe = Plan({u: 0 for u in self.units}, {g: dtype for g in GROUPS})
        return any(MAIN in locs and set(locs) & set(units) for _, locs, _ in self.recording(probe).run.joins)

    # --- evaluation -------------------------------------------------------------------------
    def unit_devices(self, plan: Plan) -> dict[str, object]:
        dmap = plan.device_map
        if all(u in dmap for u in self.units) and len(dmap) == len(self.units):
            return dict(dmap)
        res = resolve(dmap, self.profile)
        if res.uncovered or res.unknown_keys:
            raise InvalidPlan("error", "the map does not place every unit exactly once")
        out = {}
        for u in self.units:
            d = res.device_of_unit(u)
            if d is None:
                raise InvalidPlan("error", f"{u} is split across devices; only a dry run can price that")
            out[u] = d
        return out

    def evaluate(self, plan: Plan, cluster: Cluster, eff: Efficiency = Efficiency(),
                 free_move_kinds: tuple[str, ...] = (), tied_copies: bool = False) -> Estimate:
        """Simulated latency, transfers and memory of `plan`; InvalidPlan if it cannot run.

        `free_move_kinds`: logged moves the target engine does not make; `tied_copies`: the engine
        copies a tied weight to each device that uses it, so its units may sit apart (targets.PlanRules;
        the copies' bytes are in `weights`)."""
        placed = self.unit_devices(plan)
        main = main_location(placed)
        try:
            require_gpu(placed)
        except BadInput as e:
            raise InvalidPlan("error", str(e)) from None
        for u, d in placed.items():
            if isinstance(d, int) and d >= len(cluster.gpus):
                raise InvalidPlan("error", f"{u} is on cuda:{d}, outside the cluster")
            if d in OFFLOAD_TIERS and not offloadable(self.profile, u):
                raise InvalidPlan("meta-copy", f"{u} cannot be offloaded: Cannot copy out of meta tensor")
        root = set(self.profile.root_parameters)
        # where each holder executes: offloaded units and root parameters run on the main device
        exec_dev = np.array(
            [main] + [main if (placed[u] in OFFLOAD_TIERS or u in root) else placed[u] for u in self.units]
        )
        offloaded = np.array([False] + [placed[u] in OFFLOAD_TIERS for u in self.units])
        tier = [None] + [placed[u] if placed[u] in OFFLOAD_TIERS else None for u in self.units]
        for group in () if tied_copies else self.tied_units:
            devs = {exec_dev[self.holder_index[u]] for u in group}
            if len(devs) > 1:
                names = ", ".join(f"{u} on cuda:{exec_dev[self.holder_index[u]]}" for u in group)
                raise InvalidPlan("device-mismatch", f"Expected all tensors to be on the same device (one tied weight "
                                                     f"for {names}: accelerate keeps it on the head's device)")
        rec = self.recording(plan)
        for op, locs, _ in rec.run.joins:
            devs = {int(exec_dev[self.holder_index[x]]) for x in locs}
            if len(devs) > 1:
                names = ", ".join(f"{x} on cuda:{exec_dev[self.holder_index[x]]}" for x in locs)
                raise InvalidPlan(
                    "device-mismatch",
                    f"Expected all tensors to be on the same device (top-level {op} joins {names})",
                )
        calls = rec.run.calls
        call_dev = exec_dev[rec.holder]

        # time: each call priced on its GPU, in the dtype of its unit's group
        call_dtype = self.call_dtypes(plan)
        phase_compute: dict[str, float] = {}
        device_compute: dict[tuple, float] = {}
        for i, c in enumerate(calls):
            secs = self.call_seconds(plan, i, cluster.gpus[call_dev[i]], call_dtype[i], eff)
            phase_compute[c.phase] = phase_compute.get(c.phase, 0.0) + secs
            key = (c.phase, int(call_dev[i]))
            device_compute[key] = device_compute.get(key, 0.0) + secs

        # moves: logged crossings whose two ends sit on different devices, plus offload streams
        src, dst = exec_dev[rec.move_src], exec_dev[rec.move_dst]
        moved = np.nonzero(src != dst)[0]
        if free_move_kinds:
            moved = [k for k in moved if rec.run.moves[k].kind not in free_move_kinds]
        moves = [(rec.run.moves[k].phase, int(src[k]), int(dst[k]), int(rec.move_bytes[k]), rec.run.moves[k].kind) for k in moved]
        for i in np.nonzero(offloaded[rec.holder] & (rec.weight_bytes > 0))[0]:
            # one load per module that owns parameters, as accelerate's offload hooks do it
            moves.extend((calls[i].phase, tier[rec.holder[i]], main, n, "weights") for n in calls[i].weight_chunks)
        est = combine(phase_compute, moves, cluster, self.workload.new_tokens, eff, device_compute)

        # memory: live bytes per device at every call boundary, plus the call's own transient
        n_dev = len(cluster.gpus)
        onehot = np.zeros((len(self.holders), n_dev))
        onehot[np.arange(len(self.holders)), exec_dev] = 1.0
        per_dev = rec.live @ onehot
        # an offloaded unit holds one module's weights at a time: accelerate drops each after its forward
        extra = rec.transient + np.where(offloaded[rec.holder], rec.weight_chunk_max, 0.0)
        per_dev[np.arange(len(calls)), call_dev] += extra
        peak = per_dev.max(axis=0)
        est.peak_bytes = {d: int(peak[d]) for d in range(n_dev) if peak[d] > 0}
        kv = rec.kv @ onehot
        est.kv_bytes = {d: int(kv[d]) for d in range(n_dev) if kv[d] > 0}
        return est

    def call_dtypes(self, plan: Plan) -> list[str]:
        """The dtype each call of the plan's recording runs in: its unit's group's (the root's: the lm's)."""
        rec = self.recording(plan)
        dtype_of = [plan.dtypes["lm"]] + [plan.dtypes[self.profile.group_of(u)] for u in self.units]
        return [dtype_of[h] for h in rec.holder]

    def call_seconds(self, plan: Plan, i: int, gpu, dtype: str, eff: Efficiency) -> float:
        """Seconds of call `i` of the plan's recording on `gpu` in `dtype` (cached per GPU kind and dtype)."""
        rec = self.recording(plan)
        key = (id(rec), gpu, dtype, eff)
        vec = self._price_cache.get(key)
        if vec is None:
            vec = np.array([t.seconds(gpu, dtype, eff) for t in rec.tables])
            self._price_cache[key] = vec
        return float(vec[i])

    def weights(self, plan: Plan, tied_copies: bool = False) -> dict:
        placed = self.unit_devices(plan)
        return unit_level_weights(self.profile, placed, plan.dtypes, main_location(placed), tied_copies)

