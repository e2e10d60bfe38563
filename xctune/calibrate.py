"""`xctune calibrate`: fit the cost model's efficiency factors on this machine, and say how wrong it is.

1. Measure the host device's peaks with micro-benchmarks (a large matmul per dtype, a large
   copy): the "host" device the virtual executor can then describe (`--gpus host`).
2. Run the tiny model for real on a set of workloads (the real executor, one device) and
   record the same workloads in the virtual world (per-op FLOPs and bytes per phase).
3. Fit the achieved fractions of peak (matmul, memory) and the per-op overhead that make the
   roofline model match the measured phase times on the *training* workloads (grid search
   over the two fractions, least squares for the overhead, relative error).
4. Predict the *held-out* workloads and report the error per phase, in percent: the figure
   that says how far to trust a simulated number.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .costmodel import Efficiency, OpTable
from .errors import BadInput
from .hardware import GiB, GPUSpec
from .models.loading import ModelSpec
from .plan import Plan
from .real import HostExecutor, host_ram_bytes
from .virtual import virtual_run
from .workload import Workload

PHASES = ("vision", "prefill", "decode")
TRAIN = (
    Workload(images=1, prompt_tokens=16, new_tokens=8),
    Workload(images=1, prompt_tokens=128, new_tokens=8),
    Workload(images=2, prompt_tokens=64, new_tokens=8, batch=2),
    Workload(images=0, prompt_tokens=256, new_tokens=8),
    Workload(images=4, prompt_tokens=32, new_tokens=8),
)
HELD_OUT = (
    Workload(images=1, prompt_tokens=64, new_tokens=16),
    Workload(images=2, prompt_tokens=192, new_tokens=8),
    Workload(images=1, prompt_tokens=32, new_tokens=8, batch=4),
)


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_host(repeats: int = 5) -> GPUSpec:
    """The CPU as a device: matmul peak per dtype and copy bandwidth, measured now."""
    n = 1024
    tflops = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        secs = _timed(lambda: torch.mm(a, b), repeats)
        tflops[name] = 2 * n**3 / secs / 1e12
    src = torch.empty(32 * 2**20, dtype=torch.float32)  # 128 MiB
    dst = torch.empty_like(src)
    secs = _timed(lambda: dst.copy_(src), repeats)
    bw = 2 * src.numel() * 4 / secs / 1e9  # read + write
    return GPUSpec(
        name="host",
        memory_bytes=host_ram_bytes() or 16 * GiB,
        tflops=tflops,
        mem_bw_gbs=bw,
        source=f"measured on this machine by xctune calibrate ({torch.get_num_threads()} threads)",
    )


@dataclass
class Sample:
    workload: Workload
    phase: str
    measured_ms: float
    tables: list[OpTable]

    def terms(self, gpu: GPUSpec, eff: Efficiency) -> tuple[float, int, int]:
        """Roofline seconds, number of ops, number of module calls."""
        return (
            sum(t.roofline_seconds(gpu, "fp32", eff) for t in self.tables),
            sum(t.flops.size for t in self.tables),
            sum(t.module_calls for t in self.tables),
        )

    def predicted_ms(self, gpu: GPUSpec, eff: Efficiency) -> float:
        r, n_ops, n_mod = self.terms(gpu, eff)
        return 1e3 * (r + (n_ops * eff.op_overhead_us + n_mod * eff.module_overhead_us) * 1e-6)


def collect(spec: ModelSpec, workloads, repeats: int, progress=None) -> list[Sample]:
    profile = spec.profile
    plan = Plan.uniform({u.name: 0 for u in profile.units}, "fp32", label="single")
    samples = []
    for i, w in enumerate(workloads):
        if progress:
            progress(f"workload {i + 1}/{len(workloads)}: {w.describe(profile.config)}")
        rec = HostExecutor(spec, w, repeats=repeats).run(plan)
        if not rec.ok:
            raise RuntimeError(f"calibration run failed: {rec.cause}")
        run = virtual_run(profile, plan, w)
        by_phase: dict[str, list[OpTable]] = {p: [] for p in PHASES}
        for c in run.calls:
            if c.phase in ("decode", "decode_last"):
                by_phase["decode"].append(OpTable.of(c))
            elif c.phase in by_phase:
                by_phase[c.phase].append(OpTable.of(c))
        # the dry run prices the first and the last decode step; the measurement is the mean step
        measured = {"vision": rec.vision_ms.median, "prefill": rec.prefill_ms.median,
                    "decode": 2 * rec.decode_ms_per_token.median}
        for p in PHASES:
            if w.images == 0 and p == "vision":
                continue
            samples.append(Sample(w, p, measured[p], by_phase[p]))
    return samples


def fit(samples: list[Sample], gpu: GPUSpec) -> Efficiency:
    """Grid over the two fractions of peak; non-negative least squares for the two overheads."""
    best, best_err = None, float("inf")
    grid = np.geomspace(0.02, 1.0, 30)
    meas = np.array([s.measured_ms * 1e-3 for s in samples])
    counts = np.array([s.terms(gpu, Efficiency())[1:] for s in samples], dtype=np.float64)  # [n, 2]
    for em in grid:
        for eb in grid:
            eff = Efficiency(float(em), float(eb), 0.0)
            r = np.array([s.terms(gpu, eff)[0] for s in samples])
            # relative residuals: (r + counts @ o - m) / m, minimised over o >= 0
            A, b = counts / meas[:, None], (meas - r) / meas
            o = _nnls2(A, b)
            err = float(((A @ o - b) ** 2).sum())
            if err < best_err:
                best_err = err
                best = Efficiency(float(em), float(eb), o[0] * 1e6, o[1] * 1e6, "calibrated on this machine")
    return best


def _nnls2(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with two non-negative unknowns: the unconstrained answer, else the best on an axis."""
    x, *_ = np.linalg.lstsq(A, b, rcond=None)
    if (x >= 0).all():
        return x
    cands = [np.zeros(2)]
    for j in range(2):
        col = A[:, j]
        v = max(0.0, float(col @ b / (col @ col))) if col @ col > 0 else 0.0
        c = np.zeros(2)
        c[j] = v
        cands.append(c)
    return min(cands, key=lambda c: float(((A @ c - b) ** 2).sum()))


