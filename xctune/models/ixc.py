"""The embedded InternLM-XComposer2 as one implementation of the model interface (base.py).

Everything xctune's generic code used to know by name about IXC lives here: the unit order
(vision tower, projector, the HD variants' GN vectors, token embeddings, 32 decoder layers,
final norm, head), the co-location rule of its top-level image/text `torch.cat`, its inputs and
explicit generate loop (vision encode, prefill, cached greedy decode steps), its dry-run steps
(vision encode, prefill, first decode step, last decode step on a cache grown to full length)
and the parts torch pipelining needs of it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import BadInput
from ..workload import Generated, Workload, no_clock
from .base import Colocation, ModelFamily, PipelineParts, Role, UnitSpec
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
        return make_inputs(self.config, workload, device, fake=fake)

    def load_weights(self, path) -> nn.Module:
        from .loading import load_checkpoint

        return load_checkpoint(path, self.config)

    def generate(self, model, inputs, workload, clock):
        return generate(model, inputs, workload.new_tokens, clock, workload.hd_layout)

    def pipeline_parts(self, load) -> PipelineParts:
        """The language model as the pipeline traces it (engines.pipeline_text_model: the image mask
        rides as the last channel of each row); the first rank encodes the images, joins them with
        the text embeddings, and embeds each generated token."""
        from .engines import pack_inputs, pipeline_text_model

        model = load()

        @torch.no_grad()
        def prompt_rows(workload) -> torch.Tensor:
            inputs = make_inputs(self.config, workload, "cpu")
            if inputs.pixels is not None:
                dtype = next(model.vision_proj.parameters()).dtype
                image = model.encode_img(inputs.pixels.to(dtype), workload.hd_layout)
                embeds, mask = model.wrap(inputs.input_ids, image)
            else:
                embeds = model.model.tok_embeddings(inputs.input_ids)
                mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
            return pack_inputs(embeds, mask)

        @torch.no_grad()
        def token_row(token: torch.Tensor) -> torch.Tensor:
            embeds = model.model.tok_embeddings(token[:, None])
            return pack_inputs(embeds, torch.zeros(embeds.shape[:2], dtype=torch.bool))[:, 0]

        return PipelineParts(pipeline_text_model(model), prompt_rows, token_row)

    def dry_steps(self, model, workload, tracker, device, lift=None):
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


@dataclass(frozen=True)
class Inputs:
    pixels: torch.Tensor | None  # [batch * images * crops, 3, S, S]
    input_ids: torch.Tensor  # [batch, prompt_tokens]


def make_inputs(cfg: XComposerConfig, w: Workload, device, *, fake: bool = False) -> Inputs:
    n_crops = w.batch * w.images * cfg.crops_per_image(w.hd_layout)
    shape = (n_crops, 3, cfg.image_size, cfg.image_size)
    if fake:  # values do not matter to a fake tensor, only shapes and devices
        pixels = torch.empty(shape, device=device) if n_crops else None
        ids = torch.zeros(w.batch, w.prompt_tokens, dtype=torch.long, device=device)
        return Inputs(pixels, ids)
    gen = torch.Generator().manual_seed(w.seed)
    pixels = torch.randn(shape, generator=gen).to(device) if n_crops else None
    ids = torch.randint(0, cfg.vocab_size, (w.batch, w.prompt_tokens), generator=gen).to(device)
    return Inputs(pixels, ids)


@torch.no_grad()
def generate(model: XComposer, inputs: Inputs, new_tokens: int, clock=no_clock, layout=None) -> Generated:
    """Greedy generation: vision encode, prefill, then `new_tokens - 1` decode steps with the KV cache.

    `clock(phase)` is a context manager the caller uses to time or label each phase.
    """
    with clock("vision"):
        image_embeds = model.encode_img(inputs.pixels, layout) if inputs.pixels is not None else None
    with clock("prefill"):
        if image_embeds is not None:
            embeds, im_mask = model.wrap(inputs.input_ids, image_embeds)
            out = model(inputs_embeds=embeds, im_mask=im_mask)
        else:
            out = model(input_ids=inputs.input_ids)
        token = out["logits"][:, -1].argmax(-1)
    tokens = [token]
    for _ in range(new_tokens - 1):
        with clock("decode"):
            out = model(input_ids=token[:, None], past_key_values=out["past_key_values"])
            token = out["logits"][:, -1].argmax(-1)
        tokens.append(token)
    return Generated(torch.stack(tokens, dim=1), out["logits"][:, -1], out["past_key_values"])


def extend_cache(past_key_values: tuple, extra: int, tracker=None) -> tuple:
    """A cache `extra` positions longer, on the same devices (used to price the last decode step)."""
    out = []
    for k, v in past_key_values:
        pad_shape = (*k.shape[:2], extra, k.shape[3])
        k2 = torch.cat([k, torch.zeros(pad_shape, dtype=k.dtype, device=k.device)], dim=2)
        v2 = torch.cat([v, torch.zeros(pad_shape, dtype=v.dtype, device=v.device)], dim=2)
        if tracker is not None:
            tracker.tag(k2, tracker.location(k))
            tracker.tag(v2, tracker.location(v))
        out.append((k2, v2))
    return tuple(out)
