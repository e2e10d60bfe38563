"""`xctune search`: an Optuna study over device maps and precisions, under the co-location rule.

Every sampled trial is a valid plan by construction (space.py). A trial is evaluated in the
virtual world (trace + cost model: milliseconds) or measured on this machine (`real`), and its
record kept in the trial's user attributes. Memory over a device's usable capacity and fidelity
under the study's floor are reported to Optuna as constraint violations (Optuna 5's
`trial.set_constraint`), never as made-up objective values; a real trial whose memory estimate
already proves it cannot fit is pruned before measuring.

The study first enqueues the baselines (the authors' heuristic, accelerate's maps — repaired
where they break co-location, the raw map recorded as invalid — and single-device), then
samples. Studies live in Optuna's RDB storage (SQLite under the output folder by default):
running the same study again resumes it, and an interruption keeps every finished trial.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from dataclasses import replace

import optuna

from .baselines import baseline_plan, repair
from .costmodel import Efficiency
from .errors import BadInput
from .hardware import Cluster, make_cluster
from .models.loading import resolve_model
from .plan import Plan
from .record import TrialRecord
from .simulate import failed_record, record_from_estimate, simulate
from .space import SearchSpace
from .study import MAXIMISED, StudySpec
from .targets import TensorParallel, serving_estimate, serving_fields, target_cluster, tp_size
from .trace import InvalidPlan, Trace

OBJECTIVE_FIELD = {"latency": "e2e_ms", "peak_mem": "peak_bytes_max", "transfer": "transfer_bytes",
                   "throughput": "tokens_per_s"}


def memory_violation(rec: TrialRecord, cluster: Cluster) -> float:
    """max over GPUs of (peak - usable) / usable: <= 0 where everything fits."""
    worst = -1.0
    for i in range(len(cluster.gpus)):
        peak = rec.peak_bytes.get(f"cuda:{i}")
        if peak is not None:
            worst = max(worst, (peak - cluster.usable_bytes(i)) / cluster.usable_bytes(i))
    return worst


def objective_values(rec: TrialRecord, objectives) -> list[float]:
    out = []
    for o in objectives:
        if o == "latency":
            out.append(rec.e2e_ms.median)
        elif o == "throughput":
            out.append(rec.tokens_per_s if rec.tokens_per_s is not None else 0.0)
        elif o == "peak_mem":
            out.append(float(rec.peak_bytes_max))
        else:
            out.append(float(rec.transfer_bytes))
    return out


class VirtualEvaluator:
    """Trials in the virtual world: the trace, evaluated per plan (milliseconds each)."""

    source = "simulated"

    def __init__(self, spec: StudySpec, profile, cluster: Cluster, eff: Efficiency, cache_dir: Path | None,
                 tp: TensorParallel | None = None):
        self.spec, self.profile, self.cluster, self.eff = spec, profile, cluster, eff
        self.target, self.tp = spec.target, tp
        self.trace = Trace(profile, spec.workload, cache_dir=cache_dir)

    def estimate(self, plan: Plan):
        """The plan as the study's target runs it (targets.py); InvalidPlan if it cannot run."""
        est = self.trace.evaluate(plan, self.cluster, self.eff, self.target.rules.free_move_kinds)
        return serving_estimate(est, self.target, plan, self.profile, self.spec.workload, self.tp)

    def __call__(self, plan: Plan, label: str) -> TrialRecord:
        try:
            est = self.estimate(plan)
        except InvalidPlan as e:
            devices = {f"cuda:{i}": g.name for i, g in enumerate(self.cluster.gpus)}
            return failed_record(plan, self.profile, self.spec.workload, "simulated", "invalid", str(e), devices, label)
        rec = record_from_estimate(est, plan, self.profile, self.cluster, self.spec.workload, self.trace.weights(plan), label=label)
        return replace(rec, **serving_fields(est, self.target, self.cluster, self.spec.workload))

    def outside(self, plan: Plan, label: str) -> TrialRecord:
        """A plan the space cannot express (accelerate's raw map): the full dry run judges it."""
        return simulate(self.profile, plan, self.spec.workload, self.cluster, self.eff, label=label)

    def precheck(self, plan: Plan) -> str | None:
        return None


