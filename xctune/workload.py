"""The work one trial does, and what a generate loop hands back — the same for every family.

Each model family makes the workload's inputs (synthetic and deterministic: seeded random pixels
and token ids, so every trial of a study does identical work) and runs its own explicit generate
loop (models/base.py `make_inputs`, `generate`): written out, no `model.generate`, so that its
phases can be timed and instrumented: vision encode, prefill (= time to first token), decode steps.
The figures below take the family's config (models/base.py `ModelFamily.config`: `name`,
`max_position_embeddings`, `image_tokens(layout)`).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from .errors import BadInput


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

    def image_tokens(self, cfg) -> int:
        return self.images * cfg.image_tokens(self.hd_layout)

    def prompt_length(self, cfg) -> int:
        return self.prompt_tokens + self.image_tokens(cfg)

    def max_length(self, cfg) -> int:
        return self.prompt_length(cfg) + self.new_tokens

    def check_fits(self, cfg) -> None:
        if self.max_length(cfg) > cfg.max_position_embeddings:
            raise BadInput(
                f"workload needs {self.max_length(cfg)} positions; {cfg.name} has {cfg.max_position_embeddings}"
            )

    def describe(self, cfg) -> str:
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


def no_clock(phase: str):
    return contextlib.nullcontext()


@dataclass
class Generated:
    tokens: torch.Tensor  # [batch, new_tokens]
    last_logits: torch.Tensor  # [batch, vocab] of the last step
    past_key_values: tuple
