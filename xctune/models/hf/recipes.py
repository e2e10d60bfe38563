"""Inputs per transformers family: what a processor would hand the model for a workload.

A workload states image count, text length and generated tokens; each family turns that into
the tensors its forward takes, at its native resolution: `pixel_values` in the family's layout
(one tile per image; Qwen's flattened patches with `image_grid_thw`; LLaVA-NeXT's crops with
`image_sizes`; Mllama's tiles with aspect-ratio ids and a cross-attention mask), the
placeholder tokens in `input_ids`, and `token_type_ids` / `mm_token_type_ids` where the family
reads them. How many placeholder tokens one image needs is not written here: it is measured
by running the family's own `get_image_features` on fake tensors (models/hf/family.py).

Values are synthetic and seeded; only token ids, sizes and masks carry meaning (they drive the
forward's data-dependent branches), pixels are random.

Each recipe also knows how to shrink its config to a twin of tiny dimensions with the same
structure (the constraints probes and the test suite run twins).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch

TEXT = 7  # an ordinary text token id (every vocabulary has it)


@dataclass(frozen=True)
class Recipe:
    required: tuple[str, ...]  # dotted config keys the family cannot do without
    vision: Callable  # (tcfg, n_images, gen) -> dict of vision inputs (real tensors)
    layout: Callable  # (tcfg, n_images, image_tokens, text_tokens) -> (input_ids [T], extras per position)
    shrink: Callable  # (data) -> data of a tiny twin
    cross_attention: bool = False  # images enter through cross-attention (one placeholder per image)
    decode_extras: Callable | None = None  # (tcfg, inputs, batch, step_len) -> extra kwargs of a decode step
    notes: str = ""
    image_token_key: str = "image_token_id"
    extra_text_inputs: tuple[str, ...] = field(default_factory=tuple)

    def image_tokens(self, cfg) -> int:
        from .family import measured_image_tokens

        return measured_image_tokens(cfg)


def _square(vc, default):
    size = vc.get("image_size", default)
    return size[0] if isinstance(size, (list, tuple)) else size


def _patch(vc, default=14):
    p = vc.get("patch_size", default)
    return p[0] if isinstance(p, (list, tuple)) else p


def _pixels(gen, *shape):
    return torch.randn(*shape, generator=gen)


# --- layouts ----------------------------------------------------------------------------------


def _prefix_images(image_id, n_images, per_image, text_tokens, before=(), after=()):
    """[before, image tokens, after] per image, then the text."""
    ids = []
    for _ in range(n_images):
        ids += list(before) + [image_id] * per_image + list(after)
    ids += [TEXT] * text_tokens
    return ids


def _layout_simple(tcfg, n_images, per_image, text_tokens):
    return _prefix_images(tcfg.image_token_id, n_images, per_image, text_tokens), {}


def _layout_qwen(tcfg, n_images, per_image, text_tokens):
    ids = _prefix_images(
        tcfg.image_token_id, n_images, per_image, text_tokens, (tcfg.vision_start_token_id,), (tcfg.vision_end_token_id,)
    )
    return ids, {"mm_token_type_ids": [1 if i == tcfg.image_token_id else 0 for i in ids]}


def _layout_paligemma(tcfg, n_images, per_image, text_tokens):
    ids = _prefix_images(tcfg.image_token_id, n_images, per_image, text_tokens)
    # a prompt with no suffix: image and prompt are all prefix (full attention), type 0
    return ids, {"token_type_ids": [0] * len(ids)}


def _layout_gemma3(tcfg, n_images, per_image, text_tokens):
    ids = _prefix_images(tcfg.image_token_id, n_images, per_image, text_tokens, (tcfg.boi_token_id,), (tcfg.eoi_token_id,))
    return ids, {"token_type_ids": [1 if i == tcfg.image_token_id else 0 for i in ids]}


def _layout_mllama(tcfg, n_images, per_image, text_tokens):
    return _prefix_images(tcfg.image_token_id, n_images, 1, text_tokens), {}


# --- vision inputs ----------------------------------------------------------------------------


def _vision_tiles(tcfg, n, gen):
    vc = tcfg.vision_config
    s = _square(vc.to_dict(), 224)
    return {"pixel_values": _pixels(gen, n, 3, s, s)}


def _vision_llava_next(tcfg, n, gen):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    s = tcfg.vision_config.image_size
    patches = image_size_to_num_patches((s, s), tcfg.image_grid_pinpoints, s)
    return {"pixel_values": _pixels(gen, n, patches, 3, s, s), "image_sizes": torch.tensor([[s, s]] * n)}


def _vision_qwen(tcfg, n, gen):
    vc = tcfg.vision_config
    # 448 px: 32 x 32 patches of 14, merged 2 x 2 into 256 tokens (a processor's typical size)
    side = 448 // vc.patch_size
    side -= side % vc.spatial_merge_size
    per_patch = 3 * vc.temporal_patch_size * vc.patch_size * vc.patch_size
    return {
        "pixel_values": _pixels(gen, n * side * side, per_patch),
        "image_grid_thw": torch.tensor([[1, side, side]] * n),
    }


def _vision_idefics3(tcfg, n, gen):
    s = tcfg.vision_config.image_size
    return {
        "pixel_values": _pixels(gen, 1, n, 3, s, s),
        "pixel_attention_mask": torch.ones(1, n, s, s, dtype=torch.bool),
    }


def _vision_mllama(tcfg, n, gen):
    vc = tcfg.vision_config
    tiles, s = vc.max_num_tiles, vc.image_size
    mask = torch.zeros(1, n, tiles, dtype=torch.long)
    mask[..., 0] = 1  # one tile per image, aspect ratio 1x1 (id 1)
    return {
        "pixel_values": _pixels(gen, 1, n, tiles, 3, s, s),
        "aspect_ratio_ids": torch.ones(1, n, dtype=torch.long),
        "aspect_ratio_mask": mask,
    }


def _mllama_decode(tcfg, inputs, batch, step_len):
    cam = inputs["cross_attention_mask"]
    return {"cross_attention_mask": cam[:, -1:].expand(batch, step_len, *cam.shape[2:]).contiguous()}


# --- twins ------------------------------------------------------------------------------------

_TEXT_TWIN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TWIN_VOCAB = 512


def _remap_token_ids(data: dict) -> None:
    """Special token ids beyond the twin's vocabulary are renumbered from its top, in order."""
    keys = sorted(
        (k for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool) and (k.endswith("token_id") or k.endswith("token_index"))),
        key=lambda k: data[k],
    )
    big = [k for k in keys if data[k] >= TWIN_VOCAB - 64]
    for i, k in enumerate(big):
        data[k] = TWIN_VOCAB - 1 - len(big) + i
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(data.get(k), list):
            data[k] = [min(x, 2) for x in data[k]]


