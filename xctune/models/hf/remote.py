"""Remote code: a checkpoint directory whose config.json names its own classes (`auto_map`).

Running a directory's `*.py` files is code execution, so nothing here is imported unless the user
passed `--trust-remote-code`; without it the caller refuses with the reason (config.py), before
any of this module runs. With it, the classes are loaded from the directory through transformers'
own dynamic module loading (the path `from_pretrained(..., trust_remote_code=True)` takes), never
from another repository (xctune downloads nothing).

xctune feeds a class the inputs of the native family it derives from (a LLaVA subclass gets
LLaVA's inputs, recipes.py): a remote class that derives from none of the supported classes is
refused with the reason, since what its forward takes is unknown.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ...errors import BadInput

# The auto_map entries that name a model with a language-model head, in the order tried
MODEL_KEYS = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM", "AutoModel")


def code_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.py"))


def fingerprint(path: Path) -> str:
    """The directory's code, hashed: a change of the code is another model (profile and trace caches)."""
    h = hashlib.sha256()
    for f in code_files(path):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _reference(auto_map: dict, key: str, path: Path) -> str:
    ref = auto_map[key]
    if isinstance(ref, (list, tuple)):  # (slow, fast) pairs are tokenizers'; take the first that is set
        ref = next((r for r in ref if r), None)
    if not isinstance(ref, str) or "." not in ref:
        raise BadInput(f"{path}/config.json: auto_map[{key!r}] must name 'module.Class', got {ref!r}")
    if "--" in ref:
        raise BadInput(f"{path}/config.json: auto_map[{key!r}] = {ref!r} points at another repository; xctune loads "
                       "code only from the directory itself and downloads nothing")
    module = ref.rpartition(".")[0]
    if not (path / f"{module}.py").is_file():
        raise BadInput(f"{path}/config.json: auto_map[{key!r}] names {module}.py, which the directory does not hold")
    return ref


def load_class(path: Path, data: dict, key: str):
    """A class named by `auto_map[key]`, imported from the directory (the user allowed it)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    ref = _reference(data["auto_map"], key, path)
    try:
        return get_class_from_dynamic_module(ref, str(path), local_files_only=True)
    except ImportError as e:
        raise BadInput(f"{path}: its code needs what is not installed here: {str(e).splitlines()[0]}") from None
    except (AttributeError, OSError, SyntaxError) as e:
        raise BadInput(f"{path}: cannot load {ref} from its code: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def model_key(path: Path, data: dict) -> str:
    auto_map = data.get("auto_map")
    if not isinstance(auto_map, dict):
        raise BadInput(f"{path}/config.json: auto_map must be an object of 'AutoClass': 'module.Class'")
    key = next((k for k in MODEL_KEYS if k in auto_map), None)
    if key is None:
        raise BadInput(f"{path}/config.json: auto_map names no model class ({', '.join(MODEL_KEYS)})")
    return key


def native_base(cls, supported: dict[str, str]) -> str | None:
    """The supported model_type a remote model class derives from (its nearest native ancestor)."""
    by_class = {arch: mt for mt, arch in supported.items()}
    for base in cls.__mro__:
        if base.__module__.startswith("transformers.models.") and base.__name__ in by_class:
            return by_class[base.__name__]
    return None
