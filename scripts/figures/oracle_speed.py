"""How long the exact optimum takes (the README's oracle figures come from here).

    .venv/bin/python scripts/figures/oracle_speed.py [GPUS ...]

IXC2-VL-7B, the default workload, fp32/fp16/bf16 per precision group (27 dtype choices), on
clusters from 2 to 64 GPUs. The traces are recorded first (cached in $XCTUNE_CACHE) and not
counted. Prints wall and CPU seconds per cluster, with the date and the machine.
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

from xctune.hardware import make_cluster  # noqa: E402
from xctune.models import get_config  # noqa: E402
from xctune.search.oracle import Oracle  # noqa: E402
from xctune.models.profile import profile_of  # noqa: E402
from xctune.worlds.trace_cache import default_dir as trace_cache_dir  # noqa: E402
from xctune.search.space import SearchSpace, SpaceOptions  # noqa: E402
from xctune.worlds.trace import Trace  # noqa: E402
from xctune.workload import Workload  # noqa: E402

CLUSTERS = ["2x24GiB", "8x24GiB", "16x24GiB", "rtx4090,2xrtx3060", "16xa100-40g,16xrtx4090,16xl40s,16xa10"]


def main() -> None:
    profile = profile_of(get_config("ixc2-vl-7b"))
    trace = Trace(profile, Workload(), cache_dir=trace_cache_dir())
    warm = make_cluster("2x24GiB")
    Oracle(trace, SearchSpace(profile, warm, SpaceOptions()), warm).solve()  # records every width
    print(f"exact optimum, ixc2-vl-7b, default workload, fp32/fp16/bf16 per group; {datetime.date.today()}, "
          f"{platform.machine()} {os.cpu_count()}-core CPU, load average {os.getloadavg()[0]:.1f}")
    print("| GPUs | programmes | wall s | CPU s | optimum (simulated) |")
    print("|---|---|---|---|---|")
    for gpus in sys.argv[1:] or CLUSTERS:
        cluster = make_cluster(gpus)
        space = SearchSpace(profile, cluster, SpaceOptions())
        w, c = time.perf_counter(), time.process_time()
        opt = Oracle(trace, space, cluster).solve()
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        print(f"| `{gpus}` ({len(cluster.gpus)}) | {opt.configs} | {wall:.2f} | {cpu:.2f} | "
              f"{opt.e2e_ms:.1f} ms, {opt.plan.dtype_label if opt.plan else 'nothing fits'} |", flush=True)


if __name__ == "__main__":
    main()