def _twin_text(data: dict, **extra) -> None:
    target = data["text_config"] if "text_config" in data else data
    target.update(_TEXT_TWIN, vocab_size=TWIN_VOCAB, max_position_embeddings=16384, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    target.update(extra)
    if "text_config" in data and "vocab_size" in data:
        data["vocab_size"] = TWIN_VOCAB
    for k in ("sliding_window",):
        if target.get(k):
            target[k] = 64


def _twin_vision(data: dict, **extra) -> None:
    data["vision_config"].update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2), **extra)


def _shrink_llava(data):
    _twin_text(data)
    _twin_vision(data, image_size=56, projection_dim=32)
    if "image_grid_pinpoints" in data:
        data["image_grid_pinpoints"] = [[56, 112], [112, 56], [112, 112]]
    return data


def _shrink_qwen(data):
    _twin_text(data, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vc = data["vision_config"]
    if "embed_dim" in vc:  # Qwen2-VL
        vc.update(depth=2, embed_dim=32, num_heads=2, hidden_size=64)
    else:  # Qwen2.5-VL: windowed attention with one full-attention block
        vc.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1])
    return data


def _shrink_internvl(data):
    _twin_text(data)
    _twin_vision(data, image_size=[56, 56], layer_scale_init_value=0.1)
    data["image_seq_length"] = 4  # 56 px / 14 = 4 x 4 patches, pixel-shuffled by 0.5 -> 2 x 2
    return data


