"""What the serving engines know of each model family: the one place exports ask.

vLLM (checked against its model registry, vllm/model_executor/models/registry.py, 2026-12-01):
it implements the text-only `InternLM2ForCausalLM` (and `InternLM2VEForCausalLM`), not
`InternLMXComposer2ForCausalLM`: no CLIP tower, no projector, no Partial-LoRA branches. An
IXC2 checkpoint does not load in vLLM, so a vLLM export for it is written and validated (the
partition is what vLLM would take) but says plainly that it will not run.

transformers classes (the same registry, read 2026-12-02 at commit 0002bff0): `_MULTIMODAL_MODELS`
maps LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, InternVL (native class, to `interns1`), Idefics3,
PaliGemma and Gemma 3 to vLLM implementations; `MllamaForConditionalGeneration` is in
`_PREVIOUSLY_SUPPORTED_MODELS` (last in vLLM 0.10.2). The exports' torch pipelining runner
(run_pipeline.py) builds the embedded InternLM-XComposer only: for a transformers class its
split points are written and validated, and its README says how to build the stages.
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


# transformers architectures vLLM's registry implements (see the module docstring)
VLLM_ARCHITECTURES = frozenset({
    "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration", "InternVLForConditionalGeneration", "Idefics3ForConditionalGeneration",
    "PaliGemmaForConditionalGeneration", "Gemma3ForConditionalGeneration",
})


def _is_transformers(config) -> bool:
    from .hf.config import HFConfig

    return isinstance(config, HFConfig)


def checkpoint_name(config) -> str:
    """What a user passes to an engine: the hub id of a preset, the user's directory, else a placeholder."""
    if _is_transformers(config):
        from pathlib import Path

        if config.source and Path(config.source).is_dir():
            return config.source
        # a preset's source reads "<hub id> config.json (architecture keys)"
        return config.source.split()[0] if config.source else f"/path/to/your/{config.name}-checkpoint"
    return PUBLISHED_REPOS.get(config.name, f"/path/to/your/{config.name}-checkpoint")


def vllm_support(config) -> EngineSupport:
    if _is_transformers(config):
        arch = config.architecture
        if arch in VLLM_ARCHITECTURES and not config.remote:
            return EngineSupport("vllm", True, arch, f"vLLM implements {arch} (its model registry), with pipeline "
                                 f"parallelism: the partition below is what it takes.")
        why = ("the directory's own remote-code class is not what vLLM's registry implements" if config.remote
               else f"vLLM's model registry does not implement {arch} today")
        return EngineSupport("vllm", False, arch, f"vLLM does not support {config.name}: {why}. The partition and "
                             f"command below are what vLLM's pipeline parallelism takes; a plan that stays on one node "
                             f"also runs with accelerate (best_map.json).")
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


def torch_pipelining_support(config) -> EngineSupport:
    if _is_transformers(config):
        return EngineSupport(
            "torch-pipelining",
            False,
            config.architecture,
            f"split_spec.json names the decoder layers of transformers' {config.architecture} as its module tree "
            f"has them; torch.distributed.pipelining cuts the language model there (`pipeline(model, mb_args, "
            f"split_spec=...)` on the text model, inputs_embeds -> logits, the vision tower, projector and "
            f"embeddings run on the first rank before it). The runner written beside it (run_pipeline.py) builds "
            f"the embedded InternLM-XComposer only: for {config.name} build the stages with those calls yourself.",
        )
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
