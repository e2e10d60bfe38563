"""The maps people use today, to measure against.

- `authors`: the model family's own published splitting recipe, where it has one (the family
  supplies it: models/base.py `published_map`, e.g. the authors' own helper that deals the decoder
  layers out evenly).
- `accelerate-sequential` / `accelerate-balanced`: accelerate's `infer_auto_device_map`
  (balanced = with `get_balanced_memory`, what `device_map="auto"` does), computed on a `meta`
  instance of the model. These may break co-location; `repair` gives the nearest valid map.
- `single`: everything on GPU 0.
- `vllm-default`: vLLM's own partition when `VLLM_PP_LAYER_PARTITION` is not set, one stage per
  GPU (vllm/distributed/utils.py `get_pp_indices`, as its docstring states the rule: L // N
  layers each; the remainder one each to the middle stages when it fits there, else to every
  stage but the last), vision and embeddings on the first GPU, the head on the last.
"""

from __future__ import annotations

import logging

from ..errors import BadInput
from ..hardware import Cluster
from .plan import Plan, resolve
from ..models.profile import DTYPES, ModelProfile

BASELINES = ("authors", "accelerate-sequential", "accelerate-balanced", "single", "vllm-default")
NO_SPLIT = ["DecoderLayer", "CLIPEncoderLayer"]


def authors_map(profile: ModelProfile, n_gpus: int) -> dict:
    if n_gpus < 1:
        raise BadInput("the authors' splitting recipe needs at least one GPU")
    dmap = profile.family.published_map(profile.units, n_gpus)
    if dmap is None:
        raise BadInput(f"{profile.config.name} has no published splitting recipe (baseline 'authors')")
    return dmap


def has_baseline(name: str, profile: ModelProfile) -> bool:
    """Whether the model has this baseline at all (`authors` exists where the family publishes a recipe)."""
    return name != "authors" or profile.family.published_map(profile.units, 1) is not None


def vllm_default_counts(layers: int, stages: int) -> list[int]:
    """Decoder layers per pipeline stage in vLLM's default partition."""
    if not 1 <= stages <= layers:
        raise BadInput(f"vLLM's default partition needs 1..{layers} stages, got {stages}")
    counts = [layers // stages] * stages
    rest = layers % stages
    middle = list(range(1, stages - 1))
    targets = middle if stages > 2 and rest <= len(middle) else list(range(stages - 1)) or [0]
    for i in range(rest):
        counts[targets[-1 - (i % len(targets))]] += 1
    return counts


def vllm_default_map(profile: ModelProfile, n_gpus: int) -> dict:
    from ..search.targets import pipeline_map

    return pipeline_map(profile, vllm_default_counts(len(profile.layers), n_gpus))


def accelerate_map(profile: ModelProfile, cluster: Cluster, dtype: str, strategy: str = "balanced") -> dict:
    """accelerate's own answer for this model and cluster (which may be invalid)."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    # accelerate warns that the devices it plans for are absent: true here, and beside the point
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)
    model = profile.family.build_meta()
    model.to(DTYPES[dtype])
    # the classes the model itself declares unsplittable (transformers collects them in post_init), as from_pretrained passes them
    no_split = sorted(set(NO_SPLIT) | set(getattr(model, "_no_split_modules", None) or ()))
    max_memory: dict = {i: cluster.usable_bytes(i) for i in range(len(cluster.gpus))}
    max_memory["cpu"] = 2**50  # overflow goes to host RAM (without this key accelerate sends it to disk)
    if strategy == "balanced":
        max_memory = get_balanced_memory(
            model, max_memory=max_memory, no_split_module_classes=no_split, dtype=DTYPES[dtype]
        )
    elif strategy != "sequential":
        raise BadInput(f"unknown accelerate strategy {strategy!r}; use sequential or balanced")
    dmap = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=DTYPES[dtype])
    if set(dmap) == {""}:  # everything fits one device: accelerate says {"": 0}
        return {"": dmap[""]}
    return dict(dmap)


def single_map(profile: ModelProfile) -> dict:
    return {u.name: 0 for u in profile.units}


def baseline_map(name: str, profile: ModelProfile, cluster: Cluster, dtype: str = "fp32") -> dict:
    if name == "authors":
        return authors_map(profile, len(cluster.gpus))
    if name == "accelerate-sequential":
        return accelerate_map(profile, cluster, dtype, "sequential")
    if name == "accelerate-balanced":
        return accelerate_map(profile, cluster, dtype, "balanced")
    if name == "single":
        return single_map(profile)
    if name == "vllm-default":
        return vllm_default_map(profile, min(len(cluster.gpus), len(profile.layers)))
    raise BadInput(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")


def baseline_plan(name: str, profile: ModelProfile, cluster: Cluster, dtype: str = "fp32") -> Plan:
    return Plan.uniform(baseline_map(name, profile, cluster, dtype), dtype, label=name)


def repair(device_map: dict, profile: ModelProfile) -> dict:
    """The nearest map that keeps the embedding group together: move the rest of it (the image path,
    root parameters, position tables) to the token embeddings' device."""
    res = resolve(device_map, profile)
    anchor = res.device_of_unit(profile.embeddings)
    if anchor is None or anchor in ("cpu", "disk"):
        anchor = min((d for d in device_map.values() if isinstance(d, int)), default=0)
    moved = [u for u in profile.embed_group if u != profile.embeddings]
    fixed = {k: d for k, d in device_map.items() if not any(k == u or k.startswith(u + ".") for u in moved)}
    fixed.update({u: anchor for u in moved})
    return fixed
