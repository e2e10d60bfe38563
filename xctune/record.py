"""The trial record: one schema for measured and simulated trials.

A frozen dataclass; `to_dict()` is a flat JSON object (map-valued fields become dotted keys:
`peak_bytes.cuda:0`), one row of a pandas DataFrame. Latencies are milliseconds, memory and
transfers bytes. `source` says which world a number comes from: `measured` (real devices) or
`simulated` (virtual cluster, cost model). Never present one as the other.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, fields

STATUSES = ("ok", "oom", "invalid", "error")
SPREAD_FIELDS = ("vision_ms", "prefill_ms", "decode_ms_per_token", "e2e_ms")


@dataclass(frozen=True)
class Spread:
    """Median, 90th percentile and coefficient of variation of repeated measurements."""

    median: float
    p90: float
    cv: float
    n: int

    @staticmethod
    def of(values: list[float]) -> "Spread":
        if not values:
            return Spread(float("nan"), float("nan"), float("nan"), 0)
        v = sorted(values)
        p90 = v[min(len(v) - 1, round(0.9 * (len(v) - 1)))]
        mean = statistics.fmean(v)
        cv = statistics.pstdev(v) / mean if len(v) > 1 and mean > 0 else 0.0
        return Spread(statistics.median(v), p90, cv, len(v))

    @staticmethod
    def single(value: float) -> "Spread":
        return Spread(value, value, 0.0, 1)


def fmt_bytes(n: float) -> str:
    """Human-readable binary size: 512 B, 3.2 MiB, 17.25 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def software_versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    from . import __version__

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "xctune": __version__,
    }


