"""Study files: what a search runs (model, cluster, workload, space, objectives, trials), in TOML.

    name = "default"
    model = "ixc2-vl-7b"
    trials = 50
    objectives = ["latency"]          # any of latency, peak_mem, transfer, throughput
    target = "accelerate"             # or "vllm-pp", "torch-pipelining" (targets.py)
    [cluster]   gpus = "2x24GiB"  link = "pcie4"  headroom = 0.10   (nodes: "2x[4xa10]@ib-hdr")
    [serving]   requests_in_flight = 1  tensor_parallel = "none"     (vllm-pp: "node")
    [workload]  images = 1  prompt_tokens = 64  new_tokens = 32  batch = 1
    [space]     dtypes = ["fp32", "fp16", "bf16"]  mixed_precision = true  offload = []
    [real]      enabled = false  repeats = 3  fidelity_floor = 0.0  seed_plans = 3

Command-line flags override the file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import BadInput
from .space import SpaceOptions
from .targets import TargetSpec
from .workload import Workload

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


@dataclass(frozen=True)
class StudySpec:
    name: str = "default"
    model: str = "ixc2-vl-7b"
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
    storage: str | None = None
    trust_remote_code: bool = False  # command line only: a study file never grants it
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
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise BadInput(f"study name {self.name!r} must be a plain folder name")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("results") / self.name

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out_dir / 'study.db').as_posix()}"


def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise BadInput(f"{where}: [{key}] must be a table")
    return value


def _known(table: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise BadInput(f"{where}: unknown setting {unknown[0]!r}; known: {', '.join(sorted(allowed))}")


def load_study(path) -> StudySpec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise BadInput(f"cannot read study {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path} is not valid TOML: {e}") from None
    where = str(path)
    top = {"name", "model", "trials", "objectives", "sampler", "seed", "baselines", "baseline_dtype",
           "cluster", "workload", "space", "real", "description", "target", "serving"}
    _known(data, top, where)
    cluster, work, space, real, serving = (_table(data, k, where) for k in ("cluster", "workload", "space", "real", "serving"))
    _known(serving, {"requests_in_flight", "tensor_parallel"}, f"{where} [serving]")
    _known(cluster, {"gpus", "link", "headroom"}, f"{where} [cluster]")
    _known(work, {"images", "prompt_tokens", "new_tokens", "batch", "hd_layout", "seed"}, f"{where} [workload]")
    _known(space, {"dtypes", "mixed_precision", "offload", "max_devices", "skip_keys"}, f"{where} [space]")
    _known(real, {"enabled", "repeats", "fidelity_floor", "seed_plans", "calibration"}, f"{where} [real]")
    try:
        workload = Workload(**{**work, **({"hd_layout": tuple(work["hd_layout"])} if "hd_layout" in work else {})})
        options = SpaceOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in space.items()})
        return StudySpec(
            name=data.get("name", path.stem),
            model=data.get("model", "ixc2-vl-7b"),
            gpus=cluster.get("gpus"),
            link=cluster.get("link", "pcie4"),
            headroom=float(cluster.get("headroom", 0.10)),
            workload=workload,
            space=options,
            target=TargetSpec(data.get("target", "accelerate"), **serving),
            objectives=tuple(data.get("objectives", ["latency"])),
            trials=data.get("trials", 50),
            sampler=data.get("sampler", "auto"),
            seed=data.get("seed", 0),
            baselines=tuple(data.get("baselines", StudySpec.baselines)),
            baseline_dtype=data.get("baseline_dtype", "fp32"),
            real=bool(real.get("enabled", False)),
            repeats=int(real.get("repeats", 3)),
            fidelity_floor=real.get("fidelity_floor"),
            seed_plans=int(real.get("seed_plans", 3)),
            calibration=_relative_to(path, real.get("calibration")),
            source=str(path),
        )
    except TypeError as e:
        raise BadInput(f"{where}: {e}") from None


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
    packaged = Path(__file__).resolve().parent.parent / "studies" / "default.toml"
    if packaged.is_file():
        return packaged
    raise BadInput("no studies/default.toml here; pass --study FILE")


def with_overrides(spec: StudySpec, **changes) -> StudySpec:
    return replace(spec, **{k: v for k, v in changes.items() if v is not None})
