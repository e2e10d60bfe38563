"""The README's table of transformers presets: size, constraints, dry-run time, and the best map found
by `search` for 2x24GiB and 4x24GiB in fp16 against accelerate's `device_map="auto"` map.

    .venv/bin/python scripts/figures/hf_table.py [--out FILE] [--trials 50] [PRESET ...]
    .venv/bin/python scripts/figures/hf_table.py --default-space [PRESET ...]

`--default-space` runs instead what `xctune search --trials 50 --model P --gpus 2x24GiB` runs (the
default space: fp32, fp16, bf16, a dtype per group; baselines in fp32 and each of those) and prints
per preset the best map, whether it passes `xctune check`, and its gap to the exact optimum. The
exact optimum then needs a trace per element-width combination (8), so this takes minutes a preset.

Per preset (default: all nine): the parameter count of the published config built on `meta`; the
constraints that dry runs on its twin find (`xctune constraints`); the wall seconds of one full-size
dry run (prefill of one image at the model's own resolution + 64 text tokens, the first and the last
of 32 decode steps) of the best 2-GPU map; then per cluster a fresh fp16 study of `--trials` sampled
trials plus the baselines (`search --model P --gpus C --dtypes fp16`), whose best map must pass
`xctune check` (static rules + a full dry run), and its gap to the exact optimum of the cost model.
The accelerate baseline is accelerate-balanced (what `device_map="auto"` computes) in fp16, as the
study evaluated it. Decode figures are simulated (trace + cost model); the seconds are this
machine's wall time. Writes a markdown table (to stdout, and to `--out` when given) with the date
and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from xctune.plans.constraints import constraint_report  # noqa: E402
from xctune.models.hf import PRESET_NAMES, get_preset  # noqa: E402
from xctune.plans.plan import Plan, resolve  # noqa: E402
from xctune.models.profile import profile_of  # noqa: E402
from xctune.reports.report import layout  # noqa: E402
from xctune.search.runner import run_search  # noqa: E402
from xctune.search.space import SpaceOptions  # noqa: E402
from xctune.search.study import StudySpec  # noqa: E402
from xctune.worlds.virtual import virtual_run  # noqa: E402
from xctune.workload import Workload  # noqa: E402

CLUSTERS = ("2x24GiB", "4x24GiB")
BASELINE = "accelerate-balanced @ fp16"


def constraints_cell(profile) -> str:
    rep = constraint_report(profile)
    found = []
    if rep.required_together:
        found.append("together: " + ", ".join(short(u) for u in rep.required_together))
    if rep.main_gpu:
        found.append("main GPU: " + ", ".join(short(u) for u in rep.main_gpu))
    if rep.not_offloadable:
        found.append("no offload: " + ", ".join(short(u) for u in rep.not_offloadable))
    return "; ".join(found) or "none (free)"


def short(unit: str) -> str:
    return unit.rpartition(".")[2] if "." in unit else unit


def unit_map(device_map: dict, profile) -> dict:
    """A map at unit level (accelerate's maps may name a parent), for `layout`."""
    res = resolve(device_map, profile)
    return {u.name: res.device_of_unit(u.name) for u in profile.units}


def baseline_row(result) -> dict | None:
    for r in result.records:
        if BASELINE in (r.get("baseline_keys") or [r.get("baseline")]):
            return r
    return None


def cluster_cells(name: str, profile, gpus: str, trials: int, out: Path, log) -> tuple[str, str, str, object]:
    spec = StudySpec(name=f"hf-{name}-{gpus}", model=name, gpus=gpus, trials=trials, out=str(out),
                     space=SpaceOptions(dtypes=("fp16",), mixed_precision=False), baseline_dtype="fp16",
                     baselines=("authors", "accelerate-balanced"))
    (out / "study.db").unlink(missing_ok=True)
    r = run_search(spec, progress=False, log=lambda m: None)
    if r.best is None:
        return "no feasible map", "", "", None
    ok = r.verified.startswith("passes")
    gap = "no optimum"
    if r.optimum and r.optimum.plan:
        g = r.best["e2e_ms"] / r.optimum.e2e_ms - 1  # a best trial below the optimum beyond rounding would be a bug
        gap = f"{max(g, 0.0) * 100:+.2f}%" if g > -1e-9 else f"BELOW the optimum by {-g * 100:.4f}%"
    best = (f"{r.best['decode_ms_per_token']:.2f} ms/tok `{layout(r.best_plan, profile)}`"
            f"{'' if ok else ' (check FAILS: ' + r.verified + ')'}; gap to optimum {gap}")
    b = baseline_row(r)
    if b is None:
        base = "not computed"
    elif b.get("status") == "ok":  # runs and fits (a map outside the space is never "feasible" for the study)
        dmap = json.loads(b["device_map"]) if b.get("device_map") else None
        shown = f" `{layout(Plan(unit_map(dmap, profile), r.best_plan.dtypes), profile)}`" if dmap else ""
        base = f"{b['decode_ms_per_token']:.2f} ms/tok{shown}"
    else:
        base = f"{b.get('status')}: {(b.get('cause') or '')[:90]}"
    log(f"{name} {gpus}: best {best} | accelerate {base} | {r.seconds:.0f} s")
    return best, base, gap, r.best_plan


def default_space(names, trials: int, tmp: Path, log) -> list[str]:
    """The issue's own command per preset, `search --trials N --model P --gpus 2x24GiB`, as table rows."""
    lines = [
        f"Measured with `scripts/figures/hf_table.py --default-space` ({datetime.date.today().isoformat()}, "
        f"{os.cpu_count()}-core CPU, load average {os.getloadavg()[0]:.1f} at the start): `xctune search --trials "
        f"{trials} --model P --gpus 2x24GiB`, the default space (fp32, fp16, bf16 per group) and workload; "
        f"figures simulated (trace + cost model) except the seconds (the whole study: traces, trials, baselines, "
        f"exact optimum, `check` of the best map: static rules + full dry run).",
        "",
        "| model | best 2x24GiB (e2e ms, decode ms/tok) | precision | `check` | gap to the exact optimum | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        profile = profile_of(get_preset(name))
        spec = StudySpec(name=f"hf-{name}", model=name, gpus="2x24GiB", trials=trials, out=str(tmp / name))
        r = run_search(spec, progress=False, log=lambda m: None)
        if r.best is None:
            row = f"| {name} | no feasible map | | | | {r.seconds:.0f} |"
        else:
            gap = "no optimum"
            if r.optimum and r.optimum.plan:
                g = r.best["e2e_ms"] / r.optimum.e2e_ms - 1
                gap = f"{max(g, 0.0) * 100:+.2f}%" if g > -1e-9 else f"BELOW the optimum by {-g * 100:.4f}%"
            row = (f"| {name} | {r.best['e2e_ms']:.1f} ms, {r.best['decode_ms_per_token']:.2f} ms/tok "
                   f"`{layout(r.best_plan, profile)}` | {r.best_plan.dtype_label} | "
                   f"{'passes' if r.verified.startswith('passes') else r.verified} | {gap} | "
                   f"{r.seconds:.0f} |")
        lines.append(row)
        log(row)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("presets", nargs="*")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--default-space", action="store_true")
    args = ap.parse_args()
    names = args.presets or list(PRESET_NAMES)
    tmp = Path(tempfile.mkdtemp(prefix="xctune-hf-table-"))

    def log(m):
        print(m, file=sys.stderr, flush=True)

    if args.default_space:
        text = "\n".join(default_space(names, args.trials, tmp, log)) + "\n"
        print(text)
        if args.out:
            args.out.write_text(text)
        return

    lines = [
        f"Measured with `scripts/figures/hf_table.py` ({datetime.date.today().isoformat()}, "
        f"{os.cpu_count()}-core CPU, load average {os.getloadavg()[0]:.1f} at the start). Workload: one image at "
        f"the model's own resolution + 64 text tokens, 32 new tokens; fp16; PCIe 4 between GPUs; decode ms/token "
        f"simulated (trace + cost model), the dry-run seconds wall time. Best: {args.trials} sampled trials + "
        f"baselines, the map passes `xctune check`; accelerate: `device_map=\"auto\"` (balanced) in fp16.",
        "",
        "| model | parameters | constraints found (dry runs on the twin) | dry run (s) | best 2x24GiB | "
        "accelerate 2x24GiB | best 4x24GiB | accelerate 4x24GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        t0 = time.perf_counter()
        profile = profile_of(get_preset(name))
        cons = constraints_cell(profile)
        cells, best2 = [], None
        for gpus in CLUSTERS:
            best, base, _, plan = cluster_cells(name, profile, gpus, args.trials, tmp / f"{name}-{gpus}", log)
            cells += [best, base]
            if gpus == "2x24GiB":
                best2 = plan
        secs = "—"
        if best2 is not None:
            run = virtual_run(profile, best2, Workload())
            secs = f"{run.seconds:.1f}" if run.ok else f"FAILS: {run.failure.describe()[:60]}"
        row = f"| {name} | {profile.total_params / 1e9:.2f} B | {cons} | {secs} | " + " | ".join(cells) + " |"
        lines.append(row)
        log(f"{row}  ({time.perf_counter() - t0:.0f} s)")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
