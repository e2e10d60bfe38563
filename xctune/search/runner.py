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
from dataclasses import dataclass, field, replace
from pathlib import Path


import optuna

from ..atomic import check_writable
from ..plans.baselines import baseline_plan, has_baseline, repair
from ..worlds.costmodel import Efficiency
from ..errors import BadInput
from ..hardware import Cluster, make_cluster
from ..models.loading import resolve_model
from ..plans.plan import Plan
from ..record import TrialRecord
from ..worlds.simulate import failed_record, record_from_estimate, simulate
from .space import SearchSpace
from .storage import mask_url, open_storage
from .study import MAXIMISED, StudySpec
from .targets import TensorParallel, serving_estimate, serving_fields, target_cluster, tp_size
from ..worlds import trace_cache
from ..worlds.trace import InvalidPlan, Trace
from .worker import Worker

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
        """A plan the space cannot express (accelerate's raw map). The trace judges it where it can: its
        verdicts are the dry run's (tested on field and random maps); a map that splits a unit needs the dry run."""
        try:
            self.trace.unit_devices(plan)
        except InvalidPlan:
            return simulate(self.profile, plan, self.spec.workload, self.cluster, self.eff, label=label)
        return self(plan, label)

    def precheck(self, plan: Plan) -> str | None:
        return None


class RealEvaluator(VirtualEvaluator):
    """Trials measured on this machine; the virtual twin prices plans to prune and to seed."""

    source = "measured"

    def __init__(self, spec, profile, cluster, eff, cache_dir, model_spec):
        from ..worlds.calibrate import twin_cluster

        # the twin sees the budgets as devices; with a calibration, at this machine's measured speed
        super().__init__(spec, profile, twin_cluster(cluster, spec.calibration), eff, cache_dir)
        from ..worlds.real import HostExecutor

        self.model_spec = model_spec
        self.executor = HostExecutor(model_spec, spec.workload, repeats=spec.repeats, budget=cluster, threads=spec.threads)

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
    new_trials: int = 0  # trials this worker ran
    tally: object = None  # worker.Tally: sampled and queued trials this worker ran
    evaluator: object = None
    tp_size: int = 1  # GPUs per stage device (vllm-pp with tensor_parallel = "node")
    exports: list = field(default_factory=list)  # (target, Export | None, error) written with the outputs


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


def open_study(spec: StudySpec, storage=None) -> tuple[optuna.Study, bool]:
    """The study, and whether this call created it. Many workers may open one study at once: exactly
    one of them creates it (Optuna's unique study name decides), and only that one queues the
    baselines, so they are in the study once."""
    if spec.storage is None:  # the default SQLite file lives in the output folder
        check_writable(spec.out_dir)
    storage = storage or open_storage(spec.storage_url, spec.liveness)
    where = mask_url(spec.storage_url)
    try:
        study = optuna.create_study(study_name=spec.name, storage=storage, load_if_exists=False,
                                    directions=_directions(spec), sampler=_sampler(spec))
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(study_name=spec.name, storage=storage, sampler=_sampler(spec))
    if [d.name.lower() for d in study.directions] != _directions(spec):
        raise BadInput(f"study {spec.name!r} in {where} has objective directions "
                       f"{', '.join(d.name.lower() for d in study.directions)}, this run {', '.join(_directions(spec))}; "
                       f"use --study-name or --out for a new study")
    return study, False


def _directions(spec: StudySpec) -> list[str]:
    return ["maximize" if o in MAXIMISED else "minimize" for o in spec.objectives]


def build_cluster(spec: StudySpec) -> Cluster:
    extra = {}
    if spec.calibration:
        from ..worlds.calibrate import load_host_device

        extra["host"] = load_host_device(spec.calibration)
    if not spec.gpus:
        raise BadInput("the study names no GPUs: set [cluster] gpus or pass --gpus")
    return make_cluster(spec.gpus, link=spec.link, headroom=spec.headroom, extra=extra)


