"""The cost model of the virtual world: from priced ops and logged moves to simulated time.

Per op, a roofline against the device the op runs on:

    seconds = max(flops / (peak_flops[dtype] * eff.matmul), bytes / (mem_bw * eff.memory)) + eff.op_overhead

(prefill is mostly compute-bound, decode bandwidth-bound: the max picks). Per move, the link's
latency plus bytes over its *achieved* bandwidth — the datasheet rate times the fraction a copy
reaches on that kind of path (GPU<->GPU link; host link from pageable memory for `cpu` offload,
whose weights are ordinary host tensors; disk for `disk` offload). Offloaded weights stream in at
every call. Execution is sequential, as
accelerate's naive pipeline runs at batch 1: total time = compute + transfers.

`Efficiency` holds the achieved fractions of peak; the defaults are assumptions, and
`xctune calibrate` fits them on a real device.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..hardware import Cluster, GPUSpec
from .instrument import UnitCall

DECODE_PHASES = ("decode", "decode_last")


@dataclass(frozen=True)
class DtypeEfficiency:
    """What a calibration measured for one dtype: a CPU's bf16 and fp16 are not its fp32 (no
    native 16-bit kernels on many CPUs: each op converts), and small ops cost their dispatch."""

    dtype: str
    matmul: float  # achieved fraction of the device's peak FLOP/s in this dtype
    memory: float  # achieved fraction of memory bandwidth
    matmul_op_us: float  # per matmul-class op (mm, bmm, attention, convolution)
    other_op_us: float  # per other op (elementwise, norms, gathers, casts)


@dataclass(frozen=True)
class Efficiency:
    matmul: float = 0.70  # achieved fraction of peak FLOP/s in matmuls and attention
    memory: float = 0.80  # achieved fraction of memory bandwidth
    op_overhead_us: float = 6.0  # per op: kernel launch and dispatch of eager PyTorch
    module_overhead_us: float = 0.0  # per nn.Module call: Python and accelerate-hook overhead
    source: str = "default assumption (not calibrated)"
    # Achieved fractions of a link's datasheet bandwidth (assumptions until calibrated). A copy
    # never reaches the signalling rate: protocol overhead alone costs PCIe ~15-20%; a copy from
    # pageable host memory is staged through a pinned bounce buffer by the driver and reaches
    # roughly half of what a pinned copy does; a drive's sequential rate is a best case.
    gpu_link: float = 0.80  # GPU-to-GPU copies (peer or through the host)
    host_pinned: float = 0.80  # host <-> GPU from page-locked memory
    host_pageable: float = 0.40  # host <-> GPU from ordinary memory (accelerate's cpu offload)
    disk: float = 0.80  # reads from the offload folder
    by_dtype: tuple[DtypeEfficiency, ...] = ()  # calibrated per dtype; replaces matmul/memory/op overhead where given

    def __post_init__(self):
        ok = 0 < self.matmul <= 1 and 0 < self.memory <= 1 and self.op_overhead_us >= 0 and self.module_overhead_us >= 0
        ok = ok and all(0 < f <= 1 for f in (self.gpu_link, self.host_pinned, self.host_pageable, self.disk))
        ok = ok and all(0 < d.matmul <= 1 and 0 < d.memory <= 1 and d.matmul_op_us >= 0 and d.other_op_us >= 0
                        for d in self.by_dtype)
        if not ok:
            raise BadInput(f"efficiency factors out of range: {self}")

    def of(self, dtype: str) -> DtypeEfficiency:
        """The factors that price ops in `dtype`."""
        for d in self.by_dtype:
            if d.dtype == dtype:
                return d
        return DtypeEfficiency(dtype, self.matmul, self.memory, self.op_overhead_us, self.op_overhead_us)

    def link_fraction(self, src, dst) -> float:
        """The achieved fraction of the link a move from `src` to `dst` crosses (devices as in a device map).

        Host memory that xctune's moves read or write is ordinary (pageable): accelerate's cpu offload
        keeps the weights as plain tensors. `host_pinned` is there for paths that pin."""
        if "disk" in (src, dst):
            return self.disk
        if "cpu" in (src, dst):
            return self.host_pageable
        return self.gpu_link

    @staticmethod
    def load(path) -> "Efficiency":
        try:
            data = json.loads(Path(path).read_text())
            eff = data.get("efficiency", data)
            links = {k: float(eff[k]) for k in ("gpu_link", "host_pinned", "host_pageable", "disk") if k in eff}
            if "links" in data:  # a host calibration: its links are the rates measured, taken whole
                links = {**dict.fromkeys(("gpu_link", "host_pinned", "host_pageable", "disk"), 1.0), **links}
            by_dtype = tuple(DtypeEfficiency(k, float(v["matmul"]), float(v["memory"]), float(v["matmul_op_us"]),
                                             float(v["other_op_us"])) for k, v in eff.get("by_dtype", {}).items())
            return Efficiency(
                float(eff["matmul"]),
                float(eff["memory"]),
                float(eff["op_overhead_us"]),
                float(eff.get("module_overhead_us", 0.0)),
                f"calibrated: {path}",
                by_dtype=by_dtype,
                **links,
            )
        except OSError as e:
            raise BadInput(f"cannot read calibration {path}: {e.strerror or e}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadInput(f"{path} is not a calibration file ({type(e).__name__}: {e})") from None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["by_dtype"] = {d.dtype: {k: v for k, v in asdict(d).items() if k != "dtype"} for d in self.by_dtype}
        return out


@dataclass(frozen=True)
class OpTable:
    """The ops of one unit call as arrays, for vectorised pricing."""

    flops: np.ndarray
    nbytes: np.ndarray
    matmul: np.ndarray
    module_calls: int = 0

    @staticmethod
    def of(call: UnitCall) -> "OpTable":
        return OpTable(
            np.array([o.flops for o in call.ops], dtype=np.float64),
            np.array([o.nbytes for o in call.ops], dtype=np.float64),
            np.array([o.matmul for o in call.ops], dtype=bool),
            call.module_calls,
        )

    def roofline_seconds(self, gpu: GPUSpec, dtype: str, eff: Efficiency) -> float:
        """The ops' roofline time alone, without overheads."""
        if self.flops.size == 0:
            return 0.0
        d = eff.of(dtype)
        compute = self.flops / (gpu.peak_flops(dtype) * d.matmul)
        memory = self.nbytes / (gpu.mem_bw * d.memory)
        return float(np.maximum(compute, memory).sum())

    def overhead_counts(self) -> tuple[int, int, int]:
        """(matmul-class ops, other ops, module calls): what the fixed costs are charged on."""
        n_mm = int(self.matmul.sum())
        return n_mm, int(self.flops.size) - n_mm, self.module_calls

    def seconds(self, gpu: GPUSpec, dtype: str, eff: Efficiency) -> float:
        d = eff.of(dtype)
        n_mm, n_other, n_mod = self.overhead_counts()
        overhead = n_mm * d.matmul_op_us + n_other * d.other_op_us + n_mod * eff.module_overhead_us
        return self.roofline_seconds(gpu, dtype, eff) + overhead * 1e-6