def _shrink_idefics3(data):
    _twin_text(data)
    _twin_vision(data, image_size=56)
    return data


def _shrink_paligemma(data):
    _twin_text(data, num_key_value_heads=1, head_dim=16, num_image_tokens=16)
    _twin_vision(data, image_size=56, num_image_tokens=16, projection_dim=64)
    data.update(projection_dim=64, hidden_size=64)
    return data


def _shrink_gemma3(data):
    _twin_text(data, head_dim=16, sliding_window=64)
    _twin_vision(data, image_size=112)  # 8 x 8 patches pooled into 2 x 2 tokens
    data["mm_tokens_per_image"] = 4
    return data


def _shrink_mllama(data):
    _twin_text(data, cross_attention_layers=[1], num_hidden_layers=3)
    data["text_config"]["num_hidden_layers"] = 3
    vc = data["vision_config"]
    vc.update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
        image_size=28, intermediate_layers_indices=[0], vision_output_dim=64, max_num_tiles=2,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    return data


def shrink(data: dict, model_type: str) -> dict:
    data = copy.deepcopy(data)
    data = RECIPES[model_type].shrink(data)
    _remap_token_ids(data)
    if "text_config" in data:
        _remap_token_ids(data["text_config"])
    return data


RECIPES: dict[str, Recipe] = {
    "llava": Recipe(("vision_config", "text_config"), _vision_tiles, _layout_simple, _shrink_llava),
    "llava_next": Recipe(("vision_config", "text_config", "image_grid_pinpoints"), _vision_llava_next, _layout_simple, _shrink_llava),
    "qwen2_vl": Recipe(("vision_config", "hidden_size", "num_hidden_layers"), _vision_qwen, _layout_qwen, _shrink_qwen),
    "qwen2_5_vl": Recipe(("vision_config", "hidden_size", "num_hidden_layers"), _vision_qwen, _layout_qwen, _shrink_qwen),
    "internvl": Recipe(("vision_config", "text_config"), _vision_tiles, _layout_simple, _shrink_internvl),
    "idefics3": Recipe(("vision_config", "text_config"), _vision_idefics3, _layout_simple, _shrink_idefics3),
    "paligemma": Recipe(("vision_config", "text_config"), _vision_tiles, _layout_paligemma, _shrink_paligemma),
    "gemma3": Recipe(("vision_config", "text_config"), _vision_tiles, _layout_gemma3, _shrink_gemma3),
    "mllama": Recipe(
        ("vision_config", "text_config.cross_attention_layers"), _vision_mllama, _layout_mllama, _shrink_mllama,
        cross_attention=True, decode_extras=_mllama_decode,
    ),
}


def recipe_for(cfg) -> Recipe:
    return RECIPES[cfg.recipe_type]


def build_inputs(cfg, tcfg, workload, image_tokens: int) -> dict[str, torch.Tensor]:
    """The prefill inputs of a workload as real CPU tensors (batch rows identical)."""
    r = recipe_for(cfg)
    gen = torch.Generator().manual_seed(workload.seed)
    n = workload.images
    B = workload.batch
    ids, extras = r.layout(tcfg, n, image_tokens, workload.prompt_tokens)
    out: dict[str, torch.Tensor] = {"input_ids": torch.tensor([ids] * B, dtype=torch.long)}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    for k, v in extras.items():
        out[k] = torch.tensor([v] * B, dtype=torch.long)
    if n:
        vis = r.vision(tcfg, n * B if cfg.recipe_type not in ("idefics3", "mllama") else n, gen)
        if cfg.recipe_type in ("idefics3", "mllama") and B > 1:
            vis = {k: v.expand(B, *v.shape[1:]).contiguous() for k, v in vis.items()}
        out.update(vis)
        if r.cross_attention:
            tiles = tcfg.vision_config.max_num_tiles
            cam = torch.zeros(B, len(ids), n, tiles, dtype=torch.long)
            for i in range(n):
                cam[:, i:, i, 0] = 1  # text from image i on attends to its (one) tile
            out["cross_attention_mask"] = cam
    return out
