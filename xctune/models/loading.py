"""Where a model comes from: a preset, a local checkpoint directory, or (explicitly) remote code.

- A preset name gives the architecture; weights are random and deterministic (seeded).
- A directory holding `*.safetensors` plus `xctune_config.json` (written by `save_checkpoint`)
  or an InternLM-XComposer2 `config.json` gives the architecture from its config and real
  weights loaded into the same module tree (the names are the checkpoints' names).
- A Hugging Face checkpoint's own modeling code runs only through `load_remote`, which refuses
  unless the user passed `--trust-remote-code`: remote code is code execution, never implicit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..errors import BadInput
from .config import PRESETS, XComposerConfig
from .xcomposer import XComposer, init_weights

XCTUNE_CONFIG = "xctune_config.json"


@dataclass(frozen=True)
class ModelSpec:
    source: str  # what the user named
    config: XComposerConfig
    checkpoint: Path | None = None
    trust_remote_code: bool = False  # the user allowed the checkpoint's own code (and pickles) to run

    @property
    def profile(self):
        from ..profile import profile_of

        return profile_of(self.config)

    def load_master(self, seed: int = 0) -> XComposer:
        """Real weights on the CPU in fp32: from the checkpoint, else seeded random."""
        if self.checkpoint is None:
            return init_weights(XComposer(self.config), seed=seed).eval()
        return load_checkpoint(self.checkpoint, self.config, self.trust_remote_code)


def resolve_model(spec: str, trust_remote_code: bool = False) -> ModelSpec:
    if spec in PRESETS:
        return ModelSpec(spec, PRESETS[spec])
    from .hf.config import resolve as resolve_transformers

    hf = resolve_transformers(spec, trust_remote_code)  # a transformers VLM: preset or config.json
    if hf is not None:
        return ModelSpec(spec, hf, None, trust_remote_code)
    path = Path(spec)
    if not path.is_dir():
        from .hf.config import PRESET_NAMES as HF_PRESETS

        raise BadInput(
            f"unknown model {spec!r}: not a preset ({', '.join((*PRESETS, *HF_PRESETS))}) nor a checkpoint directory"
        )
    return ModelSpec(spec, config_from_dir(path), path, trust_remote_code)


def config_from_dir(path: Path) -> XComposerConfig:
    ours, theirs = path / XCTUNE_CONFIG, path / "config.json"
    if ours.is_file():
        data = _read(ours)
        names = {f.name for f in fields(XComposerConfig)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise BadInput(f"{ours}: unknown config fields {', '.join(unknown)}")
        if "hd_layout" in data:
            data["hd_layout"] = tuple(data["hd_layout"])
        try:
            return XComposerConfig(**data)
        except TypeError as e:
            raise BadInput(f"{ours}: {e}") from None
    if theirs.is_file():
        return config_from_hf(_read(theirs), path.name)
    raise BadInput(f"{path} has neither {XCTUNE_CONFIG} nor config.json")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} must hold a JSON object")
    return data


def config_from_hf(data: dict, name: str) -> XComposerConfig:
    """Map an InternLM-XComposer2 `config.json` onto our config (fields it lacks keep IXC2-VL-7B values)."""
    base = PRESETS["ixc2-vl-7b"]
    hd = "hd_num" in data
    get = lambda k, d: data.get(k, d)  # noqa: E731
    try:
        return XComposerConfig(
            name=name,
            vocab_size=int(get("vocab_size", base.vocab_size)),
            hidden_size=int(get("hidden_size", base.hidden_size)),
            intermediate_size=int(get("intermediate_size", base.intermediate_size)),
            num_layers=int(get("num_hidden_layers", base.num_layers)),
            num_heads=int(get("num_attention_heads", base.num_heads)),
            num_kv_heads=int(get("num_key_value_heads", base.num_kv_heads)),
            plora_rank=256,
            plora_rank_wqkv=8 if hd else 256,
            max_position_embeddings=int(get("max_position_embeddings", base.max_position_embeddings)),
            rope_theta=float(get("rope_theta", base.rope_theta)),
            rms_norm_eps=float(get("rms_norm_eps", base.rms_norm_eps)),
            image_size=336 if hd else int(get("img_size", base.image_size)),
            hd=hd,
        )
    except (TypeError, ValueError) as e:
        raise BadInput(f"config.json of {name}: {e}") from None


def save_checkpoint(model: XComposer, path: Path) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = asdict(model.cfg)
    cfg["hd_layout"] = list(cfg["hd_layout"])
    (path / XCTUNE_CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))


def load_checkpoint(path: Path, config: XComposerConfig, trust_remote_code: bool = False) -> XComposer:
    """The checkpoint's weights in our tree. safetensors are read directly (data only); anything
    else (pickled `*.bin` shards, custom formats) goes through the checkpoint's own code, which
    runs only with `trust_remote_code`."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
    elif list(path.glob("*.bin")):
        if not trust_remote_code:
            raise BadInput(
                f"{path} holds pickled *.bin weights: loading them runs code; pass --trust-remote-code to allow it"
            )
        try:
            state = load_remote(str(path), trust_remote_code=True, torch_dtype=torch.float32).state_dict()
        except BadInput:
            raise
        except Exception as e:  # their code, their error: one line
            raise BadInput(f"could not load {path} with its own code: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    else:
        raise BadInput(f"{path} holds no *.safetensors files")
    with torch.device("meta"):
        model = XComposer(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing:
        raise BadInput(f"{path}: {len(missing)} weights missing, e.g. {missing[0]!r}")
    if unexpected:
        raise BadInput(f"{path}: {len(unexpected)} weights this architecture does not have, e.g. {unexpected[0]!r}")
    # copies: own, aligned memory rather than views into the file
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in state.items()}, assign=True, strict=True)
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
