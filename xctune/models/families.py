"""Which model family describes a config: the one lookup the rest of xctune makes (base.py)."""

from __future__ import annotations

from functools import cache

from .base import ModelFamily


@cache
def family_of(config) -> ModelFamily:
    from .config import XComposerConfig

    if isinstance(config, XComposerConfig):
        from .ixc import IXCFamily

        return IXCFamily(config)
    from .hf.config import HFConfig

    if isinstance(config, HFConfig):
        from .hf.family import HFFamily

        return HFFamily(config)
    raise TypeError(f"no model family for {type(config).__name__}")
