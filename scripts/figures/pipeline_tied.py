"""A tied head on a pipeline target: the best plan, and every split with the copy it costs.

    .venv/bin/python scripts/figures/pipeline_tied.py [MODEL] [GPUS] [TARGET]

paligemma-3b on 2x24GiB with target vllm-pp by default, in fp16, the default workload (one image
at the model's resolution + 64 text tokens, 32 new tokens). Prints the exact optimum of the cost
model under the target's rules, then every two-stage partition: its latency, its weights per GPU
and the bytes of the last stage's own copy of the embedding matrix (all simulated), with the
date and the machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from xctune.hardware import make_cluster  # noqa: E402
from xctune.models.loading import resolve_model  # noqa: E402
from xctune.models.profile import tied_copy_bytes  # noqa: E402
from xctune.plans.plan import Plan  # noqa: E402
from xctune.reports.report import layout  # noqa: E402
from xctune.search.oracle import Oracle, feasible_e2e  # noqa: E402
from xctune.search.space import SearchSpace, SpaceOptions  # noqa: E402
from xctune.search.targets import TargetSpec, pipeline_map  # noqa: E402
from xctune.worlds.costmodel import Efficiency  # noqa: E402
from xctune.worlds.trace import Trace  # noqa: E402
from xctune.worlds.trace_cache import default_dir as trace_cache_dir  # noqa: E402
from xctune.workload import Workload  # noqa: E402

GiB = 2**30


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "paligemma-3b"
    gpus = sys.argv[2] if len(sys.argv) > 2 else "2x24GiB"
    target = TargetSpec(sys.argv[3] if len(sys.argv) > 3 else "vllm-pp")
    profile = resolve_model(model).profile
    cluster = make_cluster(gpus)
    workload = Workload()
    trace = Trace(profile, workload, cache_dir=trace_cache_dir())
    space = SearchSpace(profile, cluster, SpaceOptions(dtypes=("fp16",), mixed_precision=False), target,
                        trace.joins_main(profile.embed_group, "fp16"))
    rules, eff = target.rules, Efficiency()
    print(f"{model} on {cluster.describe()}, target {target.name}, fp16; simulated; "
          f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()}-core CPU")
    opt = Oracle(trace, space, cluster, eff).solve()
    w = trace.weights(opt.plan, rules.tied_copies)
    copy = sum(tied_copy_bytes(profile, trace.unit_devices(opt.plan), opt.plan.dtypes).values())
    print(f"exact optimum: {opt.e2e_ms:.1f} ms  {layout(opt.plan, profile)}  weights "
          + ", ".join(f"cuda:{d} {b / GiB:.2f} GiB" for d, b in sorted(w.items(), key=str))
          + f"; duplicated {copy:,} B")
    L = len(profile.layers)
    print("two stages (layers on GPU 0 + GPU 1): e2e ms, weights per GPU, the last stage's copy of the tied weight")
    for k in range(1, L):
        plan = Plan.uniform(pipeline_map(profile, [k, L - k]), "fp16")
        e2e = feasible_e2e(trace, plan, cluster, eff, rules)
        w = trace.weights(plan, rules.tied_copies)
        copy = tied_copy_bytes(profile, trace.unit_devices(plan), plan.dtypes)
        print(f"  {k:>2}+{L - k:<2} {'oom' if e2e is None else f'{1e3 * e2e:.1f}':>7}  "
              + ", ".join(f"cuda:{d} {b / GiB:.2f} GiB" for d, b in sorted(w.items(), key=str))
              + f"; copy on cuda:{', cuda:'.join(map(str, copy))}: {sum(copy.values()):,} B")


if __name__ == "__main__":
    main()
