"""The exact optimum of the cost model over the search space, and the brute force that checks it.

In the virtual world a plan's end-to-end time is a sum (trace.py): compute of every call on its
device, plus every logged move whose two ends sit on different devices, each weighted by how
often its phase runs. For a fixed configuration (GPUs used, main GPU, where the embedding group
and the head sit, dtypes, offload), the only unknowns are the contiguous layer runs per GPU, and
the sum splits into per-layer terms, terms between consecutive layers at a run boundary, and
constants. Memory feasibility of a GPU depends only on its run. Dynamic programming over
(GPU, layers placed so far, GPU of the last run) then finds the best runs exactly; the
configurations are enumerated around it.

`brute_force` evaluates every plan of the space with `Trace.evaluate`; tests check that both
give the same optimum on small cases.

A target's rules (`space.rules`, targets.PlanRules) narrow what the DP may build, in three
places only: `rules.allows` filters the configurations, `rules.min_layers` is the least run
per GPU, and moves of `rules.free_move_kinds` are not priced.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from .costmodel import Efficiency, link_seconds
from .hardware import Cluster
from .placement import main_location
from .plan import Plan
from .profile import GROUPS, unit_level_weights
from .simulate import record_from_estimate
from .space import SearchSpace
from .trace import MAIN, InvalidPlan, Trace


def phase_weights(new_tokens: int) -> dict[str, float]:
    """How often each traced phase counts in the workload's end-to-end time (see costmodel.combine)."""
    steps = max(new_tokens - 1, 0)
    if new_tokens > 2:
        return {"vision": 1.0, "prefill": 1.0, "decode": steps / 2, "decode_last": steps / 2}
    return {"vision": 1.0, "prefill": 1.0, "decode": float(steps), "decode_last": 0.0}


@dataclass
class Optimum:
    plan: Plan | None
    e2e_ms: float
    configs: int
    seconds: float


class Oracle:
    def __init__(self, trace: Trace, space: SearchSpace, cluster: Cluster, eff: Efficiency = Efficiency()):
        self.trace, self.space, self.cluster, self.eff = trace, space, cluster, eff
        self.profile = trace.profile
        self.L = len(self.profile.layers)
        self.layer_hidx = np.array([trace.holder_index[u] for u in self.profile.layers])
        self.w = phase_weights(trace.workload.new_tokens)

    def dtype_choices(self):
        ds = self.space.dtypes
        if self.space.options.mixed_precision and len(ds) > 1:
            return [dict(zip(GROUPS, combo)) for combo in itertools.product(ds, repeat=3)]
        return [{g: d for g in GROUPS} for d in ds]

    def offload_choices(self):
        tiers = self.space.options.offload
        if not tiers:
            return [(0, None, "gpu")]
        out = []
        for proj in ("gpu", *tiers):
            out.append((0, None, proj))
            for tier in tiers:
                out += [(k, tier, proj) for k in range(1, self.L + 1)]
        return out

    def solve(self) -> Optimum:
        t0 = time.perf_counter()
        best_cost, best_plan, configs = math.inf, None, 0
        for dtypes in self.dtype_choices():
            ctx = _Context(self, dtypes)
            for n in range(1, self.space.n_gpus + 1):
                for k, tier, proj in self.offload_choices():
                    for m in range(n):
                        for e in range(m, n):
                            if proj != "gpu" and e != 0:
                                continue  # an offloaded vision_proj runs on the main GPU: embeddings must be there
                            for h in range(m, n):
                                if not self.space.rules.allows(n, m, e, h):
                                    continue
                                configs += 1
                                cost, counts = ctx.best_runs(n, m, e, h, k, tier, proj)
                                if cost < best_cost:
                                    best_cost = cost
                                    best_plan = self.space.build(counts, e, h, dtypes, k, tier, proj, label="optimum")
        return Optimum(best_plan, best_cost * 1e3, configs, time.perf_counter() - t0)


