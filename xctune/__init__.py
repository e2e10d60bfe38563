"""xctune: find device maps for InternLM-XComposer that run, fit, and are fast.

The Python API is the product; the `xctune` command is a thin layer over it. Entry points:
`xctune.check.check` (will a map run?), `xctune.simulate.simulate` and
`xctune.real.HostExecutor` (one trial record, simulated or measured), `xctune.search`.
"""

__version__ = "0.1.0"
