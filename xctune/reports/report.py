"""What a search leaves behind: the best map, the leaderboard, plots, and a summary.

Files under the study's output folder:
- `best_map.json`   the map, exactly loadable by `from_pretrained(device_map=json.load(f))`
- `best_plan.json`  map + dtypes + workload + its trial record + how it compares with each baseline
- `load_best_map.py` the few lines that load the map the fast way (working skip_keys, dtypes)
- `leaderboard.csv` / `leaderboard.md`  one row per trial, baselines marked, sorted by the objective
- `history.png`, `memory.png` (and `pareto.png` for several objectives)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna

from ..atomic import OutputSet
from ..hardware import GiB
from ..plans.plan import Plan, write_device_map
from ..record import fmt_bytes

FIRST = {"latency": "e2e_ms", "peak_mem": "peak_bytes_max", "transfer": "transfer_bytes", "throughput": "tokens_per_s"}


def better_first(objective: str, value) -> float:
    """A sort key that puts the best value of `objective` first (throughput is maximised)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    from ..search.study import MAXIMISED

    return -value if objective in MAXIMISED else value


def layout(plan: Plan, profile) -> str:
    """`emb:0 L0-15:0 L16-31:1 head:1` — a map in one line (root parameters and position tables
    follow the embeddings; they are not shown)."""
    from ..models.profile import ROLE_SHORT

    m = plan.device_map
    parts = []
    shown = [u for u in profile.vision + (profile.embeddings,)]
    emb = {m.get(u) for u in shown}
    if len(emb) == 1:
        parts.append(f"emb:{emb.pop()}")
    else:
        parts += [f"{ROLE_SHORT[profile.by_name[u].role]}:{m.get(u)}" for u in shown]
    run_start, prev = None, object()
    layers = profile.layers
    for i, u in enumerate([*layers, None]):
        d = m.get(u) if u else object()
        if d != prev:
            if run_start is not None:
                parts.append(f"L{run_start}-{i - 1}:{prev}" if i - 1 > run_start else f"L{run_start}:{prev}")
            run_start, prev = i, d
    head = {m.get(u) for u in profile.head}
    parts.append(f"head:{head.pop()}" if len(head) == 1 else
                 " ".join(f"{ROLE_SHORT[profile.by_name[u].role]}:{m.get(u)}" for u in profile.head))
    return " ".join(parts)


def collect_rows(study: optuna.Study, objectives) -> list[dict]:
    rows = []
    # trials that died with their worker (or were interrupted) and were queued again: the re-run stands for them
    rerun = {n for t in study.trials for n in t.system_attrs.get("retry_history", [])}
    for t in study.trials:
        if t.state == optuna.trial.TrialState.FAIL and t.number in rerun:
            continue
        plan = t.user_attrs.get("plan")
        base = {
            "trial": t.number,
            "baseline": t.user_attrs.get("baseline"),
            "baseline_keys": t.user_attrs.get("baseline_keys"),
            "seed_plan": t.user_attrs.get("seed"),
            "state": t.state.name,
            "_plan": plan,
        }
        if t.state == optuna.trial.TrialState.COMPLETE and "record" in t.user_attrs:
            feasible = all(v <= 0 for v in t.constraints.values())
            rows.append({**t.user_attrs["record"], **base, "feasible": feasible,
                         **{f"constraint.{k}": v for k, v in t.constraints.items()}})
        elif t.state == optuna.trial.TrialState.PRUNED:
            rows.append({**t.user_attrs.get("record", {}), **base, "feasible": False, "status": "pruned",
                         "cause": t.user_attrs.get("pruned", ""), "label": base["baseline"] or f"trial {t.number}"})
        elif t.state == optuna.trial.TrialState.FAIL:
            rows.append({**base, "feasible": False, "status": "error", "label": f"trial {t.number}"})
    key = FIRST[objectives[0]]

    def order(r):
        return (0 if r.get("feasible") else 1 if r.get("status") in ("ok", "oom") else 2, better_first(objectives[0], r.get(key)))

    rows.sort(key=order)
    return rows