class RealEvaluator(VirtualEvaluator):
    """Trials measured on this machine; the virtual twin prices plans to prune and to seed."""

    source = "measured"

    def __init__(self, spec, profile, cluster, eff, cache_dir, model_spec):
        # the twin sees the budgets as devices; with a calibration, at this machine's measured speed
        super().__init__(spec, profile, twin_cluster(cluster, spec.calibration), eff, cache_dir)
        from .real import HostExecutor

        self.executor = HostExecutor(model_spec, spec.workload, repeats=spec.repeats, budget=cluster)

    def __call__(self, plan: Plan, label: str) -> TrialRecord:
        return self.executor.run(plan, label)

    def outside(self, plan: Plan, label: str) -> TrialRecord:
        return self.executor.run(plan, label)

    def precheck(self, plan: Plan) -> str | None:
        """Prune before measuring when the estimate already proves the plan cannot fit (25% margin)."""
        try:
            est = self.trace.evaluate(plan, self.cluster, self.eff)
        except InvalidPlan as e:
            return str(e)
        weights = self.trace.weights(plan)
        for i in range(len(self.cluster.gpus)):
            need = weights.get(i, 0) + est.peak_bytes.get(i, 0)
            if need > 1.25 * self.cluster.usable_bytes(i):
                return (f"estimated {need / 2**20:.1f} MiB on cuda:{i} (simulated), budget "
                        f"{self.cluster.usable_bytes(i) / 2**20:.1f} MiB: pruned before measuring")
        return None


@dataclass
class SearchResult:
    spec: StudySpec
    study: optuna.Study
    profile: object
    cluster: Cluster
    space: SearchSpace
    records: list[dict] = field(default_factory=list)  # one row per trial (+ baselines outside the space)
    best: dict | None = None  # the best feasible row
    best_plan: Plan | None = None
    verified: str = ""  # what the dry run said of the best plan
    optimum: object = None  # oracle.Optimum (virtual studies)
    fp32_optimum: object = None  # the same, for plans that keep fp32 everywhere
    seconds: float = 0.0
    interrupted: bool = False
    new_trials: int = 0
    evaluator: object = None
    tp_size: int = 1  # GPUs per stage device (vllm-pp with tensor_parallel = "node")
    exports: list = field(default_factory=list)  # (target, Export | None, error) written with the outputs


def trace_cache_dir() -> Path:
    """Where recorded traces are kept between runs: $XCTUNE_CACHE, else ~/.cache/xctune."""
    import os

    root = os.environ.get("XCTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xctune"
    return Path(root) / "traces"


def _sampler(spec: StudySpec):
    name = spec.sampler
    if name == "auto":
        name = "tpe" if len(spec.objectives) == 1 else "nsga2"
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # multivariate TPE is marked experimental
            return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed)
    return optuna.samplers.RandomSampler(seed=spec.seed)


