"""Study files: what a search runs (model, cluster, workload, space, objectives, trials), in TOML.

    name = "default"
    model = "PRESET"                  # or a checkpoint directory (default: models/presets.py DEFAULT_MODEL)
    trials = 50
    objectives = ["latency"]          # any of latency, peak_mem, transfer, throughput
    attn = "eager"                    # optional: eager | sdpa | flash (default: the checkpoint's)
    loader = "xctune"                 # or "from_pretrained": the path users will load the map with
    target = "accelerate"             # or "vllm-pp", "torch-pipelining" (targets.py)
    [cluster]   gpus = "2x24GiB"  link = "pcie4"  headroom = 0.10   (nodes: "2x[4xa10]@ib-hdr")
    [serving]   requests_in_flight = 1  tensor_parallel = "none"     (vllm-pp: "node")
    [workload]  images = 1  prompt_tokens = 64  new_tokens = 32  batch = 1
    [space]     dtypes = ["fp32", "fp16", "bf16"]  mixed_precision = true  offload = []
    [real]      enabled = false  repeats = 3  fidelity_floor = 0.0  seed_plans = 3

Command-line flags override the file.

Every setting is checked against `SETTINGS` (its type, range or choices) before anything runs;
an error names the file, the table and the key. A new setting is one line there.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import BadInput, shown
from ..models.presets import DEFAULT_MODEL
from .space import SpaceOptions
from .targets import TARGETS, TENSOR_PARALLEL, TargetSpec
from ..workload import Workload

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OBJECTIVES = {
    "latency": "end-to-end latency of the workload, ms (e2e_ms)",
    "peak_mem": "peak memory of the fullest device, bytes (peak_bytes_max)",
    "transfer": "bytes moved between devices over the workload (transfer_bytes)",
    "throughput": "tokens per second with the target's requests in flight (tokens_per_s; maximised)",
}
MAXIMISED = ("throughput",)
SAMPLERS = ("auto", "tpe", "nsga2", "random")
BASELINES = ("authors", "accelerate-sequential", "accelerate-balanced", "single", "vllm-default")  # baselines.BASELINES (not imported: it pulls in torch)
DTYPES = ("fp32", "fp16", "bf16")
SEED_MAX = 2**32 - 1  # Optuna's samplers seed numpy, which takes 0 .. 2**32 - 1


@dataclass(frozen=True)
class Setting:
    """What one key of a study file may hold."""

    kind: str  # "text", "whole" (int, not bool), "number" (int or float, finite), "flag" (bool), "texts" (list), "pair" (2 wholes)
    low: float | None = None
    high: float | None = None
    below: float | None = None  # exclusive upper bound
    choices: tuple[str, ...] = ()

    def problem(self, value) -> str | None:
        """Why `value` does not fit, or None."""
        kinds = {"text": "a string", "whole": "a whole number", "number": "a number", "flag": "true or false",
                 "texts": "a list of strings", "pair": "a list of two whole numbers"}
        want = kinds[self.kind] + self._range()
        if self.kind == "texts":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return f"must be {want}" + (" (a single string is not a list: write [\"...\"])" if isinstance(value, str) else "")
            bad = [v for v in value if self.choices and v not in self.choices]
            return f"{shown(bad[0])} is not one of {', '.join(self.choices)}" if bad else None
        if self.kind == "pair":
            ok = isinstance(value, list) and len(value) == 2 and all(_whole(v) and v >= (self.low or 0) for v in value)
            return None if ok else f"must be {want}"
        if self.kind == "text":
            if not isinstance(value, str):
                return f"must be {want}"
            return f"must be one of {', '.join(self.choices)}" if self.choices and value not in self.choices else None
        if self.kind == "flag":
            return None if isinstance(value, bool) else f"must be {want}"
        fits = _whole(value) if self.kind == "whole" else (_whole(value) or isinstance(value, float) and math.isfinite(value))
        in_range = fits and (self.low is None or value >= self.low) and (self.high is None or value <= self.high) \
            and (self.below is None or value < self.below)
        return None if in_range else f"must be {want}" + (" (true/false is not a number)" if isinstance(value, bool) else "")

    def _range(self) -> str:
        num = lambda x: f"{x:,}" if float(x).is_integer() else f"{x:g}"  # noqa: E731
        parts = [f">= {num(self.low)}" if self.low is not None else "", f"<= {num(self.high)}" if self.high is not None else "",
                 f"< {num(self.below)}" if self.below is not None else ""]
        parts = [p for p in parts if p]
        return (" " + " and ".join(parts)) if parts else ""


def _as_toml(value) -> str:
    """A value as the study file spells it (true, "text"), cut to a readable length."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and len(value) <= 60:
        return json.dumps(value, ensure_ascii=False)
    return shown(value)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# table ("" = top level) -> key -> what it may hold
