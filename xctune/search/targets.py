"""Engine targets: which program runs a plan, what it allows, and how its execution is priced.

- `accelerate` (today): one process on one node; accelerate's hooks run the units one after
  another, so at any batch the plan is a sequence: tokens/s = batch * new_tokens / e2e.
- `vllm-pp`: vLLM pipeline parallelism. Stages are contiguous runs of decoder layers, one per
  GPU in cluster order (`--pipeline-parallel-size`, `VLLM_PP_LAYER_PARTITION`); the engine fixes
  the rest: vision encoder, projector and embeddings on the first stage, norm and head on the
  last; one dtype for the model. With `tensor_parallel = "node"` a stage is a whole node whose
  GPUs split every layer (`--tensor-parallel-size` = GPUs per node); see `tp_cluster`.
- `torch-pipelining`: `torch.distributed.pipelining` stages cut at split points between decoder
  layers (`split_spec`), embeddings before the first stage, head in the last; one dtype.

Both pipeline engines compute the logits of the last position only and send a token id back,
so the trace's move of accelerate's root hook (full-sequence logits back to GPU 0) is not
theirs (`PlanRules.free_move_kinds`).

Throughput with several requests in flight (`requests_in_flight` = M micro-batches, each of the
workload's batch b). Let t_s be the seconds stage s spends on one micro-batch in a phase (its
calls plus the moves it sends to the next stage). A micro-batch's next decode step needs its
previous token, so it crosses the pipeline in sum(t_s); the M micro-batches share each stage,
so a round takes at least M * max(t_s). Per phase, a round of M micro-batches takes

    cycle(t) = max(sum_s t_s, M * max_s t_s)          (pipeline engines)
    cycle(t) = M * sum_s t_s                          (accelerate: no overlap)

and the workload (vision + prefill, then new_tokens - 1 decode steps) of M requests takes
T = cycle(t_first) + (new_tokens - 1) * cycle(t_decode), hence

    tokens/s = M * b * new_tokens / T.

At M = 1 this is b * new_tokens / e2e for every target. The KV cache of all M requests must fit:
each GPU holds M times its cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import BadInput
from ..hardware import Cluster, GPUSpec

TARGETS = {
    "accelerate": "one process, one node: accelerate's hooks run the units one after another",
    "vllm-pp": "vLLM pipeline parallelism: a stage per GPU (or per node, tensor parallel inside)",
    "torch-pipelining": "torch.distributed.pipelining: split points between decoder layers",
}
TENSOR_PARALLEL = ("none", "node")


@dataclass(frozen=True)
class PlanRules:
    """What a target allows of a plan; the search space and the exact optimum consult it."""

    first_and_last: bool = False  # main = embedding group = the first GPU used, head on the last GPU used
    min_layers: int = 0  # decoder layers on every GPU used
    free_move_kinds: tuple[str, ...] = ()  # logged moves the engine does not make

    def allows(self, n: int, main: int, embed: int, head: int) -> bool:
        """A configuration of the oracle: GPUs 0..n-1 usable, `main` the first one used."""
        return not self.first_and_last or (main == 0 and embed == 0 and head == n - 1)


ACCELERATE_RULES = PlanRules()
PIPELINE_RULES = PlanRules(first_and_last=True, min_layers=1, free_move_kinds=("return",))


@dataclass(frozen=True)
class TargetSpec:
    name: str = "accelerate"
    tensor_parallel: str = "none"  # vllm-pp: "none" (a stage per GPU) or "node" (a stage per node)
    requests_in_flight: int = 1  # micro-batches in flight, for tokens/s

    def __post_init__(self):
        if self.name not in TARGETS:
            raise BadInput(f"unknown target {self.name!r}; choose from {', '.join(TARGETS)}")
        if self.tensor_parallel not in TENSOR_PARALLEL:
            raise BadInput(f"tensor_parallel must be one of {', '.join(TENSOR_PARALLEL)}, got {self.tensor_parallel!r}")
        if self.tensor_parallel == "node" and self.name != "vllm-pp":
            raise BadInput(f"tensor_parallel = 'node' is for target vllm-pp, not {self.name}")
        if not isinstance(self.requests_in_flight, int) or isinstance(self.requests_in_flight, bool) \
                or not 1 <= self.requests_in_flight <= 1024:
            raise BadInput(f"requests_in_flight must be a whole number in 1..1024, got {self.requests_in_flight!r}")

    @property
    def pipelined(self) -> bool:
        return self.name != "accelerate"

    @property
    def rules(self) -> PlanRules:
        return PIPELINE_RULES if self.pipelined else ACCELERATE_RULES

    def to_dict(self) -> dict:
        return {"name": self.name, "tensor_parallel": self.tensor_parallel, "requests_in_flight": self.requests_in_flight}


def target_cluster(cluster: Cluster, target: TargetSpec) -> Cluster:
    """The devices a target's plan is written for.

    accelerate: one process on one node, the first node's GPUs. vllm-pp with tensor parallelism
    per node: one device per node (`tp_cluster`). Otherwise the cluster itself.
    """
    if target.tensor_parallel == "node":
        return tp_cluster(cluster)
    if not target.pipelined and cluster.n_nodes > 1:
        first = cluster.node_gpus(0)
        return replace(cluster, gpus=tuple(cluster.gpus[i] for i in first), node_of=(), node_links=(), network=None)
    return cluster


@dataclass(frozen=True)
class TensorParallel:
    """How a tensor-parallel stage device stands for its node: `size` GPUs over `link`."""

    size: int
    link: object  # LinkSpec inside the node


def tp_cluster(cluster: Cluster) -> Cluster:
    """One device per node: a tensor-parallel group that splits every layer over the node's GPUs.

    Modelled: memory is the sum of the node's GPUs (weights, KV cache and activations split
    evenly: vLLM shards attention heads, MLP, embeddings and head over the group), FLOP/s and
    bandwidth are the sum too (ideal split), plus the all-reduces of `allreduce_seconds`. Not
    modelled: replicated norms and biases, vLLM's own buffers, imbalance inside a layer.
    vLLM's tensor_parallel_size is one number: every node needs the same count of the same GPU.
    """
    sizes = {len(cluster.node_gpus(k)) for k in range(cluster.n_nodes)}
    kinds = {cluster.gpus[i] for i in range(len(cluster.gpus))}
    if len(sizes) != 1 or len(kinds) != 1:
        raise BadInput("tensor_parallel = 'node' needs nodes with the same number of the same GPU "
                       "(vLLM's --tensor-parallel-size is one number)")
    size = sizes.pop()
    gpu = kinds.pop()
    group = GPUSpec(
        name=f"{size}x{gpu.name} (TP)",
        memory_bytes=gpu.memory_bytes * size,
        tflops={d: v * size for d, v in gpu.tflops.items()},
        mem_bw_gbs=gpu.mem_bw_gbs * size,
        source=f"tensor-parallel group of {size} x {gpu.name}: sums of {gpu.source}",
    )
    n = cluster.n_nodes
    return Cluster(
        gpus=(group,) * n,
        gpu_link=cluster.node_links[0],
        host_link=cluster.host_link,
        disk_link=cluster.disk_link,
        headroom=cluster.headroom,
        node_of=tuple(range(n)),
        node_links=cluster.node_links,
        network=cluster.network if n > 1 else None,
    )


def tp_size(cluster: Cluster, target: TargetSpec) -> int:
    return len(cluster.node_gpus(0)) if target.tensor_parallel == "node" else 1


def allreduce_seconds(nbytes: int, size: int, link) -> float:
    """One ring all-reduce of `nbytes` over `size` GPUs: 2 (size - 1) steps of nbytes / size each."""
    if size <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * (size - 1)
    return steps * (link.latency_us * 1e-6 + nbytes / size / link.bandwidth)


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float
    requests_in_flight: int
    stage_first_ms: dict  # GPU -> ms of one micro-batch's vision + prefill on that stage
    stage_decode_ms: dict  # GPU -> ms of one micro-batch's decode step on that stage
    seconds: float  # T of the formula

    @property
    def bottleneck(self):
        return max(self.stage_decode_ms, key=self.stage_decode_ms.get) if self.stage_decode_ms else None


def throughput(est, target: TargetSpec, batch: int, new_tokens: int) -> Throughput:
    """tokens/s of M requests in flight, by the formula of the module docstring."""
    M = target.requests_in_flight
    first: dict = {}
    dec: dict = {}
    for (phase, dev), secs in est.device_phase_s.items():
        if phase in ("vision", "prefill"):
            first[dev] = first.get(dev, 0.0) + secs
    devices = sorted({d for _, d in est.device_phase_s})
    last = any(p == "decode_last" for p, _ in est.device_phase_s) and new_tokens > 2
    for d in devices:
        a = est.device_phase_s.get(("decode", d), 0.0)
        b = est.device_phase_s.get(("decode_last", d), 0.0)
        dec[d] = (a + b) / 2 if last else a  # the mean step, as costmodel.combine takes it

    def cycle(t: dict) -> float:
        if not t:
            return 0.0
        total = sum(t.values())
        return max(total, M * max(t.values())) if target.pipelined else M * total

    T = cycle(first) + max(new_tokens - 1, 0) * cycle(dec)
    return Throughput(
        M * batch * new_tokens / T if T > 0 else float("inf"),
        M,
        {d: 1e3 * v for d, v in sorted(first.items())},
        {d: 1e3 * v for d, v in sorted(dec.items())},
        T,
    )


def serving_estimate(est, target: TargetSpec, plan, profile, workload, tp: TensorParallel | None = None):
    """The estimate as the target runs it: the all-reduces of tensor-parallel stages (2 per
    decoder layer, of the hidden states of the step), and the KV cache of every request in flight.
    Changes `est` in place and returns it."""
    if tp is not None and tp.size > 1:
        from ..models.profile import DTYPE_BYTES

        cfg = profile.config
        width = DTYPE_BYTES[plan.dtypes["lm"]] * cfg.hidden_size * workload.batch
        tokens = {"prefill": workload.prompt_length(cfg), "decode": 1, "decode_last": 1}
        per_device: dict = {}
        for layer in profile.layers:
            d = plan.device_map[layer]
            per_device[d] = per_device.get(d, 0) + 1
        for phase, t in tokens.items():
            if phase not in est.phase_s or (phase == "decode_last" and not est.phase_s.get("decode_last")):
                continue
            one = 2 * allreduce_seconds(width * t, tp.size, tp.link)
            for d, n in per_device.items():
                est.device_phase_s[(phase, d)] = est.device_phase_s.get((phase, d), 0.0) + n * one
                est.phase_s[phase] += n * one
                est.transfer_s[phase] = est.transfer_s.get(phase, 0.0) + n * one
        n = workload.new_tokens
        last = n > 2 and est.phase_s.get("decode_last", 0.0) > 0
        est.decode_s_per_token = (est.phase_s["decode"] + est.phase_s["decode_last"]) / 2 if last else \
            (est.phase_s["decode"] if n > 1 else 0.0)
        est.e2e_s = est.phase_s["vision"] + est.phase_s["prefill"] + est.decode_s_per_token * max(n - 1, 0)
    M = target.requests_in_flight
    if M > 1:
        for d, kv in est.kv_bytes.items():
            est.peak_bytes[d] = est.peak_bytes.get(d, 0) + (M - 1) * kv
        est.kv_bytes = {d: M * kv for d, kv in est.kv_bytes.items()}
    return est


def internode_bytes(est, cluster: Cluster, new_tokens: int) -> tuple[int, int] | None:
    """(vision + prefill bytes, bytes per decode step) over the network; None on one node."""
    if cluster.n_nodes < 2:
        return None
    first = per_step = 0
    for (phase, src, dst), (n, _) in est.transfers_by_phase(new_tokens).items():
        if not cluster.crosses_nodes(src, dst):
            continue
        if phase == "decode":
            per_step += n
        else:
            first += n
    return first, round(per_step / max(new_tokens - 1, 1))


def serving_fields(est, target: TargetSpec, cluster: Cluster, workload) -> dict:
    """The record fields of targets.py: target, tokens/s, per-stage decode time, inter-node bytes."""
    tput = throughput(est, target, workload.batch, workload.new_tokens)
    inter = internode_bytes(est, cluster, workload.new_tokens)
    return dict(
        target=target.name,
        requests_in_flight=target.requests_in_flight,
        tokens_per_s=tput.tokens_per_s,
        stage_decode_ms={f"cuda:{d}": round(v, 4) for d, v in tput.stage_decode_ms.items()},
        internode_bytes_prefill=inter[0] if inter else None,
        internode_bytes_per_token=inter[1] if inter else None,
    )


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a GPU (or a tensor-parallel node) and its run of decoder layers."""

    device: int
    first_layer: int
    layers: int


