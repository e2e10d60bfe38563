"""`xctune report`: study outputs and benchmark runs, side by side, with regressions flagged.

Inputs are study folders (holding `best_plan.json`), pytest-benchmark JSON files
(`--benchmark-json`), or folders of such files. Per study: the best plan against each
baseline. Between benchmark runs (each later run against the first): the change of every
benchmark's median time and of every *guarded* figure (`extra_info["guards"]`, lower is
better: ratios measured side by side and exact counts). Times drift between machines and are
flagged but only guarded figures fail `--fail-on-regression PCT` (add `--include-times` on a
machine you trust to be stable).

The gate cannot pass by accident: besides a guarded figure worse than PCT, it fails on
anything that would let a regression through unseen (`Report.gaps`) - a benchmark of the
baseline missing from a later run (renamed ones included), a guard of the baseline missing,
a figure that is not a finite number (NaN, inf, text, null) in any run, a guard over the limit
its own run declares. It needs a baseline and at least one run to compare.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput, shown


@dataclass
class BenchRun:
    path: Path
    medians: dict[str, float]  # benchmark -> median seconds
    guards: dict[str, dict[str, float]]  # benchmark -> guard name -> value
    limits: dict[str, dict[str, float]]
    machine: str = ""
    unusable: list[tuple[str, str, str]] = field(default_factory=list)  # (benchmark, figure, value as given): not finite numbers


@dataclass(frozen=True)
class Gap:
    """Something that keeps the gate from judging a run: a missing benchmark or guard, an unusable figure."""

    run: str
    benchmark: str
    problem: str

    def describe(self) -> str:
        return f"{self.run}: {self.benchmark}: {self.problem}"


@dataclass
class Change:
    benchmark: str
    figure: str  # "time" or a guard's name
    before: float
    after: float
    guarded: bool

    @property
    def change(self) -> float:
        """Relative change, positive = worse (times and guards are lower-is-better). Measured against
        |before|, so that a guard that is negative when it passes (tau_ceiling_minus_twin) still reads
        an increase as a regression; from zero, any increase is infinite and a decrease none."""
        if self.before == 0:
            return math.inf if self.after > 0 else 0.0
        return (self.after - self.before) / abs(self.before)


@dataclass
class Report:
    studies: list[dict] = field(default_factory=list)
    runs: list[BenchRun] = field(default_factory=list)
    changes: list[tuple[str, Change]] = field(default_factory=list)  # (run label, change)
    gaps: list[Gap] = field(default_factory=list)

    def regressions(self, pct: float, include_times: bool = False) -> list[tuple[str, Change]]:
        return [(r, c) for r, c in self.changes if (c.guarded or include_times) and c.change > pct / 100]

    def gate(self, pct: float, include_times: bool = False) -> list[str]:
        """Why `--fail-on-regression PCT` fails, one line per cause; empty when the runs pass."""
        if len(self.runs) < 2:
            raise BadInput("--fail-on-regression needs a baseline and at least one run to compare with it")
        lines = [f"regression in {r}: {c.benchmark} {c.figure} {c.before:.6g} -> {c.after:.6g} "
                 f"({'n/a' if math.isinf(c.change) else f'{c.change:+.1%}'})" for r, c in self.regressions(pct, include_times)]
        return lines + [g.describe() for g in self.gaps]


def check_threshold(pct) -> float:
    """A regression threshold in percent: a finite number >= 0."""
    try:
        value = float(pct)
    except (TypeError, ValueError):
        raise BadInput(f"--fail-on-regression takes a percentage (a number >= 0), got {shown(pct)}") from None
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"--fail-on-regression takes a finite percentage >= 0, got {shown(pct)}")
    return value


def _figure(value) -> float | None:
    """A figure as a finite float, or None when it is not one (NaN, inf, text, null, bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path} is not valid JSON: {e}") from None


