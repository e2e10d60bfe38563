"""The exact optimum of the cost model over the search space, and the brute force that checks it.

In the virtual world a plan's end-to-end time is a sum (trace.py): compute of every call on its
device, plus every logged move whose two ends sit on different devices, each weighted by how
often its phase runs and priced on the link it crosses (`Cluster.link_between`): the node's own
link between two GPUs of one node, the network between GPUs of two nodes.

A plan is a walk through the GPUs in cluster order: each GPU is unused, or holds one contiguous
run of decoder layers and some of three *roles* — main (the root, root parameters and everything
offloaded run there: the first GPU used), embed (the co-location group) and head. Compute and
memory are per GPU. Moves are made local by writing each as "the network's price, minus a
refund of (network - node link) where both ends sit in one node, minus a refund of the node
link where they share a GPU" (on one node the network is the node's link, and the first refund
is nothing):
- a move between two roles or a role and a layer: the GPU refund depends on what one GPU
  holds; the node refund on which roles the node holds and which layers it runs;
- a move between consecutive layers is paid where a run starts, over the node's link when an
  earlier GPU of the same node holds layers (runs follow each other in GPU order), else over
  the network.
The copies a model makes itself to align a top-level op's operands (kind "model", trace.py: the
image features and image-token mask a transformers class sends to its embeddings' device) are
logged moves like the others, between the root (main role) and the embedding group's units: the
role terms price them, no special case (tests/test_hf_search.py checks it against brute force).
So one dynamic programme finds the best plan of a dtype and offload choice. It walks the GPUs
node by node; a state is (roles placed, the roles this node holds, whether a GPU of this node
holds layers yet) with a vector over layers placed. Entering a node chooses its roles (refunding
the moves between them to the node's link), leaving it checks they were placed. A GPU's step is
a min-plus product of the state's vector with an (L+1)^2 matrix of the run [a, b) and roles it
takes; the matrices depend only on the GPU's kind and its node's link (identical GPUs share them).
On one node the node's roles are all three and the walk is GPUs x 8 x 8 such products, as before
links were priced per pair; over several nodes at most 8 times the states. Memory feasibility of
a GPU depends only on its run and roles.

`brute_force` evaluates every plan of the space with `Trace.evaluate`; tests check that both
give the same optimum on small cases, single-node and over nodes with mixed links.

A target's rules (`space.rules`, targets.PlanRules) narrow what the programme may build, in
three places only: moves of `rules.free_move_kinds` are not priced (`_DtypeTables`), a GPU's run
holds at least `rules.min_layers` layers (`step_costs`), and `rules.first_and_last` makes the
walk a pipeline (`_gpu`): GPU 0 holds the main and embedding roles, the GPUs used follow each
other without a gap, and the head's GPU is the last one used. And in one place it widens it:
with `rules.tied_copies` a head tied to the embeddings is not joined to them (`_roles`); a GPU
holding the head role without the embedding role then holds its own copy of the tied tensor
(`need`), as `Trace.weights` counts it.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from ..worlds.costmodel import Efficiency, link_seconds
from ..hardware import Cluster
from ..plans.plan import Plan
from ..models.profile import DTYPE_BYTES, GROUPS
from ..worlds.simulate import record_from_estimate
from .space import SearchSpace
from .targets import PlanRules
from ..worlds.trace import MAIN, InvalidPlan, Trace

MAIN_ROLE, EMBED_ROLE, HEAD_ROLE = 1, 2, 4  # role bits of a GPU's holdings
ROLE_BITS = (MAIN_ROLE, EMBED_ROLE, HEAD_ROLE)
ALL_ROLES = MAIN_ROLE | EMBED_ROLE | HEAD_ROLE
ROLE_PAIRS = (MAIN_ROLE | EMBED_ROLE, MAIN_ROLE | HEAD_ROLE, EMBED_ROLE | HEAD_ROLE)


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
        self.kinds = list(dict.fromkeys(self.gpus))  # identical GPUs share every table
        self.kind_of = [self.kinds.index(g) for g in self.gpus]
        self._links()

    def _links(self):
        """The GPUs in use, node by node, and the links between them, as `Cluster.link_between` gives
        them: a node's own link between two of its GPUs, the network between GPUs of two nodes."""
        cluster, n = self.cluster, len(self.gpus)
        node_of = cluster.node_of[:n]
        self.nodes = [tuple(i for i in range(n) if node_of[i] == j) for j in dict.fromkeys(node_of)]
        links: list = []

        def index(link) -> int:
            if link not in links:
                links.append(link)
            return links.index(link)

        # a node of one GPU moves nothing inside itself: any link will do for its refunds
        self.node_link = [index(cluster.link_between(m[0], m[1]) if len(m) > 1 else cluster.node_links[node_of[m[0]]])
                          for m in self.nodes]
        self.network_link = index(cluster.link_between(self.nodes[0][0], self.nodes[1][0])) if len(self.nodes) > 1 \
            else self.node_link[0]  # one node: every move crosses its link (the programme's network refund is 0)
        self.links = links

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

    def solve(self) -> Optimum:
        t0 = time.perf_counter()
        best_cost, best_plan, programmes = math.inf, None, 0
        for dtypes in self.dtype_choices():
            tables = _DtypeTables(self, dtypes)
            for k, tier, proj in self.offload_choices():
                programmes += 1
                cost, walk = _Programme(tables, Offload(k, tier, proj)).solve()
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
        # seconds[kind][c]: weighted seconds of call c on a GPU of that kind (oracle.kinds)
        self.seconds = [
            self.call_weight * np.array([tr.call_seconds(probe, i, g, holder_dtype[rec.holder[i]], oracle.eff)
                                         for i in range(len(calls))])
            for g in oracle.kinds
        ]
        # move_seconds[link][m]: weighted seconds of logged move m over that link (0: a move the target does not make)
        free = oracle.space.rules.free_move_kinds
        self.move_weight = np.array([0.0 if mv.kind in free else oracle.w.get(mv.phase, 0.0) for mv in rec.run.moves])
        nbytes = rec.move_bytes.astype(np.float64)
        self.move_seconds = np.zeros((len(oracle.links), len(nbytes)))
        if len(oracle.gpus) > 1:  # one GPU moves nothing between GPUs
            for li, link in enumerate(oracle.links):  # LinkSpec.transfer_seconds, for every move at once
                each = np.where(nbytes > 0, link.latency_us * 1e-6 + nbytes / (link.bandwidth * oracle.eff.gpu_link), 0.0)
                self.move_seconds[li] = self.move_weight * each
        self.unit_bytes = {u.name: (u.param_bytes(dtypes[u.group]), u.buffer_bytes(dtypes[u.group])) for u in prof.units}