class _Context:
    """Everything about one dtype choice that the configurations share."""

    def __init__(self, oracle: Oracle, dtypes: dict):
        self.o, self.dtypes = oracle, dtypes
        tr, prof = oracle.trace, oracle.profile
        probe = Plan({u.name: 0 for u in prof.units}, dtypes, oracle.space.options.skip_keys)
        self.rec = rec = tr.recording(probe)
        self.n_dev = len(oracle.cluster.gpus)
        calls = rec.run.calls
        self.wc = np.array([oracle.w.get(c.phase, 0.0) for c in calls])
        holder_dtype = [dtypes["lm"]] + [dtypes[prof.group_of(u)] for u in tr.units]
        # S[c, d]: weighted seconds of call c on GPU d
        self.S = np.zeros((len(calls), self.n_dev))
        for d in range(self.n_dev):
            gpu = oracle.cluster.gpus[d]
            for i in range(len(calls)):
                self.S[i, d] = self.wc[i] * tr.call_seconds(probe, i, gpu, holder_dtype[rec.holder[i]], oracle.eff)
        self.layer_of_holder = {int(h): i for i, h in enumerate(oracle.layer_hidx)}
        self.call_layer = np.array([self.layer_of_holder.get(int(h), -1) for h in rec.holder])
        self.unit_w = {u.name: (u.param_bytes(dtypes[u.group]), u.buffer_bytes(dtypes[u.group])) for u in prof.units}
        self._cache: dict = {}

    # --- per configuration -----------------------------------------------------------------
    def holder_devices(self, m, e, h, k, tier, proj):
        """Devices of the holders that do not depend on the layer runs; -1 for GPU layers."""
        tr, prof = self.o.trace, self.o.profile
        dev = np.full(len(tr.holders), -1)
        dev[tr.holder_index[MAIN]] = m
        for u in prof.units:
            i = tr.holder_index[u.name]
            if u.is_parameter:
                dev[i] = m
            elif u.name in ("vit", "model.tok_embeddings"):
                dev[i] = e
            elif u.name == "vision_proj":
                dev[i] = e if proj == "gpu" else m
            elif u.name in ("model.norm", "output"):
                dev[i] = h
        for ℓ in range(k):
            dev[self.o.layer_hidx[ℓ]] = m
        return dev

    def best_runs(self, n, m, e, h, k, tier, proj):
        o, rec, L = self.o, self.rec, self.o.L
        dev = self.holder_devices(m, e, h, k, tier, proj)
        for _, locs, _ in rec.run.joins:  # the co-location rule, as the trace saw it
            if len({int(dev[o.trace.holder_index[x]]) for x in locs}) > 1:
                return math.inf, None
        fixed = dev >= 0
        offloaded = np.zeros(len(dev), dtype=bool)
        if proj != "gpu":
            offloaded[o.trace.holder_index["vision_proj"]] = True
        offloaded[o.layer_hidx[:k]] = True

        # compute: fixed holders are constant, GPU layers cost per (layer, device)
        call_fixed = fixed[rec.holder]
        const = float(self.S[call_fixed, dev[rec.holder[call_fixed]]].sum())
        layer_cost = np.zeros((L, self.n_dev))
        np.add.at(layer_cost, self.call_layer[~call_fixed], self.S[~call_fixed])

        # moves: constant, per layer (one fixed end), or at a run boundary (consecutive layers)
        pair = {}  # layer j -> weighted bytes per phase of the moves between layers j-1 and j, by direction
        free = o.space.rules.free_move_kinds
        for idx, mv in enumerate(rec.run.moves):
            s, d = int(rec.move_src[idx]), int(rec.move_dst[idx])
            wgt, nbytes = o.w.get(mv.phase, 0.0), int(rec.move_bytes[idx])
            if not wgt or mv.kind in free:
                continue
            if fixed[s] and fixed[d]:
                const += wgt * link_seconds(o.cluster, int(dev[s]), int(dev[d]), nbytes)
            elif fixed[s] or fixed[d]:
                ℓ = self.layer_of_holder[d if fixed[s] else s]
                other = int(dev[s] if fixed[s] else dev[d])
                for x in range(self.n_dev):
                    a, b = (other, x) if fixed[s] else (x, other)
                    layer_cost[ℓ, x] += wgt * link_seconds(o.cluster, a, b, nbytes)
            else:
                ls, ld = self.layer_of_holder[s], self.layer_of_holder[d]
                if abs(ls - ld) != 1:
                    raise RuntimeError("a move between non-adjacent layers: the dynamic programme does not apply")
                pair.setdefault(max(ls, ld), []).append((wgt, nbytes, ls < ld))
        for i in np.nonzero(offloaded[rec.holder] & (rec.weight_bytes > 0))[0]:
            t = tier if self.call_layer[i] >= 0 else proj
            for chunk in rec.run.calls[i].weight_chunks:
                const += self.wc[i] * link_seconds(o.cluster, t, m, chunk)
        cum = np.vstack([np.zeros(self.n_dev), np.cumsum(layer_cost, axis=0)])

        def pair_cost(j, a, b):
            return sum(w * link_seconds(o.cluster, a if fwd else b, b if fwd else a, nb) for w, nb, fwd in pair.get(j, ()))

        # dynamic programme over devices m..n-1
        states = {(k, m if k > 0 else None): (0.0, [])}
        for i in range(m, n):
            nxt: dict = {}
            for (j, last), (cost, counts) in states.items():
                ok = self.feasible(i, j, dev, offloaded, m, proj)
                least = o.space.rules.min_layers
                choices = range(least, L - j + 1) if i < n - 1 else [L - j] if L - j >= least else []
                for c in choices:
                    if not ok[j + c]:
                        continue
                    if i == m and c == 0 and m not in (e, h):
                        continue  # the main device must hold something
                    add = float(cum[j + c, i] - cum[j, i])
                    if c > 0 and last is not None and last != i:
                        add += pair_cost(j, last, i)
                    key = (j + c, i if c > 0 else last)
                    if key not in nxt or cost + add < nxt[key][0]:
                        nxt[key] = (cost + add, counts + [c])
            states = nxt
        best = min(((c, cnt) for (j, _), (c, cnt) in states.items() if j == L), default=(math.inf, None), key=lambda x: x[0])
        if best[1] is None:
            return math.inf, None
        counts = [0] * m + best[1]
        return const + best[0], counts

    def feasible(self, i, a, dev, offloaded, m, proj) -> np.ndarray:
        """For GPU i running layers [a, b): does it fit, for every b >= a (index b)."""
        key = (i, a, tuple(dev), m, proj)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        o, rec, L = self.o, self.rec, self.o.L
        on_i = dev == i
        base = rec.live[:, on_i].sum(axis=1)
        T = rec.transient + np.where(offloaded[rec.holder], rec.weight_chunk_max, 0.0)
        call_on_i = on_i[rec.holder]
        base = base + np.where(call_on_i, T, 0.0)
        gpu_layer = self.call_layer >= 0
        gpu_layer &= dev[rec.holder] < 0
        live_layers = rec.live[:, o.layer_hidx]  # [C, L]
        cum_live = np.hstack([np.zeros((len(base), 1)), np.cumsum(live_layers, axis=1)])
        G = np.zeros((len(base), L + 1))
        for x in range(L + 1):
            G[:, x] = np.where(gpu_layer & (self.call_layer < x), T, 0.0)
        seg = (cum_live - cum_live[:, [a]]) + (G - G[:, [a]])
        peak = (base[:, None] + seg).max(axis=0)  # [L + 1]
        # weights on GPU i: fixed units there, plus the run's layers
        w_fixed = 0
        prof = o.profile
        for u in prof.units:
            hd = dev[o.trace.holder_index[u.name]]
            if hd < 0:
                continue
            p, b = self.unit_w[u.name]
            param_here = (hd == i) and not offloaded[o.trace.holder_index[u.name]]
            w_fixed += (p if param_here else 0) + (b if hd == i else 0)
        layer_w = np.array([sum(self.unit_w[u]) for u in prof.layers], dtype=np.float64)
        cum_w = np.concatenate([[0.0], np.cumsum(layer_w)])
        weights = w_fixed + (cum_w - cum_w[a])
        ok = weights + peak <= o.cluster.usable_bytes(i)
        ok[:a] = False
        self._cache[key] = ok
        return ok


