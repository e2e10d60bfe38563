"""transformers models as xctune models: a published config, held as data.

A preset is the `config.json` of a published checkpoint, written into the project
(`configs/*.json`, architecture keys only; `_source` names the checkpoint). A user's directory
with a `config.json` of a supported class works the same way. Nothing is downloaded: the model
is built from the config on `meta` (design.md §8: default configs are often not the published
size, so the published ones are written down).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ...errors import BadInput

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The classes this backend knows how to feed (recipes.py): model_type -> architecture.
SUPPORTED = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "mllama": "MllamaForConditionalGeneration",
}


@dataclass(frozen=True)
class HFConfig:
    """A transformers VLM config as xctune holds it: frozen, hashable, comparable.

    `text` is the canonical JSON of the config (what keys the profile cache and the trace cache).
    """

    name: str
    text: str
    source: str = ""  # the checkpoint a preset was written from, or the user's directory
    # A remote-code class (the user passed --trust-remote-code): the fingerprint of the directory's
    # code, and the supported model_type its class derives from (whose inputs it takes). Empty: native.
    remote: str = ""
    base_type: str = ""

    @cached_property
    def data(self) -> dict:
        return json.loads(self.text)

    @property
    def model_type(self) -> str:
        return self.data["model_type"]

    @property
    def recipe_type(self) -> str:
        """The supported model_type whose inputs and twin recipe apply (recipes.py)."""
        return self.base_type or self.model_type

    @property
    def architecture(self) -> str:
        return SUPPORTED[self.recipe_type]

    def model_class(self):
        """The class to build: transformers' own, or the directory's (remote code, allowed by the user)."""
        if self.remote:
            from .remote import model_key

            return _remote_class(self.source, self.remote, model_key(Path(self.source), self.data))
        import transformers

        return getattr(transformers, self.architecture)

    def config_class(self):
        import transformers

        if self.remote and "AutoConfig" in self.data.get("auto_map", {}):
            return _remote_class(self.source, self.remote, "AutoConfig")
        if self.model_type not in transformers.CONFIG_MAPPING:
            raise BadInput(f"config of {self.name}: model_type {self.model_type!r} is unknown to transformers and "
                           "its auto_map names no AutoConfig")
        return transformers.CONFIG_MAPPING[self.model_type]

    def sub(self, key: str) -> dict:
        """The text or vision sub-config (some classes keep the text keys at the top level)."""
        return self.data.get(key) or {}

    def text_value(self, key: str, default=None):
        return self.sub("text_config").get(key, self.data.get(key, default))

    @property
    def max_position_embeddings(self) -> int:
        return int(self.text_value("max_position_embeddings", 32768))

    # the workload asks these of any model config
    def image_tokens(self, layout=None) -> int:
        from .recipes import recipe_for

        return recipe_for(self).image_tokens(self)

    def crops_per_image(self, layout=None) -> int:
        return 1

    def to_transformers(self):
        """The transformers config object (building it validates the keys)."""
        from transformers.utils import logging

        data = {k: v for k, v in self.data.items() if not k.startswith("_")}
        level = logging.get_verbosity()
        logging.set_verbosity_error()  # twins trip transformers' warnings on token ids and rope lengths
        cls = self.config_class()
        try:
            return cls(**data)
        except (TypeError, ValueError, KeyError) as e:
            raise BadInput(f"config of {self.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        finally:
            logging.set_verbosity(level)


def canonical(data: dict) -> str:
    return json.dumps(data, sort_keys=True)


def _preset_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


PRESET_NAMES: tuple[str, ...] = tuple(_preset_files())


def get_preset(name: str) -> HFConfig:
    path = _preset_files().get(name)
    if path is None:
        raise BadInput(f"unknown transformers preset {name!r}; known: {', '.join(PRESET_NAMES)}")
    data = json.loads(path.read_text())
    return from_dict(data, name, data.get("_source", ""))


def from_dict(data: dict, name: str, source: str = "") -> HFConfig:
    """Validate a config.json of a transformers VLM: a supported class, with the fields it needs."""
    model_type = data.get("model_type")
    if model_type is None:
        raise BadInput(f"config of {name} has no 'model_type': cannot tell which transformers class it is")
    if model_type not in SUPPORTED:
        archs = ", ".join(data.get("architectures") or []) or model_type
        raise BadInput(
            f"config of {name} is {archs} (model_type {model_type!r}), which xctune's transformers backend does not "
            f"support (supported: {', '.join(sorted(SUPPORTED))}), nor an InternLM-XComposer2 checkpoint "
            f"(InternLMXComposer2ForCausalLM)"
        )
    return _validated(HFConfig(name, canonical(data), source))


def _validated(cfg: HFConfig) -> HFConfig:
    """The fields the family's recipe needs are there, and transformers accepts the config."""
    from .recipes import recipe_for

    data, name, model_type = cfg.data, cfg.name, cfg.model_type
    # a text field may sit at the top (as published) or in text_config (as transformers 5 saves it)
    missing = [k for k in recipe_for(cfg).required
               if _lookup(data, k) is None and ("." in k or _lookup(data, f"text_config.{k}") is None)]
    if missing:
        raise BadInput(f"config of {name} ({model_type}) lacks {', '.join(missing)}")
    cfg.to_transformers()  # transformers' own validation, as one line
    return cfg


def _lookup(data: dict, dotted: str):
    cur = data
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def resolve(spec: str, trust_remote_code: bool = False) -> HFConfig | None:
    """A transformers preset name, or a directory whose config.json is a transformers VLM; else None."""
    if spec in PRESET_NAMES:
        return get_preset(spec)
    path = Path(spec)
    cfg_path = path / "config.json"
    if not (path.is_dir() and cfg_path.is_file()) or (path / "xctune_config.json").is_file():
        return None
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{cfg_path} must hold a JSON object")
    model_type = str(data.get("model_type", ""))
    if not model_type or "internlm" in model_type:
        return None  # the embedded InternLM-XComposer reads it (loading.py)
    if data.get("auto_map"):
        if trust_remote_code:
            return remote_config(path, data)
        if model_type not in SUPPORTED:
            # checked before anything of the directory is imported: its code never runs without the flag
            raise BadInput(
                f"{path} needs its own modeling code (auto_map in config.json); running it is code execution: "
                f"pass --trust-remote-code to allow it"
            )
        # a native model_type: without the flag transformers runs its own class, and so does xctune
    return from_dict(data, path.name, str(path))


def remote_config(path: Path, data: dict) -> HFConfig:
    """A directory's own classes (the user passed --trust-remote-code): imported through transformers'
    dynamic modules, fed the inputs of the supported class they derive from."""
    from .remote import fingerprint, model_key, native_base

    remote = fingerprint(path)
    cls = _remote_class(str(path), remote, model_key(path, data))
    base = native_base(cls, SUPPORTED)
    if base is None:
        raise BadInput(
            f"{path}: its class {cls.__name__} derives from none of the supported transformers classes "
            f"({', '.join(sorted(SUPPORTED.values()))}), so the inputs its forward takes are unknown to xctune"
        )
    return _validated(HFConfig(path.name, canonical(data), str(path), remote=remote, base_type=base))


@functools.cache
def _remote_class(source: str, remote: str, key: str):
    """Imported once per process and code fingerprint (`remote`: another fingerprint, another import)."""
    from .remote import load_class

    return load_class(Path(source), json.loads((Path(source) / "config.json").read_text()), key)