@dataclass(frozen=True)
class TrialRecord:
    plan_id: str
    label: str
    device_map: dict
    dtypes: dict
    skip_keys: tuple
    model: str
    workload: dict
    source: str  # "measured" | "simulated"
    devices: dict  # device -> name ("cuda:0" -> "rtx4090", or "cpu (logical cuda:1)")
    status: str  # ok | oom | invalid | error
    cause: str = ""
    vision_ms: Spread | None = None
    prefill_ms: Spread | None = None
    decode_ms_per_token: Spread | None = None
    e2e_ms: Spread | None = None
    transfer_bytes: int = 0  # over the whole workload (vision + prefill + every decode step)
    transfer_count: int = 0
    transfer_by_link: dict = field(default_factory=dict)  # "cuda:0->cuda:1" -> bytes
    transfer_by_phase: dict = field(default_factory=dict)  # "prefill cuda:0->cuda:1" -> bytes (decode: all steps)
    transfer_count_by_phase: dict = field(default_factory=dict)  # the same keys -> number of moves
    transfer_ms: float | None = None  # time spent in transfers (simulated; measured on CUDA)
    streamed_weight_bytes: int = 0  # offloaded weights moved to the GPU over the workload
    peak_bytes: dict = field(default_factory=dict)  # device -> peak bytes (weights + activations + KV)
    peak_bytes_max: int = 0
    weights_bytes: dict = field(default_factory=dict)
    activation_bytes: dict = field(default_factory=dict)  # device -> activations + KV at peak
    kv_bytes: dict = field(default_factory=dict)
    fidelity_top1: float | None = None  # share of generated tokens equal to the fp32 reference's
    fidelity_max_abs: float | None = None  # max |logit - reference logit| at the last step
    fidelity_mean_abs: float | None = None
    placement_ms: float | None = None
    # serving (targets.py): the engine that runs the plan and its figures with several requests
    target: str = "accelerate"
    requests_in_flight: int = 1
    tokens_per_s: float | None = None  # with requests_in_flight micro-batches (targets.throughput)
    stage_decode_ms: dict = field(default_factory=dict)  # GPU -> ms of one micro-batch's decode step there
    internode_bytes_prefill: int | None = None  # vision + prefill bytes over the network between nodes
    internode_bytes_per_token: int | None = None  # per decode step, over the network
    repeats: int = 0
    threads: int | None = None  # measured trials: torch intra-op threads the runs used (set, not inherited)
    clock: str = ""  # measured trials: cuda-events, wall, or process-cpu (CPU time of a one-thread run)
    noisy: bool = False  # measured trials: end-to-end repeats varied by more than the executor's noise bound
    memory_note: str = ""  # what the peak counts, in words
    versions: dict = field(default_factory=dict)
    # bytes crossing devices per decode step under each loading path ("xctune": load_best_map.py,
    # "from_pretrained": a bare map), from dry runs: simulated even in a measured record
    decode_bytes_by_loader: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        if self.source not in ("measured", "simulated"):
            raise ValueError("source must be measured or simulated")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def e2e(self) -> float:
        return self.e2e_ms.median if self.e2e_ms else float("inf")

    def to_dict(self) -> dict:
        """A flat JSON object."""
        out: dict = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SPREAD_FIELDS:
                out[f.name] = value.median if value else None
                out[f"{f.name}_p90"] = value.p90 if value else None
                out[f"{f.name}_cv"] = value.cv if value else None
            elif f.name in ("device_map", "skip_keys"):
                out[f.name] = json.dumps(value if f.name == "device_map" else list(value))
            elif isinstance(value, dict):
                for k, v in value.items():
                    out[f"{f.name}.{k}"] = v
            else:
                out[f.name] = value
        return out

    def summary(self) -> str:
        head = f"[{self.source}] {self.label or self.plan_id} ({'/'.join(self.dtypes[g] for g in ('vision', 'lm', 'head'))})"
        if not self.ok:
            return f"{head}: {self.status.upper()}: {self.cause}"
        lines = [head]

        def fmt(name, s):
            extra = f"  (p90 {s.p90:.2f}, cv {s.cv:.1%}, n={s.n})" if s.n > 1 else ""
            return f"  {name:<22} {s.median:10.2f} ms{extra}"

        for name, s in (("vision encode", self.vision_ms), ("prefill (to 1st token)", self.prefill_ms),
                        ("decode per token", self.decode_ms_per_token), ("end to end", self.e2e_ms)):
            if s is not None:
                lines.append(fmt(name, s))
        lines.append(f"  transfers              {fmt_bytes(self.transfer_bytes):>13} in {self.transfer_count} moves"
                     + (f", {self.transfer_ms:.2f} ms" if self.transfer_ms is not None else ""))
        for key, b in self.transfer_by_phase.items():
            lines.append(f"    {key:<28} {fmt_bytes(b):>13} in {self.transfer_count_by_phase.get(key, 0)} moves")
        for name, b in self.decode_by_loader_lines():
            lines.append(f"    per decode step, {name:<19} {b:>13} (dry run, simulated)")
        if self.internode_bytes_per_token is not None:
            lines.append(f"  between nodes          {fmt_bytes(self.internode_bytes_per_token):>13} per token "
                         f"(prefill {fmt_bytes(self.internode_bytes_prefill or 0)})")
        if self.tokens_per_s is not None:
            lines.append(f"  throughput             {self.tokens_per_s:10.1f} tokens/s with {self.requests_in_flight} "
                         f"request(s) in flight ({self.target})")
        if self.streamed_weight_bytes:
            lines.append(f"  offloaded weights streamed {fmt_bytes(self.streamed_weight_bytes)} (included above)")
        for d, b in self.peak_bytes.items():
            lines.append(f"  peak {d:<17} {fmt_bytes(b):>13} (weights {fmt_bytes(self.weights_bytes.get(d, 0))})")
        if self.memory_note:
            lines.append(f"  ({self.memory_note})")
        if self.fidelity_top1 is not None:
            lines.append(f"  fidelity vs fp32 reference: top-1 {self.fidelity_top1:.1%}, "
                         f"max |dlogit| {self.fidelity_max_abs:.3g}, mean {self.fidelity_mean_abs:.3g}")
        if self.placement_ms is not None:
            lines.append(f"  placement {self.placement_ms:.1f} ms" + (f", {self.threads} thread(s), {self.clock} clock" if self.threads else ""))
        if self.noisy:
            lines.append(f"  NOISY: the repeats vary by {self.e2e_ms.cv:.0%} (cv), over the bound even when measured again")
        return "\n".join(lines)

    def decode_by_loader_lines(self):
        words = {"xctune": "xctune's loader", "from_pretrained": "bare from_pretrained"}
        return [(words.get(k, k), "fails" if v is None else fmt_bytes(v)) for k, v in self.decode_bytes_by_loader.items()]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)


