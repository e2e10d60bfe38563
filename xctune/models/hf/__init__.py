"""transformers' own VLM classes as models under test: published configs as presets (configs/),
units discovered from the module tree (family.py), inputs per family (recipes.py)."""

from .config import PRESET_NAMES, HFConfig, from_dict, get_preset

__all__ = ["PRESET_NAMES", "HFConfig", "from_dict", "get_preset", "twin"]


def twin(cfg: HFConfig) -> HFConfig:
    """The same class with tiny dimensions: same module tree shape, same code paths."""
    from .recipes import shrink

    return from_dict(shrink(cfg.data, cfg.model_type), f"{cfg.name}-twin", cfg.source)
