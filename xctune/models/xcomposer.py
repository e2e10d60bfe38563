"""InternLM-XComposer2 in one readable file: CLIP vision tower, projector, InternLM2 with PLoRA.

Written for xctune from the public description of the architecture (design.md §4). What
matters for device maps is kept exactly as in the authors' code:

- the module tree and parameter names (`vit.vision_tower.vision_model.*`, `vision_proj`,
  `model.tok_embeddings`, `model.layers.N.attention.wqkv`, ..., `output`, and in the HD
  variant `plora_glb_GN` / `plora_sub_GN` registered first at the root);
- the device moves the authors' code makes itself: the vision tower sends pixels to its own
  `self.device` (so an offloaded vit crashes, as it does upstream), the top level sends token
  ids to `self.device` (the first parameter's device);
- image and text embeddings are joined by a `torch.cat` at top level, outside any module an
  accelerate hook could align: vision_proj and tok_embeddings must produce on one device;
- the KV cache is a tuple of (k, v) per layer, returned under the key `past_key_values`;
- logits are cast to fp32 over the full sequence, as upstream.

One deliberate difference: upstream PLoRA indexes `x[im_mask]` (a data-dependent shape that a
fake tensor cannot have). Here the LoRA branch runs on all tokens of a step that contains image
tokens and is masked, which gives the same numbers; steps without image tokens (decode) skip it
entirely, as upstream does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from .config import XComposerConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class PLoRA(nn.Linear):
    """A linear layer plus a low-rank branch that applies only to image tokens.

    `extra` adapters ((name, rank): `{name}_A`, `{name}_B`) are IXC2.5's adapters of other
    inference modes: weights that live in the layer but the chat forward never runs.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, extra: tuple[tuple[str, int], ...] = ()):
        super().__init__(in_features, out_features, bias=False)
        self.Plora_A = nn.Linear(in_features, rank, bias=False)
        self.Plora_B = nn.Linear(rank, out_features, bias=False)
        for name, r in extra:
            self.add_module(f"{name}_A", nn.Linear(in_features, r, bias=False))
            self.add_module(f"{name}_B", nn.Linear(r, out_features, bias=False))

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if im_mask is not None:
            lora = self.Plora_B(self.Plora_A(x))
            out = out + lora * im_mask.unsqueeze(-1).to(lora.dtype)
        return out


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables, as upstream: buffers that cost memory the parameter count hides."""

    def __init__(self, dim: int, max_positions: int, base: float):
        super().__init__()
        self.dim, self.max_positions, self.base = dim, max_positions, base
        cos, sin = self._tables()
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def _tables(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim))
        t = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def reset_tables(self) -> None:
        """Recompute the tables in place (after a model built on `meta` got real storage)."""
        cos, sin = self._tables(device="cpu")
        self.cos_cached.copy_(cos.to(self.cos_cached.dtype))
        self.sin_cached.copy_(sin.to(self.sin_cached.dtype))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_cached[position_ids], self.sin_cached[position_ids]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, T, D]; cos/sin: [B, T, D]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: XComposerConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_per_kv = cfg.num_heads // cfg.num_kv_heads
        self.eager = cfg.attn == "eager"
        # wqkv packs, per KV head, its q_per_kv query heads then one key and one value head.
        extra = cfg.extra_adapters
        self.wqkv = PLoRA(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.plora_rank_wqkv, extra)
        self.wo = PLoRA(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.plora_rank, extra)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)

    def forward(self, x, im_mask, position_ids, layer_past, attention_mask=None):
        B, T, _ = x.shape
        qkv = self.wqkv(x, im_mask).view(B, T, self.num_kv_heads, self.q_per_kv + 2, self.head_dim)
        q = qkv[..., : self.q_per_kv, :].reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        cos, sin = self.rotary_emb(position_ids)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if layer_past is not None:
            k = torch.cat([layer_past[0], k], dim=2)
            v = torch.cat([layer_past[1], v], dim=2)
        present = (k, v)
        if self.eager:
            attn = _eager_attention(q, k, v, attention_mask, self.q_per_kv)
        else:
            # Grouped-query attention: each KV head serves q_per_kv query heads
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=(layer_past is None and T > 1), enable_gqa=True)
        attn = attn.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.wo(attn, im_mask), present


def _eager_attention(q, k, v, mask, q_per_kv):
    """The authors' eager path: KV heads repeated for their query heads, the full score tensor
    [B, heads, T, S] plus the additive mask, softmax in fp32, then the weighted sum."""
    k = k.repeat_interleave(q_per_kv, dim=1)
    v = v.repeat_interleave(q_per_kv, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def eager_mask(batch: int, length: int, past: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The 4D additive mask the authors' code builds once per forward: [B, 1, T, past + T],
    causal over the new tokens (a decode step's [B, 1, 1, S] masks nothing), in the
    embeddings' dtype, on the embeddings' device."""
    mask = torch.zeros(batch, 1, length, past + length, dtype=dtype, device=device)
    if length > 1:
        causal = torch.full((length, past + length), torch.finfo(dtype).min, dtype=dtype, device=device)
        mask = mask + causal.triu(past + 1)
    return mask


