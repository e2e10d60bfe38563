"""The embedded InternLM-XComposer2 as one implementation of the model interface (base.py).

Everything xctune's generic code used to know by name about IXC lives here: the unit order
(vision tower, projector, the HD variants' GN vectors, token embeddings, 32 decoder layers,
final norm, head), the co-location rule of its top-level image/text `torch.cat`, and its
dry-run steps (vision encode, prefill, first decode step, last decode step on a cache grown
to full length).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch import nn

from ..errors import BadInput
from .base import Colocation, ModelFamily, Role, UnitSpec
from .config import XComposerConfig
from .xcomposer import XComposer, init_weights

_ROLES = {
    "vit": Role.VISION_TOWER,
    "vision_proj": Role.PROJECTOR,
    "model.tok_embeddings": Role.EMBEDDINGS,
    "model.norm": Role.FINAL_NORM,
    "output": Role.HEAD,
}


class IXCFamily(ModelFamily):
    uses_real_metadata = False  # its forward has no data-dependent branch (PLoRA runs masked)

    def __init__(self, config: XComposerConfig):
        self.config = config

    def build_meta(self) -> nn.Module:
        with torch.device("meta"):
            return XComposer(self.config)

    def units(self, model: nn.Module) -> tuple[UnitSpec, ...]:
        root = [n for n, _ in model.named_parameters(recurse=False)]  # GN vectors (HD variants)
        return (
            UnitSpec("vit", Role.VISION_TOWER),
            UnitSpec("vision_proj", Role.PROJECTOR),
            *(UnitSpec(n, Role.ROOT_PARAMETER) for n in root),
            UnitSpec("model.tok_embeddings", Role.EMBEDDINGS),
            *(UnitSpec(f"model.layers.{i}", Role.DECODER_LAYER) for i in range(self.config.num_layers)),
            UnitSpec("model.norm", Role.FINAL_NORM),
            UnitSpec("output", Role.HEAD),
        )

    def static_colocation(self, units, model) -> Colocation:
        root = sorted(u.name for u in units if u.role is Role.ROOT_PARAMETER)
        return Colocation(
            ("vit", "vision_proj", "model.tok_embeddings", *root),
            "the image and text embeddings are joined by a torch.cat at top level, outside any hook",
        )

    @property
    def skip_keys(self) -> tuple[str, ...]:
        return ("past_key_values",)

    def published_map(self, units, n_gpus: int) -> dict:
        """The authors' helper (examples/utils.py `auto_configure_device_map` in the InternLM-XComposer
        repo): vision, embeddings and head count as 3 of 38 layer-equivalents, the 32 decoder layers
        are dealt out in order at 38 / N per GPU, the head goes on the last GPU. It ignores memory,
        dtype, card speed and the KV cache."""
        if n_gpus < 1:
            raise BadInput("the authors' heuristic needs at least one GPU")
        per_gpu = 38 / n_gpus
        dmap: dict = {"vit": 0, "vision_proj": 0, "model.tok_embeddings": 0}
        dmap.update({u.name: 0 for u in units if u.role is Role.ROOT_PARAMETER})
        dmap.update({"model.norm": n_gpus - 1, "output": n_gpus - 1})
        used, gpu = 3, 0
        for u in units:
            if u.role is not Role.DECODER_LAYER:
                continue
            if used >= per_gpu:
                gpu, used = gpu + 1, 0
            dmap[u.name] = gpu
            used += 1
        return dmap

    def twin(self) -> XComposerConfig:
        cfg = self.config
        return replace(
            cfg,
            name=f"{cfg.name}-twin",
            vocab_size=256,
            hidden_size=64,
            intermediate_size=96,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2 if cfg.num_kv_heads < cfg.num_heads else 4,
            plora_rank=4,
            plora_rank_wqkv=4,
            max_position_embeddings=512,
            vision_hidden_size=32,
            vision_intermediate_size=64,
            vision_layers=1,
            vision_heads=2,
            image_size=cfg.patch_size * 4,
            hd_layout=(1, 2),
        )

    def build_host(self, seed: int = 0) -> nn.Module:
        return init_weights(XComposer(self.config), seed=seed).eval()

    def make_inputs(self, workload, device, *, fake: bool = False):
        from ..workload import make_inputs

        return make_inputs(self.config, workload, device, fake=fake)

    def load_weights(self, path) -> nn.Module:
        from .loading import load_checkpoint

        return load_checkpoint(path, self.config)

    def generate(self, model, inputs, workload, clock):
        from ..workload import generate

        return generate(model, inputs, workload.new_tokens, clock, workload.hd_layout)

    def dry_steps(self, model, workload, tracker, device, lift=None):
        from ..workload import extend_cache, generate

        @contextlib.contextmanager
        def phase(name):
            tracker.phase = name
            yield

        inputs = self.make_inputs(workload, device, fake=True)
        gen = generate(model, inputs, 2 if workload.new_tokens > 1 else 1, phase, workload.hd_layout)
        past = gen.past_key_values
        if workload.new_tokens > 2:
            # price the last decode step: its input cache holds prompt + new_tokens - 2 positions
            tracker.phase = "setup"
            with tracker.unpriced_ops():
                past = extend_cache(past, workload.new_tokens - 3, tracker) if workload.new_tokens > 3 else past
            del gen
            tracker.phase = "decode_last"
            token = torch.zeros(workload.batch, 1, dtype=torch.long, device=device)
            past = model(input_ids=token, past_key_values=past)["past_key_values"]
        return [t for kv in past for t in kv]
