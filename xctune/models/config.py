"""Model presets: the dimensions of the InternLM-XComposer2 family and a tiny twin.

A preset fixes the module tree; the tree fixes the parameter names, and the names are what a
device map is written in. The 7B presets reproduce the public checkpoints' parameter counts
exactly (design.md §4), so a map found on them transfers name-for-name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import BadInput


ATTENTION = ("eager", "sdpa", "flash")


@dataclass(frozen=True)
class XComposerConfig:
    name: str
    # language model (InternLM2)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    plora_rank: int  # rank of the Partial-LoRA branch on every decoder linear...
    plora_rank_wqkv: int  # ...except wqkv, which IXC2-4KHD gives a rank of its own
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-5
    # vision tower (CLIP ViT)
    vision_hidden_size: int = 1024
    vision_intermediate_size: int = 4096
    vision_layers: int = 24
    vision_heads: int = 16
    patch_size: int = 14
    image_size: int = 490  # the size the position table is built for (one crop in HD mode)
    # IXC2-4KHD style: images are cut into crops of `image_size`, the features of each crop are
    # merged 2x2 (4x fewer tokens, 4x wider), and rows/views are separated by the two learned
    # "GN" vectors that live at the top level of the model.
    hd: bool = False
    hd_layout: tuple[int, int] = (2, 3)  # default crop grid (rows, cols) of one image
    # The attention the checkpoint's code runs (its config's `attn_implementation`): "eager"
    # builds a [B, 1, T, S] additive mask that every decoder layer receives and holds
    # [B, heads, T, S] scores; "sdpa" and "flash" are one fused kernel without either.
    attn: str = "sdpa"
    # IXC2.5: LoRA adapters of the other inference modes, (name, rank) on every PLoRA linear,
    # next to `Plora_A` / `Plora_B`. They are weights (memory) the chat forward never runs.
    extra_adapters: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.attn not in ATTENTION:
            raise BadInput(f"unknown attention {self.attn!r}; choose from {', '.join(ATTENTION)}")
        problem = config_problem(self)
        if problem:
            raise BadInput(f"bad config {self.name!r}: {problem}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def merge(self) -> int:
        """Side of the square of patches merged into one image token (HD mode merges 2x2)."""
        return 2 if self.hd else 1

    @property
    def vision_out_size(self) -> int:
        return self.vision_hidden_size * self.merge * self.merge

    def image_tokens(self, layout: tuple[int, int] | None = None) -> int:
        """Image tokens one image becomes in the language model's input."""
        side = self.patches_per_side // self.merge
        if not self.hd:
            return side * side
        rows, cols = layout or self.hd_layout
        glb = side * side + side  # the global view, one sub_GN closing each row
        sub = (rows * side) * (cols * side) + rows * side  # the crop grid, likewise
        return glb + 1 + sub  # glb_GN separates the two views

    def crops_per_image(self, layout: tuple[int, int] | None = None) -> int:
        if not self.hd:
            return 1
        rows, cols = layout or self.hd_layout
        return 1 + rows * cols


# sizes that must be whole numbers >= 1 (a layer count of 0 or a hidden size of 0 makes no model)
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "plora_rank",
          "plora_rank_wqkv", "max_position_embeddings", "vision_hidden_size", "vision_intermediate_size",
          "vision_layers", "vision_heads", "patch_size", "image_size")
_POSITIVE = ("rope_theta", "rms_norm_eps")  # finite numbers > 0
# (what must divide, what it must divide, why)
_DIVIDES = (
    ("num_heads", "hidden_size", "the attention heads split the hidden size"),
    ("num_kv_heads", "num_heads", "grouped-query attention shares each KV head among whole groups of heads"),
    ("vision_heads", "vision_hidden_size", "the vision heads split the vision hidden size"),
)


