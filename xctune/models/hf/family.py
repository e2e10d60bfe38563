"""A transformers VLM class as an xctune model: units, groups and tied weights read off its module tree.

Discovery (no per-model names): the token embeddings are `get_input_embeddings()`, the head is
`get_output_embeddings()`; the language model is the embeddings' parent, its decoder layers the
longest ModuleList there (layers of a cross-attention class are cross-attention layers), its
other children with parameters the final norm, those with buffers only (rotary tables) position
tables. The language model's parent is the multimodal base: its children that are transformers
models are vision towers, the other modules with parameters projectors, its own parameters
(LLaVA-NeXT's `image_newline`) root parameters. Tied weights are parameters that are one tensor.
"""

from __future__ import annotations

import contextlib
from functools import cache

import torch
from torch import nn

from ...errors import BadInput
from ..base import Colocation, ModelFamily, Role, UnitSpec
from .config import HFConfig
from .recipes import build_inputs, recipe_for



class HFFamily(ModelFamily):
    uses_real_metadata = True  # data-dependent branches answered from real copies (datadep.py)

    def __init__(self, config: HFConfig):
        self.config = config

    @property
    def transformers_config(self):
        return self.config.to_transformers()

    def model_class(self):
        return self.config.model_class()

    # --- structure ----------------------------------------------------------------------------
    def build_meta(self) -> nn.Module:
        tcfg = self.transformers_config
        tcfg._attn_implementation = "sdpa"
        with torch.device("meta"), quiet_transformers():
            model = self.model_class()(tcfg)
        return model.eval()

    def units(self, model: nn.Module) -> tuple[UnitSpec, ...]:
        return discover_units(model)

    def tied_weights(self, model: nn.Module) -> tuple[tuple[str, ...], ...]:
        by_id: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
        return tuple(tuple(names) for names in by_id.values() if len(names) > 1)

    def static_colocation(self, units, model) -> Colocation | None:
        tied = self.tied_weights(model)
        if not tied:
            return None
        unit_names = [u.name for u in units]
        members = []
        for group in tied:
            for p in group:
                u = max((n for n in unit_names if p == n or p.startswith(n + ".")), key=len, default=None)
                if u is not None and u not in members:
                    members.append(u)
        if len(members) < 2:
            return None
        return Colocation(
            tuple(members),
            "their weights are one tied tensor, which accelerate keeps on one device (the head's)",
        )

    @property
    def skip_keys(self) -> tuple[str, ...]:
        return ("cache", "past_key_values")

    def published_map(self, units, n_gpus: int) -> dict | None:
        from .splits import PUBLISHED

        recipe = PUBLISHED.get(self.config.model_type)
        return recipe(units, n_gpus) if recipe else None

    @staticmethod
    def _cross_attention_layers(model) -> set[int]:
        layers = [u for u in discover_units(model) if u.role in (Role.DECODER_LAYER, Role.CROSS_ATTENTION_LAYER)]
        return {i for i, u in enumerate(layers) if u.role is Role.CROSS_ATTENTION_LAYER}

    def twin(self) -> HFConfig:
        from . import twin

        return twin(self.config)

    # --- building -----------------------------------------------------------------------------
    def build_host(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        tcfg = self.transformers_config
        tcfg._attn_implementation = "sdpa"
        return self.model_class()(tcfg).eval()

    # --- running ------------------------------------------------------------------------------
    def make_inputs(self, workload, device, *, fake: bool = False):
        """Real tensors on `device`; a fake run makes them on the CPU and lifts them to fake tensors with
        real copies (dry_steps)."""
        tcfg = self.transformers_config
        inputs = build_inputs(self.config, tcfg, workload, self.config.image_tokens() if workload.images else 0)
        return {k: v.to(device) for k, v in inputs.items()}

    def load_weights(self, path) -> nn.Module:
        from .weights import load_weights

        return load_weights(self, path)

    def kv_tensors(self, past) -> list[torch.Tensor]:
        return cache_tensors(past)

    @torch.no_grad()
    def generate(self, model, inputs, workload, clock):
        """The dry run's steps for real: prefill on the processor-style inputs, then greedy decode steps
        that pass the cache (and a cross-attention family's mask row), phases under `clock`."""
        from ...workload import Generated

        recipe = recipe_for(self.config)
        with quiet_transformers():
            with clock("prefill"):
                out = model(**inputs, use_cache=True)
                logits = out.logits[:, -1]
                token = logits.argmax(-1)
            cache_obj = out.past_key_values
            del out
            tokens = [token]
            for _ in range(workload.new_tokens - 1):
                with clock("decode"):
                    kw = {}
                    if recipe.decode_extras is not None and "cross_attention_mask" in inputs:
                        kw = recipe.decode_extras(model.config, inputs, workload.batch, 1)
                    step = model(input_ids=token[:, None], cache=cache_obj, use_cache=True, **kw)
                    cache_obj = step.past_key_values
                    logits = step.logits[:, -1]
                    token = logits.argmax(-1)
                    del step
                tokens.append(token)
        return Generated(torch.stack(tokens, dim=1), logits, cache_obj)

    def dry_steps(self, model, workload, tracker, device, lift):
        with quiet_transformers(), values_are_known():
            return self._dry_steps(model, workload, tracker, device, lift)

    def _dry_steps(self, model, workload, tracker, device, lift):
        from ...worlds.datadep import real_tensors

        with real_tensors():
            real = self.make_inputs(workload, "cpu")
        inputs = {k: lift(v, device) for k, v in real.items()}
        recipe = recipe_for(self.config)
        tcfg = model.config
        tracker.phase = "prefill"
        out = model(**inputs, use_cache=True)
        cache_obj = out.past_key_values
        token = out.logits[:, -1].argmax(-1)
        del out
        steps = [("decode", 0)]
        if workload.new_tokens > 2:
            steps.append(("decode_last", workload.new_tokens - 3))
        if workload.new_tokens < 2:
            steps = []
        for phase, extra in steps:
            if extra:
                tracker.phase = "setup"
                with tracker.unpriced_ops():
                    extend_cache(cache_obj, extra, tracker, self._cross_attention_layers(model))
            tracker.phase = phase
            kw = {}
            if recipe.decode_extras is not None and "cross_attention_mask" in inputs:
                kw = recipe.decode_extras(tcfg, inputs, workload.batch, 1)
            step = model(input_ids=token[:, None], cache=cache_obj, use_cache=True, **kw)
            cache_obj = step.past_key_values
            token = step.logits[:, -1].argmax(-1)
            del step
        return cache_tensors(cache_obj)


@contextlib.contextmanager
def quiet_transformers():
    """transformers logs deprecations from inside its own forwards: not the user's business here."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


@contextlib.contextmanager
def values_are_known():
    """transformers takes a fake tensor for a graph being traced (`is_tracing`) and then avoids reading
    values: SDPA's causal-mask skip among them, so a dry run would build (and copy to every layer on
    another GPU) a 4D mask that the real run never makes. In a dry run every value the model reads has
    a real copy (datadep.py): let transformers read it, as on real tensors."""
    from transformers.utils import import_utils

    original = import_utils.is_fake_tensor
    import_utils.is_fake_tensor = lambda tensor: False
    try:
        yield
    finally:
        import_utils.is_fake_tensor = original


def cache_tensors(cache_obj) -> list[torch.Tensor]:
    out = []
    for layer in getattr(cache_obj, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def extend_cache(cache_obj, extra: int, tracker, cross_attention: set[int] = frozenset()) -> None:
    """Grow every self-attention cache layer by `extra` positions, on its device (prices the last decode step).

    Cross-attention layers (their cache holds image features) and sliding windows keep their length."""
    for i, layer in enumerate(getattr(cache_obj, "layers", [])):
        if i in cross_attention or "Sliding" in type(layer).__name__ or not isinstance(getattr(layer, "keys", None), torch.Tensor):
            continue
        for name in ("keys", "values"):
            t = getattr(layer, name)
            pad = torch.zeros((*t.shape[:-2], extra, t.shape[-1]), dtype=t.dtype, device=t.device)
            grown = torch.cat([t, pad], dim=-2)
            tracker.tag(grown, tracker.location(t))
            setattr(layer, name, grown)


def discover_units(model: nn.Module) -> tuple[UnitSpec, ...]:
    names = {id(m): n for n, m in model.named_modules()}
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if emb is None or head is None or id(emb) not in names or id(head) not in names:
        raise BadInput(f"{type(model).__name__}: cannot find its token embeddings and head")
    emb_name, head_name = names[id(emb)], names[id(head)]
    lm_name = emb_name.rpartition(".")[0]
    lm = model.get_submodule(lm_name)
    lists = [(n, c) for n, c in lm.named_children() if isinstance(c, nn.ModuleList)]
    if not lists:
        raise BadInput(f"{type(model).__name__}: no decoder layers under {lm_name}")
    layers_name, layers = max(lists, key=lambda x: len(x[1]))
    prefix = f"{lm_name}." if lm_name else ""
    layer_units = [
        UnitSpec(
            f"{prefix}{layers_name}.{i}",
            Role.CROSS_ATTENTION_LAYER if "CrossAttention" in type(layer).__name__ else Role.DECODER_LAYER,
        )
        for i, layer in enumerate(layers)
    ]
    tables, norms = [], []
    for n, c in lm.named_children():
        if c is emb or c is layers:
            continue
        if any(True for _ in c.parameters()):
            norms.append(UnitSpec(prefix + n, Role.FINAL_NORM))
        elif any(True for _ in c.buffers()):
            tables.append(UnitSpec(prefix + n, Role.POSITION_TABLE))
    base_name = lm_name.rpartition(".")[0]
    base = model.get_submodule(base_name) if base_name else model
    bprefix = f"{base_name}." if base_name else ""
    towers, projectors = [], []
    from transformers import PreTrainedModel

    for n, c in base.named_children():
        if c is lm or c is head or not any(True for _ in c.parameters()):
            continue
        (towers if isinstance(c, PreTrainedModel) else projectors).append(
            UnitSpec(bprefix + n, Role.VISION_TOWER if isinstance(c, PreTrainedModel) else Role.PROJECTOR)
        )
    root = [UnitSpec(bprefix + n, Role.ROOT_PARAMETER) for n, _ in base.named_parameters(recurse=False)]
    units = (*towers, *projectors, *root, UnitSpec(emb_name, Role.EMBEDDINGS), *tables, *layer_units, *norms, UnitSpec(head_name, Role.HEAD))
    covered = {u.name for u in units}
    stray = [
        n for n, _ in model.named_parameters()
        if not any(n == u or n.startswith(u + ".") for u in covered)
    ]
    if stray:
        raise BadInput(f"{type(model).__name__}: parameters outside every discovered unit, e.g. {stray[0]!r}")
    return units


@cache
def measured_image_tokens(cfg: HFConfig) -> int:
    """Placeholder tokens one image needs: the rows the family's own `get_image_features` returns
    for one image at the recipe's resolution, on fake tensors (cross-attention families: one)."""
    recipe = recipe_for(cfg)
    if recipe.cross_attention:
        return 1
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ...worlds.datadep import RealShadows, fake_metadata

    family = HFFamily(cfg)
    tcfg = family.transformers_config
    model = family.build_meta()
    vision = recipe.vision(tcfg, 1, torch.Generator().manual_seed(0))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    shadows = RealShadows()
    with mode:
        for mod in model.modules():
            for k, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[k] = nn.Parameter(torch.empty_strided(p.shape, p.stride(), dtype=p.dtype), requires_grad=False)
            for k, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[k] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype)
    with mode, fake_metadata(shadows), torch.no_grad():
        lifted = {k: shadows.fake_of(v, "cpu") for k, v in vision.items()}
        feats = model.model.get_image_features(**lifted)
    pooled = getattr(feats, "pooler_output", feats)
    leaves = pooled if isinstance(pooled, (list, tuple)) else [pooled]
    hidden = tcfg.get_text_config().hidden_size
    return sum(t.numel() for t in leaves) // hidden