def errors(samples: list[Sample], gpu: GPUSpec, eff: Efficiency) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for p in PHASES:
        rel = []
        for s in samples:
            if s.phase != p:
                continue
            rel.append((s.predicted_ms(gpu, eff) - s.measured_ms) / s.measured_ms)
        if rel:
            out[p] = {
                "mean_abs_pct": 100 * float(np.mean(np.abs(rel))),
                "max_abs_pct": 100 * float(np.max(np.abs(rel))),
                "mean_signed_pct": 100 * float(np.mean(rel)),
                "n": len(rel),
            }
    return out


@dataclass
class Calibration:
    device: GPUSpec
    efficiency: Efficiency
    train_error: dict
    held_out_error: dict
    model: str
    seconds: float
    samples: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "device": {
                "name": self.device.name,
                "memory_bytes": self.device.memory_bytes,
                "tflops": dict(self.device.tflops),
                "mem_bw_gbs": self.device.mem_bw_gbs,
                "source": self.device.source,
            },
            "efficiency": self.efficiency.to_dict(),
            "model": self.model,
            "train_error_pct": self.train_error,
            "held_out_error_pct": self.held_out_error,
            "seconds": round(self.seconds, 1),
            "samples": self.samples,
        }

    def render(self) -> str:
        d = self.device
        lines = [
            f"host device (measured): fp32 {d.tflops['fp32'] * 1e3:.1f} GFLOP/s, bf16 {d.tflops['bf16'] * 1e3:.1f}, "
            f"fp16 {d.tflops['fp16'] * 1e3:.1f}; copy bandwidth {d.mem_bw_gbs:.1f} GB/s",
            f"fitted efficiency: matmul {self.efficiency.matmul:.3f} of peak, memory {self.efficiency.memory:.3f} "
            f"of bandwidth, {self.efficiency.op_overhead_us:.1f} us per op, {self.efficiency.module_overhead_us:.1f} us per module call",
            "prediction error of the virtual executor against measurements of the tiny model on this machine:",
            f"  {'phase':<8} {'held-out mean |err|':>20} {'max |err|':>10} {'train mean |err|':>17}",
        ]
        for p in PHASES:
            h, t = self.held_out_error.get(p), self.train_error.get(p)
            if h:
                lines.append(f"  {p:<8} {h['mean_abs_pct']:>19.1f}% {h['max_abs_pct']:>9.1f}% {t['mean_abs_pct']:>16.1f}%")
        lines.append(f"({self.seconds:.0f} s)")
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        from .atomic import write_text

        write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")


def calibrate(spec: ModelSpec, repeats: int = 5, progress=None, train_set=TRAIN, held_out=HELD_OUT) -> Calibration:
    if spec.profile.total_params > 50_000_000:
        raise BadInput("calibrate measures a small model for real: use --model tiny (or a small checkpoint)")
    if repeats < 1:
        raise BadInput("--repeats must be at least 1")
    t0 = time.perf_counter()
    host = measure_host()
    train = collect(spec, train_set, repeats, progress)
    test = collect(spec, held_out, repeats, progress)
    eff = fit(train, host)
    rows = [
        {"workload": s.workload.to_dict(), "phase": s.phase, "measured_ms": s.measured_ms,
         "predicted_ms": s.predicted_ms(host, eff),
         "set": "train" if s in train else "held-out"}
        for s in train + test
    ]
    return Calibration(host, eff, errors(train, host, eff), errors(test, host, eff), spec.config.name,
                       time.perf_counter() - t0, rows)


def load_host_device(path) -> GPUSpec:
    """The `host` device a calibration file describes (for `--gpus host`)."""
    try:
        d = json.loads(Path(path).read_text())["device"]
        return GPUSpec(d["name"], int(d["memory_bytes"]), dict(d["tflops"]), float(d["mem_bw_gbs"]), d["source"])
    except OSError as e:
        raise BadInput(f"cannot read calibration {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path} is not a calibration file ({type(e).__name__}: {e})") from None
