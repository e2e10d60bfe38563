"""Exports: for each engine target, the files a user runs, each validated before it is handed over.

- `accelerate`: `best_map.json` (the device map `from_pretrained(device_map=...)` takes) and
  `load_best_map.py` (the lines that load it the fast way) — accelerate.py;
- `vllm-pp`: `vllm/launch_vllm.sh` (the environment, `VLLM_PP_LAYER_PARTITION`, and the command
  line with `--pipeline-parallel-size` / `--tensor-parallel-size`), `vllm/vllm_plan.json`,
  `vllm/README.md`; for a model vLLM does not implement, a plain statement that it will not run
  — vllm.py (vLLM itself is never imported);
- `torch-pipelining`: `torch_pipelining/split_spec.json`, `run_pipeline.py` (builds the stages
  and generates), `pipeline_plan.json`, `README.md` — pipelining.py.

Validation (`validate_pipeline`): the partition read back from the written files has one run
of at least one decoder layer per stage and sums to the text model's layers; it rebuilds the
very plan it came from (round trip); and `xctune check` (static rules + the dry run on virtual
GPUs) judges that plan: it must run, and every stage's memory must fit. With several requests
in flight, the record's memory (every request's KV cache) must fit too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput
from ..plans.plan import Plan
from ..search.targets import TargetSpec, pipeline_map, pipeline_stages
from ..atomic import write_text

EXPORT_TARGETS = ("accelerate", "vllm-pp", "torch-pipelining")


_JUDGED: dict = {}  # (plan id, model config, cluster, workload) -> CheckReport of this process


class ExportInvalid(Exception):
    """A written export failed its validation: the message says which check."""


@dataclass(frozen=True)
class Export:
    target: str
    folder: Path
    files: dict  # name -> path
    supported: bool  # the engine runs this model
    statement: str  # what a user must know (support, how to run)
    checks: tuple[str, ...] = field(default=())  # what was validated, in words


def tied_weight_copies(plan: Plan, profile) -> list[dict]:
    """The stages that hold their own copy of a tied weight (the head's stage, of the embedding matrix
    the first stage owns), with the copy's bytes: what the engines load there, and what `check` counts."""
    from ..models.profile import tied_copies
    from ..plans.plan import resolve

    res = resolve(plan.device_map, profile)
    placed = {u.name: res.device_of_unit(u.name) for u in profile.units}
    return [{"tensor": t.name, "owner": t.owner, "used_by": unit, "stage": dev, "bytes": nbytes}
            for t, unit, dev, nbytes in tied_copies(profile, placed, plan.dtypes)]


def copy_statement(copies: list[dict]) -> str:
    """One sentence for an export's README: which stage holds which copy, and what it costs."""
    if not copies:
        return ""
    parts = [f"stage {c['stage']} holds its own copy of {c['tensor']} for {c['used_by']}, {c['bytes'] / 2**30:.2f} GiB"
             for c in copies]
    return ("The head's weight is tied to the token embeddings, which the first stage holds: " + "; ".join(parts)
            + ". The engines load it there from the checkpoint's embedding weight; xctune counts it in that stage's "
              "memory (simulated).")


