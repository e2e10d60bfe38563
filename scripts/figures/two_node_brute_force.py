"""The exact optimum of the two-node study against brute force over every plan of its space.

    .venv/bin/python scripts/figures/two_node_brute_force.py [STUDY.toml]

studies/two-node.toml by default: IXC2-4KHD, target vllm-pp, on 2x[2xrtx3060]@eth-100g, where
each move is priced on the link it crosses (a node's PCIe or the network). Prints both optima,
their plans, the count of plans and the seconds each took, with the date and the machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from xctune.models.loading import resolve_model  # noqa: E402
from xctune.search.oracle import Oracle, brute_force  # noqa: E402
from xctune.reports.report import layout  # noqa: E402
from xctune.search.runner import build_cluster  # noqa: E402
from xctune.worlds.trace_cache import default_dir as trace_cache_dir  # noqa: E402
from xctune.search.space import SearchSpace  # noqa: E402
from xctune.search.study import load_study  # noqa: E402
from xctune.search.targets import target_cluster  # noqa: E402
from xctune.worlds.trace import Trace  # noqa: E402


def main() -> None:
    spec = load_study(sys.argv[1] if len(sys.argv) > 1 else ROOT / "studies" / "two-node.toml")
    profile = resolve_model(spec.model, spec.trust_remote_code, attn=spec.attn).profile
    cluster = target_cluster(build_cluster(spec), spec.target)
    space = SearchSpace(profile, cluster, spec.space, spec.target)
    trace = Trace(profile, spec.workload, cache_dir=trace_cache_dir())
    trace.recording(space.build([len(profile.layers)], 0, 0, {g: space.dtypes[0] for g in ("vision", "lm", "head")}))
    print(f"study {spec.name!r}: {spec.model} on {cluster.describe()}, target {spec.target.name}; simulated; "
          f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()}-core CPU, "
          f"load average {os.getloadavg()[0]:.1f}")
    dp = Oracle(trace, space, cluster).solve()
    t0 = time.perf_counter()
    brute = brute_force(trace, space, cluster)
    brute_s = time.perf_counter() - t0
    for name, opt, secs in (("dynamic programme", dp, dp.seconds), ("brute force", brute, brute_s)):
        plan = f"{layout(opt.plan, profile)}, {opt.plan.dtype_label}" if opt.plan else "nothing fits"
        print(f"{name}: {opt.e2e_ms:.4f} ms ({plan}); {opt.configs} {'programme(s)' if opt is dp else 'plans'}, "
              f"{secs:.2f} s")
    same = dp.e2e_ms == brute.e2e_ms or abs(dp.e2e_ms - brute.e2e_ms) <= 1e-9 * abs(brute.e2e_ms)
    print(f"equal: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
