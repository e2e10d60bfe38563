"""The exact optimum of the cost model over the search space, and the brute force that checks it.

In the virtual world a plan's end-to-end time is a sum (trace.py): compute of every call on its
device, plus every logged move whose two ends sit on different devices, each weighted by how
often its phase runs. Every GPU-to-GPU move crosses the same link, so a move costs its link time
exactly when its two ends are on *different* GPUs; which two does not matter.

That makes the sum local to each GPU. A plan is a walk through the GPUs in cluster order: each
GPU is unused, or holds one contiguous run of decoder layers and some of three *roles* — main
(the root, root parameters and everything offloaded run there: the lowest GPU used), embed (the
co-location group) and head. Write every move between different things as "always paid, minus a
refund where both ends share a GPU": the refunds for role-role and role-layer moves depend only
on what one GPU holds, and a move between consecutive layers is paid where a run starts. Compute
and memory are per GPU too. So one dynamic programme over (GPUs so far, layers placed, roles
placed) finds the best plan of a dtype and offload choice; its cost is GPUs x 8 x 8 min-plus
products of (L+1)^2 matrices, and the matrices depend only on the GPU's kind (identical GPUs
share them). Memory feasibility of a GPU depends only on its run and roles.

`brute_force` evaluates every plan of the space with `Trace.evaluate`; tests check that both
give the same optimum on small cases.

A target's rules (`space.rules`, targets.PlanRules) narrow what the programme may build, in
three places only: moves of `rules.free_move_kinds` are not priced (`_moves`), a GPU's run holds
at least `rules.min_layers` layers (`step_costs`), and `rules.first_and_last` makes the walk a
pipeline (`solve`): GPU 0 holds the main and embedding roles, the GPUs used follow each other
without a gap, and the head's GPU is the last one used.
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

MAIN_ROLE, EMBED_ROLE, HEAD_ROLE = 1, 2, 4  # role bits of a GPU's holdings
ROLE_BITS = (MAIN_ROLE, EMBED_ROLE, HEAD_ROLE)
ALL_ROLES = MAIN_ROLE | EMBED_ROLE | HEAD_ROLE


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
    configs: int  # dynamic programmes solved (one per dtype and offload choice); plans, for brute force
    seconds: float


@dataclass(frozen=True)
class Offload:
    """Leading decoder layers on a tier (they run on the main GPU) and where the projectors live."""

    layers: int = 0
    tier: str | None = None
    proj: str = "gpu"


class Oracle:
    def __init__(self, trace: Trace, space: SearchSpace, cluster: Cluster, eff: Efficiency = Efficiency()):
        self.trace, self.space, self.cluster, self.eff = trace, space, cluster, eff
        self.profile = trace.profile
        self.L = len(self.profile.layers)
        self.layer_hidx = np.array([trace.holder_index[u] for u in self.profile.layers])
        self.w = phase_weights(trace.workload.new_tokens)
        self.gpus = cluster.gpus[: space.n_gpus]

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
        for proj in ("gpu", *tiers) if self.space.projectors else ("gpu",):
            out.append((0, None, proj))
            for tier in tiers:
                out += [(k, tier, proj) for k in range(1, self.L + 1)]
        return out

    def gpu_link(self):
        """The one link every GPU-to-GPU move crosses (the programme relies on there being one)."""
        n = len(self.gpus)
        links = {self.cluster.link_between(a, b) for a in range(n) for b in range(n) if a != b}
        if len(links) > 1:
            raise RuntimeError("the GPUs are joined by links of different kinds: the dynamic programme "
                               "assumes one GPU-to-GPU link")
        return links.pop() if links else None

    def solve(self) -> Optimum:
        t0 = time.perf_counter()
        link = self.gpu_link()
        best_cost, best_plan, programmes = math.inf, None, 0
        for dtypes in self.dtype_choices():
            tables = _DtypeTables(self, dtypes)
            for k, tier, proj in self.offload_choices():
                programmes += 1
                cost, walk = _Programme(tables, Offload(k, tier, proj), link).solve()
                if cost < best_cost:
                    best_cost = cost
                    best_plan = self._plan(walk, dtypes, Offload(k, tier, proj))
        return Optimum(best_plan, best_cost * 1e3, programmes, time.perf_counter() - t0)

    def _plan(self, walk, dtypes, off: Offload) -> Plan:
        """A plan from the programme's walk: per GPU, (layers held, roles held)."""
        counts = [c for c, _ in walk]
        embed = next(i for i, (_, r) in enumerate(walk) if r & EMBED_ROLE)
        head = next(i for i, (_, r) in enumerate(walk) if r & HEAD_ROLE)
        return self.space.build(counts, embed, head, dtypes, off.layers, off.tier, off.proj, label="optimum")