def pipeline_map(profile, counts) -> dict:
    """The device map of a pipeline with `counts[i]` decoder layers on stage i: the embedding
    group on the first stage, norm and head on the last (the engines' fixed placement)."""
    n = len(counts)
    if n < 1 or sum(counts) != len(profile.layers) or min(counts) < 1:
        raise BadInput(f"a partition needs at least 1 layer per stage and {len(profile.layers)} layers in all, "
                       f"got {list(counts)}")
    dmap: dict = {u: 0 for u in profile.embed_group}
    layer = iter(profile.layers)
    for stage, c in enumerate(counts):
        for _ in range(c):
            dmap[next(layer)] = stage
    dmap.update({u: n - 1 for u in profile.head})
    return {u.name: dmap[u.name] for u in profile.units}


def pipeline_stages(plan, profile) -> tuple[Stage, ...]:
    """The stages of a plan that a pipeline engine can run; BadInput says what breaks its rules."""
    from ..plans.plan import resolve

    res = resolve(plan.device_map, profile)
    dev = {u.name: res.device_of_unit(u.name) for u in profile.units}
    if len(set(plan.dtypes.values())) != 1:
        raise BadInput(f"a pipeline engine runs one dtype for the model; the plan mixes {plan.dtype_label}")
    layers = [dev[u] for u in profile.layers]
    if any(not isinstance(d, int) for d in layers):
        raise BadInput("a pipeline engine offloads nothing: every decoder layer needs a GPU")
    n = max(layers) + 1
    if layers[0] != 0 or any(b not in (a, a + 1) for a, b in zip(layers, layers[1:])):
        raise BadInput("pipeline stages are contiguous runs of decoder layers on GPUs 0, 1, ... in order, "
                       "at least one layer each")
    first = {dev[u] for u in profile.embed_group}
    if first != {0}:
        raise BadInput("the engines run the vision encoder, projector and embeddings on the first stage (GPU 0)")
    if {dev[u] for u in profile.head} != {n - 1}:
        raise BadInput(f"the engines run the norm and the head on the last stage (GPU {n - 1})")
    return tuple(Stage(d, layers.index(d), layers.count(d)) for d in range(n))
