"""Where a model comes from: a preset, a local checkpoint directory, or (explicitly) remote code.

- A preset name gives the architecture; weights are random and deterministic (seeded).
- A directory gives the architecture from its config: an `xctune_config.json` (written by
  `save_checkpoint`, any shape) or a published InternLM-XComposer2 `config.json`, identified as
  one of the published variants from the directory's own files (checkpoint.py). Its weights
  (`*.safetensors` or pickled `*.bin` shards, through their index) are read as data, straight
  into the same tree: the names are the checkpoints' names. No code of the checkpoint runs.
- A Hugging Face checkpoint's own modeling code runs only through `load_remote`, which refuses
  unless the user passed `--trust-remote-code`: remote code is code execution, never implicit.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

import torch

from ..errors import BadInput
from .checkpoint import UNUSED_WEIGHTS, identify, read_json, read_weights, weight_files
from .config import PRESETS, XComposerConfig
from .xcomposer import XComposer

XCTUNE_CONFIG = "xctune_config.json"


@dataclass(frozen=True)
class ModelSpec:
    source: str  # what the user named
    config: XComposerConfig
    checkpoint: Path | None = None
    trust_remote_code: bool = False  # the user allowed the checkpoint's own code to run
    notes: tuple[str, ...] = ()  # what identifying the checkpoint found worth saying

    @property
    def profile(self):
        from .profile import profile_of

        return profile_of(self.config)

    def with_attention(self, attn: str | None) -> "ModelSpec":
        """The same model running another attention implementation (`--attn`, a study's `attn`)."""
        if attn is None or attn == getattr(self.config, "attn", None):
            return self
        if not hasattr(self.config, "attn"):
            raise BadInput(f"--attn applies to the embedded InternLM-XComposer models; {self.source} is a transformers "
                           "class, which xctune runs with SDPA (priced as one fused op)")
        return replace(self, config=replace(self.config, attn=attn))

    def load_master(self, seed: int = 0) -> torch.nn.Module:
        """Real weights on the CPU in fp32: from the checkpoint, else seeded random."""
        from .families import family_of

        family = family_of(self.config)
        if self.checkpoint is None:
            return family.build_host(seed)
        return family.load_weights(self.checkpoint)


# What the authors' modeling code declares for accelerate: a string, not a list.
REMOTE_SKIP_KEYS = "past_key_values"


@dataclass(frozen=True)
class LoadingPath:
    """How users put a map on their GPUs, and the skip keys accelerate's root hook then gets."""

    name: str
    skip_keys: tuple[str, ...]
    description: str


def loading_paths() -> dict[str, LoadingPath]:
    """xctune's loader (the lines of load_best_map.py) and a bare `from_pretrained(device_map=...)`
    under the installed transformers: from version 5 it turns the remote code's string into
    `set('past_key_values')`, a set of letters that matches no output key, so the KV cache
    crosses GPUs at every decode step (and the output also carries it as `cache`)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    bare = tuple(sorted(set(REMOTE_SKIP_KEYS))) if major >= 5 else (REMOTE_SKIP_KEYS,)
    bare_words = "none that match (set('past_key_values'): letters)" if major >= 5 else REMOTE_SKIP_KEYS
    return {
        "xctune": LoadingPath("xctune", ("past_key_values", "cache"), "xctune's loader (load_best_map.py): skip_keys past_key_values, cache"),
        "from_pretrained": LoadingPath(
            "from_pretrained", bare,
            f"bare from_pretrained(device_map=...) under transformers {transformers.__version__}: skip keys {bare_words}",
        ),
    }


def loading_path(name: str) -> LoadingPath:
    paths = loading_paths()
    if name not in paths:
        raise BadInput(f"unknown loader {name!r}; choose from {', '.join(paths)}")
    return paths[name]


def resolve_model(spec: str, trust_remote_code: bool = False, attn: str | None = None) -> ModelSpec:
    if spec in PRESETS:
        return ModelSpec(spec, PRESETS[spec]).with_attention(attn)
    from .hf.config import PRESET_NAMES as HF_PRESETS
    from .hf.config import resolve as resolve_transformers

    hf = resolve_transformers(spec, trust_remote_code)  # a transformers VLM: preset or config.json
    if hf is not None:
        # a directory is its checkpoint (weights optional: without them, dry runs only); a preset has random weights
        return ModelSpec(spec, hf, Path(spec) if spec not in HF_PRESETS else None, trust_remote_code).with_attention(attn)
    path = Path(spec)
    if not path.is_dir():
        from .presets import preset_names

        raise BadInput(f"unknown model {spec!r}: not a preset ({', '.join(preset_names())}) nor a checkpoint directory")
    config, notes = config_from_dir(path)
    return ModelSpec(spec, config, path, trust_remote_code, notes).with_attention(attn)


def config_from_dir(path: Path) -> tuple[XComposerConfig, tuple[str, ...]]:
    """The architecture of a checkpoint directory, and notes on how it was identified."""
    ours, theirs = path / XCTUNE_CONFIG, path / "config.json"
    if ours.is_file():
        data = read_json(ours)
        names = {f.name for f in fields(XComposerConfig)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise BadInput(f"{ours}: unknown config fields {', '.join(unknown)}")
        if isinstance(data.get("hd_layout"), list):
            data["hd_layout"] = tuple(data["hd_layout"])
        if "extra_adapters" in data:
            try:
                data["extra_adapters"] = tuple((str(a), int(r)) for a, r in data["extra_adapters"])
            except (TypeError, ValueError):
                raise BadInput(f"bad config {ours}: extra_adapters must be a list of [name, rank] pairs") from None
        missing = sorted(f.name for f in fields(XComposerConfig) if f.default is MISSING and f.name not in data)
        if missing:
            raise BadInput(f"bad config {ours}: missing {', '.join(missing)}")
        try:
            return XComposerConfig(**data), ()
        except BadInput as e:
            raise BadInput(f"bad config {ours}: {str(e).split(': ', 1)[-1]}") from None
    if theirs.is_file():
        files = weight_files(path)
        found = identify(path, read_json(theirs), files)
        notes = [f"{path} is {found.variant.title} ({'; '.join(found.evidence)}); attention {found.config.attn}"]
        omitted = [n for n in UNUSED_WEIGHTS if files is not None and files.names and n not in files.names]
        if omitted:
            notes.append(f"its index omits {', '.join(omitted)}: the forward never uses them; accepted")
        return found.config, tuple(notes)
    raise BadInput(f"{path} has neither {XCTUNE_CONFIG} nor config.json")


def save_checkpoint(model: XComposer, path: Path, *, format: str = "safetensors", shards: int = 1) -> None:
    """Write `model` as xctune's checkpoint: xctune_config.json plus weights, sharded with an
    index when `shards` > 1 (`format` "bin" writes torch.save shards, as the published IXC2 ones)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = asdict(model.cfg)
    cfg["hd_layout"] = list(cfg["hd_layout"])
    cfg["extra_adapters"] = [list(a) for a in cfg["extra_adapters"]]
    (path / XCTUNE_CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_shards(state, path, format=format, shards=shards)


def write_shards(state: dict[str, torch.Tensor], path: Path, *, format: str = "safetensors", shards: int = 1) -> None:
    """Weights as the Hugging Face layout: one file, or `shards` files of similar size plus an index."""
    from safetensors.torch import save_file

    if format not in ("safetensors", "bin"):
        raise BadInput(f"unknown weight format {format!r}")
    single = "model.safetensors" if format == "safetensors" else "pytorch_model.bin"
    names = list(state)
    if shards <= 1:
        groups = [(single, names)]
    else:
        total = sum(state[n].numel() * state[n].element_size() for n in names)
        groups, current, size = [], [], 0
        for n in names:
            current.append(n)
            size += state[n].numel() * state[n].element_size()
            if size >= total / shards and len(groups) < shards - 1:
                groups.append(current)
                current, size = [], 0
        groups.append(current)
        stem, ext = single.rsplit(".", 1)
        groups = [(f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}", g) for i, g in enumerate(groups) if g]
    for fname, group in groups:
        part = {n: state[n] for n in group}
        if format == "safetensors":
            save_file(part, str(path / fname))
        else:
            torch.save(part, path / fname)
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {n: fname for fname, group in groups for n in group}}
        (path / f"{single}.index.json").write_text(json.dumps(index, indent=1) + "\n")


def load_checkpoint(path: Path, config: XComposerConfig, dtype: torch.dtype = torch.float32) -> XComposer:
    """The checkpoint's weights in our tree, read as data shard by shard (checkpoint.py)."""
    files = weight_files(path)
    if files is None:
        raise BadInput(f"{path} holds no weights (*.safetensors or pytorch_model*.bin)")
    with torch.device("meta"):
        model = XComposer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state, omitted, _ = read_weights(files, expected, dtype)
    for name in omitted:  # unused by the forward: the norm's neutral values
        fill = torch.ones if name.endswith("weight") else torch.zeros
        state[name] = fill(expected[name], dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    del state
    # buffers are not in the checkpoint: rebuild them on the CPU
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
        if hasattr(module, "reset_tables"):
            module.reset_tables()
        if hasattr(module, "position_ids") and isinstance(module.position_ids, torch.Tensor):
            module.position_ids.copy_(torch.arange(module.position_ids.shape[-1]).expand_as(module.position_ids))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_remote(path: str, *, trust_remote_code: bool, **kwargs):
    """The checkpoint's own modeling code, through transformers. Refuses without the explicit flag."""
    if not trust_remote_code:
        raise BadInput(
            f"{path} needs its own modeling code; running it is code execution: pass --trust-remote-code to allow it"
        )
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, trust_remote_code=True, **kwargs)
