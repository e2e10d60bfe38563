"""The model presets `--model` accepts, and which one a command runs when none is named.

Light on purpose (no torch): the command line lists these names in its help.
"""

from __future__ import annotations

# What `--model` means when a command or study names none: the published 7B of the embedded family
DEFAULT_MODEL = "ixc2-vl-7b"
# What `xctune calibrate` measures for real by default: a model small enough to run on the CPU in
# seconds (the embedded family's tiny preset)
CALIBRATION_MODEL = "tiny"


def preset_names() -> tuple[str, ...]:
    """Every model preset: the embedded family's, then the transformers classes'."""
    from .config import PRESETS
    from .hf.config import PRESET_NAMES

    return (*PRESETS, *PRESET_NAMES)


def preset_table() -> dict[str, dict[str, dict]]:
    """What `xctune presets` shows of the models: {"models": the embedded presets, "transformers": the
    transformers presets}, each {name: figures}."""
    from .config import PRESETS
    from .hf.config import PRESET_NAMES, get_preset
    from .profile import profile_of

    hf = {n: get_preset(n) for n in PRESET_NAMES}
    return {
        "models": {n: {"params": profile_of(c).total_params, "image_tokens": c.image_tokens()} for n, c in PRESETS.items()},
        # image tokens of these are measured by a fake run of the vision tower: `xctune check` shows them
        "transformers": {n: {"params": profile_of(c).total_params, "architecture": c.architecture, "source": c.source}
                         for n, c in hf.items()},
    }
