"""`xctune search` in a process whose virtual trials are slowed, for the multi-worker tests.

The trials themselves are the real virtual-world evaluation; this wrapper only makes each take
a while, so that a test can kill or interrupt a worker while a trial is running:
  SLOW_WORKER_LOG      a file; one line is appended when an evaluation starts
  SLOW_WORKER_SECONDS  seconds each evaluation sleeps first (default 0.2)
  SLOW_WORKER_HANG_AT  the n-th evaluation of this process sleeps for a minute (to be killed there)
Usage: python tests/slow_worker.py search ARGS...  (the arguments of `xctune`)
"""

import os
import sys
import time

from xctune.search import runner as search
from xctune.cli import main

_evaluate = search.VirtualEvaluator.__call__
_count = [0]


def slowed(self, plan, label):
    _count[0] += 1
    with open(os.environ["SLOW_WORKER_LOG"], "a") as f:
        f.write(f"{os.getpid()} {_count[0]} {label}\n")
    hang = int(os.environ.get("SLOW_WORKER_HANG_AT", "0"))
    time.sleep(60 if _count[0] == hang else float(os.environ.get("SLOW_WORKER_SECONDS", "0.2")))
    return _evaluate(self, plan, label)


search.VirtualEvaluator.__call__ = slowed
sys.exit(main(sys.argv[1:]))
