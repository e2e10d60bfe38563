"""The accelerate export: the device map and the lines that load it the fast way."""

from __future__ import annotations

from pathlib import Path

from ..models.engines import checkpoint_name
from ..plans.plan import Plan, write_device_map

LOADER = '''"""Load the best map the fast way (written by xctune).

A bare `from_pretrained(device_map=...)` under transformers 5 does not skip the KV cache when
it moves outputs between GPUs (the remote code's skip keys arrive as a set of letters): the
cache then crosses GPUs at every decode step. These lines put the skip keys right.
"""
import json

import torch
from transformers import AutoModel

PATH = "{checkpoint}"  # your checkpoint
device_map = json.load(open("best_map.json"))
model = AutoModel.from_pretrained(PATH, trust_remote_code=True, torch_dtype=torch.{dtype}, device_map=device_map).eval()
hook = getattr(model, "_hf_hook", None)
if hook is not None:  # the root hook sends outputs back to the first GPU: not the cache
    hook.skip_keys = ["past_key_values", "cache"]
{mixed}'''


def torch_name(d: str) -> str:
    return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[d]


def loader_text(plan: Plan, profile) -> str:
    """The lines that load `plan`'s map the fast way (working skip keys, the plan's dtypes)."""
    mixed = ""
    if plan.mixed:
        mixed = (f"# The plan mixes precisions ({plan.dtype_label}): cast each group as best_plan.json says,\n"
                 f"# e.g. model.{profile.vision[0]}.to(torch.{torch_name(plan.dtypes['vision'])}); "
                 f"xctune's placement adds the casts between groups.\n")
    return LOADER.format(checkpoint=checkpoint_name(profile.config), dtype=torch_name(plan.dtypes["lm"]), mixed=mixed)


def export_accelerate(plan: Plan, profile, out: Path):
    from ..atomic import staged, write_text
    from . import Export

    files = {"best_map.json": out / "best_map.json", "load_best_map.py": out / "load_best_map.py"}
    with staged(files["best_map.json"]) as tmp:
        write_device_map(plan, tmp)
    write_text(files["load_best_map.py"], loader_text(plan, profile))
    return Export("accelerate", out, files, True,
                  "one process on one node: from_pretrained(..., device_map=json.load(open('best_map.json')))")