def feasible_e2e(trace: Trace, plan: Plan, cluster: Cluster, eff: Efficiency, free_move_kinds=()) -> float | None:
    """End-to-end seconds of a plan that runs and fits, else None (the verdict a search trial gets)."""
    try:
        est = trace.evaluate(plan, cluster, eff, free_move_kinds)
    except InvalidPlan:
        return None
    placed = trace.unit_devices(plan)
    weights = unit_level_weights(trace.profile, placed, plan.dtypes, main_location(placed))
    return est.e2e_s if record_from_estimate(est, plan, trace.profile, cluster, trace.workload, weights).ok else None


def brute_force(trace: Trace, space: SearchSpace, cluster: Cluster, eff: Efficiency = Efficiency()) -> Optimum:
    """Every plan of the space through `Trace.evaluate` (small cases only)."""
    t0 = time.perf_counter()
    oracle = Oracle(trace, space, cluster, eff)
    L = oracle.L
    best, best_plan, count = math.inf, None, 0
    for dtypes in oracle.dtype_choices():
        for n in range(1, space.n_gpus + 1):
            for k, tier, proj in oracle.offload_choices():
                for counts in _compositions(L - k, n):
                    if min(counts) < space.rules.min_layers:
                        continue
                    for e in range(n):
                        for h in range(n):
                            if not space.rules.allows(n, 0, e, h):
                                continue
                            plan = space.build(list(counts), e, h, dtypes, k, tier, proj)
                            count += 1
                            e2e = feasible_e2e(trace, plan, cluster, eff, space.rules.free_move_kinds)
                            if e2e is not None and e2e < best:
                                best, best_plan = e2e, plan
    return Optimum(best_plan, best * 1e3, count, time.perf_counter() - t0)