def pick_best(result, evaluator) -> None:
    """The best feasible trial; in the virtual world it must also pass the full dry run (`check`),
    whose verdict is kept beside the traces: a warm search of the same study does not rerun it."""
    from ..plans.check import check_verdict

    spec = result.spec
    key = FIRST[spec.objectives[0]]
    candidates = [r for r in result.records if r.get("feasible") and r.get("_plan")]
    if len(spec.objectives) > 1:
        front = {t.number for t in result.study.best_trials}
        candidates = [r for r in candidates if r.get("trial") in front] or candidates
        for r in result.records:
            r["pareto"] = r.get("trial") in front
    if spec.real:  # a measurement whose repeats varied over the noise bound does not win over a quiet one
        candidates = [r for r in candidates if not r.get("noisy")] or candidates
    candidates.sort(key=lambda r: better_first(spec.objectives[0], r.get(key)))
    for r in candidates[:5]:
        plan = Plan.from_dict(r["_plan"])
        if spec.real:
            result.best, result.best_plan, result.verified = r, plan, "measured on this machine"
            return
        verdict = check_verdict(plan, result.profile, result.cluster, spec.workload, evaluator.trace.cache_dir,
                                tied_copies=spec.target.rules.tied_copies)
        if verdict.ok:
            result.best, result.best_plan = r, plan
            result.verified = "passes xctune check (static rules + dry run on virtual GPUs" + \
                ("; verdict kept from an earlier run of the same plan)" if verdict.cached else ")")
            return
        r["feasible"] = False
        r["cause"] = "rejected by the dry run: " + "; ".join(verdict.errors)[:300]


def _ratio_rows(result) -> list[dict]:
    """One row per baseline and precision: its objective value and its ratio to the best, or why it has none."""
    best = result.best
    out = []
    key = FIRST[result.spec.objectives[0]]
    for r in result.records:
        if not r.get("baseline"):
            continue
        for bkey in r.get("baseline_keys") or [r["baseline"]]:
            name, _, dtype = bkey.rpartition(" @ ") if " @ " in bkey else (bkey, "", result.spec.baseline_dtype)
            row = {"baseline": name, "dtype": dtype, "trial": r.get("trial"), "status": r.get("status"),
                   "feasible": bool(r.get("feasible"))}
            if best and r.get("status") == "ok" and r.get(key):
                row[key] = r.get(key)
                row["ratio"] = r[key] / best[key] if best.get(key) else None
            else:
                row["cause"] = r.get("cause", "")
            out.append(row)
    return out


def baseline_gains(result) -> list[dict]:
    """Per baseline: the gain of the best plan split into placement and precision.

    - placement: the baseline at the best plan's precision (its language model's dtype; baselines are
      uniform) over the best — what the map alone buys;
    - precision: the baseline in the study's baseline dtype over the same baseline at the best's
      precision — what the dtype alone buys;
    - total: the baseline in the baseline dtype over the best (placement x precision where both exist).
    A baseline that does not fit or run at one precision is still compared at the others."""
    if not result.best or result.best_plan is None:
        return []
    key = FIRST[result.spec.objectives[0]]
    same, base = result.best_plan.dtypes["lm"], result.spec.baseline_dtype
    rows = _ratio_rows(result)
    out = []
    order = list(dict.fromkeys([base, *result.space.dtypes]))
    for name in dict.fromkeys(r["baseline"] for r in rows):
        at = {r["dtype"]: r for r in rows if r["baseline"] == name}
        at = {d: at[d] for d in sorted(at, key=lambda d: order.index(d) if d in order else len(order))}
        gain = {"baseline": name, "best_precision": same, "baseline_dtype": base,
                "ratios": {d: r.get("ratio") for d, r in at.items()},
                "status": {d: r["status"] for d, r in at.items()}}
        gain["placement"] = at.get(same, {}).get("ratio")
        gain["total"] = at.get(base, {}).get("ratio")
        a, b = at.get(base, {}).get(key), at.get(same, {}).get(key)
        gain["precision"] = a / b if a and b else None
        out.append(gain)
    return out


# every file a study writes; one missing from a run (no feasible plan: no best_map.json) is removed
OUTPUTS = ("leaderboard.csv", "leaderboard.md", "best_map.json", "best_plan.json", "load_best_map.py",
           "history.png", "pareto.png", "memory.png")