class _Programme:
    """The dynamic programme for one dtype and offload choice (see the module docstring)."""

    def __init__(self, tables: _DtypeTables, off: Offload):
        self.t, self.off = tables, off
        o = tables.o
        self.o, self.rec, self.L, self.k = o, tables.rec, o.L, off.layers
        self._need, self._fit, self._steps, self._runs = {}, {}, {}, {}  # what GPUs of one kind or link share
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
        rules = o.space.rules
        if o.space.head_with_embed and not rules.tied_copies:
            self.joined.append(EMBED_ROLE | HEAD_ROLE)  # one tied tensor: accelerate keeps it on one device
        # with copies: (role bit of the tensor's owner, role bit of another user, the copy's bytes) per tied user
        self.copies = []
        if rules.tied_copies:
            for t in o.profile.tied_tensors:
                own_bit = int(self.role[tr.holder_index[t.owner]])
                for unit in t.users:
                    if int(self.role[tr.holder_index[unit]]) != own_bit:
                        width = DTYPE_BYTES[self.t.dtypes[o.profile.group_of(unit)]]  # the copy is in its user's dtype
                        self.copies.append((own_bit, int(self.role[tr.holder_index[unit]]), t.numel * width))

    # --- moves: the network's price, minus refunds where both ends share a node or a GPU --------
    def _moves(self):
        """Price every logged move on each link kind and split it into the programme's terms.

        A move between two different things costs the network's price, minus (network - node link)
        where both ends sit in one node, minus the node link's price where they share a GPU. On one
        node the network is the node's own link: the first refund is nothing."""
        o, t, rec, L = self.o, self.t, self.rec, self.L
        rs, rd = self.role[rec.move_src], self.role[rec.move_dst]
        ls, ld = self.layer[rec.move_src], self.layer[rec.move_dst]
        paid = t.move_weight > 0
        role_role = paid & (rs > 0) & (rd > 0) & (rs != rd)
        role_layer = paid & ((rs > 0) != (rd > 0))
        layer_layer = paid & (rs == 0) & (rd == 0) & (ls != ld)
        if (np.abs(ls - ld)[layer_layer] != 1).any():
            raise RuntimeError("a move between non-adjacent layers: the dynamic programme does not apply")
        pair = (rs | rd)[role_role]
        role_of, layer_of = np.maximum(rs, rd)[role_layer], np.maximum(ls, ld)[role_layer]
        cut = np.maximum(ls, ld)[layer_layer]
        n_links = len(o.links)
        self.role_pair = np.zeros((n_links, 8))  # [link, bits of two roles] -> seconds of the moves between them
        self.role_layer_cum = np.zeros((n_links, 8, L + 1))  # [link, role bit, x] -> seconds to/from layers below x
        self.boundary = np.zeros((n_links, L + 1))  # [link, j] -> seconds of the moves between layers j - 1 and j
        for li in range(n_links):
            secs = t.move_seconds[li]
            self.role_pair[li] = np.bincount(pair, weights=secs[role_role], minlength=8)
            per_layer = np.zeros((8, L))
            np.add.at(per_layer, (role_of, layer_of), secs[role_layer])
            self.role_layer_cum[li, :, 1:] = np.cumsum(per_layer, axis=1)
            self.boundary[li] = np.bincount(cut, weights=secs[layer_layer], minlength=L + 1)
        net = o.network_link
        self.const = float(self.role_pair[net].sum() + self.role_layer_cum[net, :, L].sum())
        calls = rec.run.calls
        layer_holders = set(o.layer_hidx.tolist())
        for i in np.nonzero(self.offloaded[rec.holder] & (rec.weight_bytes > 0))[0]:
            tier = self.off.tier if int(rec.holder[i]) in layer_holders else self.off.proj
            for chunk in calls[i].weight_chunks:  # streamed to the main GPU at every call: the same link for any GPU
                self.const += t.call_weight[i] * link_seconds(o.cluster, tier, 0, chunk, o.eff)

    def pair_refund(self, li: int, R: int) -> float:
        """Seconds, on link li, of the moves between two roles that R both holds."""
        return float(sum(self.role_pair[li, p] for p in ROLE_PAIRS if R & p == p))

    # --- one GPU: the cost of holding roles R and layers [a, b) ------------------------------
    def step_costs(self, kind: int, li: int) -> dict[int, np.ndarray]:
        """For each allowed role set R: an (L+1) x (L+1) matrix of seconds, [a, b] for the run [a, b)
        (inf: not allowed), on a GPU of this kind in a node whose link is li. The move into the
        run's first layer is not in it: its link depends on the GPU before (`run_costs`)."""
        key = (kind, li)
        if key in self._steps:
            return self._steps[key]
        t, L, k = self.t, self.L, self.k
        sec = t.seconds[kind]
        call_layer = self.layer[self.rec.holder]
        layer_sec = np.zeros(L)
        np.add.at(layer_sec, call_layer[call_layer >= 0], sec[call_layer >= 0])
        layer_cum = np.concatenate([[0.0], np.cumsum(layer_sec)])
        role_sec = {bit: float(sec[self.role[self.rec.holder] == bit].sum()) for bit in ROLE_BITS}
        a = np.arange(L + 1)[:, None]
        b = np.arange(L + 1)[None, :]
        run = layer_cum[b] - layer_cum[a]
        valid = (b >= a) & (a >= k)
        refund = self.role_layer_cum[li]
        out = {}
        for R in range(8):
            if any(R & j and R & j != j for j in self.joined):
                continue  # a join split across GPUs
            cost = run.copy()
            for bit in ROLE_BITS:
                if R & bit:
                    cost += role_sec[bit] - (refund[bit][b] - refund[bit][a])
            cost -= self.pair_refund(li, R)
            ok = valid & self.fits(kind, R) & (b - a >= self.o.space.rules.min_layers)
            if R in (0, MAIN_ROLE):
                ok &= b > a  # an unused GPU is a skip; the main GPU holds some unit
            out[R] = np.where(ok, cost, np.inf)
        self._steps[key] = out
        return out

    def run_costs(self, kind: int, li: int, R: int, C: int, into: int, diagonal: bool) -> np.ndarray:
        """`step_costs` plus what the run costs beyond its GPU: the move into its first layer over
        link `into`, and the refund (network - node link) of the moves between its layers and the
        roles C of its node. `diagonal`: keep the empty runs [a, a] (they pay neither)."""
        key = (kind, li, R, C, into, diagonal)
        M = self._runs.get(key)
        if M is None:
            L, k = self.L, self.k
            a = np.arange(L + 1)[:, None]
            b = np.arange(L + 1)[None, :]
            M = self.step_costs(kind, li)[R] + np.where((b > a) & (a > k), self.boundary[into][:, None], 0.0)
            net = self.o.network_link
            if net != li:
                for bit in ROLE_BITS:
                    if C & bit:
                        d = self.role_layer_cum[net, bit] - self.role_layer_cum[li, bit]
                        M = M - (d[b] - d[a])
            if not diagonal:
                M = np.where(b > a, M, np.inf)
            self._runs[key] = M
        return M

    def empty_run_costs(self, kind: int, li: int, R: int) -> np.ndarray:
        """`step_costs` of the empty runs [a, a] alone (roles without layers)."""
        key = (kind, li, R, "empty")
        if key not in self._runs:
            self._runs[key] = np.where(np.eye(self.L + 1, dtype=bool), self.step_costs(kind, li)[R], np.inf)
        return self._runs[key]

    def fits(self, kind: int, R: int) -> np.ndarray:
        """[a, b]: does a GPU of this kind hold roles R and layers [a, b) within its usable memory?"""
        key = (kind, R)
        if key not in self._fit:
            self._fit[key] = self.need(R) <= self.o.cluster.usable_bytes(self.o.kind_of.index(kind))
        return self._fit[key]

    def need(self, R: int) -> np.ndarray:
        """[a, b]: the bytes a GPU holding roles R and layers [a, b) needs at its peak (any GPU kind)."""
        if R in self._need:
            return self._need[R]
        o, rec, L = self.o, self.rec, self.L
        here = (self.role & R) > 0  # holders on this GPU besides the run's layers
        extra = rec.transient + np.where(self.offloaded[rec.holder], rec.weight_chunk_max, 0.0)
        base = rec.live[:, here].sum(axis=1) + np.where(here[rec.holder], extra, 0.0)  # [C]
        cum_live = np.hstack([np.zeros((len(base), 1)), np.cumsum(rec.live[:, o.layer_hidx], axis=1)])  # [C, L+1]
        call_layer = self.layer[rec.holder]
        below = (call_layer[:, None] >= 0) & (call_layer[:, None] < np.arange(L + 1)[None, :])
        own = np.where(below, extra[:, None], 0.0)  # [C, x]: a call's transient counts where its layer is below x
        at = cum_live + own  # [C, L+1]
        peak = (base[:, None, None] + at[:, None, :] - at[:, :, None]).max(axis=0)  # [a, b]
        fixed = 0
        for u in o.profile.units:
            h = o.trace.holder_index[u.name]
            if here[h]:
                p, buf = self.t.unit_bytes[u.name]
                fixed += buf + (0 if self.offloaded[h] else p)
        for own_bit, user_bit, nbytes in self.copies:  # a tied tensor's copy where a user sits without its owner
            if R & user_bit and not R & own_bit:
                fixed += nbytes
        layer_w = np.array([sum(self.t.unit_bytes[u]) for u in o.profile.layers], dtype=np.float64)
        cum_w = np.concatenate([[0.0], np.cumsum(layer_w)])
        weights = fixed + cum_w[None, :] - cum_w[:, None]
        self._need[R] = weights + peak
        return self._need[R]

    # --- the programme ---------------------------------------------------------------------
    def solve(self) -> tuple[float, list | None]:
        """Walk the GPUs node by node. A state is (roles placed, roles of this node, whether a GPU
        of this node holds layers yet), with seconds by layers placed. Entering a node chooses the
        roles it will hold, which refunds the moves between them down to the node's link; leaving
        it requires them placed. On one node its roles are all of them and nothing changes link."""
        o, L, k = self.o, self.L, self.k
        merged = {0: np.full(L + 1, np.inf)}  # roles placed -> seconds by layers placed, between two nodes
        merged[0][k] = 0.0
        exits, back = [], []  # per node: where each merged state came from; per GPU: how each state was reached
        for j, members in enumerate(o.nodes):
            li = o.node_link[j]
            V = {}
            for placed, vec in merged.items():
                free = ALL_ROLES & ~placed
                for C in [free] if j == len(o.nodes) - 1 else [c for c in range(8) if not c & placed]:
                    # no GPU before the first node holds layers: its first run pays no move into it
                    V[(placed, C, j == 0)] = vec - (self.pair_refund(o.network_link, C) - self.pair_refund(li, C))
            for i in members:
                V, choice = self._gpu(i, li, V)
                back.append(choice)
            merged, came = {}, {}
            for key, vec in V.items():
                placed, C, _ = key
                if C & ~placed:
                    continue  # a role promised to this node is not in it
                if placed not in merged:
                    merged[placed], came[placed] = vec, ([key], np.zeros(L + 1, dtype=int))
                else:
                    keys, idx = came[placed]
                    better = vec < merged[placed]
                    merged[placed] = np.where(better, vec, merged[placed])
                    idx[better] = len(keys)
                    keys.append(key)
            exits.append(came)
        if ALL_ROLES not in merged or not math.isfinite(merged[ALL_ROLES][L]):
            return math.inf, None
        return self.const + float(merged[ALL_ROLES][L]), self._walk(exits, back)

    def _gpu(self, i: int, li: int, V: dict) -> tuple[dict, dict]:
        """One GPU's step: each state either skips it or puts a role set and a run of layers on it."""
        o, L = self.o, self.L
        kind, pipeline, net = o.kind_of[i], o.space.rules.first_and_last, o.network_link
        steps = self.step_costs(kind, li)
        # the GPU unused (a pipeline has no gap: unused only once the head's GPU, the last stage, is placed)
        new = {key: vec for key, vec in V.items() if not pipeline or key[0] & HEAD_ROLE}
        # choice[state]: (moves, move by b (-1: the GPU unused), a by b); moves[m] = (state before, R)
        choice: dict = {}
        cols = np.arange(L + 1)

        def relax(to, frm, vec, M, R):
            finite = np.isfinite(vec)
            if finite.all():
                rows, total = cols, vec[:, None] + M
            else:  # only the layer counts this state reaches can start the run
                rows = np.flatnonzero(finite)
                total = vec[rows, None] + M[rows]
            pick = total.argmin(axis=0)
            val = total[pick, cols]
            cur = new.get(to)
            better = np.isfinite(val) if cur is None else val < cur
            if better.any():
                new[to] = val if cur is None else np.where(better, val, cur)
                if to not in choice:
                    choice[to] = ([], np.full(L + 1, -1), np.zeros(L + 1, dtype=int))
                moves, move, a = choice[to]
                move[better] = len(moves)
                a[better] = rows[pick[better]]
                moves.append((frm, R))

        for key, vec in V.items():
            placed, C, f = key
            if pipeline and placed & HEAD_ROLE:
                continue  # the head's GPU was the last stage
            owed = C & ~placed
            for R in steps:
                if R & ~owed:
                    continue  # placed already, or promised to another node
                if pipeline and i == 0 and R & (MAIN_ROLE | EMBED_ROLE) != MAIN_ROLE | EMBED_ROLE:
                    continue  # the first stage holds the root and the embedding group
                if not placed & MAIN_ROLE and not R & MAIN_ROLE:
                    continue  # the first GPU used is the main GPU
                if (self.off.proj != "gpu" or self.o.space.embed_on_main) and R & EMBED_ROLE and i != 0:
                    continue  # an offloaded projector (or a join with the root) needs the embeddings on GPU 0
                to = placed | R
                if f:  # the run follows layers of this node: its first move crosses the node's link
                    relax((to, C, True), key, vec, self.run_costs(kind, li, R, C, li, True), R)
                else:  # the run's first move comes from another node; an empty run leaves this state as it was
                    relax((to, C, True), key, vec, self.run_costs(kind, li, R, C, net, False), R)
                    relax((to, C, False), key, vec, self.empty_run_costs(kind, li, R), R)
        return new, choice

    def _walk(self, exits, back) -> list:
        """Per GPU (layers held, roles held), read back from the best final state."""
        o, L = self.o, self.L
        walk = [(0, 0)] * len(o.gpus)
        b = L
        keys, idx = exits[-1][ALL_ROLES]
        key = keys[idx[b]]
        for j in range(len(o.nodes) - 1, -1, -1):
            for i in reversed(o.nodes[j]):
                hit = back[i].get(key)
                if hit is None or hit[1][b] < 0:
                    continue  # unused GPU
                moves, move, a = hit
                key, R = moves[move[b]]
                walk[i] = (b - a[b], R)
                b = int(a[b])
            if j:
                keys, idx = exits[j - 1][key[0]]
                key = keys[idx[b]]
        return walk


def feasible_e2e(trace: Trace, plan: Plan, cluster: Cluster, eff: Efficiency, rules: PlanRules = PlanRules()) -> float | None:
    """End-to-end seconds of a plan that runs and fits under the target's rules, else None (the verdict a
    search trial gets)."""
    try:
        est = trace.evaluate(plan, cluster, eff, rules.free_move_kinds, rules.tied_copies)
    except InvalidPlan:
        return None
    weights = trace.weights(plan, rules.tied_copies)
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
                            e2e = feasible_e2e(trace, plan, cluster, eff, space.rules)
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
        e2e = feasible_e2e(trace, plan, cluster, eff, space.rules)
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
