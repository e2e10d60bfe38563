"""Where a warm default search spends its time (the README's search-speed figures come from here).

    .venv/bin/python scripts/figures/search_speed.py [--trials 50]

Runs studies/default.toml once to warm the caches (traces, the best plan's verdict), then again
warm, timing each part in process: wall and CPU time of the whole search, per trial the sampler
(Optuna's TPE inside SearchSpace.suggest), the evaluation (trace arithmetic) and Optuna's
bookkeeping (the rest of the trial), and the parts around the trials (baselines, exact optimum,
picking the best). CPU time is the figure to compare on a shared machine: the wall clock
stretches with other processes' load, which is printed. The trials run in the study's SQLite
file (WAL mode), as every search does: a killed search loses no finished trial.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from xctune.reports import report  # noqa: E402

from xctune.search import runner as search  # noqa: E402
from xctune.search.space import SearchSpace  # noqa: E402
from xctune.search.study import load_study, with_overrides  # noqa: E402

SPENT: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])


def timed(owner, name: str, label: str):
    """Wrap owner.name so that its wall and CPU seconds add up under `label`."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            s = SPENT[label]
            s[0] += time.perf_counter() - w
            s[1] += time.process_time() - c
            s[2] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    args = ap.parse_args()
    os.environ.setdefault("XCTUNE_CACHE", str(Path(tempfile.gettempdir()) / "xctune-figures-cache"))
    out = Path(tempfile.mkdtemp(prefix="xctune-speed-"))
    spec = with_overrides(load_study(ROOT / "studies" / "default.toml"), trials=args.trials, out=str(out / "cold"))
    w = time.perf_counter()
    search.run_search(spec, progress=False, log=lambda m: None)
    cold = time.perf_counter() - w

    timed(SearchSpace, "suggest", "trial: sampling (TPE, in SearchSpace.suggest)")
    timed(search.VirtualEvaluator, "__call__", "trial: evaluation (trace arithmetic)")
    timed(search, "_enqueue_baselines", "baselines (accelerate's maps, raw maps judged by the trace)")
    timed(report, "pick_best", "best plan (its cached dry-run verdict)")
    from xctune.search import oracle

    timed(oracle.Oracle, "solve", "exact optima (two dynamic programmes)")
    warm_spec = with_overrides(spec, out=str(out / "warm"))
    from xctune.search.worker import Worker

    timed(Worker, "run", "all trials (the worker loop)")
    w, c = time.perf_counter(), time.process_time()
    result = search.run_search(warm_spec, progress=False, log=lambda m: None)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    shutil.rmtree(out, ignore_errors=True)

    n = result.new_trials
    print(f"warm default search, {n} trials ({args.trials} sampled + baselines), SQLite storage (WAL)")
    print(f"date {datetime.date.today()}, machine: {platform.machine()} {os.cpu_count()}-core CPU, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} (shared machine)")
    print(f"first search (records what the caches lack: traces, the best plan's verdict): {cold:.1f} s wall")
    print(f"warm search: {wall:.2f} s wall, {cpu:.2f} s CPU")
    trials = SPENT.pop("all trials (the worker loop)")
    per = {k: v for k, v in SPENT.items() if k.startswith("trial:")}
    rest_w = trials[0] - sum(v[0] for v in per.values())
    rest_c = trials[1] - sum(v[1] for v in per.values())
    print(f"  {'part':<62} {'wall s':>8} {'CPU s':>8} {'CPU ms/trial':>13}")
    for k, (ws, cs, _) in SPENT.items():
        extra = f"{cs / n * 1e3:13.1f}" if k.startswith("trial:") else ""
        print(f"  {k:<62} {ws:8.2f} {cs:8.2f} {extra}")
    # the rest of a trial; nested timers make it slightly negative where it is nil
    rest_w, rest_c = max(rest_w, 0.0), max(rest_c, 0.0)
    print(f"  {'trial: Optuna bookkeeping (ask, tell, attributes, storage)':<62} {rest_w:8.2f} {rest_c:8.2f} {rest_c / n * 1e3:13.1f}")
    print(f"  {'all trials':<62} {trials[0]:8.2f} {trials[1]:8.2f} {trials[1] / n * 1e3:13.1f}")


if __name__ == "__main__":
    main()
