"""Load the best map the fast way (written by xctune).

A bare `from_pretrained(device_map=...)` under transformers 5 does not skip the KV cache when
it moves outputs between GPUs (the remote code's skip keys arrive as a set of letters): the
cache then crosses GPUs at every decode step. These lines put the skip keys right.
"""
import json

import torch
from transformers import AutoModel

PATH = "/path/to/your/tiny-checkpoint"  # your checkpoint
device_map = json.load(open("best_map.json"))
model = AutoModel.from_pretrained(PATH, trust_remote_code=True, torch_dtype=torch.bfloat16, device_map=device_map).eval()
hook = getattr(model, "_hf_hook", None)
if hook is not None:  # the root hook sends outputs back to the first GPU: not the cache
    hook.skip_keys = ["past_key_values", "cache"]
# The plan mixes precisions (fp32/bf16/bf16): cast each group as best_plan.json says,
# e.g. model.vit.to(torch.float32); xctune's placement adds the casts between groups.