SETTINGS: dict[str, dict[str, Setting]] = {
    "": {
        "name": Setting("text"),
        "description": Setting("text"),
        "model": Setting("text"),
        "trials": Setting("whole", low=0, high=1_000_000),
        "objectives": Setting("texts", choices=tuple(OBJECTIVES)),
        "sampler": Setting("text", choices=SAMPLERS),
        "seed": Setting("whole", low=0, high=SEED_MAX),
        "baselines": Setting("texts", choices=BASELINES),
        "baseline_dtype": Setting("text", choices=DTYPES),
        "attn": Setting("text", choices=("eager", "sdpa", "flash")),
        "loader": Setting("text", choices=("xctune", "from_pretrained")),
        "target": Setting("text", choices=tuple(TARGETS)),
    },
    "cluster": {
        "gpus": Setting("text"),
        "link": Setting("text"),
        "headroom": Setting("number", low=0, below=1),
    },
    "workload": {
        "images": Setting("whole", low=0, high=64),
        "prompt_tokens": Setting("whole", low=1, high=1_000_000),
        "new_tokens": Setting("whole", low=1, high=1_000_000),
        "batch": Setting("whole", low=1, high=4096),
        "hd_layout": Setting("pair", low=1),
        "seed": Setting("whole", low=0, high=SEED_MAX),
    },
    "space": {
        "dtypes": Setting("texts", choices=DTYPES),
        "mixed_precision": Setting("flag"),
        "offload": Setting("texts", choices=("cpu", "disk")),
        "max_devices": Setting("whole", low=1, high=4096),
        "skip_keys": Setting("texts"),
    },
    "real": {
        "enabled": Setting("flag"),
        "repeats": Setting("whole", low=1, high=10_000),
        "fidelity_floor": Setting("number", low=0, high=1),
        "seed_plans": Setting("whole", low=0, high=1000),
        "calibration": Setting("text"),
        "threads": Setting("whole", low=1, high=1024),
    },
    "serving": {
        "requests_in_flight": Setting("whole", low=1, high=1024),
        "tensor_parallel": Setting("text", choices=TENSOR_PARALLEL),
    },
}
# command-line overrides checked by the same rules: StudySpec field -> (table, key)
OVERRIDES = {"model": ("", "model"), "gpus": ("cluster", "gpus"), "trials": ("", "trials"), "seed": ("", "seed"),
             "sampler": ("", "sampler"), "headroom": ("cluster", "headroom")}


@dataclass(frozen=True)
class StudySpec:
    name: str = "default"
    model: str = DEFAULT_MODEL
    gpus: str | None = "2x24GiB"
    link: str = "pcie4"
    headroom: float = 0.10
    workload: Workload = field(default_factory=Workload)
    space: SpaceOptions = field(default_factory=SpaceOptions)
    target: TargetSpec = field(default_factory=TargetSpec)
    objectives: tuple[str, ...] = ("latency",)
    trials: int = 50
    sampler: str = "auto"
    seed: int | None = 0
    baselines: tuple[str, ...] = ("authors", "accelerate-sequential", "accelerate-balanced", "single")
    baseline_dtype: str = "fp32"
    real: bool = False
    repeats: int = 3
    fidelity_floor: float | None = None  # real studies: the least share of tokens equal to the fp32 reference
    seed_plans: int = 3  # real studies: enqueue the virtual world's best few plans
    calibration: str | None = None
    threads: int = 1  # real studies: torch intra-op threads while measuring
    storage: str | None = None
    heartbeat: int = 5  # seconds between a running trial's heartbeats; 4 missed and it is re-run elsewhere
    trust_remote_code: bool = False  # command line only: a study file never grants it
    attn: str | None = None  # attention the model runs; None: the checkpoint's (as its published config declares)
    loader: str = "xctune"  # the loading path users will take: "xctune" (load_best_map.py) or "from_pretrained"
    out: str | None = None  # default results/<name>
    source: str = ""  # the study file

    def __post_init__(self):
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives:
            raise BadInput(f"unknown objective {bad[0] if bad else ''!r}; choose from {', '.join(OBJECTIVES)}")
        if self.sampler not in SAMPLERS:
            raise BadInput(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        if not isinstance(self.trials, int) or self.trials < 0:
            raise BadInput(f"trials must be a whole number >= 0, got {self.trials!r}")
        if self.baseline_dtype not in ("fp32", "fp16", "bf16"):
            raise BadInput(f"unknown baseline_dtype {self.baseline_dtype!r}")
        if self.fidelity_floor is not None and not 0 <= self.fidelity_floor <= 1:
            raise BadInput("fidelity_floor is a share of tokens, between 0 and 1")
        if self.attn is not None and self.attn not in ("eager", "sdpa", "flash"):
            raise BadInput(f"unknown attn {self.attn!r}; choose from eager, sdpa, flash")
        if self.loader not in ("xctune", "from_pretrained"):
            raise BadInput(f"unknown loader {self.loader!r}; choose from xctune, from_pretrained")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise BadInput(f"study name {self.name!r} must be a plain folder name")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("results") / self.name

    @property
    def liveness(self):
        from .storage import Liveness

        return Liveness.every(self.heartbeat)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out_dir / 'study.db').as_posix()}"