class FeedForward(nn.Module):
    def __init__(self, cfg: XComposerConfig):
        super().__init__()
        extra = cfg.extra_adapters
        self.w1 = PLoRA(cfg.hidden_size, cfg.intermediate_size, cfg.plora_rank, extra)
        self.w3 = PLoRA(cfg.hidden_size, cfg.intermediate_size, cfg.plora_rank, extra)
        self.w2 = PLoRA(cfg.intermediate_size, cfg.hidden_size, cfg.plora_rank, extra)

    def forward(self, x, im_mask):
        return self.w2(F.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: XComposerConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, hidden_states, im_mask=None, position_ids=None, layer_past=None, attention_mask=None):
        # A step without image tokens (decode: the authors pass an all-False im_mask) skips the
        # LoRA branch, as upstream does; only a multi-token step can hold image tokens here.
        lora_mask = im_mask if im_mask is not None and im_mask.shape[-1] > 1 else None
        attn, present = self.attention(
            self.attention_norm(hidden_states), lora_mask, position_ids, layer_past, attention_mask
        )
        hidden_states = hidden_states + attn
        hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states), lora_mask)
        return hidden_states, present


class InternLM2Model(nn.Module):
    def __init__(self, cfg: XComposerConfig):
        super().__init__()
        self.attn = cfg.attn
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids=None, inputs_embeds=None, im_mask=None, past_key_values=None):
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        B, T, _ = inputs_embeds.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        position_ids = torch.arange(past_len, past_len + T, device=inputs_embeds.device).unsqueeze(0).expand(B, T)
        extra = {}
        if self.attn != "sdpa":
            # the authors' code: a step from token ids gets an all-False im_mask, and (eager) the
            # 4D mask; both are built here, on the embeddings' device, and every decoder layer
            # receives them (accelerate copies them to each layer on another device)
            if im_mask is None:
                im_mask = torch.zeros(B, T, dtype=torch.bool, device=inputs_embeds.device)
            if self.attn == "eager":
                extra["attention_mask"] = eager_mask(B, T, past_len, inputs_embeds.dtype, inputs_embeds.device)
        hidden_states, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            layer_past = None if past_key_values is None else past_key_values[i]
            hidden_states, present = layer(
                hidden_states, im_mask=im_mask, position_ids=position_ids, layer_past=layer_past, **extra
            )
            presents.append(present)
        return self.norm(hidden_states), tuple(presents)