def write_outputs(result) -> dict[str, Path]:
    """The study's outputs, replaced together (atomic.OutputSet): a failed write changes nothing."""
    rows = result.records
    import pandas as pd

    flat = [{k: v for k, v in r.items() if k != "_plan"} for r in rows]
    for i, r in enumerate(flat):
        r["rank"] = i + 1
        r["layout"] = layout(Plan.from_dict(rows[i]["_plan"]), result.profile) if rows[i].get("_plan") else ""
    df = pd.DataFrame(flat)
    first = ["rank", "label", "baseline", "trial", "state", "status", "feasible", "source", "layout",
             "dtypes.vision", "dtypes.lm", "dtypes.head", "e2e_ms", "prefill_ms", "decode_ms_per_token", "vision_ms",
             "peak_bytes_max", "transfer_bytes", "fidelity_top1", "cause", "plan_id"]
    cols = [c for c in first if c in df.columns] + [c for c in df.columns if c not in first]
    df = df[cols] if len(df) else df
    files = {}
    with OutputSet(result.spec.out_dir, OUTPUTS) as out:
        with out.staged("leaderboard.csv") as tmp:
            df.to_csv(tmp, index=False)
        files["leaderboard.csv"] = out.path("leaderboard.csv")
        files["leaderboard.md"] = out.write_text("leaderboard.md", _markdown(df, result))
        if result.best_plan is not None:
            from ..export.accelerate import loader_text

            with out.staged("best_map.json") as tmp:
                write_device_map(result.best_plan, tmp)
            files["best_map.json"] = out.path("best_map.json")
            files["load_best_map.py"] = out.write_text("load_best_map.py", loader_text(result.best_plan, result.profile))
            files.update(_exports(result, out.folder))  # the pipeline engines' files, each written whole
            files["best_plan.json"] = out.write_text("best_plan.json", json.dumps(_best_plan_doc(result), indent=1, default=str) + "\n")
        files.update(_plots(result, out))
    return files


def _exports(result, out: Path) -> dict[str, Path]:
    """The files each engine takes (xctune/export): accelerate's loader for an accelerate study;
    vLLM's and torch pipelining's for a pipeline study. Each is validated as it is written."""
    from ..errors import BadInput
    from ..export import ExportInvalid, export_plan

    spec = result.spec
    targets = ["vllm-pp", "torch-pipelining"] if spec.target.pipelined else []  # accelerate's: write_outputs
    if spec.real:
        targets = []  # a measured plan of logical devices: best_map.json is what it is
    files = {}
    for target in targets:
        try:
            exp = export_plan(target, result.best_plan, result.profile, result.cluster, spec.workload, out,
                              serving=spec.target, tp_size=result.tp_size, record=result.best)
        except (BadInput, ExportInvalid) as e:
            result.exports.append((target, None, str(e)))
            continue
        result.exports.append((target, exp, ""))
        for name, path in exp.files.items():
            files[str(path.relative_to(out))] = path
    return files


def _best_plan_doc(result) -> dict:
    best, spec = result.best, result.spec
    doc = {
        "study": spec.name,
        "model": spec.model,
        "cluster": result.cluster.describe(),
        "plan": result.best_plan.to_dict(),
        "layout": layout(result.best_plan, result.profile),
        "workload": spec.workload.to_dict(),
        "source": best.get("source"),
        "verified": result.verified,
        "record": {k: v for k, v in best.items() if k != "_plan"},
        "baselines": _ratio_rows(result),
        "gains": baseline_gains(result),
        "how_to_load": "json.load(open('best_map.json')) as device_map= of from_pretrained; see load_best_map.py "
                       "for the skip keys that keep the KV cache in place",
        "target": spec.target.to_dict(),
        "gpus": spec.gpus,
        "link": spec.link,
        "exports": {t: {"folder": str(e.folder), "supported": e.supported, "statement": e.statement,
                        "checks": list(e.checks)} if e else {"error": err}
                    for t, e, err in result.exports},
    }
    if spec.target.pipelined:
        doc["how_to_load"] = "a pipeline plan: see vllm/ and torch_pipelining/ (best_map.json is its device map, for xctune check)"
    if result.optimum is not None and result.optimum.plan is not None:
        doc["optimum"] = {
            "e2e_ms": result.optimum.e2e_ms,
            "layout": layout(result.optimum.plan, result.profile),
            "dtypes": result.optimum.plan.dtypes,
            "gap": best["e2e_ms"] / result.optimum.e2e_ms - 1 if best.get("e2e_ms") else None,
            "source": "simulated: exact optimum of the cost model over the search space (dynamic programming)",
        }
    return doc


