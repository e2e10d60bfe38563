"""The README's headline table: per shipped study, the best plan against the authors' heuristic, the gain
split into placement (same precision) and precision (same map).

    .venv/bin/python scripts/figures/gains_table.py [--regenerate] [STUDY ...]

Runs each study (default: every virtual study in studies/, i.e. not `[real] enabled`), fresh, with
its own trials and seed, and prints one markdown row per study with the date and the machine.
`--regenerate` writes the outputs to the study's results/ folder (replacing its study.db); otherwise
they go to a temporary folder. Every number is simulated (trace + cost model) and says so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from xctune.reports.report import baseline_gains, layout, summary, write_outputs  # noqa: E402
from xctune.search.runner import run_search  # noqa: E402
from xctune.search.study import load_study, with_overrides  # noqa: E402


def x(v) -> str:
    return f"{v:.2f}x" if v else "—"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("studies", nargs="*")
    ap.add_argument("--regenerate", action="store_true")
    args = ap.parse_args()
    paths = [Path(s) for s in args.studies] or sorted((ROOT / "studies").glob("*.toml"))
    tmp = Path(tempfile.mkdtemp(prefix="xctune-gains-"))
    rows = []
    for path in paths:
        spec = load_study(path)
        if spec.real:
            continue
        out = ROOT / "results" / spec.name if args.regenerate else tmp / spec.name
        (out / "study.db").unlink(missing_ok=True)
        result = run_search(with_overrides(spec, out=str(out)), progress=False, log=lambda m: None)
        if args.regenerate:
            write_outputs(result)
        print(summary(result), file=sys.stderr)
        gains = {g["baseline"]: g for g in baseline_gains(result)}
        authors = gains.get("authors", {})
        same = result.best_plan.dtypes["lm"]
        rivals = [(g["ratios"].get(same), name) for name, g in gains.items() if g["ratios"].get(same)]
        rival = min(rivals) if rivals else None
        status = {d: authors.get("status", {}).get(d) for d in authors.get("ratios", {})}
        authors_cells = ", ".join(f"{d} {x(r) if r else status[d]}" for d, r in authors.get("ratios", {}).items())
        rows.append(
            f"| `{spec.name}`: {spec.model}, `{spec.gpus}`, {'/'.join(spec.space.dtypes)} | "
            f"{layout(result.best_plan, result.profile)}, {result.best_plan.dtype_label}: {result.best['e2e_ms']:.1f} ms | "
            f"{authors_cells} | **{x(authors.get('placement'))}** | {x(authors.get('precision'))} | "
            f"{f'{rival[1]} {x(rival[0])}' if rival else '—'} |"
        )
    print(f"simulated (trace + cost model, default efficiency factors); {datetime.date.today()}, "
          f"{platform.machine()} {os.cpu_count()}-core CPU; scripts/figures/gains_table.py")
    print()
    print("| study | best plan (e2e) | authors' map, e2e over the best's, per precision | placement gain "
          "(authors at the best's precision) | precision gain (authors, baseline dtype -> best's) | "
          "strongest baseline at the best's precision |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
