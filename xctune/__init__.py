"""xctune: find device maps for vision-language models that run, fit, and are fast.

The Python API is the product; the `xctune` command is a thin layer over it. Entry points:
`xctune.plans.check.check` (will a map run?), `xctune.worlds.simulate.simulate` and
`xctune.worlds.real.HostExecutor` (one trial record, simulated or measured),
`xctune.search.runner.run_search` (a study). The folders group modules by role: models/ (every
model family, behind one interface), plans/, worlds/ (virtual and real), search/, reports/, export/.
"""

__version__ = "0.1.0"
