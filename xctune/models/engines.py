"""What the serving engines know of this model family: the one place exports ask.

vLLM (checked against its model registry, vllm/model_executor/models/registry.py, 2026-12-01):
it implements the text-only `InternLM2ForCausalLM` (and `InternLM2VEForCausalLM`), not
`InternLMXComposer2ForCausalLM`: no CLIP tower, no projector, no Partial-LoRA branches. An
IXC2 checkpoint does not load in vLLM, so a vLLM export for it is written and validated (the
partition is what vLLM would take) but says plainly that it will not run.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import PUBLISHED_REPOS, XComposerConfig

# presets -> the public checkpoint they reproduce (design.md §4)


@dataclass(frozen=True)
class EngineSupport:
    engine: str
    supported: bool
    architecture: str  # the class name the engine would load
    statement: str  # one paragraph for the export's README


def checkpoint_name(config: XComposerConfig) -> str:
    """What a user passes to an engine: the hub id of a preset, else a placeholder to fill in."""
    return PUBLISHED_REPOS.get(config.name, f"/path/to/your/{config.name}-checkpoint")


def vllm_support(config: XComposerConfig) -> EngineSupport:
    arch = "InternLMXComposer2ForCausalLM"
    return EngineSupport(
        "vllm",
        False,
        arch,
        f"vLLM does not support {config.name}: its model registry has no {arch} (it implements the "
        f"text-only InternLM2ForCausalLM, without the CLIP vision tower, the projector and the Partial-LoRA "
        f"branches of InternLM-XComposer2). The partition and command below are what vLLM's pipeline "
        f"parallelism takes (VLLM_PP_LAYER_PARTITION sums to the model's {config.num_layers} decoder layers); "
        f"they run once vLLM implements the architecture. Today, run this plan with torch pipelining "
        f"(../torch_pipelining/); a plan that stays on one node also runs with accelerate (best_map.json).",
    )


def torch_pipelining_support(config: XComposerConfig) -> EngineSupport:
    return EngineSupport(
        "torch-pipelining",
        True,
        "XComposer (xctune.models.xcomposer)",
        f"torch.distributed.pipelining traces the language model of {config.name} (inputs_embeds -> logits) "
        f"and cuts it at the split points; the vision encoder, projector and token embeddings run on the first "
        f"rank before the pipeline, as the engines place them. No KV cache crosses the pipeline: each step runs "
        f"the padded sequence again (causal attention keeps earlier positions exact).",
    )


def pipeline_text_model(xc):
    """The language model of an XComposer as torch.distributed.pipelining traces it: one input,
    the input embeddings with the image mask as a last channel, -> fp32 logits.

    Its children keep the checkpoint's names (`model.layers.N`, `model.norm`, `output`), so a
    split_spec written in those names applies. The same computation as `XComposer.forward`
    without a cache, with two changes the pipeline needs (torch 2.13): later stages receive
    only values earlier stages compute (not a second pipeline input), so the mask is unpacked
    inside; and values sent between stages must be contiguous, so position ids are materialised.
    """
    import torch
    from torch import nn

    class _Text(nn.Module):
        def __init__(self, xc):
            super().__init__()
            self.model, self.output = xc.model, xc.output

        def forward(self, packed):
            hidden = packed[..., :-1].contiguous()
            weights = packed[..., -1].contiguous()
            B, T, _ = hidden.shape
            position_ids = torch.arange(T, device=hidden.device).unsqueeze(0).repeat(B, 1)
            for layer in self.model.layers:
                hidden, _ = layer(hidden, im_mask=weights, position_ids=position_ids)
            return self.output(self.model.norm(hidden)).float()

    return _Text(xc)


def pack_inputs(inputs_embeds, im_mask):
    """The one input of `pipeline_text_model`."""
    import torch

    return torch.cat([inputs_embeds, im_mask.to(inputs_embeds.dtype).unsqueeze(-1)], dim=-1)
