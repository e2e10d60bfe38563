"""The vLLM export: pipeline parallelism as vLLM takes it, for the plan's stages.

vLLM reads the layers per stage from `VLLM_PP_LAYER_PARTITION` ("a,b,...", summing to the text
model's decoder layers) and the stage count from `--pipeline-parallel-size`; a stage spans
`--tensor-parallel-size` GPUs. Over several nodes it runs on a Ray cluster. vLLM is not
imported here and need not be installed: the export is text, read back and validated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..models.engines import checkpoint_name, vllm_support
from ..search.targets import TargetSpec
from ..atomic import write_text

TORCH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _stage_lines(stages, profile, cluster, tp_size: int, node_of) -> list[str]:
    lines = []
    for s in stages:
        where = f"node {node_of[s.device]}, " if node_of is not None and max(node_of) > 0 else ""
        gpus = f"{tp_size} GPUs (tensor parallel)" if tp_size > 1 else f"GPU {s.device}"
        extra = []
        if s.device == stages[0].device:
            extra.append("vision encoder, projector, embeddings")
        if s.device == stages[-1].device:
            extra.append("norm, head")
        last = s.first_layer + s.layers - 1
        lines.append(f"stage {s.device}: {where}{gpus} ({cluster.gpus[s.device].name}), decoder layers "
                     f"{s.first_layer}-{last}" + (f" + {', '.join(extra)}" if extra else ""))
    return lines


def export_vllm(plan, stages, profile, cluster, workload, out: Path, *, serving: TargetSpec, tp_size: int = 1):
    from . import Export, copy_statement, tied_weight_copies

    cfg = profile.config
    copies = tied_weight_copies(plan, profile)
    support = vllm_support(cfg)
    folder = Path(out) / "vllm"
    folder.mkdir(parents=True, exist_ok=True)
    partition = ",".join(str(s.layers) for s in stages)
    pp = len(stages)
    dtype = TORCH_DTYPE[plan.dtypes["lm"]]
    multi_node = cluster.n_nodes > 1
    backend = "ray" if multi_node else "mp"
    node_of = cluster.node_of
    stage_lines = _stage_lines(stages, profile, cluster, tp_size, node_of)
    args = [
        "--trust-remote-code",
        f"--dtype {dtype}",
        f"--pipeline-parallel-size {pp}",
        f"--tensor-parallel-size {tp_size}",
        f"--max-model-len {workload.max_length(cfg)}",
        f"--distributed-executor-backend {backend}",
    ]
    if serving.requests_in_flight > 1:
        args.append(f"--max-num-seqs {serving.requests_in_flight * workload.batch}")
    guard = ""
    if not support.supported:
        guard = ('if [ -z "${XCTUNE_FORCE:-}" ]; then\n'
                 f'  echo "{support.statement.split(":")[0]}: see README.md (XCTUNE_FORCE=1 runs the command anyway)" >&2\n'
                 "  exit 1\nfi\n")
    ray = ""
    if multi_node:
        ray = ("#\n# Several nodes: vLLM runs on a Ray cluster. On every node, export VLLM_PP_LAYER_PARTITION as below,\n"
               "# then start Ray: on node 0 (the head)  `ray start --head --port=6379`;\n"
               "#                 on every other node   `ray start --address=<node 0's address>:6379`.\n"
               "# Run this script on node 0: vLLM ranks the head node's GPUs first, as the stages below assume.\n")
    script = (
        "#!/usr/bin/env bash\n"
        f"# vLLM pipeline parallelism for {cfg.name} on {cluster.describe()} — written by xctune (plan {plan.plan_id}).\n"
        + "".join(f"#   {line}\n" for line in stage_lines)
        + ray
        + "set -euo pipefail\n"
        + guard
        + f'export VLLM_PP_LAYER_PARTITION="{partition}"\n'
        + f'exec vllm serve "${{MODEL:-{checkpoint_name(cfg)}}}" \\\n'
        + "".join(f"  {a} \\\n" for a in args)
        + '  "$@"\n'
    )
    files = {"launch_vllm.sh": folder / "launch_vllm.sh", "plan": folder / "vllm_plan.json", "README.md": folder / "README.md"}
    write_text(files["launch_vllm.sh"], script)
    files["launch_vllm.sh"].chmod(0o755)
    doc = {
        "engine": "vllm",
        "model": cfg.name,
        "checkpoint": checkpoint_name(cfg),
        "supported": support.supported,
        "statement": support.statement,
        "cluster": cluster.describe(),
        "env": {"VLLM_PP_LAYER_PARTITION": partition},
        "pipeline_parallel_size": pp,
        "tensor_parallel_size": tp_size,
        "dtype": dtype,
        "requests_in_flight": serving.requests_in_flight,
        # nothing to set for vLLM: its last rank holds the embedding matrix its logits read (models/engines.py)
        "tied_weight_copies": copies,
        "stages": [{"stage": s.device, "node": node_of[s.device], "first_layer": s.first_layer, "layers": s.layers}
                   for s in stages],
        "plan": plan.to_dict(),
    }
    write_text(files["plan"], json.dumps(doc, indent=1) + "\n")
    readme = [f"# vLLM export: {cfg.name} on {cluster.describe()}", ""]
    readme += [("**Supported.** " if support.supported else "**Not supported by vLLM today.** ") + support.statement, ""]
    readme += ["Stages (vLLM fixes the vision encoder, projector and embeddings on the first stage, the head on the last):", ""]
    readme += [f"- {line}" for line in stage_lines] + [""]
    if copies:
        readme += [copy_statement(copies) + " vLLM needs no setting for it.", ""]
    readme += [f"Run: `./launch_vllm.sh` (sets `VLLM_PP_LAYER_PARTITION={partition}`, "
               f"`--pipeline-parallel-size {pp} --tensor-parallel-size {tp_size}`).", ""]
    write_text(files["README.md"], "\n".join(readme))
    return Export("vllm-pp", folder, files, support.supported, support.statement)


def read_partition(folder: Path, profile) -> list[int]:
    """The layers per stage as vLLM would read them from the written launch script."""
    text = (Path(folder) / "launch_vllm.sh").read_text()
    part = re.search(r'VLLM_PP_LAYER_PARTITION="([0-9,]+)"', text)
    pp = re.search(r"--pipeline-parallel-size (\d+)", text)
    if not part or not pp:
        from . import ExportInvalid

        raise ExportInvalid("launch_vllm.sh lacks VLLM_PP_LAYER_PARTITION or --pipeline-parallel-size")
    counts = [int(x) for x in part.group(1).split(",")]
    if len(counts) != int(pp.group(1)):
        from . import ExportInvalid

        raise ExportInvalid(f"VLLM_PP_LAYER_PARTITION has {len(counts)} stages, --pipeline-parallel-size {pp.group(1)}")
    return counts
