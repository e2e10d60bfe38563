"""The embedded model zoo: InternLM-XComposer2 presets built without downloading anything."""

from .config import PRESETS, XComposerConfig, get_config
from .xcomposer import XComposer, init_weights, num_params

__all__ = ["PRESETS", "XComposerConfig", "get_config", "XComposer", "init_weights", "num_params"]
