"""`xctune report`: study outputs and benchmark runs, side by side, with regressions flagged.

Inputs are study folders (holding `best_plan.json`), pytest-benchmark JSON files
(`--benchmark-json`), or folders of such files. Per study: the best plan against each
baseline. Between benchmark runs (each later run against the first): the change of every
benchmark's median time and of every *guarded* figure (`extra_info["guards"]`, lower is
better: ratios measured side by side and exact counts). Times drift between machines and are
flagged but only guarded figures fail `--fail-on-regression PCT` (add `--include-times` on a
machine you trust to be stable).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput


@dataclass
class BenchRun:
    path: Path
    medians: dict[str, float]  # benchmark -> median seconds
    guards: dict[str, dict[str, float]]  # benchmark -> guard name -> value
    limits: dict[str, dict[str, float]]
    machine: str = ""


@dataclass
class Change:
    benchmark: str
    figure: str  # "time" or a guard's name
    before: float
    after: float
    guarded: bool

    @property
    def change(self) -> float:
        if self.before == 0:
            return 0.0 if self.after == 0 else math.inf
        return self.after / self.before - 1


@dataclass
class Report:
    studies: list[dict] = field(default_factory=list)
    runs: list[BenchRun] = field(default_factory=list)
    changes: list[tuple[str, Change]] = field(default_factory=list)  # (run label, change)

    def regressions(self, pct: float, include_times: bool = False) -> list[tuple[str, Change]]:
        return [(r, c) for r, c in self.changes if (c.guarded or include_times) and c.change > pct / 100]


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
    medians, guards, limits = {}, {}, {}
    for b in data["benchmarks"]:
        try:
            name = b["name"]
            medians[name] = float(b["stats"]["median"])
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{path}: a benchmark entry lacks name or stats.median") from None
        extra = b.get("extra_info") or {}
        guards[name] = {k: float(v) for k, v in (extra.get("guards") or {}).items()}
        limits[name] = {k: float(v) for k, v in (extra.get("limits") or {}).items()}
    info = data.get("machine_info") or {}
    machine = f"{info.get('node', '?')}, {info.get('cpu', {}).get('brand_raw', '')}".strip(", ")
    return BenchRun(path, medians, guards, limits, machine)


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
        for run in rep.runs[1:]:
            label = run.path.name
            for name, t in run.medians.items():
                if name in base.medians:
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
    for r in rep.runs:
        for name, limits in r.limits.items():
            for g, lim in limits.items():
                v = r.guards.get(name, {}).get(g)
                if v is not None and v > lim:
                    lines.append(f"- over its own limit in `{r.path.name}`: {name} {g} = {v:.4g} > {lim:.4g}")
    return "\n".join(lines) + "\n"


def write_csv(rep: Report, path: Path) -> None:
    import pandas as pd

    rows = [{"run": label, "benchmark": c.benchmark, "figure": c.figure, "guarded": c.guarded, "before": c.before,
             "after": c.after, "change": c.change} for label, c in rep.changes]
    rows += [{"run": "study", "benchmark": s["study"], "figure": "e2e_ms", "guarded": False, "before": None,
              "after": s["e2e_ms"], "change": None} for s in rep.studies]
    pd.DataFrame(rows).to_csv(path, index=False)