def run_search(spec: StudySpec, progress: bool = True, log=print) -> SearchResult:
    t0 = time.perf_counter()
    check_writable(spec.out_dir)  # the outputs (and the default SQLite study) go there: fail now, not after the trials
    storage = open_storage(spec.storage_url, spec.liveness)  # likewise a bad URL or an unreachable server
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    model_spec = resolve_model(spec.model, spec.trust_remote_code, attn=spec.attn)
    if spec.loader != "xctune":
        # optimise for the path users will take: its skip keys in every trial and baseline
        from ..models.loading import loading_path

        spec = replace(spec, space=replace(spec.space, skip_keys=loading_path(spec.loader).skip_keys))
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
    cache = trace_cache.default_dir()
    if spec.real:
        evaluator = RealEvaluator(spec, profile, cluster, eff, cache, model_spec)
    else:
        evaluator = VirtualEvaluator(spec, profile, cluster, eff, cache, tp)
    embed_on_main = evaluator.trace.joins_main(profile.embed_group, spec.baseline_dtype)
    space = SearchSpace(profile, cluster, spec.space, spec.target, embed_on_main)
    study, created = open_study(spec, storage)
    if not created:
        _wait_until_ready(study, spec, log)
        _check_identity(study, spec, cluster, profile.attention)
    result = SearchResult(spec, study, profile, cluster, space, evaluator=evaluator, tp_size=tp.size if tp else 1)
    before = len([t for t in study.trials if t.state != optuna.trial.TrialState.WAITING])

    # the creator queues what every worker shares; a resume queues only what is missing
    _enqueue_baselines(spec, study, space, profile, cluster, evaluator, log)
    if spec.real and spec.seed_plans:
        _enqueue_virtual_seeds(spec, study, space, evaluator, log)
    if created:
        _check_identity(study, spec, cluster, profile.attention)  # written last: it tells other workers the study is ready

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
    log(f"study {spec.name!r}: {spec.trials} sampled trial(s) to run here, and the {waiting} queued one(s) "
        f"(baselines, seeds, re-runs) shared with any other worker; {before} already in {mask_url(spec.storage_url)}")
    worker = Worker(study, storage, objective, spec.liveness, on_trial=_progress(spec.trials + waiting, progress, log))
    try:
        worker.run(spec.trials)
    except KeyboardInterrupt:
        result.interrupted = True
    result.tally = worker.tally
    result.new_trials = worker.tally.total
    if worker.tally.lost:
        log(f"trial(s) {', '.join(map(str, worker.tally.lost))} went silent for over {spec.liveness.grace} s "
            f"and were queued again by another worker")
    from ..reports.report import collect_rows, pick_best

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
                fp32 = SearchSpace(profile, cluster, replace(spec.space, dtypes=("fp32",), mixed_precision=False),
                                   spec.target, embed_on_main)
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


def study_identity(spec: StudySpec, cluster: Cluster, attn: str) -> dict:
    """What makes trials of one study comparable: resuming must not mix models, clusters or workloads."""
    return {
        "model": spec.model,
        "attention": attn,
        "cluster": cluster.describe(),
        "headroom": cluster.headroom,
        "workload": spec.workload.to_dict(),
        "space": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.space.__dict__.items()},
        "real": spec.real,
        "objectives": list(spec.objectives),
        # only where it is not today's default, so studies made before targets existed still resume
        **({"target": spec.target.to_dict()} if spec.target != type(spec.target)() else {}),
    }


def _check_identity(study: optuna.Study, spec: StudySpec, cluster: Cluster, attn: str) -> None:
    mine = json.loads(json.dumps(study_identity(spec, cluster, attn)))
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", mine)
        return
    diff = [k for k in mine if stored.get(k) != mine[k]]
    if diff:
        k = diff[0]
        raise BadInput(
            f"study {spec.name!r} in {mask_url(spec.storage_url)} was run with another {k} ({stored.get(k)} vs {mine[k]}); "
            f"use --study-name or --out for a new study"
        )


def _progress(total: int, progress: bool, log):
    """A progress bar on a terminal; elsewhere one line every tenth of the way, with the best so far.
    `total` counts the queued trials seen at the start: other workers may take some of them."""
    if not progress:
        return None
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, file=sys.stderr, leave=False)
        return lambda study, trial: bar.update(1)
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


