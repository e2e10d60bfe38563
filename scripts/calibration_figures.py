#!/usr/bin/env python
"""Regenerate the README's calibration figures (section "xctune calibrate") on this machine.

Writes results/calibration/host.json (the calibration, with the rank agreement over the real CPU
study's plans and the staleness probe), results/calibration/overhead.json (what measuring costs,
per phase) and results/calibration/figures.md (the tables the README shows, with the date, the
machine and its load while they were measured). Run from the repository root:

    .venv/bin/python scripts/calibration_figures.py [--plans 18] [--rounds 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xctune.plans.baselines import baseline_plan  # noqa: E402
from xctune.worlds.calibrate import PHASES, calibrate  # noqa: E402
from xctune.hardware import make_cluster  # noqa: E402
from xctune.models.loading import resolve_model  # noqa: E402
from xctune.worlds.real import HostExecutor, overhead_ratios  # noqa: E402
from xctune.search.study import load_study  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu})"


def load() -> str:
    try:
        return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", type=int, default=18)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--overhead-rounds", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "results" / "calibration"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = datetime.datetime.now(datetime.timezone.utc), load()
    spec = resolve_model("tiny")
    study = load_study(ROOT / "studies" / "real-cpu.toml")
    cal = calibrate(spec, repeats=args.repeats, agreement_study=study, agreement_plans=args.plans,
                    agreement_rounds=args.rounds, out=out / "host.json", progress=lambda m: print(m, file=sys.stderr))
    plan = baseline_plan("authors", spec.profile, make_cluster(study.gpus, headroom=0), "fp32")
    overhead = overhead_ratios(HostExecutor(spec, study.workload, repeats=3), plan, args.overhead_rounds)
    (out / "overhead.json").write_text(json.dumps({"plan": "authors (2 logical devices, fp32)", "workload": study.workload.to_dict(),
                                                   "rounds": args.overhead_rounds, "threads": 1, **overhead}, indent=1) + "\n")
    a = cal.agreement
    lines = [
        f"Measured {started:%Y-%m-%d %H:%M} UTC on a {machine()}, 1 torch thread; {load_before} at the start, "
        f"{load()} at the end; `scripts/calibration_figures.py` ({cal.seconds:.0f} s for the calibration).",
        "",
        "| phase | held-out mean abs. error | max | training mean abs. error | measurement noise (median cv) |",
        "|---|---|---|---|---|",
    ]
    for p in PHASES:
        h, t = cal.held_out_error[p], cal.train_error[p]
        lines.append(f"| {p} | {h['mean_abs_pct']:.1f}% | {h['max_abs_pct']:.1f}% | {t['mean_abs_pct']:.1f}% | "
                     f"{h['measurement_cv_pct']:.1f}% |")
    lines += [
        "",
        f"Rank agreement over {a.n_plans} plans of `studies/real-cpu.toml`, {a.rounds} interleaved rounds "
        f"(median e2e cv {100 * a.e2e_cv_median:.1f}%): Kendall tau twin vs measured median **{a.tau_twin:.2f}**; "
        f"the measurement against itself: {a.tau_ceiling:.2f} (median of even vs odd rounds), "
        f"{a.tau_single:.2f} (one round vs another).",
        "",
        f"What measuring costs (authors' map, 2 logical devices, fp32, {args.overhead_rounds} interleaved rounds):",
        "",
        "| ratio | vision | prefill | decode per token |",
        "|---|---|---|---|",
    ]
    for stat in ("fastest", "median"):
        for k, v in overhead[stat].items():
            lines.append(f"| {k.replace('_', ' ')} ({'fastest runs' if stat == 'fastest' else 'median of per-round ratios'}) | "
                         + " | ".join(f"{v.get(p, float('nan')):.3f}" for p in PHASES) + " |")
    text = "\n".join(lines) + "\n"
    (out / "figures.md").write_text(text)
    print(cal.render())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