class _DtypeTables:
    """What every programme of one dtype choice shares: priced calls per GPU kind, weights, recording."""

    def __init__(self, oracle: Oracle, dtypes: dict):
        self.o, self.dtypes = oracle, dtypes
        tr, prof = oracle.trace, oracle.profile
        probe = Plan({u.name: 0 for u in prof.units}, dtypes, oracle.space.options.skip_keys)
        self.rec = rec = tr.recording(probe)
        calls = rec.run.calls
        self.call_weight = np.array([oracle.w.get(c.phase, 0.0) for c in calls])
        holder_dtype = [dtypes["lm"]] + [dtypes[prof.group_of(u)] for u in tr.units]
        self.kinds = list(dict.fromkeys(oracle.gpus))  # identical GPUs share every table
        # seconds[kind][c]: weighted seconds of call c on a GPU of that kind
        self.seconds = {
            g: self.call_weight * np.array([tr.call_seconds(probe, i, g, holder_dtype[rec.holder[i]], oracle.eff)
                                            for i in range(len(calls))])
            for g in self.kinds
        }
        self.unit_bytes = {u.name: (u.param_bytes(dtypes[u.group]), u.buffer_bytes(dtypes[u.group])) for u in prof.units}


class _Programme:
    """The dynamic programme for one dtype and offload choice (see the module docstring)."""

    def __init__(self, tables: _DtypeTables, off: Offload, link):
        self.t, self.off, self.link = tables, off, link
        o = tables.o
        self.o, self.rec, self.L, self.k = o, tables.rec, o.L, off.layers
        self._roles()
        self._moves()

    # --- what each holder is ---------------------------------------------------------------
    def _roles(self):
        """role[h]: the role bit of holder h, or 0 for a decoder layer on a GPU (layer[h] says which)."""
        o, tr, off = self.o, self.o.trace, self.off
        H = len(tr.holders)
        self.role = np.zeros(H, dtype=int)
        self.layer = np.full(H, -1)
        self.offloaded = np.zeros(H, dtype=bool)
        self.role[tr.holder_index[MAIN]] = MAIN_ROLE
        for u in o.profile.units:
            if u.is_parameter:
                self.role[tr.holder_index[u.name]] = MAIN_ROLE  # accelerate runs root parameters on the main GPU
        for name in o.space.group_units["embed"]:
            if not o.profile.by_name[name].is_parameter:
                self.role[tr.holder_index[name]] = EMBED_ROLE
        for name in o.space.group_units["head"]:
            self.role[tr.holder_index[name]] = HEAD_ROLE
        if off.proj != "gpu":
            for name in o.space.projectors:
                self.role[tr.holder_index[name]] = MAIN_ROLE
                self.offloaded[tr.holder_index[name]] = True
        for ℓ, h in enumerate(o.layer_hidx):
            if ℓ < self.k:
                self.role[h], self.offloaded[h] = MAIN_ROLE, True
            else:
                self.layer[h] = ℓ
        # roles that a top-level join needs on one GPU (the co-location rule, as the trace saw it)
        self.joined = []
        for _, locs, _ in self.rec.run.joins:
            hs = [tr.holder_index[x] for x in locs]
            if any(self.layer[h] >= 0 for h in hs):
                raise RuntimeError("a top-level join takes a decoder layer's output: the dynamic programme does not apply")
            bits = 0
            for h in hs:
                bits |= int(self.role[h])
            if bin(bits).count("1") > 1:
                self.joined.append(bits)
        if o.space.head_with_embed and not o.space.rules.first_and_last:
            self.joined.append(EMBED_ROLE | HEAD_ROLE)  # one tied tensor: accelerate keeps it on one device

    # --- moves: always paid, minus refunds where both ends share a GPU -----------------------
    def _moves(self):
        o, rec, L = self.o, self.rec, self.L
        self.const = 0.0
        self.role_pair = {}  # (bits of two roles) -> seconds refunded when one GPU holds both
        self.role_layer = np.zeros((8, L))  # [role bit, layer] -> seconds refunded when they share a GPU
        self.boundary = np.zeros(L + 1)  # [j] -> seconds paid when a run starts at layer j > k
        for idx, mv in enumerate(rec.run.moves):
            s, d = int(rec.move_src[idx]), int(rec.move_dst[idx])
            wgt = o.w.get(mv.phase, 0.0)
            if not wgt or mv.kind in o.space.rules.free_move_kinds:
                continue
            secs = wgt * self.link.transfer_seconds(int(rec.move_bytes[idx]), o.eff.gpu_link) if self.link else 0.0
            rs, rd, ls, ld = self.role[s], self.role[d], self.layer[s], self.layer[d]
            if rs and rd:
                if rs != rd:
                    self.const += secs
                    key = rs | rd
                    self.role_pair[key] = self.role_pair.get(key, 0.0) + secs
            elif rs or rd:
                self.const += secs
                self.role_layer[rs or rd, ld if rs else ls] += secs
            elif ls != ld:
                if abs(ls - ld) != 1:
                    raise RuntimeError("a move between non-adjacent layers: the dynamic programme does not apply")
                self.boundary[max(ls, ld)] += secs
        calls = rec.run.calls
        layer_holders = set(o.layer_hidx.tolist())
        for i in np.nonzero(self.offloaded[rec.holder] & (rec.weight_bytes > 0))[0]:
            tier = self.off.tier if int(rec.holder[i]) in layer_holders else self.off.proj
            for chunk in calls[i].weight_chunks:  # streamed to the main GPU at every call: the same link for any GPU
                self.const += self.t.call_weight[i] * link_seconds(o.cluster, tier, 0, chunk, o.eff)
        self.role_layer_cum = np.hstack([np.zeros((8, 1)), np.cumsum(self.role_layer, axis=1)])

    # --- one GPU: the cost of holding roles R and layers [a, b) ------------------------------
    def step_costs(self, gpu) -> dict[int, np.ndarray]:
        """For each allowed role set R: an (L+1) x (L+1) matrix of seconds, [a, b] for the run [a, b) (inf: not allowed)."""
        t, L, k = self.t, self.L, self.k
        sec = t.seconds[gpu]
        call_layer = self.layer[self.rec.holder]
        layer_sec = np.zeros(L)
        np.add.at(layer_sec, call_layer[call_layer >= 0], sec[call_layer >= 0])
        layer_cum = np.concatenate([[0.0], np.cumsum(layer_sec)])
        role_sec = {bit: float(sec[self.role[self.rec.holder] == bit].sum()) for bit in ROLE_BITS}
        a = np.arange(L + 1)[:, None]
        b = np.arange(L + 1)[None, :]
        run = layer_cum[b] - layer_cum[a] + np.where((b > a) & (a > k), self.boundary[np.minimum(a, L)], 0.0)
        valid = (b >= a) & (a >= k)
        out = {}
        for R in range(8):
            if any(R & j and R & j != j for j in self.joined):
                continue  # a join split across GPUs
            cost = run.copy()
            for bit in ROLE_BITS:
                if R & bit:
                    cost += role_sec[bit] - (self.role_layer_cum[bit][b] - self.role_layer_cum[bit][a])
            cost -= sum(s for pair, s in self.role_pair.items() if R & pair == pair)
            ok = valid & self.fits(gpu, R) & (b - a >= self.o.space.rules.min_layers)
            if R in (0, MAIN_ROLE):
                ok &= b > a  # an unused GPU is a skip; the main GPU holds some unit
            out[R] = np.where(ok, cost, np.inf)
        return out

    def fits(self, gpu, R: int) -> np.ndarray:
        """[a, b]: does a GPU of this kind hold roles R and layers [a, b) within its usable memory?"""
        o, rec, L = self.o, self.rec, self.L
        here = (self.role & R) > 0  # holders on this GPU besides the run's layers
        extra = rec.transient + np.where(self.offloaded[rec.holder], rec.weight_chunk_max, 0.0)
        base = rec.live[:, here].sum(axis=1) + np.where(here[rec.holder], extra, 0.0)  # [C]
        cum_live = np.hstack([np.zeros((len(base), 1)), np.cumsum(rec.live[:, o.layer_hidx], axis=1)])  # [C, L+1]
        call_layer = self.layer[rec.holder]
        own = np.zeros((len(base), L + 1))  # [C, x]: a call's transient counts where its layer is below x
        for x in range(L + 1):
            own[:, x] = np.where((call_layer >= 0) & (call_layer < x), extra, 0.0)
        at = cum_live + own  # [C, L+1]
        peak = (base[:, None, None] + at[:, None, :] - at[:, :, None]).max(axis=0)  # [a, b]
        fixed = 0
        for u in o.profile.units:
            h = o.trace.holder_index[u.name]
            if here[h]:
                p, buf = self.t.unit_bytes[u.name]
                fixed += buf + (0 if self.offloaded[h] else p)
        layer_w = np.array([sum(self.t.unit_bytes[u]) for u in o.profile.layers], dtype=np.float64)
        cum_w = np.concatenate([[0.0], np.cumsum(layer_w)])
        weights = fixed + cum_w[None, :] - cum_w[:, None]
        usable = o.cluster.usable_bytes(o.gpus.index(gpu))
        return weights + peak <= usable

    # --- the programme ---------------------------------------------------------------------
    def solve(self) -> tuple[float, list | None]:
        L, k = self.L, self.k
        gpus = self.o.gpus
        steps = {g: self.step_costs(g) for g in dict.fromkeys(gpus)}
        V = np.full((8, L + 1), np.inf)  # [roles placed, layers placed]
        V[0, k] = 0.0
        back = []  # per GPU: {(placed, b): (previous placed, a, roles here)}
        pipeline = self.o.space.rules.first_and_last
        for i, g in enumerate(gpus):
            new = V.copy()  # the GPU unused
            if pipeline:  # a pipeline starts at GPU 0 and has no gap: unused only once the head is placed
                new[[p for p in range(8) if not p & HEAD_ROLE]] = np.inf
            choice = {}
            for placed in range(8):
                if not np.isfinite(V[placed]).any():
                    continue
                if pipeline and placed & HEAD_ROLE:
                    continue  # the head's GPU was the last stage
                for R, M in steps[g].items():
                    if R & placed:
                        continue
                    if pipeline and i == 0 and R & (MAIN_ROLE | EMBED_ROLE) != MAIN_ROLE | EMBED_ROLE:
                        continue  # the first stage holds the root and the embedding group
                    if not placed & MAIN_ROLE and not R & MAIN_ROLE:
                        continue  # the first GPU used is the main GPU
                    if placed & MAIN_ROLE and R & MAIN_ROLE:
                        continue
                    if (self.off.proj != "gpu" or self.o.space.embed_on_main) and R & EMBED_ROLE and i != 0:
                        continue  # an offloaded projector (or a join with the root) needs the embeddings on GPU 0
                    total = V[placed][:, None] + M
                    a_best = total.argmin(axis=0)
                    val = total[a_best, np.arange(L + 1)]
                    to = placed | R
                    better = val < new[to]
                    for bb in np.nonzero(better)[0]:
                        choice[(to, int(bb))] = (placed, int(a_best[bb]), R)
                    new[to] = np.where(better, val, new[to])
            back.append(choice)
            V = new
        best = float(V[ALL_ROLES, L])
        if not math.isfinite(best):
            return math.inf, None
        walk = [(0, 0)] * len(gpus)
        placed, b = ALL_ROLES, L
        for i in range(len(gpus) - 1, -1, -1):
            hit = back[i].get((placed, b))
            if hit is None:
                continue  # unused GPU
            prev, a, R = hit
            walk[i] = (b - a, R)
            placed, b = prev, a
        return self.const + best, walk


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
                            if not space.allows(n, e, h, proj):
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
        if space.allows(n, e, h, off[2]) and min(counts) >= space.rules.min_layers
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
            elif space.head_with_embed:
                h = e
            if space.allows(n, e, h, off[2]) and min(counts) >= space.rules.min_layers:
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