def baseline_precisions(spec: StudySpec, space: SearchSpace) -> list[str]:
    """Each baseline runs in the study's baseline dtype and in every precision the space allows, so that
    a gain can be split into placement (same precision) and precision (same map)."""
    return list(dict.fromkeys([spec.baseline_dtype, *space.dtypes]))


def baseline_key(name: str, dtype: str) -> str:
    """One baseline at one precision, as the leaderboard labels it: `authors @ fp16`."""
    return f"{name} @ {dtype}"


def _wait_until_ready(study: optuna.Study, spec: StudySpec, log, timeout: float = 60.0) -> None:
    """A study another worker has just created: wait until it has queued the baselines (it writes
    the study's identity last). A creator that died meanwhile is replaced after `timeout` s."""
    t0 = time.monotonic()
    while "identity" not in study.user_attrs and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    if "identity" not in study.user_attrs:
        log(f"study {spec.name!r} was created by a worker that never finished setting it up; this one does")


def _enqueue_baselines(spec, study, space, profile, cluster, evaluator, log) -> int:
    """Queue every baseline at every precision that is not in the study yet; record the raw maps the space
    cannot express. Baselines that land on the same plan are one trial (`authors = single @ fp16`)."""
    done = set()
    for t in study.trials:
        done.update(t.user_attrs.get("baseline_keys") or [t.user_attrs.get("baseline")])
    done |= {r.get("baseline") for r in study.user_attrs.get("outside", [])}
    by_params: dict[tuple, list[str]] = {}
    params_of: dict[tuple, dict] = {}
    outside = list(study.user_attrs.get("outside", []))
    names = [n for n in spec.baselines if has_baseline(n, profile)]
    if "authors" in set(spec.baselines) - set(names):
        log(f"baseline authors: {profile.config.name} has no published splitting recipe")
    for dtype in baseline_precisions(spec, space):
        for name in names:
            try:
                plan = baseline_plan(name, profile, cluster, dtype)
            except BadInput as e:
                log(f"baseline {name} in {dtype}: {e}")
                continue
            key = baseline_key(name, dtype)
            plan = Plan(plan.device_map, plan.dtypes, spec.space.skip_keys, key)
            params = space.params_of(plan)
            if params is None:
                # outside the space: accelerate's raw map (say why), and its nearest valid repair
                if key not in done:
                    rec = evaluator.outside(plan, key)
                    outside.append({**rec.to_dict(), "baseline": key, "baseline_keys": [key]})
                key = baseline_key(f"{name} (repaired)", dtype)
                params = space.params_of(Plan(repair(plan.device_map, profile), plan.dtypes, plan.skip_keys, key))
                if params is None:
                    continue
            group = tuple(sorted(params.items()))
            by_params.setdefault(group, []).append(key)
            params_of[group] = params
    if outside:
        study.set_user_attr("outside", outside)
    queued = 0
    for group, keys in by_params.items():
        if any(k in done for k in keys):
            continue
        dtypes = {k.rsplit(" @ ", 1)[1] for k in keys}
        label = " = ".join(k.rsplit(" @ ", 1)[0] for k in keys) + f" @ {dtypes.pop()}" if len(dtypes) == 1 else " = ".join(keys)
        study.enqueue_trial(params_of[group], user_attrs={"baseline": label, "baseline_keys": keys}, skip_if_exists=False)
        queued += 1
    return queued


def _enqueue_virtual_seeds(spec, study, space, evaluator, log) -> int:
    """Real studies start from the virtual world's best few plans (design.md §5), where the twin has
    earned it: a calibration whose measured rank agreement reached calibrate.TRUSTED_TAU and whose
    probe says this machine has not changed since. Otherwise no seeds: the baselines and the sampler."""
    if any(t.user_attrs.get("seed") for t in study.trials):
        return 0
    from ..worlds.calibrate import twin_trust
    from .oracle import rank_plans

    trusted, why = twin_trust(spec.calibration, evaluator.model_spec, spec.threads)
    study.set_user_attr("twin", {"trusted": trusted, "why": why})
    if not trusted:
        log(f"not seeding from the virtual twin: {why}")
        return 0
    log(f"virtual twin: {why}")

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