@dataclass
class Estimate:
    """Simulated time, transfers and memory of one plan on one cluster."""

    phase_s: dict[str, float]  # compute + transfers per phase (vision, prefill, decode, decode_last)
    transfer_s: dict[str, float]  # the transfer part of each phase
    decode_s_per_token: float
    e2e_s: float
    moves: list[tuple[str, object, object, int, str]] = field(default_factory=list)  # (phase, src, dst, bytes, kind)
    peak_bytes: dict = field(default_factory=dict)  # device -> activations + KV at peak
    kv_bytes: dict = field(default_factory=dict)
    # (phase, GPU) -> the seconds of that phase spent on that GPU: its calls, plus the moves it
    # sends (offload streams count on the GPU they land on). What a pipeline stage costs (targets.py).
    device_phase_s: dict = field(default_factory=dict)

    def workload_transfers(self, new_tokens: int) -> tuple[int, int, dict]:
        """(bytes, count, bytes per link) over the whole workload: vision + prefill + every decode step."""
        by_phase = self.transfers_by_phase(new_tokens)
        links: dict = defaultdict(int)
        for (_, src, dst), (n, _) in by_phase.items():
            links[(src, dst)] += n
        return sum(n for n, _ in by_phase.values()), sum(c for _, c in by_phase.values()), dict(links)

    def transfers_by_phase(self, new_tokens: int) -> dict[tuple, tuple[int, int]]:
        """(phase, src, dst) -> (bytes, count) over the workload; "decode" sums every decode step."""
        steps = max(new_tokens - 1, 0)
        out: dict = defaultdict(lambda: [0, 0])
        for phase, src, dst, n, kind in self.moves:
            if phase in ("vision", "prefill"):
                out[(phase, src, dst)][0] += n
                out[(phase, src, dst)][1] += 1
        for (src, dst), (n, c) in _decode_mean([m for m in self.moves if m[0] in DECODE_PHASES]).items():
            out[("decode", src, dst)][0] += round(n * steps)
            out[("decode", src, dst)][1] += round(c * steps)
        return {k: (v[0], v[1]) for k, v in out.items() if v[1]}