def config_problem(cfg: "XComposerConfig") -> str | None:
    """Why these values make no model, or None; in the words of the config's own keys."""
    import math

    if not isinstance(cfg.name, str):
        return f"name = {cfg.name!r} must be a string"
    for key in _SIZES:
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            return f"{key} = {_shown(v)} must be a whole number >= 1"
    for key in _POSITIVE:
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            return f"{key} = {_shown(v)} must be a finite number > 0"
    for part, whole, why in _DIVIDES:
        if getattr(cfg, whole) % getattr(cfg, part):
            return f"{part} = {getattr(cfg, part)} does not divide {whole} = {getattr(cfg, whole)} ({why})"
    if (cfg.hidden_size // cfg.num_heads) % 2:
        return f"head size hidden_size / num_heads = {cfg.hidden_size // cfg.num_heads} must be even (rotary embeddings rotate pairs)"
    if not isinstance(cfg.hd, bool):
        return f"hd = {_shown(cfg.hd)} must be true or false"
    side = 2 if cfg.hd else 1
    if cfg.image_size < cfg.patch_size * side:
        return f"image_size = {cfg.image_size} is smaller than {'two patches' if cfg.hd else 'one patch'} (patch_size = {cfg.patch_size})"
    layout = cfg.hd_layout
    if not isinstance(layout, tuple) or len(layout) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in layout):
        return f"hd_layout = {_shown(layout)} must be two whole numbers >= 1 (rows, cols)"
    return None


def _shown(value) -> str:
    from ..errors import shown

    return shown(value)


_IXC2_LM = dict(
    vocab_size=92544,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    plora_rank=256,
)

# IXC2.5's adapters besides Plora_A/B: their total rank (1024) is fixed by the published
# parameter count; the split and the names are read from a checkpoint's weight index when
# one is given (checkpoint.py), these are the preset's.
IXC2D5_ADAPTERS = (("lora_sft", 512), ("lora_web", 512))

PRESETS: dict[str, XComposerConfig] = {
    # A few MB of random weights, same tree: the model the test suite and CPU studies run.
    "tiny": XComposerConfig(
        name="tiny",
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=352,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        plora_rank=16,
        plora_rank_wqkv=16,
        max_position_embeddings=2048,
        vision_hidden_size=64,
        vision_intermediate_size=128,
        vision_layers=2,
        vision_heads=4,
        image_size=56,
    ),
    # The published checkpoints run the authors' eager attention (their config.json says so).
    # internlm/internlm-xcomposer2-vl-7b: 490 px images (35x35 = 1225 tokens), 8,666,840,064 params.
    "ixc2-vl-7b": XComposerConfig(name="ixc2-vl-7b", plora_rank_wqkv=256, image_size=490, attn="eager", **_IXC2_LM),
    # internlm/internlm-xcomposer2-4khd-7b: 336 px crops, 2x2 merge, GN separators, rank-8 LoRA
    # on wqkv; 8,597,501,952 params. A 2x3 crop grid is 1045 image tokens.
    "ixc2-4khd-7b": XComposerConfig(
        name="ixc2-4khd-7b", plora_rank_wqkv=8, image_size=336, hd=True, hd_layout=(2, 3), attn="eager", **_IXC2_LM
    ),
    # internlm/internlm-xcomposer2d5-7b: 560 px crops (40x40 patches, 2x2 merge: 400 tokens a
    # crop), GN separators, rank-256 LoRA everywhere plus the adapters of its "write" and "web"
    # modes on every PLoRA linear (total extra rank 1024); 11,095,734,272 params. A 2x2 crop
    # grid is 2061 image tokens.
    "ixc2d5-7b": XComposerConfig(
        name="ixc2d5-7b", plora_rank_wqkv=256, image_size=560, hd=True, hd_layout=(2, 2), attn="eager",
        extra_adapters=IXC2D5_ADAPTERS, **_IXC2_LM
    ),
}


# The same, HD flavour: GN parameters at the root, crops merged 2x2, a lower wqkv LoRA rank.
PRESETS["tiny-hd"] = replace(PRESETS["tiny"], name="tiny-hd", plora_rank_wqkv=4, hd=True, hd_layout=(1, 2))


# Where each published variant lives on the Hugging Face hub (for the lines users run).
PUBLISHED_REPOS = {
    "ixc2-vl-7b": "internlm/internlm-xcomposer2-vl-7b",
    "ixc2-4khd-7b": "internlm/internlm-xcomposer2-4khd-7b",
    "ixc2d5-7b": "internlm/internlm-xcomposer2d5-7b",
}


def get_config(name: str) -> XComposerConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise BadInput(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None


def with_overrides(cfg: XComposerConfig, **changes) -> XComposerConfig:
    return replace(cfg, **changes)
