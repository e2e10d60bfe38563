"""Everything that knows a model family (design.md §6): the embedded InternLM-XComposer2 presets,
built without downloading anything, and transformers' own classes (hf/), behind one interface
(base.py, profile.py, families.py, loading.py, presets.py).

The package itself stays light (no torch at import: the command line reads presets.py to build its
help); the embedded model's names below load on first use.
"""

_LAZY = {
    "PRESETS": "config", "XComposerConfig": "config", "get_config": "config",
    "XComposer": "xcomposer", "init_weights": "xcomposer", "num_params": "xcomposer",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
