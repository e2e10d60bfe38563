"""The torch.distributed.pipelining export: split points, the stage layout, and a runnable script.

`split_spec.json` is what `torch.distributed.pipelining.pipeline(..., split_spec=...)` takes, with
`SplitPoint` names as strings: `{"model.layers.8": "BEGINNING", ...}`, one cut before the first
layer of every stage but the first. `run_pipeline.py` (a copy of xctune/export/run_pipeline.py)
builds the stages from it and generates; `pipeline_plan.json` holds the model, dtype, stages and
workload the script reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..models.engines import torch_pipelining_support
from ..atomic import write_text


def export_torch_pipelining(plan, stages, profile, cluster, workload, out: Path):
    from . import Export, copy_statement, tied_weight_copies

    cfg = profile.config
    copies = tied_weight_copies(plan, profile)
    support = torch_pipelining_support(cfg)
    folder = Path(out) / "torch_pipelining"
    folder.mkdir(parents=True, exist_ok=True)
    layers = profile.layers
    spec = {layers[s.first_layer]: "BEGINNING" for s in stages[1:]}
    files = {"split_spec.json": folder / "split_spec.json", "plan": folder / "pipeline_plan.json",
             "run_pipeline.py": folder / "run_pipeline.py", "README.md": folder / "README.md"}
    write_text(files["split_spec.json"], json.dumps(spec, indent=1) + "\n")
    doc = {
        "engine": "torch-pipelining",
        "model": cfg.name,
        "dtype": plan.dtypes["lm"],
        "weights_seed": 0,
        "cluster": cluster.describe(),
        "stages": [{"stage": s.device, "node": cluster.node_of[s.device], "first_layer": s.first_layer, "layers": s.layers}
                   for s in stages],
        "workload": workload.to_dict(),
        "statement": support.statement,
        # torch.distributed.pipelining replicates a parameter several stages use (MultiUseParameterConfig.REPLICATE)
        "tied_weight_copies": copies,
        "plan": plan.to_dict(),
    }
    write_text(files["plan"], json.dumps(doc, indent=1) + "\n")
    write_text(files["run_pipeline.py"], Path(__file__).with_name("run_pipeline.py").read_text())
    n = len(stages)
    per_node = {}
    for s in stages:
        per_node[cluster.node_of[s.device]] = per_node.get(cluster.node_of[s.device], 0) + 1
    launch = (f"torchrun --nnodes {len(per_node)} --nproc-per-node {max(per_node.values())} --rdzv-backend c10d "
              f"--rdzv-endpoint <node 0's address>:29500 run_pipeline.py" if len(per_node) > 1
              else f"torchrun --nproc-per-node {n} run_pipeline.py")
    readme = [
        f"# torch pipelining export: {cfg.name} on {cluster.describe()}", "", support.statement, "",
        "Split points (`split_spec.json`, `SplitPoint.BEGINNING` of each named layer):", "",
        *[f"- stage {s.device} (node {cluster.node_of[s.device]}): decoder layers {s.first_layer}-{s.first_layer + s.layers - 1}"
          for s in stages], "",
        *([copy_statement(copies) + " torch.distributed.pipelining does the same by default: a parameter used by "
           "several stages is replicated into each (`MultiUseParameterConfig.REPLICATE`).", ""] if copies else []),
        f"Run on the cluster: `{launch}` (the model is `--model PRESET_OR_CHECKPOINT_DIR`, default `{cfg.name}`).",
        f"Try it on one machine's CPU: `python run_pipeline.py --nproc {n} --cpu`; `--reference` runs the same greedy loop "
        "in one process for comparison. Both need xctune importable (the model's code).", "",
    ]
    write_text(files["README.md"], "\n".join(readme))
    return Export("torch-pipelining", folder, files, support.supported, support.statement)


def read_partition(folder: Path, profile) -> list[int]:
    """Layers per stage as the split points cut the language model's layers."""
    from . import ExportInvalid

    spec = json.loads((Path(folder) / "split_spec.json").read_text())
    index = {name: i for i, name in enumerate(profile.layers)}
    bad = [k for k, v in spec.items() if k not in index or v != "BEGINNING"]
    if bad:
        raise ExportInvalid(f"split_spec.json: {bad[0]!r} is not the BEGINNING of a decoder layer")
    cuts = sorted(index[k] for k in spec)
    bounds = [0, *cuts, len(profile.layers)]
    return [b - a for a, b in zip(bounds, bounds[1:])]