def _checked(data: dict, table: str, where: str) -> dict:
    """The settings of one table of a study file, each checked against SETTINGS."""
    rules = SETTINGS[table]
    label = f"{where} [{table}]" if table else where
    for key, value in data.items():
        if key not in rules:
            if table == "" and key in SETTINGS:
                raise BadInput(f"{where}: [{key}] must be a table")
            raise BadInput(f"{label}: unknown setting {shown(key, 40)}; known: {', '.join(sorted(rules))}")
        problem = rules[key].problem(value)
        if problem:
            raise BadInput(f"{label}: {key} = {_as_toml(value)}: {problem}")
    return data


def load_study(path) -> StudySpec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise BadInput(f"cannot read study {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path} is not valid TOML: {shown(str(e), 200)[1:-1]}") from None
    where = str(path)
    tables = {k: data.pop(k) for k in list(data) if k in SETTINGS and k}
    for k, v in tables.items():
        if not isinstance(v, dict):
            raise BadInput(f"{where}: [{k}] must be a table")
    top = _checked(data, "", where)
    cluster, work, space, real, serving = (_checked(tables.get(k, {}), k, where)
                                           for k in ("cluster", "workload", "space", "real", "serving"))
    workload = Workload(**{**work, **({"hd_layout": tuple(work["hd_layout"])} if "hd_layout" in work else {})})
    options = SpaceOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in space.items()})
    return StudySpec(
        name=top.get("name", path.stem),
        model=top.get("model", DEFAULT_MODEL),
        attn=top.get("attn"),
        loader=top.get("loader", "xctune"),
        gpus=cluster.get("gpus"),
        link=cluster.get("link", "pcie4"),
        headroom=float(cluster.get("headroom", 0.10)),
        workload=workload,
        space=options,
        target=TargetSpec(top.get("target", "accelerate"), **serving),
        objectives=tuple(top.get("objectives", ["latency"])),
        trials=top.get("trials", 50),
        sampler=top.get("sampler", "auto"),
        seed=top.get("seed", 0),
        baselines=tuple(top.get("baselines", StudySpec.baselines)),
        baseline_dtype=top.get("baseline_dtype", "fp32"),
        real=real.get("enabled", False),
        repeats=real.get("repeats", 3),
        fidelity_floor=real.get("fidelity_floor"),
        seed_plans=real.get("seed_plans", 3),
        calibration=_relative_to(path, real.get("calibration")),
        threads=real.get("threads", 1),
        source=str(path),
    )


def _relative_to(study: Path, value: str | None) -> str | None:
    """Paths in a study file are relative to the file, so a study runs from any directory."""
    if value is None:
        return None
    p = Path(value)
    return str(p if p.is_absolute() else (study.parent / p).resolve())


def find_default_study() -> Path:
    """studies/default.toml in the working directory, else in the checkout xctune runs from."""
    here = Path("studies/default.toml")
    if here.is_file():
        return here
    packaged = Path(__file__).resolve().parents[2] / "studies" / "default.toml"
    if packaged.is_file():
        return packaged
    raise BadInput("no studies/default.toml here; pass --study FILE")


def with_overrides(spec: StudySpec, **changes) -> StudySpec:
    """`spec` with the command line's settings (None: not given), checked by the study file's rules."""
    changes = {k: v for k, v in changes.items() if v is not None}
    for name, value in changes.items():
        if name in OVERRIDES:
            table, key = OVERRIDES[name]
            problem = SETTINGS[table][key].problem(value)
            if problem:
                raise BadInput(f"--{name.replace('_', '-')} {shown(value)}: {problem}")
    return replace(spec, **changes)