def load_bench(path: Path) -> BenchRun:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise BadInput(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' list)")
    run = BenchRun(path, {}, {}, {})
    for b in data["benchmarks"]:
        if not isinstance(b, dict) or not isinstance(b.get("name"), str) or not isinstance(b.get("stats"), dict) \
                or "median" not in b["stats"]:
            raise BadInput(f"{path}: a benchmark entry lacks name or stats.median")
        name = b["name"]
        if name in run.medians or name in run.guards:
            raise BadInput(f"{path}: benchmark {shown(name)} appears twice")
        extra = b.get("extra_info") if isinstance(b.get("extra_info"), dict) else {}
        run.medians[name] = _figure(b["stats"]["median"])
        if run.medians[name] is None:
            run.unusable.append((name, "median time", shown(b["stats"]["median"])))
            run.medians[name] = math.nan  # kept (not compared) so that the benchmark does not read as missing
        for kind in ("guards", "limits"):
            table = extra.get(kind) or {}
            if not isinstance(table, dict):
                raise BadInput(f"{path}: {name} extra_info.{kind} must be an object of figures")
            getattr(run, kind)[name] = figures = {}
            for key, raw in table.items():
                value = _figure(raw)
                if value is None:
                    run.unusable.append((name, f"{kind[:-1]} {key}", shown(raw)))
                else:
                    figures[key] = value
    info = data.get("machine_info") if isinstance(data.get("machine_info"), dict) else {}
    cpu = info.get("cpu") if isinstance(info.get("cpu"), dict) else {}
    run.machine = f"{info.get('node', '?')}, {cpu.get('brand_raw', '')}".strip(", ")
    return run


def load_study_summary(folder: Path) -> dict:
    doc = _read_json(folder / "best_plan.json")
    rec = doc.get("record", {})
    return {
        "study": doc.get("study", folder.name),
        "model": doc.get("model"),
        "cluster": doc.get("cluster"),
        "layout": doc.get("layout"),
        "dtypes": "/".join((doc.get("plan", {}).get("dtypes") or {}).values()),
        "e2e_ms": rec.get("e2e_ms"),
        "source": doc.get("source"),
        "baselines": doc.get("baselines", []),
        "optimum_gap": (doc.get("optimum") or {}).get("gap"),
        "path": str(folder),
    }


def build_report(paths: list[str]) -> Report:
    if not paths:
        raise BadInput("give at least one study folder or benchmark JSON file")
    rep = Report()
    for p in map(Path, paths):
        if p.is_dir() and (p / "best_plan.json").is_file():
            rep.studies.append(load_study_summary(p))
        elif p.is_dir():
            files = sorted(f for f in p.glob("*.json"))
            if not files:
                raise BadInput(f"{p} holds neither best_plan.json nor benchmark JSON files")
            rep.runs += [load_bench(f) for f in files]
        elif p.is_file():
            rep.runs.append(load_bench(p))
        else:
            raise BadInput(f"no such file or folder: {p}")
    if rep.runs:
        base = rep.runs[0]
        if not base.medians:
            raise BadInput(f"the baseline {base.path} holds no benchmarks: nothing to guard")
        for run in rep.runs:
            rep.gaps += [Gap(run.path.name, b, f"{what} = {raw} is not a finite number") for b, what, raw in run.unusable]
            for name, limits in run.limits.items():
                for g, lim in limits.items():
                    v = run.guards[name].get(g)
                    if v is not None and v > lim:
                        rep.gaps.append(Gap(run.path.name, name, f"guard {g} = {v:.6g} is over its own limit {lim:.6g}"))
        for run in rep.runs[1:]:
            label = run.path.name
            for name in base.medians:
                if name not in run.medians:
                    new = sorted(set(run.medians) - set(base.medians))
                    hint = f" (new in this run: {', '.join(new[:3])}{', ...' if len(new) > 3 else ''})" if new else ""
                    rep.gaps.append(Gap(label, name, f"missing from this run: renamed or not run{hint}"))
                    continue
                for g in base.guards[name]:
                    if g not in run.guards[name] and (name, f"guard {g}") not in {u[:2] for u in run.unusable}:
                        rep.gaps.append(Gap(label, name, f"guard {g} missing from this run"))
            for name, t in run.medians.items():
                if name in base.medians and math.isfinite(t) and math.isfinite(base.medians[name]):
                    rep.changes.append((label, Change(name, "time", base.medians[name], t, False)))
                for g, v in run.guards.get(name, {}).items():
                    if g in base.guards.get(name, {}):
                        rep.changes.append((label, Change(name, g, base.guards[name][g], v, True)))
    return rep


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def render_markdown(rep: Report, pct: float | None, include_times: bool) -> str:
    lines = ["# xctune report", ""]
    if rep.studies:
        lines += ["## Studies", "", "| study | model | cluster | best layout | dtypes | e2e ms | source | vs baselines | gap to optimum |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in rep.studies:
            vs = "; ".join(
                f"{b['baseline']}{' @ ' + b['dtype'] if b.get('dtype') else ''}: "
                + (f"{b['ratio']:.2f}x" if b.get("ratio") else str(b.get("status")))
                for b in s["baselines"]
            )
            gap = f"{s['optimum_gap']:+.2%}" if s.get("optimum_gap") is not None else ""
            e2e = f"{s['e2e_ms']:.1f}" if s.get("e2e_ms") else ""
            lines.append(f"| {s['study']} | {s['model']} | {s['cluster']} | {s['layout']} | {s['dtypes']} | {e2e} | "
                         f"{s['source']} | {vs} | {gap} |")
        lines.append("")
    if rep.runs:
        lines += ["## Benchmark runs", ""]
        for i, r in enumerate(rep.runs):
            lines.append(f"- {'baseline' if i == 0 else 'run'}: `{r.path}` ({len(r.medians)} benchmarks; {r.machine})")
        lines.append("")
    if rep.changes:
        threshold = pct if pct is not None else 10.0
        lines += [f"## Changes against `{rep.runs[0].path.name}` (flag: worse by more than {threshold:g}%)", "",
                  "| run | benchmark | figure | before | after | change | flag |", "|---|---|---|---|---|---|---|"]
        for label, c in rep.changes:
            worse = c.change > threshold / 100
            flag = ("**REGRESSION**" if c.guarded or include_times else "slower (time, not guarded)") if worse else ""
            fmt = _fmt_time if c.figure == "time" else (lambda v: f"{v:.6g}")
            ch = "n/a" if math.isinf(c.change) else f"{c.change:+.1%}"
            lines.append(f"| {label} | {c.benchmark} | {c.figure}{' (guarded)' if c.guarded else ''} | {fmt(c.before)} | "
                         f"{fmt(c.after)} | {ch} | {flag} |")
        lines.append("")
    if rep.gaps:
        lines += ["## What the gate cannot judge (each fails --fail-on-regression)", ""]
        lines += [f"- {g.describe()}" for g in rep.gaps]
        lines.append("")
    return "\n".join(lines) + "\n"


def write_csv(rep: Report, path: Path) -> None:
    import pandas as pd

    rows = [{"run": label, "benchmark": c.benchmark, "figure": c.figure, "guarded": c.guarded, "before": c.before,
             "after": c.after, "change": c.change} for label, c in rep.changes]
    rows += [{"run": "study", "benchmark": s["study"], "figure": "e2e_ms", "guarded": False, "before": None,
              "after": s["e2e_ms"], "change": None} for s in rep.studies]
    pd.DataFrame(rows).to_csv(path, index=False)