def _decode_mean(moves) -> dict:
    """Mean bytes and count per link of one decode step (the first and the last step, averaged)."""
    phases = {m[0] for m in moves} or {"decode"}
    acc: dict = defaultdict(lambda: [0.0, 0.0])
    for phase, src, dst, n, kind in moves:
        acc[(src, dst)][0] += n / len(phases)
        acc[(src, dst)][1] += 1 / len(phases)
    return {k: (v[0], v[1]) for k, v in acc.items()}


def link_seconds(cluster: Cluster, src, dst, nbytes: int, eff: Efficiency) -> float:
    """Seconds of one move: the link's latency plus bytes over its achieved bandwidth."""
    if src == dst or nbytes == 0:
        return 0.0
    return cluster.link_between(src, dst).transfer_seconds(nbytes, eff.link_fraction(src, dst))


def combine(
    phase_compute: dict[str, float],
    moves: Sequence[tuple[str, object, object, int, str]],
    cluster: Cluster,
    new_tokens: int,
    eff: Efficiency,
    device_compute: dict | None = None,
) -> Estimate:
    """Phase times from compute seconds and the moves of one run (each move over the link it
    crosses: a node's own link, or the network between nodes). `device_compute`, (phase, GPU) ->
    seconds, gives the per-GPU split of the compute."""
    transfer = defaultdict(float)
    per_device = defaultdict(float, device_compute or {})
    for phase, src, dst, n, kind in moves:
        secs = link_seconds(cluster, src, dst, n, eff)
        transfer[phase] += secs
        per_device[(phase, src if isinstance(src, int) else dst)] += secs
    phase_s = {p: phase_compute.get(p, 0.0) + transfer.get(p, 0.0) for p in ("vision", "prefill", "decode", "decode_last")}
    if new_tokens <= 1:
        per_token = 0.0
    elif new_tokens == 2 or phase_s["decode_last"] == 0.0:
        per_token = phase_s["decode"]
    else:
        # a decode step's cost is affine in the cache length: the mean of the first and last is the mean of all
        per_token = (phase_s["decode"] + phase_s["decode_last"]) / 2
    e2e = phase_s["vision"] + phase_s["prefill"] + per_token * max(new_tokens - 1, 0)
    return Estimate(phase_s, dict(transfer), per_token, e2e, list(moves),
                    device_phase_s=dict(per_device) if device_compute is not None else {})


def price_calls(
    calls: Sequence[UnitCall],
    gpu_of: Callable[[UnitCall], GPUSpec],
    dtype_of: Callable[[UnitCall], str],
    eff: Efficiency,
) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for call in calls:
        if call.ops or call.module_calls:
            out[call.phase] += OpTable.of(call).seconds(gpu_of(call), dtype_of(call), eff)
    return dict(out)
