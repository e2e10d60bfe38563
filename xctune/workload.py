"""The work one trial does, and the explicit generate loop both worlds run.

Inputs are synthetic and deterministic (seeded random pixels and token ids), so every trial of
a study does identical work. The loop is written out (no `model.generate`) so that its phases
can be timed and instrumented: vision encode, prefill (= time to first token), decode steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from .errors import BadInput
from .models import XComposer, XComposerConfig


@dataclass(frozen=True)
class Workload:
    images: int = 1  # images per prompt
    prompt_tokens: int = 64  # text tokens per prompt
    new_tokens: int = 32  # tokens generated (the first comes out of prefill)
    batch: int = 1
    hd_layout: tuple[int, int] | None = None  # HD models: crop grid (rows, cols); None = the preset's
    seed: int = 0

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens", "batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BadInput(f"workload {name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.images, int) or self.images < 0:
            raise BadInput(f"workload images must be 0 or more, got {self.images!r}")
        if self.hd_layout is not None:
            if len(self.hd_layout) != 2 or any(not isinstance(x, int) or x < 1 for x in self.hd_layout):
                raise BadInput(f"hd_layout must be two positive integers (rows, cols), got {self.hd_layout!r}")
            object.__setattr__(self, "hd_layout", tuple(self.hd_layout))

    def image_tokens(self, cfg: XComposerConfig) -> int:
        return self.images * cfg.image_tokens(self.hd_layout)

    def prompt_length(self, cfg: XComposerConfig) -> int:
        return self.prompt_tokens + self.image_tokens(cfg)

    def max_length(self, cfg: XComposerConfig) -> int:
        return self.prompt_length(cfg) + self.new_tokens

    def check_fits(self, cfg: XComposerConfig) -> None:
        if self.max_length(cfg) > cfg.max_position_embeddings:
            raise BadInput(
                f"workload needs {self.max_length(cfg)} positions; {cfg.name} has {cfg.max_position_embeddings}"
            )

    def describe(self, cfg: XComposerConfig) -> str:
        img = f"{self.images} image(s) = {self.image_tokens(cfg)} image tokens"
        return f"batch {self.batch}, {img} + {self.prompt_tokens} text tokens, {self.new_tokens} new tokens"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hd_layout"] = list(self.hd_layout) if self.hd_layout else None
        return d


def parse_layout(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise BadInput(f"--hd-layout must look like 2x3 (rows x cols), got {text!r}") from None
    if rows < 1 or cols < 1:
        raise BadInput(f"--hd-layout needs positive rows and cols, got {text!r}")
    return rows, cols


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


def no_clock(phase: str):
    return contextlib.nullcontext()


@dataclass
class Generated:
    tokens: torch.Tensor  # [batch, new_tokens]
    last_logits: torch.Tensor  # [batch, vocab] of the last step
    past_key_values: tuple


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