def open_study(spec: StudySpec) -> optuna.Study:
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.create_study(
            study_name=spec.name,
            storage=spec.storage_url,
            load_if_exists=True,
            directions=["maximize" if o in MAXIMISED else "minimize" for o in spec.objectives],
            sampler=_sampler(spec),
        )
    except ValueError as e:  # e.g. an existing study with other objectives
        raise BadInput(f"cannot open study {spec.name!r} in {spec.storage_url}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # SQLAlchemy errors: a bad URL, an unreachable server
        if "sqlalchemy" in type(e).__module__.lower() or "storage" in str(e).lower():
            raise BadInput(f"cannot use storage {spec.storage_url}: {str(e).splitlines()[0]}") from None
        raise


def twin_cluster(budgets: Cluster, calibration: str | None) -> Cluster:
    """Logical devices of a real study as the virtual twin sees them: each budget's memory, and
    the calibrated host's throughput and bandwidth where a calibration is given."""
    if not calibration:
        return budgets
    from dataclasses import replace

    from .calibrate import load_host_device

    host = load_host_device(calibration)
    gpus = tuple(replace(host, name=f"host ({g.name})", memory_bytes=g.memory_bytes) for g in budgets.gpus)
    return replace(budgets, gpus=gpus)


def build_cluster(spec: StudySpec) -> Cluster:
    extra = {}
    if spec.calibration:
        from .calibrate import load_host_device

        extra["host"] = load_host_device(spec.calibration)
    if not spec.gpus:
        raise BadInput("the study names no GPUs: set [cluster] gpus or pass --gpus")
    return make_cluster(spec.gpus, link=spec.link, headroom=spec.headroom, extra=extra)


def run_search(spec: StudySpec, progress: bool = True, log=print) -> SearchResult:
    t0 = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    model_spec = resolve_model(spec.model, spec.trust_remote_code)
    profile = model_spec.profile
    spec.workload.check_fits(profile.config)
    full = build_cluster(spec)
    if spec.real and spec.target.pipelined:
        raise BadInput(f"target {spec.target.name} runs on a cluster of GPUs: real studies measure accelerate "
                       f"placements on this machine; search it in the virtual world")
    # the devices the target's plans are written for: node 0 for accelerate, a device per node under TP
    cluster = target_cluster(full, spec.target)
    tp = TensorParallel(tp_size(full, spec.target), full.node_links[0]) if spec.target.tensor_parallel == "node" else None
    eff = Efficiency.load(spec.calibration) if spec.calibration else Efficiency()
    space = SearchSpace(profile, cluster, spec.space, spec.target)
    cache = trace_cache_dir()
    if spec.real:
        evaluator = RealEvaluator(spec, profile, cluster, eff, cache, model_spec)
    else:
        evaluator = VirtualEvaluator(spec, profile, cluster, eff, cache, tp)
    study = open_study(spec)
    _check_identity(study, spec, cluster)
    result = SearchResult(spec, study, profile, cluster, space, evaluator=evaluator, tp_size=tp.size if tp else 1)
    before = len([t for t in study.trials if t.state != optuna.trial.TrialState.WAITING])

    _enqueue_baselines(spec, study, space, profile, cluster, evaluator, log)
    if spec.real and spec.seed_plans:
        _enqueue_virtual_seeds(spec, study, space, evaluator, log)

    def objective(trial: optuna.Trial):
        plan = space.suggest(trial)
        label = trial.user_attrs.get("baseline") or trial.user_attrs.get("seed") or f"trial {trial.number}"
        reason = evaluator.precheck(plan)
        if reason:
            trial.set_user_attr("plan", plan.to_dict())
            trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)
        rec = evaluator(plan, label)
        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr("record", rec.to_dict())
        if rec.status in ("invalid", "error"):
            trial.set_user_attr("pruned", rec.cause)
            raise optuna.TrialPruned(rec.cause)  # the space should make this impossible; say so if not
        trial.set_constraint("memory", memory_violation(rec, cluster))
        if spec.fidelity_floor is not None and rec.fidelity_top1 is not None:
            trial.set_constraint("fidelity", spec.fidelity_floor - rec.fidelity_top1)
        return objective_values(rec, spec.objectives)

    waiting = len([t for t in study.trials if t.state == optuna.trial.TrialState.WAITING])
    n = spec.trials + waiting
    log(f"study {spec.name!r}: {n} trial(s) to run ({waiting} queued baselines/seeds + {spec.trials} sampled), "
        f"{before} already in {spec.storage_url}")
    bar = progress and sys.stderr.isatty()
    callbacks = [] if bar or not progress else [_progress_lines(n, log)]
    try:
        study.optimize(objective, n_trials=n, show_progress_bar=bar, catch=(RuntimeError,), callbacks=callbacks)
    except KeyboardInterrupt:
        result.interrupted = True
    result.new_trials = len([t for t in study.trials if t.state != optuna.trial.TrialState.WAITING]) - before
    from .report import collect_rows, pick_best

    result.records = collect_rows(study, spec.objectives) + _outside_rows(study)
    pick_best(result, evaluator)
    # The DP minimises the end-to-end latency of one request: the throughput of several requests
    # in flight is a max over stages, and their KV caches change what fits.
    exact = spec.objectives[0] == "latency" and spec.target.requests_in_flight == 1
    if not spec.real and not result.interrupted and exact:
        from .oracle import Oracle

        try:
            result.optimum = _priced(Oracle(evaluator.trace, space, cluster, eff).solve(), evaluator)
            if "fp32" in space.dtypes and len(space.dtypes) > 1:  # the answer to "can I keep fp32?"
                fp32 = SearchSpace(profile, cluster, replace(spec.space, dtypes=("fp32",), mixed_precision=False), spec.target)
                result.fp32_optimum = _priced(Oracle(evaluator.trace, fp32, cluster, eff).solve(), evaluator)
        except RuntimeError as e:
            log(f"no exact optimum: {e}")
    result.seconds = time.perf_counter() - t0
    return result


