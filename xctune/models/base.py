"""The one description of a model that the rest of xctune uses (design.md §6).

A model family (the embedded InternLM-XComposer, a transformers class, ...) answers, through a
`ModelFamily`, everything plans, checks, searches and both worlds need to know about it:

- its placement units in execution order, each with a role (vision tower, projector, token
  embeddings, decoder layer, cross-attention layer, final norm, head, root parameter) — the
  roles give the precision groups and every rule that used to name one family's modules;
- tied weights, the keys accelerate must not move (`skip_keys`), and the static co-location
  rule with its reason (dry runs say what is truly required: constraints.py);
- how to build it on `meta` (for fake tensors) and with real weights;
- how to make its inputs for a workload and run the dry-run steps (prefill, cached decode);
- for measured runs: how to read its weights from a checkpoint directory (as data) and run the
  workload for real (the explicit generate loop, phases timed by the caller's clock);
- for the torch pipelining runner (export/run_pipeline.py), where the family provides them: its
  text model as the pipeline traces it, and the input rows of a prompt and of a generated token.

Nothing outside `xctune/models/` should need a family's module names: it asks the profile
(profile.py) built from this description.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from ..errors import BadInput


class Role(str, Enum):
    VISION_TOWER = "vision tower"
    PROJECTOR = "projector"
    ROOT_PARAMETER = "root parameter"
    EMBEDDINGS = "embeddings"
    POSITION_TABLE = "position table"  # a module with buffers only (rotary tables): placed, no weights
    DECODER_LAYER = "decoder layer"
    CROSS_ATTENTION_LAYER = "cross-attention layer"
    FINAL_NORM = "final norm"
    HEAD = "head"


# The precision group of each role: the granularity at which a plan chooses dtypes.
ROLE_GROUP = {
    Role.VISION_TOWER: "vision",
    Role.PROJECTOR: "vision",
    Role.ROOT_PARAMETER: "vision",
    Role.EMBEDDINGS: "lm",
    Role.POSITION_TABLE: "lm",
    Role.DECODER_LAYER: "lm",
    Role.CROSS_ATTENTION_LAYER: "lm",
    Role.FINAL_NORM: "lm",
    Role.HEAD: "head",
}
LAYER_ROLES = (Role.DECODER_LAYER, Role.CROSS_ATTENTION_LAYER)


@dataclass(frozen=True)
class UnitSpec:
    """One entry a device map may give a device: a module path (or a root parameter)."""

    name: str
    role: Role


@dataclass(frozen=True)
class Colocation:
    """Units whose outputs (or weights) must be on one device, and why."""

    units: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class PipelineParts:
    """What torch.distributed.pipelining runs of one model (export/run_pipeline.py).

    The first rank turns a request into input rows before the pipeline; the pipeline traces
    `decoder` (the language model) and cuts it at the split points. Rows are one tensor per
    position (what stages send each other), so a generated token's row can be written into a
    padded sequence."""

    #: [1, T, width] rows -> fp32 logits [1, T, vocab]; its children keep the checkpoint's names
    #: (the decoder layers of the profile), so a `split_spec` in those names applies
    decoder: nn.Module
    #: the workload's prompt (one request) -> its rows [1, prompt length, width]
    prompt_rows: Callable[[object], torch.Tensor]
    #: token ids [1] -> the row of that token [1, width]
    token_row: Callable[[torch.Tensor], torch.Tensor]


class ModelFamily(ABC):
    """How one model (one config of one family) is built, described and run."""

    #: the config object the profile is keyed by (frozen, hashable); it carries `name`,
    #: `max_position_embeddings` and `image_tokens(layout)` for the workload.
    config: object

    @property
    def name(self) -> str:
        return self.config.name

    # --- structure ----------------------------------------------------------------------------
    @abstractmethod
    def build_meta(self) -> nn.Module:
        """The model on the `meta` device: structure, names and shapes, no memory."""

    @abstractmethod
    def units(self, model: nn.Module) -> tuple[UnitSpec, ...]:
        """Placement units in execution order, read off a (meta) instance."""

    def tied_weights(self, model: nn.Module) -> tuple[tuple[str, ...], ...]:
        """Groups of parameter names that are one tensor (a head tied to the embeddings)."""
        return ()

    def static_colocation(self, units: tuple[UnitSpec, ...], model: nn.Module) -> Colocation | None:
        """The conservative rule checked in milliseconds before any dry run."""
        return None

    @property
    def skip_keys(self) -> tuple[str, ...]:
        """Keyword arguments / outputs accelerate must not move between devices (the KV cache)."""
        return ("past_key_values",)

    def published_map(self, units, n_gpus: int) -> dict | None:
        """The family's own published splitting recipe for `n_gpus` GPUs (the authors' helper), as a
        device map over `units` (each has `.name` and `.role`); None where the family publishes none."""
        return None

    @abstractmethod
    def twin(self):
        """The config of a shrunk twin: same code and flags, tiny dimensions. Device behaviour does
        not depend on the dimensions, so constraint probes and tests run twins in milliseconds."""

    # --- building -----------------------------------------------------------------------------
    @abstractmethod
    def build_host(self, seed: int = 0) -> nn.Module:
        """Real random weights on the CPU in fp32, deterministic per seed."""

    # --- running ------------------------------------------------------------------------------
    @abstractmethod
    def make_inputs(self, workload, device, *, fake: bool = False):
        """The workload's inputs (synthetic, deterministic), on `device`."""

    #: whether a fake run must keep real copies of its inputs to answer data-dependent ops
    uses_real_metadata: bool = False

    @abstractmethod
    def load_weights(self, path) -> nn.Module:
        """Real weights from a checkpoint directory, fp32 on the CPU, read as data (no code of the
        checkpoint runs); BadInput where the directory holds none or they do not fit the config."""

    @abstractmethod
    def generate(self, model: nn.Module, inputs, workload, clock):
        """The real workload: prefill, then `workload.new_tokens - 1` cached greedy decode steps, each
        under `clock(phase)` ("vision", "prefill", "decode"); returns a `workload.Generated`."""

    def kv_tensors(self, past) -> list[torch.Tensor]:
        """The KV-cache tensors of a `Generated.past_key_values` (to count their bytes per device)."""
        return [t for kv in past for t in kv]

    def pipeline_parts(self, load: Callable[[], nn.Module]) -> PipelineParts:
        """The parts the torch pipelining runner needs of the model that `load()` gives (real weights,
        loaded only where the family provides parts). BadInput where it provides none: the runner
        then cannot build its stages."""
        raise BadInput(f"the torch pipelining runner (run_pipeline.py) supports only model families that provide "
                       f"their pipeline parts (models/base.py pipeline_parts); {self.name} does not: build the stages "
                       f"from split_spec.json with torch.distributed.pipelining yourself")

    @abstractmethod
    def dry_steps(self, model: nn.Module, workload, tracker, device, lift) -> list[torch.Tensor]:
        """Prefill and the priced decode steps of a dry run, inside the fake mode; returns the KV
        tensors at the end. `lift(real_cpu_tensor, device)` makes a fake input that keeps its
        values (datadep.py). The family sets `tracker.phase` to "vision", "prefill", "decode",
        "decode_last" as the steps go (the accounting downstream reads it)."""
