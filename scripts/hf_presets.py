"""The README's table of transformers presets: parameters, constraints found, full-size dry-run seconds.

    .venv/bin/python scripts/hf_presets.py [PRESET ...]

For each preset: the parameter count of the published config built on `meta`; the constraints the
dry runs on its twin find (xctune constraints); and one full-size dry run (prefill of one image at the
native resolution + 64 text tokens, the first and the last of 32 decode steps) of a 2-GPU fp16 map
that splits the decoder layers in half, through `xctune check` on 2x24GiB. All figures are simulated
(fake tensors on virtual GPUs) except the seconds, which are this machine's wall time.
"""

from __future__ import annotations

import sys
import time

from xctune.plans.check import check
from xctune.plans.constraints import constraint_report
from xctune.hardware import make_cluster
from xctune.models.hf import PRESET_NAMES, get_preset
from xctune.plans.plan import Plan
from xctune.models.profile import profile_of
from xctune.workload import Workload


def two_gpu_map(profile) -> dict:
    """Decoder layers split in half; the second half and the head on GPU 1 unless the head is tied."""
    m = {u.name: 0 for u in profile.units}
    layers = profile.layers
    for name in layers[len(layers) // 2:]:
        m[name] = 1
    for name in profile.head:
        if name not in profile.colocation:
            m[name] = 1
    return m


def main(names) -> None:
    cluster = make_cluster("2x24GiB")
    print("| model | parameters | image tokens | constraints found (dry runs on the twin) | 2-GPU fp16 dry run | seconds |")
    print("|---|---|---|---|---|---|")
    for name in names:
        cfg = get_preset(name)
        profile = profile_of(cfg)
        t = time.perf_counter()
        rep = constraint_report(profile)
        c_s = time.perf_counter() - t
        found = []
        if rep.required_together:
            found.append("together: " + ", ".join(rep.required_together))
        if rep.main_gpu:
            found.append("main GPU: " + ", ".join(rep.main_gpu))
        if rep.not_offloadable:
            found.append("no offload: " + ", ".join(rep.not_offloadable))
        report = check(Plan.uniform(two_gpu_map(profile), "fp16"), profile, cluster, Workload())
        dr = report.dry_run
        verdict = "runs" if dr.ok else "FAILS: " + dr.failure.describe()
        mb = report.transfer_bytes("prefill") / 1e6
        print(
            f"| {name} | {profile.total_params / 1e9:.2f} B | {cfg.image_tokens()} | {'; '.join(found) or 'none (free)'} "
            f"| {verdict}, {mb:.1f} MB per prefill | {dr.seconds:.1f} (constraints {c_s:.0f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or PRESET_NAMES)