def validate_pipeline(plan: Plan, counts, profile, cluster, workload, record: dict | None = None) -> tuple[str, ...]:
    """The checks every pipeline export passes; ExportInvalid names the first that fails."""
    from ..plans.check import check

    L = len(profile.layers)
    checks = []
    if len(counts) < 1 or min(counts) < 1 or sum(counts) != L:
        raise ExportInvalid(f"partition {list(counts)}: needs >= 1 layer per stage and {L} in all")
    checks.append(f"partition {','.join(map(str, counts))}: {len(counts)} stage(s), sums to the text model's {L} layers")
    back = Plan(pipeline_map(profile, counts), plan.dtypes, plan.skip_keys, plan.label)
    if back.device_map != dict(plan.device_map):
        raise ExportInvalid("the partition does not rebuild the plan it was written from")
    checks.append("round trip: the written partition rebuilds the plan's device map exactly")
    key = (back.plan_id, profile.config, cluster, workload)
    # as the engines run it: a tied head's stage holds its own copy of the tensor (targets.PIPELINE_RULES)
    report = _JUDGED.get(key) or check(back, profile, cluster, workload, tied_copies=True)
    _JUDGED[key] = report  # the vLLM and torch exports of one plan round-trip into the same plan: one dry run
    if not report.ok:
        raise ExportInvalid("xctune check rejects the round-tripped plan: " + "; ".join(f.message for f in report.errors))
    worst = max((d.total_bytes / d.capacity_bytes for d in report.devices if d.capacity_bytes), default=0.0)
    checks.append(f"xctune check: the plan runs (dry run on virtual GPUs) and every stage fits, fullest at "
                  f"{worst:.0%} of its usable memory (simulated)")
    if record and record.get("requests_in_flight", 1) > 1:
        for i in range(len(cluster.gpus)):
            need = record.get(f"peak_bytes.cuda:{i}")
            if need is not None and need > cluster.usable_bytes(i):
                raise ExportInvalid(f"cuda:{i} does not fit {record['requests_in_flight']} requests in flight "
                                    f"(their KV caches)")
        checks.append(f"memory with {record['requests_in_flight']} requests in flight fits every stage (simulated)")
    return tuple(checks)


def export_plan(target: str, plan: Plan, profile, cluster, workload, out: Path, *,
                serving: TargetSpec | None = None, tp_size: int = 1, record: dict | None = None) -> Export:
    """Write and validate the export of `plan` for `target` under `out`. BadInput where the plan
    is not one the target can run; ExportInvalid where a written export fails its checks."""
    import json

    out = Path(out)
    if target == "accelerate":
        return _export_accelerate(plan, profile, cluster, workload, out)
    if target not in EXPORT_TARGETS:
        raise BadInput(f"unknown export target {target!r}; choose from {', '.join(EXPORT_TARGETS)}")
    stages = pipeline_stages(plan, profile)
    if target == "vllm-pp":
        from .vllm import export_vllm, read_partition

        exp = export_vllm(plan, stages, profile, cluster, workload, out, serving=serving or TargetSpec(target),
                          tp_size=tp_size)
    else:
        if tp_size > 1:
            raise BadInput("torch pipelining runs a stage per GPU: a plan of tensor-parallel stages is for vllm-pp")
        from .pipelining import export_torch_pipelining, read_partition

        exp = export_torch_pipelining(plan, stages, profile, cluster, workload, out)
    # validate what was written, read back from the files
    checks = validate_pipeline(plan, read_partition(exp.folder, profile), profile, cluster, workload, record)
    meta = exp.files["plan"]
    doc = json.loads(meta.read_text())
    doc["validated"] = list(checks)
    write_text(meta, json.dumps(doc, indent=1) + "\n")
    return Export(exp.target, exp.folder, exp.files, exp.supported, exp.statement, checks)


def _export_accelerate(plan: Plan, profile, cluster, workload, out: Path) -> Export:
    from ..plans.check import check
    from ..plans.plan import load_plan
    from .accelerate import export_accelerate

    if cluster.n_nodes > 1 and any(cluster.node_of[d] != 0 for d in plan.gpus):
        raise BadInput("accelerate runs in one process on one node: this plan spans nodes; export it for "
                       "vllm-pp or torch-pipelining")
    exp = export_accelerate(plan, profile, out)
    back = load_plan(exp.files["best_map.json"])
    if back.device_map != dict(plan.device_map):
        raise ExportInvalid("best_map.json does not read back as the plan's device map")
    report = check(Plan(back.device_map, plan.dtypes, plan.skip_keys, plan.label), profile, cluster, workload)
    if not report.ok:
        raise ExportInvalid("xctune check rejects best_map.json: " + "; ".join(f.message for f in report.errors))
    checks = ("round trip: best_map.json reads back as the plan's device map",
              "xctune check: the map runs (dry run on virtual GPUs) and fits every GPU (simulated)")
    return Export(exp.target, exp.folder, exp.files, exp.supported, exp.statement, checks)
