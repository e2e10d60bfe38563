"""Weights of a transformers VLM: a checkpoint directory read as data, for measured runs.

A directory holds `config.json` and the weights as `save_pretrained` writes them: one
`model.safetensors`, or shards with `model.safetensors.index.json` (pickled `pytorch_model*.bin`
shards are read with `torch.load(weights_only=True)`). They are loaded through the class's own
`from_pretrained`, given the config xctune holds: its key mapping is what turns the names a
checkpoint stores (LLaVA's `language_model.model.*`) into the module tree's, and it re-ties a
tied head. No code of the checkpoint runs for a native class; for a remote-code class the code
was allowed by `--trust-remote-code` before any of it was imported (config.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import BadInput

WEIGHT_GLOBS = ("model.safetensors", "model-*-of-*.safetensors", "pytorch_model.bin", "pytorch_model-*-of-*.bin")


def has_weights(path: Path) -> bool:
    return any(any(path.glob(g)) for g in WEIGHT_GLOBS)


def load_weights(family, path: Path) -> torch.nn.Module:
    """The checkpoint's weights in the family's class, fp32 on the CPU; BadInput where they do not fit."""
    from .family import quiet_transformers

    path = Path(path)
    if not has_weights(path):
        raise BadInput(
            f"{path} holds no weights (model.safetensors, sharded *.safetensors with an index, or pytorch_model*.bin): "
            "measured runs (--real) need them; dry runs (--gpus) need only config.json"
        )
    tcfg = family.transformers_config
    tcfg._attn_implementation = "sdpa"
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        with quiet_transformers():
            model, info = family.model_class().from_pretrained(
                path, config=tcfg, dtype=torch.float32, local_files_only=True, output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, in one line, instead of transformers' report
            )
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise BadInput(f"cannot load the weights in {path}: {_first_line(e)}") from None
    finally:
        if bars:
            logging.enable_progress_bar()
    problems = [(what, sorted(info.get(key) or ())) for key, what in
                (("missing_keys", "missing"), ("unexpected_keys", "not in this architecture"),
                 ("mismatched_keys", "of another shape"))]
    problems = [(what, names) for what, names in problems if names]
    if problems:
        what, names = problems[0]
        example = names[0]
        if isinstance(example, (list, tuple)) and len(example) == 3:  # (name, checkpoint shape, model shape)
            example = f"{example[0]!r} ({list(example[1])} in the checkpoint, {list(example[2])} by config.json)"
        else:
            example = repr(example)
        raise BadInput(f"{path}: {len(names)} weight(s) {what}, e.g. {example}: the weights do not fit config.json")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def save_weights(model: torch.nn.Module, path: Path, *, shards: int = 1) -> None:
    """Write `model` as a checkpoint directory the way users have them (`save_pretrained`): config.json and
    safetensors, split into `shards` files with `model.safetensors.index.json` when more than one."""
    from .family import quiet_transformers

    path = Path(path)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = max(1, total // shards + 1) if shards > 1 else None
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        with quiet_transformers():
            model.save_pretrained(path, max_shard_size=size or "1000GB", safe_serialization=True)
    finally:
        if bars:
            logging.enable_progress_bar()
    if shards > 1 and not (path / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"save_pretrained wrote no index for {shards} shards in {path}")


def weight_names(path: Path) -> list[str]:
    """The tensor names a safetensors checkpoint stores (from its index, or its single file's header)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return sorted(f.keys())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:240]
