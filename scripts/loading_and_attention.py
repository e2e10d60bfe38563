"""The README's figures for loading paths and attention (simulated: dry runs on virtual GPUs).

    .venv/bin/python scripts/loading_and_attention.py

1. the authors' 2-GPU map of IXC2-VL-7B in fp16: bytes per decode step under xctune's loader
   and a bare from_pretrained(device_map=...), at the default workload and at the 1355-token
   prompt of design.md §7;
2. eager vs SDPA attention: bytes crossing GPUs in prefill and the peak per GPU (weights +
   activations + KV), at the default workload (IXC2-VL-7B) and a long-context one (IXC2-4KHD-7B,
   4x4 crops = 2461 image tokens + 128 text tokens), the authors' map, fp16, 2 x RTX 4090.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from xctune.plans.baselines import baseline_plan
from xctune.plans.check import check
from xctune.hardware import GiB, make_cluster
from xctune.models.loading import loading_paths, resolve_model
from xctune.plans.plan import load_plan
from xctune.workload import Workload

ROOT = Path(__file__).resolve().parent.parent
AUTHORS_2GPU = ROOT / "tests" / "data" / "field" / "ixc2-vl-7b.authors-heuristic.2gpu.json"


def main() -> None:
    cluster = make_cluster("2xrtx4090")
    print("| workload | xctune's loader | bare from_pretrained |")
    print("|---|---|---|")
    for label, w in (("default: 1225 image + 64 text tokens", Workload()),
                     ("design.md §7: 1225 image + 130 text = 1355 tokens", Workload(prompt_tokens=130))):
        rep = check(load_plan(AUTHORS_2GPU, "fp16"), resolve_model("ixc2-vl-7b").profile, cluster, w)
        by = rep.decode_by_loader
        print(f"| {label} | {by['xctune'] / 1e6:.2f} MB | {by['from_pretrained'] / 1e6:.1f} MB |", flush=True)
    print(f"\n({loading_paths()['from_pretrained'].description})\n")
    print("| workload | attention | prefill bytes across GPUs | peak cuda:0 | peak cuda:1 |")
    print("|---|---|---|---|---|")
    cases = (("default (ixc2-vl-7b)", "ixc2-vl-7b", Workload()),
             ("long context (ixc2-4khd-7b, 4x4 crops, 2589 tokens)", "ixc2-4khd-7b",
              Workload(hd_layout=(4, 4), prompt_tokens=128, new_tokens=64)))
    for label, model, w in cases:
        for attn in ("eager", "sdpa"):
            prof = resolve_model(model, attn=attn).profile
            plan = baseline_plan("authors", prof, cluster, "fp16")
            rep = check(plan, prof, cluster, w)
            peaks = " | ".join(f"{d.total_bytes / GiB:.2f} GiB" for d in rep.devices)
            print(f"| {label} | {attn} | {rep.transfer_bytes('prefill') / 1e6:.1f} MB | {peaks} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