def _priced(optimum, evaluator):
    """The optimum's latency as the target prices it: tensor-parallel all-reduces are the same for
    every split (every layer sits on a TP stage), so they shift the DP's figure, not its argmin."""
    if optimum.plan is not None and evaluator.tp is not None:
        optimum.e2e_ms = evaluator(optimum.plan, "optimum").e2e_ms.median
    return optimum


def study_identity(spec: StudySpec, cluster: Cluster) -> dict:
    """What makes trials of one study comparable: resuming must not mix models, clusters or workloads."""
    return {
        "model": spec.model,
        "cluster": cluster.describe(),
        "headroom": cluster.headroom,
        "workload": spec.workload.to_dict(),
        "space": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.space.__dict__.items()},
        "real": spec.real,
        "objectives": list(spec.objectives),
        # only where it is not today's default, so studies made before targets existed still resume
        **({"target": spec.target.to_dict()} if spec.target != type(spec.target)() else {}),
    }


def _check_identity(study: optuna.Study, spec: StudySpec, cluster: Cluster) -> None:
    mine = json.loads(json.dumps(study_identity(spec, cluster)))
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", mine)
        return
    diff = [k for k in mine if stored.get(k) != mine[k]]
    if diff:
        k = diff[0]
        raise BadInput(
            f"study {spec.name!r} in {spec.storage_url} was run with another {k} ({stored.get(k)} vs {mine[k]}); "
            f"use --study-name or --out for a new study"
        )


def _progress_lines(total: int, log):
    """Where stderr is not a terminal: one line every tenth of the way, with the best so far."""
    step = max(1, total // 10)
    done = [0]

    def callback(study, trial):
        done[0] += 1
        if done[0] % step == 0 or done[0] == total:
            try:
                best = f"{study.best_trials[0].values[0]:.1f}" if study.best_trials else "none feasible yet"
            except ValueError:
                best = "none yet"
            log(f"  {done[0]}/{total} trials, best {best}")

    return callback


def _enqueue_baselines(spec, study, space, profile, cluster, evaluator, log) -> int:
    """Queue every baseline that is not in the study yet; record the raw maps the space cannot express."""
    done = {t.user_attrs.get("baseline") for t in study.trials}
    done |= {r.get("label") for r in study.user_attrs.get("outside", [])}
    by_params: dict[tuple, list[str]] = {}
    params_of: dict[tuple, dict] = {}
    outside = list(study.user_attrs.get("outside", []))
    for name in spec.baselines:
        try:
            plan = baseline_plan(name, profile, cluster, spec.baseline_dtype)
        except BadInput as e:
            log(f"baseline {name}: {e}")
            continue
        plan = Plan(plan.device_map, plan.dtypes, spec.space.skip_keys, name)
        params = space.params_of(plan)
        if params is None:
            # outside the space: accelerate's raw map (say why), and its nearest valid repair
            if name not in done:
                rec = evaluator.outside(plan, name)
                outside.append({**rec.to_dict(), "baseline": name})
            fixed = Plan(repair(plan.device_map, profile), plan.dtypes, plan.skip_keys, f"{name} (repaired)")
            params = space.params_of(fixed)
            name = f"{name} (repaired)"
            if params is None:
                continue
        key = tuple(sorted(params.items()))
        by_params.setdefault(key, []).append(name)
        params_of[key] = params
    if outside:
        study.set_user_attr("outside", outside)
    queued = 0
    for key, names in by_params.items():
        label = " = ".join(names)
        if label in done or any(n in done for n in names):
            continue
        study.enqueue_trial(params_of[key], user_attrs={"baseline": label}, skip_if_exists=False)
        queued += 1
    return queued


def _enqueue_virtual_seeds(spec, study, space, evaluator, log) -> int:
    """Real studies start from the virtual world's best few plans (design.md §5)."""
    if any(t.user_attrs.get("seed") for t in study.trials):
        return 0
    from .oracle import rank_plans

    ranked = rank_plans(evaluator.trace, space, evaluator.cluster, evaluator.eff, spec.seed_plans)
    for i, plan in enumerate(ranked):
        study.enqueue_trial(space.params_of(plan), user_attrs={"seed": f"virtual #{i + 1}"})
    if ranked:
        log(f"seeded with the virtual world's best {len(ranked)} plan(s)")
    return len(ranked)


def _outside_rows(study) -> list[dict]:
    rows = []
    for rec in study.user_attrs.get("outside", []):
        rows.append({**rec, "trial": None, "baseline": rec.get("baseline"), "feasible": False, "state": "OUTSIDE"})
    return rows

