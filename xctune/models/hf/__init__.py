"""transformers' own VLM classes as models under test: published configs as presets (configs/),
units discovered from the module tree (family.py), inputs per family (recipes.py)."""

from .config import PRESET_NAMES, HFConfig, from_dict, get_preset

__all__ = ["PRESET_NAMES", "HFConfig", "from_dict", "get_preset", "twin"]


def twin(cfg: HFConfig) -> HFConfig:
    """The same class with tiny dimensions: same module tree shape, same code paths (a remote-code
    class stays the directory's class)."""
    from dataclasses import replace

    from .config import canonical
    from .recipes import shrink

    small = replace(cfg, name=f"{cfg.name}-twin", text=canonical(shrink(cfg.data, cfg.recipe_type)))
    small.to_transformers()  # transformers' own validation of the shrunk config
    return small
