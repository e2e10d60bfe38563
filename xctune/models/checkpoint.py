"""A published InternLM-XComposer checkpoint directory, read as data.

Two questions, both answered from the directory's own files and never by running its code:

1. *Which model is it?* `identify` weighs the evidence a checkpoint carries: `config.json`
   (the architecture it names, a `quantization_config`, the keys that only one variant has)
   and the parameter names of its weight index (`plora_*_GN` at the root, IXC2.5's extra
   adapters), with shapes read from the shards where names alone cannot tell (the rank of
   wqkv's LoRA, the vision tower's position table). Sources that disagree, or a directory that
   matches no known variant, are bad input naming what was found: never a silent fallback to
   another variant (a 4KHD checkpoint read as IXC2-VL gives wrong memory and inverted verdicts).
2. *What are its weights?* `read_weights` reads `*.safetensors` or pickled `*.bin` shards
   through their index, shard by shard: `.bin` with `torch.load(weights_only=True, mmap=True)`
   (tensors only: a pickle that would build any other object is refused, so no code runs),
   each tensor cast to the target dtype as its shard is read, so that host memory stays near
   one copy of the model. Weights the forward never uses and that published shards omit are
   accepted by name with a note; any other missing or unexpected weight is an error naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import BadInput, shown
from .config import PRESETS, XComposerConfig

ARCHITECTURE = "InternLMXComposer2ForCausalLM"
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")

# The vision tower's features are its last hidden state: CLIP's post_layernorm never runs, and
# the published 4KHD shards leave it out.
UNUSED_WEIGHTS = (
    "vit.vision_tower.vision_model.post_layernorm.weight",
    "vit.vision_tower.vision_model.post_layernorm.bias",
)
POSITION_TABLE = "vit.vision_tower.vision_model.embeddings.position_embedding.weight"
WQKV_LORA = "model.layers.0.attention.wqkv.Plora_A.weight"

# config.json `attn_implementation` (the authors' values) -> xctune's attention choice
ATTN_OF_CONFIG = {"eager": "eager", "flash_attention_2": "flash", "sdpa": "sdpa"}

# Language-model sizes every IXC 7B config.json states; a value that differs from the
# identified variant's is an error (xctune models the published trees, not look-alikes).
_SIZE_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
}


@dataclass(frozen=True)
class Variant:
    preset: str  # the preset whose tree the variant has
    title: str
    hd: bool  # GN separators at the root
    adapters: bool  # IXC2.5's extra LoRA adapters
    crop: int  # image / crop size in pixels (the vision tower's position table)
    wqkv_rank: int
    config_keys: dict = field(default_factory=dict)  # config.json values that point to this variant


# `img_size` is the key IXC2-VL's own code reads; the `max_length` values of the HD variants
# are this project's reading and only break ties that names and shapes leave open.
READ_KEYS = {"img_size"}

VARIANTS = (
    Variant("ixc2-vl-7b", "IXC2-VL-7B", hd=False, adapters=False, crop=490, wqkv_rank=256, config_keys={"img_size": 490}),
    Variant("ixc2-4khd-7b", "IXC2-4KHD-7B", hd=True, adapters=False, crop=336, wqkv_rank=8,
            config_keys={"max_length": 16384}),
    Variant("ixc2d5-7b", "IXC2.5-7B", hd=True, adapters=True, crop=560, wqkv_rank=256,
            config_keys={"max_length": 24576}),
)
BY_PRESET = {v.preset: v for v in VARIANTS}


@dataclass(frozen=True)
class WeightFiles:
    """Where a directory's weights are: the format, the shards, and which shard holds each name."""

    format: str  # "safetensors" | "bin"
    shards: tuple[Path, ...]
    weight_map: dict[str, str] | None  # name -> shard file name, from the index; None without one

    @property
    def names(self) -> set[str] | None:
        return None if self.weight_map is None else set(self.weight_map)


