"""Splitting recipes that model authors publish for their checkpoints, as baselines (`authors`).

Each recipe is written from the authors' own text, over the units the family discovered (roles,
not module names), so it applies to the native transformers class of that family.
"""

from __future__ import annotations

import math

from ..base import LAYER_ROLES


def internvl_split_model(units, n_gpus: int) -> dict:
    """OpenGVLab's `split_model` (the InternVL2.5 / InternVL3 model cards, "multiple GPUs"): the first
    GPU counts as half a GPU because it also runs the vision model, so it gets ceil(ceil(L / (N - 0.5)) / 2)
    decoder layers and every other GPU ceil(L / (N - 0.5)), dealt in order; the vision model, the
    projector, the embeddings, the rotary table, the final norm, the head and the *last* decoder layer
    all go on GPU 0 (so the last layer's output is already where the head is)."""
    layers = [u.name for u in units if u.role in LAYER_ROLES]
    L = len(layers)
    per_gpu = math.ceil(L / (n_gpus - 0.5))
    counts = [per_gpu] * n_gpus
    counts[0] = math.ceil(per_gpu * 0.5)
    dmap: dict = {}
    it = iter(layers)
    for gpu, count in enumerate(counts):
        for name in [next(it, None) for _ in range(count)]:
            if name is not None:
                dmap[name] = gpu
    dmap.update({u.name: 0 for u in units if u.role not in LAYER_ROLES})
    dmap[layers[-1]] = 0
    return {u.name: dmap[u.name] for u in units}


# model_type -> the recipe its authors publish
PUBLISHED = {"internvl": internvl_split_model}
