"""The search space: plans that satisfy the co-location rule and layer contiguity by construction.

A point of the space, in the order the parameters are suggested:
- `n_devices`: use GPUs 0..n-1 of the cluster (the pipeline runs in cluster order);
- `offload_layers` / `layer_tier` (when the study allows offload): the first k decoder layers
  live on `cpu`/`disk` and run on GPU 0, streamed in per token;
- `embed_device_n{n}`: the GPU of the embedding group (what runs before the decoder layers:
  vision tower, projector, root parameters, token embeddings, position tables — profile.py),
  `projector_tier` whether the projector is offloaded (models that have one);
- `head_device_n{n}`: the GPU of the final norm and the head (the embedding group's GPU when
  the head's weight is tied to the embeddings and the target keeps one tensor: no parameter then;
  a pipeline target copies it to the head's stage instead, `PlanRules.tied_copies`);
- `dtype_vision`, `dtype_lm`, `dtype_head` (or one `dtype`): among the study's dtypes that every
  GPU of the cluster supports;
- `share_n{n}_d{i}`: GPU i's share of the decoder layers, weighted by how many layers its memory
  holds next to its groups; the layers are dealt out in order, one contiguous run per GPU.

Parameter names carry `n` where their range depends on it, so every distribution is static.

A pipeline target (targets.py) narrows the space by its `PlanRules`: the embedding group on
GPU 0 and the head on GPU n-1 (no `embed_device` / `head_device` parameters), at least one
decoder layer per GPU, one dtype, no offload.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import BadInput
from ..hardware import Cluster
from ..plans.plan import Plan, resolve
from ..models.profile import GROUPS, ModelProfile, tied_copy_bytes
from .targets import TargetSpec


@dataclass(frozen=True)
class SpaceOptions:
    dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")
    mixed_precision: bool = True  # a dtype per group (vision, lm, head), else one for the model
    offload: tuple[str, ...] = ()  # tiers allowed: "cpu", "disk"
    max_devices: int | None = None
    skip_keys: tuple[str, ...] = ("past_key_values",)

    def __post_init__(self):
        for d in self.dtypes:
            if d not in ("fp32", "fp16", "bf16"):
                raise BadInput(f"unknown dtype {d!r} in the study's space; use fp32, fp16, bf16")
        for t in self.offload:
            if t not in ("cpu", "disk"):
                raise BadInput(f"unknown offload tier {t!r}; use cpu or disk")
        if not self.dtypes:
            raise BadInput("the study's space allows no dtype")


class SearchSpace:
    def __init__(self, profile: ModelProfile, cluster: Cluster, options: SpaceOptions = SpaceOptions(),
                 target: TargetSpec = TargetSpec(), embed_on_main: bool = False):
        if target.pipelined:  # the engines run one dtype for the model and offload nothing
            options = replace(options, mixed_precision=False, offload=())
        self.profile, self.options, self.target, self.rules = profile, options, target, target.rules
        self.layers = profile.layers
        self.n_gpus = min(len(cluster.gpus), options.max_devices or len(cluster.gpus))
        if self.rules.min_layers:
            self.n_gpus = min(self.n_gpus, len(self.layers) // self.rules.min_layers)
        # a dtype is offered only where every GPU of the cluster can run it
        self.dtypes = tuple(d for d in options.dtypes if all(g.supports(d) for g in cluster.gpus))
        if not self.dtypes:
            raise BadInput(f"no dtype among {', '.join(options.dtypes)} is supported by every GPU of the cluster")
        self.usable = [cluster.usable_bytes(i) for i in range(len(cluster.gpus))]
        self.group_units = {"embed": profile.embed_group, "head": profile.head}
        self.projectors = profile.projectors  # the part of the embedding group that may be offloaded
        # one tied tensor for the head and the embeddings binds their groups, unless the target copies it
        self.head_with_embed = profile.head_tied_to_embeddings and not self.rules.tied_copies
        # a top-level join of the embeddings with the root's own tensors (trace.joins_main): the group on GPU 0
        self.embed_on_main = embed_on_main

    # --- from parameters to a plan -------------------------------------------------------------
    def suggest(self, trial) -> Plan:
        L = len(self.layers)
        n = trial.suggest_int("n_devices", 1, self.n_gpus)
        k, tier, proj_tier = 0, None, "gpu"
        if self.options.offload:
            k = trial.suggest_int("offload_layers", 0, L)
            tier = trial.suggest_categorical("layer_tier", list(self.options.offload)) if k else None
            if self.projectors:
                proj_tier = trial.suggest_categorical("projector_tier", ["gpu", *self.options.offload])
        # an offloaded projector runs on the main GPU (0): the embeddings it is joined with must be there
        fixed = self.rules.first_and_last or n == 1 or self.embed_on_main
        embed = trial.suggest_int(f"embed_device_n{n}", 0, n - 1) if not fixed and proj_tier == "gpu" else 0
        if self.head_with_embed:
            head = embed
        elif self.rules.first_and_last or n == 1:
            head = n - 1
        else:
            head = trial.suggest_int(f"head_device_n{n}", 0, n - 1)
        if self.options.mixed_precision and len(self.dtypes) > 1:
            dtypes = {g: trial.suggest_categorical(f"dtype_{g}", list(self.dtypes)) for g in GROUPS}
        elif len(self.dtypes) > 1:
            d = trial.suggest_categorical("dtype", list(self.dtypes))
            dtypes = {g: d for g in GROUPS}
        else:
            dtypes = {g: self.dtypes[0] for g in GROUPS}
        shares = [trial.suggest_float(f"share_n{n}_d{i}", 0.0, 1.0) for i in range(n)] if n > 1 else [1.0]
        caps = self.capacities(n, embed, head, dtypes, proj_tier)
        return self.build(self.deal(L - k, n, shares, caps), embed, head, dtypes, k, tier, proj_tier)

    def deal(self, total: int, n: int, shares, caps) -> list[int]:
        """The layer counts of n GPUs: the rules' minimum each, the rest by share x capacity."""
        base = self.rules.min_layers
        return [c + base for c in split_layers(total - base * n, [s * c for s, c in zip(shares, caps)])]

    def capacities(self, n, embed, head, dtypes, proj_tier="gpu") -> list[int]:
        """Decoder layers each GPU could hold by weights alone, next to the groups it carries (at least 1).

        Layer shares are weighted by these, so a sampled split is mostly a split that fits:
        a heterogeneous cluster's small cards get few layers unless the sampler insists.
        """
        units = self.profile.by_name
        fixed = [0] * n
        for u in self.group_units["embed"]:
            if u in self.projectors and proj_tier != "gpu":
                continue
            fixed[embed] += units[u].weight_bytes(dtypes[units[u].group])
        for u in self.group_units["head"]:
            fixed[head] += units[u].weight_bytes(dtypes[units[u].group])
        if self.rules.tied_copies:
            placed = {**{u: embed for u in self.group_units["embed"]}, **{u: head for u in self.group_units["head"]}}
            for d, nbytes in tied_copy_bytes(self.profile, placed, dtypes).items():
                fixed[d] += nbytes
        layer = units[self.layers[0]].weight_bytes(dtypes["lm"])
        return [max(1, int((self.usable[i] - fixed[i]) // layer)) for i in range(n)]

    def build(self, counts, embed, head, dtypes, offload_layers=0, tier=None, proj_tier="gpu", label="") -> Plan:
        dmap: dict = {}
        for u in self.group_units["embed"]:
            dmap[u] = embed
        if proj_tier != "gpu":
            dmap.update({u: proj_tier for u in self.projectors})
        i = 0
        for _ in range(offload_layers):
            dmap[self.layers[i]] = tier
            i += 1
        for d, c in enumerate(counts):
            for _ in range(c):
                dmap[self.layers[i]] = d
                i += 1
        for u in self.group_units["head"]:
            dmap[u] = head
        # the order of a from_pretrained map does not matter; keep the model's order for readers
        order = [u.name for u in self.profile.units]
        return Plan({u: dmap[u] for u in order}, dict(dtypes), self.options.skip_keys, label)

    # --- from a plan to parameters (to enqueue baselines) --------------------------------------
    def params_of(self, plan: Plan) -> dict | None:
        """The parameters that give `plan`, or None where the plan lies outside the space."""
        res = resolve(plan.device_map, self.profile)
        if res.uncovered or res.unknown_keys:
            return None
        dev = {u.name: res.device_of_unit(u.name) for u in self.profile.units}
        if any(d is None for d in dev.values()):
            return None
        embed_devs = {dev[u] for u in self.group_units["embed"] if u not in self.projectors}
        head_devs = {dev[u] for u in self.group_units["head"]}
        if len(embed_devs) != 1 or len(head_devs) != 1:
            return None
        embed, head = embed_devs.pop(), head_devs.pop()
        if not isinstance(embed, int) or not isinstance(head, int):
            return None
        layer_devs = [dev[u] for u in self.layers]
        k = 0
        while k < len(layer_devs) and layer_devs[k] in ("cpu", "disk"):
            k += 1
        tiers = set(layer_devs[:k])
        gpu_runs = layer_devs[k:]
        if any(not isinstance(d, int) for d in gpu_runs) or gpu_runs != sorted(gpu_runs):
            return None
        used = {embed, head, *gpu_runs}
        n = max(used) + 1
        if n > self.n_gpus or len(tiers) > 1:
            return None
        if not self.allows(n, embed, head):
            return None
        params: dict = {"n_devices": n}
        if self.options.offload:
            params["offload_layers"] = k
            if k:
                params["layer_tier"] = tiers.pop()
            projs = {dev[u] for u in self.projectors}
            if len(projs) > 1:
                return None
            proj = projs.pop() if projs else embed
            if self.projectors:
                params["projector_tier"] = proj if proj in ("cpu", "disk") else "gpu"
            if proj not in ("cpu", "disk") and proj != embed:
                return None
        elif k or any(dev[u] != embed for u in self.projectors):
            return None
        if params.get("projector_tier", "gpu") != "gpu" and embed != 0:
            return None
        counts = [gpu_runs.count(i) for i in range(n)]
        if self.rules.first_and_last and (embed != 0 or head != n - 1):
            return None
        if min(counts) < self.rules.min_layers:
            return None
        if n > 1:
            if not self.rules.first_and_last:
                if params.get("projector_tier", "gpu") == "gpu" and not self.embed_on_main:
                    params[f"embed_device_n{n}"] = embed
                if not self.head_with_embed:
                    params[f"head_device_n{n}"] = head
            # shares that reproduce the counts exactly: (count - minimum) / capacity, scaled into [0, 1]
            caps = self.capacities(n, embed, head, plan.dtypes, params.get("projector_tier", "gpu"))
            raw = [(c - self.rules.min_layers) / cap for c, cap in zip(counts, caps)]
            top = max(raw) or 1.0
            for i in range(n):
                params[f"share_n{n}_d{i}"] = raw[i] / top
            if self.deal(len(gpu_runs), n, [params[f"share_n{n}_d{i}"] for i in range(n)], caps) != counts:
                return None
        if any(plan.dtypes[g] not in self.dtypes for g in GROUPS):
            return None
        if self.options.mixed_precision and len(self.dtypes) > 1:
            params.update({f"dtype_{g}": plan.dtypes[g] for g in GROUPS})
        elif len(self.dtypes) > 1:
            if len(set(plan.dtypes.values())) != 1:
                return None
            params["dtype"] = plan.dtypes["lm"]
        return params

    def allows(self, n: int, embed: int, head: int, proj_tier: str = "gpu") -> bool:
        """Whether a configuration (GPUs 0..n-1, the embedding and head groups' GPUs, the projectors'
        tier) is one the space can build: the target's rules, a tied head with the embeddings, the
        embeddings on the main GPU where an offloaded projector or a top-level join needs them there."""
        if not self.rules.allows(n, 0, embed, head):
            return False
        if proj_tier != "gpu" and not self.projectors:
            return False
        if (proj_tier != "gpu" or self.embed_on_main) and embed != 0:
            return False
        return not (self.head_with_embed and head != embed)

    def contains(self, plan: Plan) -> bool:
        return self.params_of(plan) is not None


def split_layers(total: int, weights: list[float]) -> list[int]:
    """`total` layers in proportion to `weights`, rounded by largest remainder (sums to `total`)."""
    s = sum(weights)
    if s <= 0:
        weights, s = [1.0] * len(weights), float(len(weights))
    exact = [total * w / s for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts
