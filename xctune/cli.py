"""The `xctune` command: a thin layer over the Python API.

Exit codes, for every subcommand: 0 success (for `check`: the map will run), 1 the thing asked
about fails (a map that will not run, a regression), 2 bad input (one line on stderr, cut to a
readable length), 130 interrupted. An unexpected internal error - a bug of ours, never bad
input - prints one line too, asking for a report (XCTUNE_DEBUG=1 shows the traceback), and
exits 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from .errors import BadInput
from .models.presets import CALIBRATION_MODEL, DEFAULT_MODEL, preset_names


def _add_model(p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    p.add_argument(
        "--model",
        default=default,
        help=f"model preset ({', '.join(preset_names())}; `xctune presets` lists them) or a checkpoint directory"
        + (" (default: %(default)s)" if default else ""),
    )
    p.add_argument(
        "--attn", choices=["eager", "sdpa", "flash"], default=None,
        help="attention the model runs (default: the checkpoint's config, as the published checkpoint declares it)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint's own code to run when loading it: code execution, never implicit "
        "(*.bin weight shards are read as data and need no flag)",
    )


def _model(args):
    from .models.loading import resolve_model

    spec = resolve_model(args.model, args.trust_remote_code, attn=getattr(args, "attn", None))
    if not getattr(args, "json", False):
        for note in spec.notes:
            print(f"note: {note}", file=sys.stderr)
    return spec


def _add_cluster(p: argparse.ArgumentParser, default: str | None = "2x24GiB") -> None:
    p.add_argument(
        "--gpus",
        default=default,
        help="GPUs: comma-separated [N x]KIND, KIND a preset (rtx4090, a100-40g, ...) or a memory size (24GiB); "
        "several nodes: [N x][GPUS] groups joined by +, then @NETWORK, e.g. 2x[4xa10]@ib-hdr"
        + (" (default: %(default)s)" if default else ""),
    )
    p.add_argument("--link", default="pcie4", help="link between GPUs of a node: pcie3, pcie4, pcie5, nvlink2-4 (default: %(default)s)")
    p.add_argument(
        "--headroom", type=float, default=0.10, help="fraction of each GPU's memory kept free (default: %(default)s)"
    )


def _add_workload(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload (synthetic, deterministic inputs)")
    g.add_argument("--images", type=int, default=None, help="images per prompt (default 1)")
    g.add_argument("--prompt-tokens", type=int, default=None, help="text tokens per prompt (default 64)")
    g.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 32)")
    g.add_argument("--batch", type=int, default=None, help="prompts per batch (default 1)")
    g.add_argument("--hd-layout", default=None, help="HD models: crop grid of each image, ROWSxCOLS (default: the preset's)")
    g.add_argument("--seed", type=int, default=None, help="seed of the synthetic inputs (default 0)")


def _workload(args, base=None):
    from dataclasses import replace

    from .workload import Workload, parse_layout

    w = base or Workload()
    changes = {
        k: getattr(args, k)
        for k in ("images", "prompt_tokens", "new_tokens", "batch", "seed")
        if getattr(args, k, None) is not None
    }
    if getattr(args, "hd_layout", None):
        changes["hd_layout"] = parse_layout(args.hd_layout)
    return replace(w, **changes)


def _cluster(args):
    from .hardware import make_cluster

    if not args.gpus:
        raise BadInput("--gpus is required (e.g. --gpus 2x24GiB)")
    extra = {}
    if getattr(args, "calibration", None):
        from .worlds.calibrate import load_host_device

        extra["host"] = load_host_device(args.calibration)
    return make_cluster(args.gpus, link=args.link, headroom=args.headroom, extra=extra)


def _efficiency(args):
    from .worlds.costmodel import Efficiency

    return Efficiency.load(args.calibration) if getattr(args, "calibration", None) else Efficiency()


def _plan_from_args(args, profile, cluster):
    """A plan from MAP (a file) or --baseline NAME; exactly one of them."""
    from .plans.baselines import baseline_plan
    from .plans.plan import load_plan

    if bool(args.map) == bool(args.baseline):
        raise BadInput("give a map file or --baseline NAME (authors, accelerate-sequential, accelerate-balanced, single)")
    if args.baseline:
        return baseline_plan(args.baseline, profile, cluster, args.dtype or "fp32")
    return load_plan(args.map, dtype=args.dtype)


def _emit_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


# ------------------------------------------------------------------------------------------


def cmd_check(args) -> int:
    from .plans.check import check

    from .plans.constraints import constraint_report
    from .worlds.trace_cache import default_dir

    spec = _model(args)
    cluster = _cluster(args)
    plan = _plan_from_args(args, spec.profile, cluster)
    found = constraint_report(spec.profile, default_dir(), log=lambda m: _progress(args, m))
    report = check(plan, spec.profile, cluster, _workload(args), found)
    if args.json:
        _emit_json(report.to_dict())
    else:
        print(report.render())
    return 0 if report.ok else 1


def cmd_bench(args) -> int:
    from .plans.baselines import repair
    from .plans.check import decode_bytes_by_loader
    from .models.loading import loading_path
    from .plans.plan import Plan

    spec = _model(args)
    workload = _workload(args)
    budget = _cluster(args) if args.gpus else None
    cluster = budget if budget or not args.real else _default_cluster(args)
    if not args.real and cluster is None:
        raise BadInput("--gpus is required (e.g. --gpus 2x24GiB), or --real to measure on this machine")
    plan = _plan_from_args(args, spec.profile, cluster)
    if args.repair:
        plan = Plan(repair(plan.device_map, spec.profile), plan.dtypes, plan.skip_keys, plan.label)
    loader = "from_pretrained" if args.no_skip_kv else args.loader
    if loader:
        plan = Plan(plan.device_map, plan.dtypes, loading_path(loader).skip_keys, plan.label)
    if args.real:
        from .worlds.real import HostExecutor

        _progress(args, f"measuring {plan.label or 'the map'} on this machine ({args.repeats} repeats, {args.threads} thread(s))...")
        record = HostExecutor(spec, workload, repeats=args.repeats, warmup=args.warmup, budget=budget,
                              threads=args.threads).run(plan)
    else:
        from .worlds.simulate import simulate

        _progress(args, f"simulating {plan.label or 'the map'} on {cluster.describe()} (dry run on fake tensors)...")
        record = simulate(spec.profile, plan, workload, cluster, _efficiency(args), label=plan.label)
    if record.ok:
        from dataclasses import replace

        # the decode transfer under both loading paths (dry runs: simulated, whatever the world above)
        record = replace(record, decode_bytes_by_loader=decode_bytes_by_loader(spec.profile, plan, workload))
    if args.json:
        print(record.to_json())
    else:
        print(record.summary())
        if record.status == "invalid" and args.baseline and args.baseline.startswith("accelerate") and not args.repair:
            print(f"accelerate's own map is invalid for this model; `--repair` benches the nearest valid map: "
                  f"{json.dumps(repair(plan.device_map, spec.profile))}")
    return 0 if record.ok else 1


def _default_cluster(args):
    """--real without --gpus: this machine's GPUs (memory as reported), for baselines that need a count."""
    import torch

    from .hardware import make_cluster

    if args.baseline and not torch.cuda.is_available():
        raise BadInput("--real --baseline on a machine without GPUs needs --gpus: the logical devices and their memory budgets")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    mem = [torch.cuda.get_device_properties(i).total_memory for i in range(n)] if torch.cuda.is_available() else [2**40]
    return make_cluster(",".join(f"{m // 2**20}MiB" for m in mem), headroom=args.headroom)


def _progress(args, message: str) -> None:
    if not getattr(args, "json", False):
        print(message, file=sys.stderr)


def cmd_calibrate(args) -> int:
    from pathlib import Path

    from .worlds.calibrate import calibrate

    from .atomic import check_writable
    from .search.study import load_study

    out = Path(args.out)
    check_writable(out.parent)  # before minutes of measuring, not after
    spec = _model(args)
    study = load_study(args.study) if args.study else None
    cal = calibrate(spec, repeats=args.repeats, progress=None if args.json else lambda m: print(m, file=sys.stderr),
                    threads=args.threads, agreement_study=study, agreement_plans=args.plans, out=out)
    if args.json:
        _emit_json(cal.to_dict())
    else:
        print(cal.render())
        print(f"written: {out}  (use it with --calibration {out}; `--gpus host` then describes this machine)")
    return 0


def cmd_search(args) -> int:
    from pathlib import Path

    from .reports.report import baseline_gains, summary, write_outputs
    from .search.runner import run_search
    from .search.storage import mask_url
    from .search.study import find_default_study, load_study, with_overrides

    spec = load_study(args.study) if args.study else load_study(find_default_study())
    changes = dict(
        model=args.model, gpus=args.gpus, trials=args.trials, storage=args.storage, name=args.study_name,
        out=args.out, sampler=args.sampler, seed=args.seed, calibration=args.calibration, heartbeat=args.heartbeat,
        attn=args.attn, loader=args.loader,
    )
    if args.objectives:
        changes["objectives"] = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    if args.real:
        changes["real"] = True
    if args.trust_remote_code:
        changes["trust_remote_code"] = True
    if args.target or args.requests_in_flight or args.tensor_parallel:
        from dataclasses import replace

        from .search.targets import TargetSpec

        t = spec.target
        changes["target"] = TargetSpec(args.target or t.name, args.tensor_parallel or t.tensor_parallel,
                                       args.requests_in_flight or t.requests_in_flight)
    spec = with_overrides(spec, **changes)
    quiet = args.json
    result = run_search(spec, progress=not quiet, log=(lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr)))
    try:
        files = write_outputs(result)
    except BadInput as e:
        raise BadInput(f"{e} (the finished trials are kept in {mask_url(spec.storage_url)}; "
                       f"run `xctune search` again with --trials 0 to write the outputs)") from None
    if args.json:
        _emit_json({
            "study": spec.name,
            "out": str(spec.out_dir),
            "trials": len(result.study.trials),
            "run_here": {"sampled": result.tally.sampled, "queued": result.tally.queued},
            "best": {k: v for k, v in (result.best or {}).items() if k != "_plan"},
            "optimum_e2e_ms": result.optimum.e2e_ms if result.optimum and result.optimum.plan else None,
            "gains": baseline_gains(result),
            "files": {k: str(v) for k, v in files.items()},
            "interrupted": result.interrupted,
        })
    else:
        print(summary(result))
        print("written: " + ", ".join(str(Path(p)) for p in files.values()))
    if result.interrupted:
        print(f"xctune: interrupted: the finished trials are kept in {mask_url(spec.storage_url)} and the outputs "
              f"written; the same command resumes (the interrupted trial first)", file=sys.stderr)
        return 130
    return 0 if result.best else 1


def cmd_export(args) -> int:
    from pathlib import Path

    from .export import ExportInvalid, export_plan
    from .hardware import make_cluster
    from .models.loading import resolve_model
    from .plans.plan import Plan, load_plan
    from .search.targets import TargetSpec, target_cluster, tp_size
    from .workload import Workload

    source = Path(args.plan)
    study: dict = {}
    if source.is_dir():
        doc = source / "best_plan.json"
        if not doc.is_file():
            raise BadInput(f"{source} has no best_plan.json: give a study folder, a plan JSON or a device map")
        try:
            study = json.loads(doc.read_text())
            plan = Plan.from_dict(study["plan"])
        except (ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{doc} is not a best_plan.json of xctune search ({type(e).__name__}: {e})") from None
    else:
        plan = load_plan(source, dtype=args.dtype or None)
    target_doc = study.get("target") or {}
    target = args.target or target_doc.get("name") or "accelerate"
    tp = (args.tensor_parallel or target_doc.get("tensor_parallel") or "none") if target == "vllm-pp" else "none"
    serving = TargetSpec(target, tp, int(target_doc.get("requests_in_flight", 1)))
    gpus = args.gpus or study.get("gpus")
    if not gpus:
        raise BadInput("--gpus is required (the cluster the plan is for), unless PLAN is a study folder")
    full = make_cluster(gpus, link=args.link or study.get("link") or "pcie4", headroom=args.headroom)
    cluster = target_cluster(full, serving)
    spec = resolve_model(args.model or study.get("model") or DEFAULT_MODEL, args.trust_remote_code)
    base = Workload(**{k: tuple(v) if k == "hd_layout" and v else v for k, v in study["workload"].items()}) \
        if study.get("workload") else None
    workload = _workload(args, base)
    out = Path(args.out) if args.out else (source if source.is_dir() else Path("export"))
    record = study.get("record")
    try:
        exp = export_plan(target, plan, spec.profile, cluster, workload, out, serving=serving,
                          tp_size=tp_size(full, serving), record=record)
    except ExportInvalid as e:
        print(f"xctune: the export fails its validation: {e}", file=sys.stderr)
        return 1
    if args.json:
        _emit_json({"target": exp.target, "folder": str(exp.folder), "supported": exp.supported,
                    "statement": exp.statement, "checks": list(exp.checks),
                    "files": {k: str(v) for k, v in exp.files.items()}})
    else:
        print(f"{exp.target} export of {spec.config.name} on {cluster.describe()}: {exp.folder}/")
        for name, path in exp.files.items():
            print(f"  {path}")
        print("validated:")
        for c in exp.checks:
            print(f"  - {c}")
        if not exp.supported:
            print(f"note: {exp.statement}")
    return 0


def cmd_report(args) -> int:
    from .atomic import OutputSet, check_writable
    from .reports.compare import build_report, check_threshold, render_markdown, write_csv

    pct = None if args.fail_on_regression is None else check_threshold(args.fail_on_regression)
    if args.out:
        check_writable(args.out)
    rep = build_report(args.inputs)
    failures = rep.gate(pct, args.include_times) if pct is not None else []
    text = render_markdown(rep, pct, args.include_times)
    if args.out:
        with OutputSet(args.out) as out:
            out.write_text("report.md", text)
            with out.staged("report.csv") as tmp:
                write_csv(rep, tmp)
    if args.json:
        _emit_json({
            "studies": rep.studies,
            "changes": [{"run": r, "benchmark": c.benchmark, "figure": c.figure, "guarded": c.guarded,
                         "before": c.before, "after": c.after, "change": c.change} for r, c in rep.changes],
            "gaps": [g.describe() for g in rep.gaps],
            "gate": None if pct is None else {"threshold_pct": pct, "passed": not failures, "failures": failures},
        })
    else:
        print(text)
    for line in failures:
        print(f"xctune: gate: {line}", file=sys.stderr)
    return 1 if failures else 0


def cmd_constraints(args) -> int:
    from .plans.constraints import constraint_report

    from .worlds.trace_cache import default_dir

    spec = _model(args)
    rep = constraint_report(spec.profile, default_dir(), log=lambda m: _progress(args, m))
    if args.json:
        _emit_json(rep.to_dict())
    else:
        print(rep.render())
    return 0


def cmd_presets(args) -> int:
    from .hardware import GPU_PRESETS, LINK_PRESETS, NETWORK_PRESETS, GiB
    from .models.presets import preset_table

    rows = {
        **preset_table(),
        "gpus": {
            n: {"memory_GiB": g.memory_bytes / GiB, "tflops": dict(g.tflops), "mem_bw_gbs": g.mem_bw_gbs, "source": g.source}
            for n, g in GPU_PRESETS.items()
        },
        "links": {n: {"bandwidth_gbs": l.bandwidth_gbs, "latency_us": l.latency_us} for n, l in LINK_PRESETS.items()},
        "networks": {n: {"bandwidth_gbs": l.bandwidth_gbs, "latency_us": l.latency_us, "source": l.source}
                     for n, l in NETWORK_PRESETS.items()},
    }
    if args.json:
        _emit_json(rows)
        return 0
    print("models:")
    for n, r in rows["models"].items():
        print(f"  {n:<14} {r['params'] / 1e9:>6.2f} B params, {r['image_tokens']} tokens per image")
    print("transformers models (transformers' own class, built from the published config; nothing downloaded):")
    for n, r in rows["transformers"].items():
        print(f"  {n:<22} {r['params'] / 1e9:>6.2f} B params, {r['architecture']} ({r['source']})")
    print("gpus:")
    for n, r in rows["gpus"].items():
        tf = ", ".join(f"{k} {v:g}" for k, v in r["tflops"].items())
        print(f"  {n:<10} {r['memory_GiB']:>5.0f} GiB  {r['mem_bw_gbs']:>6.0f} GB/s  TFLOP/s: {tf}")
    print("links:")
    for n, r in rows["links"].items():
        print(f"  {n:<11} {r['bandwidth_gbs']:>6g} GB/s  {r['latency_us']:g} us")
    print("networks between nodes (--gpus '2x[4xa10]@NETWORK'):")
    for n, r in rows["networks"].items():
        print(f"  {n:<11} {r['bandwidth_gbs']:>6g} GB/s  {r['latency_us']:g} us")
    return 0


# ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xctune",
        description="Device maps for vision-language models across several GPUs: check them, benchmark them, search for the best.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "check",
        help="will this device map run on this cluster, and how full will each card be?",
        description="Static rules plus a dry run of the real forward pass on virtual GPUs (fake tensors, "
        "accelerate's hooks). Exit 0: the map will run; 1: it will fail; 2: bad input.",
    )
    p.add_argument("map", nargs="?", help="device map JSON ({module: GPU index | 'cpu' | 'disk'}) or a plan JSON")
    p.add_argument("--baseline", help="check a named map instead: authors, accelerate-sequential, accelerate-balanced, single")
    _add_model(p)
    _add_cluster(p)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="precision of the whole model (default: the plan's, else fp32)")
    _add_workload(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "search",
        help="search device maps and precisions with Optuna; export the best map and a leaderboard",
        description=f"Runs a study file (default: studies/default.toml: {DEFAULT_MODEL} on a virtual 2x24GiB cluster). "
        "Trials are valid plans by construction; the baselines are enqueued first. Outputs go to "
        "results/<study>/ (best_map.json, best_plan.json, leaderboard.csv/.md, plots). Running the same "
        "study again resumes it and adds trials.",
    )
    p.add_argument("--study", help="study TOML file (default: studies/default.toml)")
    p.add_argument("--trials", type=int, help="sampled trials to add (baselines come on top)")
    _add_model(p, default=None)
    p.add_argument("--gpus", help="override the study's cluster (with --real: memory budgets of logical devices)")
    p.add_argument("--real", action="store_true", help="measure every trial on this machine")
    p.add_argument("--objectives", help="comma-separated: latency (e2e ms), peak_mem (bytes), transfer (bytes)")
    p.add_argument("--sampler", choices=["auto", "tpe", "nsga2", "random"], help="Optuna sampler (default: auto)")
    p.add_argument("--seed", type=int, help="sampler seed")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite under the output folder)")
    p.add_argument("--study-name", help="study name (default: the file's)")
    p.add_argument("--out", help="output folder (default: results/<study-name>)")
    p.add_argument("--calibration", help="calibration JSON for the cost model")
    p.add_argument("--heartbeat", type=int, metavar="S",
                   help="seconds between a running trial's heartbeats; a trial silent for 4 of them (its worker died) "
                        "is failed and run again (default 5)")
    p.add_argument("--loader", choices=["xctune", "from_pretrained"], default=None,
                   help="the loading path to optimise for (default: the study's, else xctune's loader)")
    p.add_argument("--target", choices=["accelerate", "vllm-pp", "torch-pipelining"],
                   help="the engine that runs the plan (default: the study's, else accelerate)")
    p.add_argument("--requests-in-flight", type=int, help="micro-batches in flight for tokens/s (default: the study's, else 1)")
    p.add_argument("--tensor-parallel", choices=["none", "node"], help="vllm-pp: a stage per GPU (none) or per node (node)")
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "export",
        help="write the files an engine runs for a plan (vLLM, torch pipelining, accelerate), validated",
        description="PLAN is a study folder (its best_plan.json: model, cluster and target come with it), a plan "
        "JSON or a device map. Every export is validated: the partition sums to the text model's layers, it "
        "round-trips into the same plan, and xctune check judges that plan (it runs, every stage fits). "
        "vLLM need not be installed. Exit 0: written and valid; 1: the plan fails a check; 2: bad input.",
    )
    p.add_argument("plan", help="study folder (with best_plan.json), plan JSON or device map JSON")
    p.add_argument("--target", choices=["accelerate", "vllm-pp", "torch-pipelining"],
                   help="engine (default: the study's target, else accelerate)")
    p.add_argument("--model", default=None, help=f"model preset or checkpoint directory (default: the study's, else {DEFAULT_MODEL})")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own code to run when loading it")
    p.add_argument("--gpus", default=None, help="cluster (default: the study's); nodes as in `search`")
    p.add_argument("--link", default=None, help="link between GPUs of a node (default: the study's, else pcie4)")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of each GPU's memory kept free (default: %(default)s)")
    p.add_argument("--tensor-parallel", choices=["none", "node"], default=None, help="vllm-pp: a stage per node, TP inside")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="precision of a bare map (default fp16)")
    _add_workload(p)
    p.add_argument("--out", help="output folder (default: the study folder, else ./export)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "bench",
        help="one trial: run a plan and record latency, transfers, memory and fidelity",
        description="Simulated on a virtual cluster (--gpus) through the dry run and the cost model, or measured "
        "on this machine (--real: its GPUs, or logical devices on the CPU when it has too few). Prints a "
        "summary or, with --json, the flat trial record. Exit 0: the plan ran; 1: it failed (oom, invalid, error).",
    )
    p.add_argument("--map", dest="map", help="device map or plan JSON")
    p.add_argument("--baseline", help="a named map: authors, accelerate-sequential, accelerate-balanced, single")
    p.add_argument("--repair", action="store_true", help="move the image path to the embeddings' device (accelerate's maps)")
    _add_model(p)
    _add_cluster(p, default=None)
    p.add_argument("--real", action="store_true", help="measure on this machine; with --gpus, the GPUs are memory budgets for logical devices")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="precision of the whole model")
    p.add_argument("--loader", choices=["xctune", "from_pretrained"], default=None,
                   help="how the map is loaded: xctune's loader (load_best_map.py, the default) or a bare from_pretrained(device_map=...)")
    p.add_argument("--no-skip-kv", action="store_true", help="the same as --loader from_pretrained: accelerate moves the KV cache")
    _add_workload(p)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (--real; default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs (--real; default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads while measuring (--real; default %(default)s)")
    p.add_argument("--calibration", help="calibration JSON from `xctune calibrate` (efficiency factors, the host device)")
    p.add_argument("--json", action="store_true", help="print the trial record as one flat JSON object")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "calibrate",
        help="fit the cost model to this machine and report its prediction error per phase",
    )
    _add_model(p, default=CALIBRATION_MODEL)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds per workload (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads while measuring (default %(default)s)")
    p.add_argument("--study", help="a real study file: also measure the twin's rank agreement over its plans")
    p.add_argument("--plans", type=int, default=18, help="plans of --study to rank (default %(default)s)")
    p.add_argument("--out", default="results/calibration/host.json", help="where to write the calibration (default %(default)s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "report",
        help="compare study outputs and benchmark runs; flag regressions",
        description="Study folders (with best_plan.json) give the best plan against its baselines; pytest-benchmark "
        "JSON files (or folders of them) are compared, each later run against the first: median times and the "
        "guarded figures (extra_info guards: ratios measured side by side, exact counts).",
    )
    p.add_argument("inputs", nargs="+", help="study folders, benchmark JSON files, or folders of benchmark JSON files")
    p.add_argument("--fail-on-regression", metavar="PCT",
                   help="exit 1 when a guarded figure got worse by more than PCT percent, or when a run cannot be judged "
                   "(a benchmark or guard of the baseline missing, a figure that is not a finite number)")
    p.add_argument("--include-times", action="store_true", help="let median times fail --fail-on-regression too (stable machines only)")
    p.add_argument("--out", help="also write report.md and report.csv here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "constraints",
        help="print the co-location groups of a model, and what the dry run says is truly required",
    )
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_constraints)

    p = sub.add_parser("presets", help="list the model, GPU and link presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except BadInput as e:
        text = " ".join(str(e).split())  # one line, cut to a readable length whatever the input held
        print(f"xctune: error: {text if len(text) <= 500 else text[:500] + '... (cut)'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xctune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`xctune presets | head`): not an error of ours
        # Python would complain again when it flushes stdout at exit: point it at nothing first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug of ours: one line, the traceback on request
        if os.environ.get("XCTUNE_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"xctune: internal error: {type(e).__name__}: {first} (a bug in xctune: please report it with the command "
              "line and the traceback that XCTUNE_DEBUG=1 prints)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