@dataclass(frozen=True)
class Identified:
    variant: Variant
    config: XComposerConfig
    evidence: tuple[str, ...]  # what decided it, for messages and notes


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} must hold a JSON object")
    return data


def weight_files(path: Path) -> WeightFiles | None:
    """The weights of a directory, through its index when it has one."""
    for name in INDEX_FILES:
        index = path / name
        if index.is_file():
            data = read_json(index)
            wmap = data.get("weight_map")
            if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
                raise BadInput(f"{index} has no weight_map {{name: shard file}}")
            fmt = "safetensors" if name.startswith("model.safetensors") else "bin"
            shards = tuple(path / f for f in dict.fromkeys(wmap.values()))
            return WeightFiles(fmt, shards, dict(wmap))
    for name in SINGLE_FILES:
        if (path / name).is_file():
            return WeightFiles("safetensors" if name.endswith("safetensors") else "bin", (path / name,), None)
    for fmt, pattern in (("safetensors", "*.safetensors"), ("bin", "pytorch_model*.bin")):
        shards = tuple(sorted(path.glob(pattern)))
        if shards:  # shards without an index: every name is looked for in every shard
            return WeightFiles(fmt, shards, None)
    return None


# ------------------------------------------------------------------------------------------
# reading shards


def _open_shard(shard: Path, fmt: str) -> dict[str, torch.Tensor]:
    """One shard as {name: tensor}, memory-mapped: tensors are read as they are used."""
    if not shard.is_file():
        raise BadInput(f"weight shard {shard} is missing (named by the index)")
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(shard))
        except (SafetensorError, OSError) as e:
            raise BadInput(f"cannot read {shard}: {e}") from None
    try:
        data = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # weights_only refuses any pickle that would build a non-tensor object
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(
            f"{shard} is not a plain file of tensors, refused without running it ({type(e).__name__}: {first[:160]})"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise BadInput(f"{shard} does not hold a {{name: tensor}} mapping")
    return data


def tensor_shapes(files: WeightFiles, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of a few named tensors, opening only the shards that hold them (absent ones are skipped)."""
    out: dict[str, tuple[int, ...]] = {}
    by_shard: dict[Path, list[str]] = {}
    for n in names:
        shard = files.shards[0].parent / files.weight_map[n] if files.weight_map and n in files.weight_map else None
        if shard is None and files.weight_map is None and len(files.shards) == 1:
            shard = files.shards[0]
        if shard is not None and shard.is_file():
            by_shard.setdefault(shard, []).append(n)
    for shard, wanted in by_shard.items():
        if files.format == "safetensors":
            from safetensors import safe_open

            with safe_open(str(shard), framework="pt") as f:
                keys = set(f.keys())
                for n in wanted:
                    if n in keys:
                        out[n] = tuple(f.get_slice(n).get_shape())
        else:
            data = _open_shard(shard, "bin")
            for n in wanted:
                if n in data:
                    out[n] = tuple(data[n].shape)
            del data
    return out


def read_weights(files: WeightFiles, expected: dict[str, tuple[int, ...]], dtype: torch.dtype):
    """All weights as {name: tensor in `dtype`} plus notes, shard by shard.

    `expected`: name -> shape of every tensor the model holds. Each tensor is cast (a copy
    that owns its memory) while its shard is open; the shard's mapping is dropped before the
    next one opens, so the host holds about one copy of the model plus one shard.
    """
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for shard in files.shards:
        data = _open_shard(shard, files.format)
        for name in list(data):
            t = data.pop(name)
            if name not in expected:
                unexpected.append(name)
                continue
            if tuple(t.shape) != tuple(expected[name]):
                raise BadInput(f"{shard.name}: {name} has shape {list(t.shape)}, this architecture needs {list(expected[name])}")
            state[name] = t.to(dtype if t.is_floating_point() else t.dtype, copy=True)
            del t
        del data
    if unexpected:
        raise BadInput(
            f"{len(unexpected)} weight(s) in the checkpoint that this architecture does not have, e.g. {unexpected[0]!r}"
        )
    missing = sorted(set(expected) - set(state))
    omitted = [n for n in missing if n in UNUSED_WEIGHTS]
    missing = [n for n in missing if n not in UNUSED_WEIGHTS]
    if missing:
        raise BadInput(f"{len(missing)} weight(s) missing from the checkpoint, e.g. {missing[0]!r}")
    notes = []
    if omitted:
        notes.append(
            f"the checkpoint omits {', '.join(omitted)}: the forward never uses them (features are CLIP's last hidden "
            "state); filled with the layer norm's neutral values"
        )
    return state, omitted, tuple(notes)


# ------------------------------------------------------------------------------------------
# which variant


def _is_ixc(config: dict) -> bool:
    archs = config.get("architectures") or []
    auto = config.get("auto_map") or {}
    return ARCHITECTURE in archs or any(ARCHITECTURE in str(v) for v in (auto.values() if isinstance(auto, dict) else []))


def _quantization(path: Path, config: dict) -> str | None:
    q = config.get("quantization_config")
    if isinstance(q, dict):
        return f"{q.get('quant_method', 'quantized')}, {q.get('bits', '?')}-bit"
    if (path / "quantize_config.json").is_file():
        q = read_json(path / "quantize_config.json")
        return f"GPTQ (quantize_config.json), {q.get('bits', '?')}-bit"
    return None


def _adapters_from_names(names: set[str]) -> list[str]:
    """Names of LoRA adapters besides Plora_A/B on layer 0's wqkv ("lora_web" for `...wqkv.lora_web_A.weight`)."""
    prefix = "model.layers.0.attention.wqkv."
    out = []
    for n in names:
        if n.startswith(prefix) and n.endswith("_A.weight"):
            adapter = n[len(prefix): -len("_A.weight")]
            if adapter != "Plora" and "." not in adapter:
                out.append(adapter)
    return sorted(out)


def _from_config(config: dict) -> tuple[list[Variant], str]:
    """Variants whose config.json fingerprint matches, and what was seen."""
    hits = [v for v in VARIANTS if v.config_keys and all(config.get(k) == val for k, val in v.config_keys.items())]
    seen = ", ".join(f"{k}={config.get(k)!r}" for k in ("img_size", "max_length") if k in config) or "no img_size / max_length"
    return hits, seen


def identify(path: Path, config: dict, files: WeightFiles | None) -> Identified:
    where = path / "config.json"
    if not _is_ixc(config):
        archs = config.get("architectures") or config.get("model_type") or "nothing"
        raise BadInput(f"{where} names {archs!r}, not {ARCHITECTURE}: not an InternLM-XComposer2 checkpoint")
    evidence: list[str] = []
    candidates = list(VARIANTS)

    names = files.names if files else None
    if names:
        hd = "plora_glb_GN" in names
        adapters = _adapters_from_names(names)
        candidates = [v for v in candidates if v.hd == hd and v.adapters == bool(adapters)]
        evidence.append(
            f"weight index: {'plora_glb_GN' if hd else 'no GN vectors'}"
            + (f", adapters {', '.join(adapters)}" if adapters else ", no extra adapters")
        )
        if len(candidates) > 1:  # names leave a choice: look at the shapes that tell the variants apart
            shapes = tensor_shapes(files, [POSITION_TABLE, WQKV_LORA])
            if POSITION_TABLE in shapes:
                side = int(round((shapes[POSITION_TABLE][0] - 1) ** 0.5))
                candidates = [v for v in candidates if v.crop // 14 == side]
                evidence.append(f"vision position table for {side * 14} px")
            if WQKV_LORA in shapes:
                candidates = [v for v in candidates if v.wqkv_rank == shapes[WQKV_LORA][0]]
                evidence.append(f"wqkv LoRA rank {shapes[WQKV_LORA][0]}")
    by_config, seen = _from_config(config)
    solid = [v for v in by_config if any(k in READ_KEYS for k in v.config_keys)]
    if solid and names and not {v.preset for v in solid} & {v.preset for v in candidates}:
        raise BadInput(
            f"{path}: config.json says {solid[0].title} ({seen}) but its weights say "
            f"{' or '.join(v.title for v in candidates) or 'none of the known variants'} ({'; '.join(evidence)})"
        )
    if not names and "img_size" not in config:
        # IXC2-VL's code reads config.img_size; without it only the HD variants remain
        candidates = [v for v in candidates if v.hd]
    agree = [v for v in candidates if v in by_config]
    if agree:
        evidence.append(f"config.json {seen}")
        candidates = agree

    quant = _quantization(path, config)
    if len(candidates) != 1:
        found = "; ".join(evidence) or f"config.json {seen}, no weight index"
        if not candidates:
            raise BadInput(f"{path} matches no known InternLM-XComposer2 variant (found: {found})")
        raise BadInput(
            f"{path} could be {' or '.join(v.title for v in candidates)} (found: {found}); "
            "add its weight index (model.safetensors.index.json or pytorch_model.bin.index.json) to tell them apart"
        )
    variant = candidates[0]
    if quant:
        raise BadInput(
            f"{path} is {variant.title} quantized ({quant}): xctune models fp32/fp16/bf16 weights; "
            f"use the full-precision checkpoint or --model {variant.preset}"
        )
    return Identified(variant, _config_for(variant, config, path, names, files), tuple(evidence))


def _config_for(variant: Variant, config: dict, path: Path, names, files) -> XComposerConfig:
    base = PRESETS[variant.preset]
    for key in _SIZE_KEYS:  # values that make no model are a bad config, whatever the variant
        v = config.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadInput(f"bad config: config.json of {path.name}: {key} = {shown(v)} must be a whole number >= 1")
    for key, field_name in _SIZE_KEYS.items():
        if key in config and config[key] != getattr(base, field_name):
            raise BadInput(
                f"{path / 'config.json'}: {key}={config[key]!r}, but {variant.title} has {getattr(base, field_name)}; "
                "xctune models the published variants (write an xctune_config.json for another shape)"
            )
    attn_raw = config.get("attn_implementation")
    if attn_raw is not None and attn_raw not in ATTN_OF_CONFIG:
        raise BadInput(f"{path / 'config.json'}: unknown attn_implementation {attn_raw!r}")
    changes = dict(name=path.name or variant.preset)
    if attn_raw is not None:
        changes["attn"] = ATTN_OF_CONFIG[attn_raw]
    for key, field_name, cast in (("rope_theta", "rope_theta", float), ("rms_norm_eps", "rms_norm_eps", float),
                                  ("max_position_embeddings", "max_position_embeddings", int)):
        if key in config:
            try:
                changes[field_name] = cast(config[key])
            except (TypeError, ValueError):
                raise BadInput(f"{path / 'config.json'}: {key}={config[key]!r} is not a number") from None
    if variant.adapters and names:
        # the adapters the checkpoint really holds, with their ranks where the shards are readable
        adapters = _adapters_from_names(names)
        wanted = [f"model.layers.0.attention.wqkv.{a}_A.weight" for a in adapters]
        shapes = tensor_shapes(files, wanted) if files else {}
        if len(shapes) == len(wanted):
            changes["extra_adapters"] = tuple((a, shapes[w][0]) for a, w in zip(adapters, wanted))
        elif [a for a, _ in base.extra_adapters] != adapters:
            raise BadInput(
                f"{path}: adapters {', '.join(adapters)} in the index differ from the preset's "
                f"({', '.join(a for a, _ in base.extra_adapters)}) and their shards are not readable for their ranks"
            )
    return replace(base, **changes)


def expected_names(config: XComposerConfig) -> set[str]:
    """Every weight name of the tree `config` describes (for tests and index checks)."""
    from .xcomposer import XComposer

    with torch.device("meta"):
        model = XComposer(config)
    return set(model.state_dict())