def _markdown(df, result) -> str:
    spec = result.spec
    lines = [f"# Leaderboard: {spec.name}", "",
             f"{spec.model} on {result.cluster.describe()}; workload: {spec.workload.describe(result.profile.config)}; "
             f"objective(s): {', '.join(spec.objectives)}; numbers are **{'measured' if spec.real else 'simulated'}**.", ""]
    cols = [("rank", "#"), ("label", "trial"), ("status", "status"), ("layout", "layout"),
            ("dtypes.lm", "lm dtype"), ("e2e_ms", "e2e ms"), ("decode_ms_per_token", "decode ms/tok"),
            ("peak_bytes_max", "peak"), ("transfer_bytes", "moved"), ("fidelity_top1", "top-1")]
    if spec.target.pipelined or "throughput" in spec.objectives:
        cols += [("tokens_per_s", "tokens/s"), ("internode_bytes_per_token", "network/token")]
    cols = [(c, h) for c, h in cols if c in df.columns]
    lines += _gains_markdown(result)
    lines.append("| " + " | ".join(h for _, h in cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for _, r in df.iterrows():
        cells = []
        for c, _ in cols:
            v = r.get(c)
            if c == "label" and isinstance(r.get("baseline"), str):
                v = f"**{r['baseline']}** (baseline)"
            # a map outside the space is never a trial (not feasible for the study), but "ok" there means it fits
            if c == "status" and r.get("status") == "ok" and not r.get("feasible") and r.get("state") != "OUTSIDE":
                v = "ok (over memory)"
            if c in ("peak_bytes_max", "transfer_bytes", "internode_bytes_per_token") and isinstance(v, (int, float)) \
                    and not math.isnan(v):
                v = fmt_bytes(v)
            elif isinstance(v, float):
                v = "" if math.isnan(v) else f"{v:.4g}"
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(result, out: OutputSet) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import warnings

    files = {}
    study, spec = result.study, result.spec
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if completed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from optuna.visualization import matplotlib as ovm

            if len(spec.objectives) == 1:
                ax = ovm.plot_optimization_history(study)
            else:
                ax = ovm.plot_optimization_history(study, target=lambda t: t.values[0], target_name=spec.objectives[0])
            ax.set_title(f"{spec.name}: optimisation history ({'measured' if spec.real else 'simulated'})")
            files["history.png"] = _save(ax.figure, out, "history.png", (8, 4.5))
            if len(spec.objectives) > 1:
                ax = ovm.plot_pareto_front(study, target_names=list(spec.objectives))
                files["pareto.png"] = _save(ax.figure, out, "pareto.png", (7, 5))
    best = result.best
    if best:
        n = len(result.cluster.gpus)
        names = [f"cuda:{i}" for i in range(n)]
        weights = [best.get(f"weights_bytes.{d}", 0) / GiB for d in names]
        acts = [best.get(f"activation_bytes.{d}", 0) / GiB for d in names]
        caps = [result.cluster.usable_bytes(i) / GiB for i in range(n)]
        fig, ax = plt.subplots(figsize=(1.6 * n + 5, 4))
        ax.bar(names, weights, label="weights")
        ax.bar(names, acts, bottom=weights, label="activations + KV cache")
        ax.scatter(names, caps, marker="_", s=2000, color="red", label="usable capacity", zorder=3)
        ax.set_ylabel("GiB")
        ax.set_title(f"best plan, memory per device ({best.get('source')})")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        files["memory.png"] = _save(fig, out, "memory.png")
    return files


def _save(fig, out: OutputSet, name: str, size=None) -> Path:
    import matplotlib.pyplot as plt

    if size:
        fig.set_size_inches(*size)
    fig.tight_layout()
    try:
        with out.staged(name) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return out.path(name)


def _counts(result) -> str:
    """This worker's trials and the study's: with several workers, each counts only its own."""
    trials = result.study.trials
    workers = {t.user_attrs.get("worker") for t in trials} - {None}
    tally = result.tally
    here = (f"{tally.total} trial(s) run by this worker ({tally.sampled} sampled, {tally.queued} queued)"
            if tally is not None else f"{result.new_trials} trial(s) run now")
    finished = sum(t.state.is_finished() for t in trials)
    return f"{here}; the study holds {len(trials)} ({finished} finished) from {len(workers)} worker(s)"


def _serving_lines(result, best: dict) -> list[str]:
    """Target, inter-node transfer, throughput and exports of the best plan."""
    spec, lines = result.spec, []
    t = spec.target
    if t.pipelined or t.requests_in_flight > 1 or best.get("internode_bytes_per_token") is not None:
        stages = {k.split(".", 1)[1]: v for k, v in best.items() if k.startswith("stage_decode_ms.") and v is not None}
        slowest = max(stages, key=stages.get) if stages else None
        tp = f", tensor parallel {result.tp_size} GPUs per stage" if result.tp_size > 1 else ""
        lines.append(f"      target {t.name}{tp}: {best.get('tokens_per_s', float('nan')):.1f} tokens/s with "
                     f"{t.requests_in_flight} request(s) in flight"
                     + (f" (slowest stage {slowest}: {stages[slowest]:.2f} ms per decode step)" if slowest else "")
                     + f"  [{best.get('source')}]")
    if best.get("internode_bytes_per_token") is not None:
        lines.append(f"      between nodes ({result.cluster.network.name}): {fmt_bytes(best['internode_bytes_per_token'])} "
                     f"per token, {fmt_bytes(best.get('internode_bytes_prefill') or 0)} in vision + prefill")
    for target, exp, err in result.exports:
        if exp is None:
            lines.append(f"      export {target}: not written: {err}")
        else:
            note = "" if exp.supported else " (the engine does not run this model: see its README.md)"
            lines.append(f"      export {target}: {exp.folder}/ validated ({len(exp.checks)} checks){note}")
    return lines


def summary(result) -> str:
    spec, best = result.spec, result.best
    world = "measured on this machine" if spec.real else "simulated on a virtual cluster"
    lines = [f"study {spec.name}: {spec.model} on {result.cluster.describe()} ({world})",
             _counts(result) + f"; {result.seconds:.1f} s"]
    if result.interrupted:
        lines.append("interrupted: the finished trials are kept in the study; run the same command to resume")
    if not best:
        lines.append("no feasible plan found")
        if result.optimum is not None and result.optimum.plan is None:
            lines.append(f"exact optimum of the cost model: no plan of the space fits ({result.optimum.configs} "
                         f"configuration(s) solved)")
        return "\n".join(lines)
    key = FIRST[spec.objectives[0]]
    lines.append(f"best: {best.get('label')}  {layout(result.best_plan, result.profile)}  dtypes {result.best_plan.dtype_label}")
    lines.append(f"      e2e {best['e2e_ms']:.1f} ms (prefill {best['prefill_ms']:.1f}, decode {best['decode_ms_per_token']:.2f} ms/token), "
                 f"peak {fmt_bytes(best['peak_bytes_max'])}, moved {fmt_bytes(best['transfer_bytes'])}  [{best.get('source')}]")
    lines.append(f"      {result.verified}")
    lines += _serving_lines(result, best)
    lines += _gain_lines(result, key)
    if len(spec.objectives) > 1:
        front = sorted((r for r in result.records if r.get("pareto") and r.get("feasible")), key=lambda r: r.get("e2e_ms", 0))
        lines.append(f"Pareto front ({', '.join(spec.objectives)}): {len(front)} feasible trial(s)")
        for r in front[:6]:
            values = ", ".join(f"{o} {fmt_bytes(r[FIRST[o]]) if o != 'latency' else f'{r[FIRST[o]]:.1f} ms'}" for o in spec.objectives)
            lines.append(f"  {r.get('label'):<12} {values}  {layout(Plan.from_dict(r['_plan']), result.profile)}")
    if result.optimum is None and not spec.real and (key != "e2e_ms" or spec.target.requests_in_flight > 1):
        lines.append("exact optimum: computed for the latency of one request only (the throughput of several in "
                     "flight is a max over stages, not the sum the dynamic programme minimises)")
    if result.optimum is not None and result.optimum.plan is not None:
        gap = best["e2e_ms"] / result.optimum.e2e_ms - 1
        gap = 0.0 if abs(gap) < 5e-5 else gap  # float sums in another order: not "-0.00%"
        lines.append(f"exact optimum of the cost model: {result.optimum.e2e_ms:.1f} ms "
                     f"({layout(result.optimum.plan, result.profile)}, {result.optimum.plan.dtype_label}); "
                     f"best trial is {gap:+.2%} from it")
    if result.fp32_optimum is not None and result.fp32_optimum.plan is not None and result.best_plan.dtype_label != "fp32":
        o = result.fp32_optimum
        fp32_rows = [r for r in result.records if r.get("feasible") and r.get("dtypes.vision") == r.get("dtypes.lm")
                     == r.get("dtypes.head") == "fp32"]
        tried = f"best fp32 trial {fp32_rows[0]['e2e_ms']:.1f} ms; " if fp32_rows else ""
        lines.append(f"in fp32 (outputs unchanged): {tried}exact fp32 optimum {o.e2e_ms:.1f} ms "
                     f"({layout(o.plan, result.profile)}), {o.e2e_ms / best['e2e_ms']:.2f}x the best's latency")
    return "\n".join(lines)


def _gain_lines(result, key: str) -> list[str]:
    """The baselines against the best, per precision, with the gain split into placement and precision."""
    gains = baseline_gains(result)
    if not gains:
        return []
    same, base = gains[0]["best_precision"], gains[0]["baseline_dtype"]
    lines = [f"  baselines, {key} over the best's (placement: at the best's precision, {same}; "
             f"precision: {base} -> {same}, same map):"]
    causes = {(r["baseline"], r["dtype"]): r.get("cause", "") for r in _ratio_rows(result)}
    for g in gains:
        cells = [f"{d} {g['ratios'][d]:.2f}x" if g["ratios"][d] else f"{d} {g['status'][d]}" for d in g["ratios"]]
        split = []
        if g["placement"]:
            split.append(f"placement {g['placement']:.2f}x")
        if g["precision"]:
            split.append(f"precision {g['precision']:.2f}x")
        lines.append(f"  vs {g['baseline']:<34} {' | '.join(cells):<40} {', '.join(split)}".rstrip())
        for d in g["ratios"]:
            if not g["ratios"][d] and causes.get((g["baseline"], d)):
                lines.append(f"       {d}: {str(causes[(g['baseline'], d)])[:110]}")
    return lines


def _gains_markdown(result) -> list[str]:
    """The leaderboard's head: each baseline per precision, and the best's gain split into placement and precision."""
    gains = baseline_gains(result)
    if not gains:
        return []
    key = FIRST[result.spec.objectives[0]]
    dtypes = list(dict.fromkeys(d for g in gains for d in g["ratios"]))
    lines = [f"Baselines, {key} over the best's, per precision; placement = at the best's precision "
             f"({gains[0]['best_precision']}), precision = {gains[0]['baseline_dtype']} -> {gains[0]['best_precision']} "
             f"on the same map:", "",
             "| baseline | " + " | ".join(dtypes) + " | placement gain | precision gain |",
             "|---|" + "---|" * (len(dtypes) + 2)]
    for g in gains:
        cells = [(f"{g['ratios'][d]:.3f}x" if g["ratios"][d] else g["status"][d]) if d in g["ratios"] else "" for d in dtypes]
        split = [f"{g[k]:.3f}x" if g[k] else "" for k in ("placement", "precision")]
        lines.append(f"| {g['baseline']} | " + " | ".join(cells + split) + " |")
    return lines + [""]