class _CLIPHolder(nn.Module):
    """Keeps the checkpoints' `vision_tower.vision_model.*` names: transformers 5 flattened CLIP."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        clip = CLIPVisionModel(config)
        # transformers 4.x wraps the parts in `vision_model`; 5.x has them directly.
        self.vision_model = getattr(clip, "vision_model", clip)

    def forward(self, pixel_values: torch.Tensor):
        return self.vision_model(pixel_values=pixel_values, output_hidden_states=True)


class VisionTower(nn.Module):
    def __init__(self, cfg: XComposerConfig):
        super().__init__()
        self.cfg = cfg
        clip = CLIPVisionConfig(
            hidden_size=cfg.vision_hidden_size,
            intermediate_size=cfg.vision_intermediate_size,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
        )
        self.vision_tower = _CLIPHolder(clip)

    @property
    def device(self) -> torch.device:
        return next(self.vision_tower.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        # As upstream: the tower's own device and dtype, the last hidden state without CLS.
        out = self.vision_tower(pixels.to(device=self.device, dtype=self.dtype))
        return out.hidden_states[-1][:, 1:]

    def forward(self, pixels, glb_GN=None, sub_GN=None, layout=None):
        feats = self.features(pixels)  # [crops, side*side, C]
        if not self.cfg.hd:
            return feats
        return _hd_arrange(feats, glb_GN, sub_GN, layout, self.cfg.patches_per_side)


def _hd_arrange(feats, glb_GN, sub_GN, layout, side):
    """IXC2-4KHD token layout: merge 2x2 patches, close every row with sub_GN, global view, glb_GN, crop grid."""
    rows, cols = layout
    per_image = 1 + rows * cols
    n, _, C = feats.shape
    h = side // 2
    x = feats.view(n, h, 2, h, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(n, h, h, 4 * C)
    x = x.view(n // per_image, per_image, h, h, 4 * C)
    images = []
    for img in x:
        glb = img[0]  # [h, h, 4C]
        grid = img[1:].view(rows, cols, h, h, 4 * C).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * h, 4 * C)
        glb = torch.cat([glb, sub_GN[0].expand(h, 1, 4 * C)], dim=1).flatten(0, 1)
        grid = torch.cat([grid, sub_GN[0].expand(rows * h, 1, 4 * C)], dim=1).flatten(0, 1)
        images.append(torch.cat([glb, glb_GN[0], grid], dim=0))
    return torch.stack(images)


class XComposer(nn.Module):
    """The top-level model. Registration order matters: `self.device` is the first parameter's."""

    def __init__(self, cfg: XComposerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.hd:
            self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, cfg.vision_out_size))
            self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, cfg.vision_out_size))
        self.model = InternLM2Model(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.vit = VisionTower(cfg)
        self.vision_proj = nn.Sequential(
            nn.Linear(cfg.vision_out_size, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_img(self, pixels: torch.Tensor, layout: tuple[int, int] | None = None) -> torch.Tensor:
        """Pixels of all crops of all images -> projected image embeddings [images, tokens, hidden]."""
        if self.cfg.hd:
            feats = self.vit(pixels, self.plora_glb_GN, self.plora_sub_GN, layout or self.cfg.hd_layout)
        else:
            feats = self.vit(pixels)
        return self.vision_proj(feats)

    def wrap(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_at: int = 1):
        """Join text and image embeddings at top level, as upstream's interleave wrap does.

        input_ids: [B, T_text]; image_embeds: [B * n_images, tokens, hidden]. The images of each
        sample are placed after the first `image_at` text tokens. Returns inputs_embeds [B, T, H]
        and im_mask [B, T] (True on image tokens).
        """
        input_ids = input_ids.to(self.device)
        text = self.model.tok_embeddings(input_ids)
        B = input_ids.shape[0]
        img = image_embeds.reshape(B, -1, image_embeds.shape[-1])
        # The authors' chat code hands the joined embeddings to generate() on `self.device` (the
        # first parameter's: the GN vector of 4KHD / 2.5, which accelerate keeps on the main GPU).
        embeds = torch.cat([text[:, :image_at], img, text[:, image_at:]], dim=1).to(self.device)
        n_img, n_text = img.shape[1], text.shape[1]
        im_mask = torch.cat(
            [
                torch.zeros(B, image_at, dtype=torch.bool, device=embeds.device),
                torch.ones(B, n_img, dtype=torch.bool, device=embeds.device),
                torch.zeros(B, n_text - image_at, dtype=torch.bool, device=embeds.device),
            ],
            dim=1,
        )
        return embeds, im_mask

    def forward(self, input_ids=None, inputs_embeds=None, im_mask=None, past_key_values=None):
        hidden, presents = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, im_mask=im_mask, past_key_values=past_key_values
        )
        logits = self.output(hidden).float()
        # A plain dict: accelerate's hooks walk it key by key, so `skip_keys` can spare the cache.
        return {"logits": logits, "past_key_values": presents}


def init_weights(model: XComposer, seed: int = 0, std: float = 0.02) -> XComposer:
    """Deterministic random weights: the same seed gives the same model on any machine."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_tables()
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