def _compositions(total: int, parts: int):
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def rank_plans(trace: Trace, space: SearchSpace, cluster: Cluster, eff: Efficiency, k: int, limit: int = 3000,
               seed: int = 0) -> list[Plan]:
    """The k best feasible plans of the space by the cost model (all of them if the space is small,
    else `limit` drawn at random)."""
    import random

    oracle = Oracle(trace, space, cluster, eff)
    L = oracle.L
    candidates = [
        (dtypes, n, off, counts, e, h)
        for dtypes in oracle.dtype_choices()
        for n in range(1, space.n_gpus + 1)
        for off in oracle.offload_choices()
        for counts in _compositions(L - off[0], n)
        for e in range(n)
        for h in range(n)
        if (off[2] == "gpu" or e == 0) and space.rules.allows(n, 0, e, h) and min(counts) >= space.rules.min_layers
    ] if _space_size(oracle) <= limit else None
    rng = random.Random(seed)
    if candidates is None:
        candidates = []
        for _ in range(limit):
            dtypes = rng.choice(oracle.dtype_choices())
            n = rng.randint(1, space.n_gpus)
            off = rng.choice(oracle.offload_choices())
            cuts = sorted(rng.randint(0, L - off[0]) for _ in range(n - 1))
            counts = [b - a for a, b in zip([0, *cuts], [*cuts, L - off[0]])]
            e = 0 if off[2] != "gpu" else rng.randrange(n)
            h = rng.randrange(n)
            if space.rules.first_and_last:
                e, h = 0, n - 1
            if space.rules.allows(n, 0, e, h) and min(counts) >= space.rules.min_layers:
                candidates.append((dtypes, n, off, counts, e, h))
    scored = {}
    for dtypes, n, (kk, tier, proj), counts, e, h in candidates:
        plan = space.build(list(counts), e, h, dtypes, kk, tier, proj)
        e2e = feasible_e2e(trace, plan, cluster, eff, space.rules.free_move_kinds)
        if e2e is not None:
            scored.setdefault(plan.plan_id, (e2e, plan))
    return [p for _, p in sorted(scored.values(), key=lambda x: x[0])[:k]]


def _space_size(oracle: Oracle) -> int:
    n_dt = len(oracle.dtype_choices())
    total = 0
    for n in range(1, oracle.space.n_gpus + 1):
        for kk, _, _ in oracle.offload_choices():
            total += math.comb(oracle.L - kk + n - 1, n - 1) * n * n * n_dt
    return total
