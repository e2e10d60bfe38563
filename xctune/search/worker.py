"""One worker of a study: the trial loop that many processes can run on one storage at once.

Each worker runs its own quota of *sampled* trials, and on the way any *queued* trial it can
claim (baselines, seed plans, re-runs of trials whose worker died or was interrupted). Queued
trials are claimed one at a time with Optuna's own atomic claim (a WAITING -> RUNNING update that
only one worker wins), so no trial runs twice and the study ends with exactly the baselines once
plus N x quota sampled trials. `study.optimize` cannot promise that: once its quota is reached a
worker may still `ask` for "the last queued trial", lose the race for it, and get a new sampled
trial instead.

While a trial runs, a thread records its heartbeat; a trial whose heartbeat stopped (its process
was killed) is failed and queued again by Optuna's `fail_stale_trials` and
`RetryFailedTrialCallback`, which every worker calls before each trial. A worker that has used up
its quota waits, at most one grace period, for trials still running elsewhere: a dead worker's
trial is then re-run before the study is reported, and a resume right after a crash re-runs it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from .storage import Liveness, never_beaten


def worker_id() -> str:
    """Which process ran a trial: host and process id (kept in the trial's user attributes)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Tally:
    """What this worker ran (it counts as it goes, so it is not frozen)."""

    sampled: int = 0  # new trials drawn by the sampler
    queued: int = 0  # baselines, seeds and re-runs claimed from the queue
    lost: list[int] = field(default_factory=list)  # trials another worker gave up on while this one ran them

    @property
    def total(self) -> int:
        return self.sampled + self.queued


class _Heartbeat:
    def __init__(self, storage, trial_id: int, seconds: int):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(storage, trial_id, seconds), daemon=True)

    def _beat(self, storage, trial_id, seconds):
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # noqa: BLE001 - a missed beat is retried; too many and the trial is re-run
                pass
            if self._stop.wait(seconds):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _is_queued(frozen: optuna.trial.FrozenTrial) -> bool:
    """Was this trial waiting in the queue (enqueued or a re-run) rather than drawn by the sampler?"""
    return "fixed_params" in frozen.system_attrs or "failed_trial" in frozen.system_attrs


def _requeue(study, frozen) -> None:
    """Queue a trial that did not finish (interrupted here) again, as a dead worker's trial is."""
    optuna.storages.RetryFailedTrialCallback(max_retry=2)(study, frozen)


class Worker:
    def __init__(self, study: optuna.Study, storage, objective, liveness: Liveness, catch=(RuntimeError,),
                 on_trial=None):
        self.study, self.storage, self.objective, self.liveness = study, storage, objective, liveness
        self.catch, self.on_trial = catch, on_trial
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.me = worker_id()
        self.tally = Tally()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, quota: int) -> Tally:
        waited_since = None
        while True:
            self._fail_stale()
            trial = self._claim_queued()
            if trial is None and self.tally.sampled < quota:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize": we beat
                    trial = self.study.ask()  # a new trial, or a queued one that appeared meanwhile
            if trial is not None:
                waited_since = None
                self._run(trial)
                continue
            # quota used up, nothing queued: wait (bounded) for trials still running elsewhere
            if not self._running_elsewhere():
                break
            now = time.monotonic()
            waited_since = waited_since or now
            if now - waited_since > self.liveness.grace + 2 * self.liveness.heartbeat:
                break
            time.sleep(min(1.0, self.liveness.heartbeat))
        return self.tally

    def _fail_stale(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental
            optuna.storages.fail_stale_trials(self.study)
        # ... and trials whose worker died before their first heartbeat, which Optuna never judges
        for trial_id in never_beaten(self.storage, self.study_id, self.liveness.grace):
            try:
                if self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    _requeue(self.study, self.storage.get_trial(trial_id))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker got there first

    def _claim_queued(self) -> optuna.Trial | None:
        for t in self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.WAITING,)):
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
            try:
                if self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):  # only one worker wins
                    return optuna.Trial(self.study, trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    def _running_elsewhere(self) -> bool:
        return bool(self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.RUNNING,)))

    def _run(self, trial: optuna.Trial) -> None:
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
        queued = _is_queued(self.storage.get_trial(trial_id))
        values, state = None, TrialState.COMPLETE
        with _Heartbeat(self.storage, trial_id, self.liveness.heartbeat):
            try:
                trial.set_user_attr("worker", self.me)
                values = self.objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except self.catch as e:
                state = TrialState.FAIL
                trial.set_user_attr("error", f"{type(e).__name__}: {str(e).strip()[:300]}")
            except BaseException:  # Ctrl-C (or a bug): the trial did not finish; queue it again, then stop
                frozen = self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                if frozen.state == TrialState.FAIL:
                    _requeue(self.study, frozen)
                raise
        frozen = self.study.tell(trial, values if state == TrialState.COMPLETE else None, state=state,
                                 skip_if_finished=True)
        if frozen.state != state:  # another worker found its heartbeat stale and queued it again
            self.tally.lost.append(trial.number)
        if queued:
            self.tally.queued += 1
        else:
            self.tally.sampled += 1
        if self.on_trial:
            self.on_trial(self.study, frozen)
