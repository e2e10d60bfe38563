"""What the copy a transformers class makes of its image features costs a map, trace against full dry run.

    .venv/bin/python scripts/figures/native_copy.py [PRESET ...]   (default: llama-3.2-11b-vision llava-1.5-7b qwen2-vl-7b)

A native class moves its image features (and its image-token mask) to the embeddings' GPU itself
(`image_features.to(inputs_embeds.device)`); a trace, where every unit shares one physical device,
prices that copy from the joins a dry run does not confirm (trace.py, moves of kind "model"). Per
preset, at full size, fp16, the search's default workload (one image at the model's own resolution
+ 64 text tokens, 32 new tokens) and skip keys: accelerate-balanced (`device_map="auto"`) on
2x24GiB and 4x24GiB, and on 2x24GiB that map with the vision path (vision tower + projector) moved
to GPU 1. For each map: the bytes the model copies per prefill, the simulated end-to-end ms of the
trace without those copies (what the trace gave before it priced them: the same recording with
moves of kind "model" left free) and with them, and the full dry run of the map itself (the judge:
`virtual_run` on the real map), whose transfer bytes per phase must equal the trace's. All figures
simulated (trace + cost model); prints a markdown table with the date and the machine.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from xctune.hardware import make_cluster  # noqa: E402
from xctune.models.hf import get_preset  # noqa: E402
from xctune.models.profile import profile_of  # noqa: E402
from xctune.plans.baselines import baseline_map  # noqa: E402
from xctune.plans.plan import Plan, resolve  # noqa: E402
from xctune.reports.report import layout  # noqa: E402
from xctune.search.space import SpaceOptions  # noqa: E402
from xctune.worlds.trace import Trace  # noqa: E402
from xctune.worlds.virtual import virtual_run  # noqa: E402
from xctune.workload import Workload  # noqa: E402

PRESETS = ("llama-3.2-11b-vision", "llava-1.5-7b", "qwen2-vl-7b")
COPY = "model"  # the move kind of a copy the model's own code makes


def per_phase(moves) -> dict[str, int]:
    out: dict[str, int] = {}
    for phase, _, _, n, _ in moves:
        out[phase] = out.get(phase, 0) + n
    return out


def row(name, profile, trace, label, gpus, dmap, workload, skip_keys) -> str:
    cluster = make_cluster(gpus)
    res = resolve(dmap, profile)
    units = {u.name: res.device_of_unit(u.name) for u in profile.units}
    plan = Plan(units, {g: "fp16" for g in ("vision", "lm", "head")}, skip_keys)
    before = trace.evaluate(plan, cluster, free_move_kinds=(COPY,))
    after = trace.evaluate(plan, cluster)
    copied = sum(n for _, _, _, n, kind in after.moves if kind == COPY)
    full = virtual_run(profile, Plan(dmap, plan.dtypes, skip_keys), workload)
    if not full.ok:
        judge = f"dry run fails: {full.failure.describe()[:60]}"
    else:
        dry = per_phase([(m.phase, m.src, m.dst, m.nbytes, m.kind) for m in full.moves])
        trc = per_phase(after.moves)
        same = "equal" if dry == trc else "DIFFER"
        judge = f"{same}: prefill {dry.get('prefill', 0) / 1e6:.2f} MB (trace {trc.get('prefill', 0) / 1e6:.2f})"
    e2e0, e2e1 = before.e2e_s * 1e3, after.e2e_s * 1e3
    return (f"| {name} | {gpus} | {label} `{layout(plan, profile)}` | {copied / 1e6:.2f} | {e2e0:.2f} | {e2e1:.2f} "
            f"({(e2e1 / e2e0 - 1) * 100:+.2f}%) | {judge} |")


def main() -> None:
    names = sys.argv[1:] or list(PRESETS)
    workload = Workload()
    skip_keys = SpaceOptions().skip_keys  # what a study's trials and baselines use by default
    cache = os.environ.get("XCTUNE_CACHE")
    lines = [
        f"Measured with `scripts/figures/native_copy.py` ({datetime.date.today().isoformat()}, {os.cpu_count()}-core "
        f"CPU). Full-size presets, fp16, one image + 64 text tokens, 32 new tokens; all figures simulated.",
        "",
        "| model | GPUs | map | copied by the model per prefill (MB) | e2e ms, trace without the copy | "
        "e2e ms, trace with it | full dry run of the map: transfer bytes per phase vs the trace |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        profile = profile_of(get_preset(name))
        trace = Trace(profile, workload, cache_dir=Path(cache) if cache else None)
        for gpus in ("2x24GiB", "4x24GiB"):
            dmap = baseline_map("accelerate-balanced", profile, make_cluster(gpus), "fp16")
            lines.append(row(name, profile, trace, "accelerate", gpus, dmap, workload, skip_keys))
            print(lines[-1], file=sys.stderr, flush=True)
            if gpus == "2x24GiB":
                res = resolve(dmap, profile)
                moved = {u.name: res.device_of_unit(u.name) for u in profile.units} | {u: 1 for u in profile.vision}
                lines.append(row(name, profile, trace, "accelerate, vision path on GPU 1", gpus, moved, workload,
                                 skip_keys))
                print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
