"""Many workers on one study, on SQLite and PostgreSQL: real processes, kill -9, Ctrl-C, resume.

Each worker is `python tests/slow_worker.py search ...`: the real CLI with its virtual trials
slowed a little, so that a test can kill a worker while one of its trials is running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT
from xctune.cli import main

WORKER = [sys.executable, str(ROOT / "tests" / "slow_worker.py"), "search", "--model", "tiny", "--gpus", "2x1GiB",
          "--heartbeat", "1"]
TRIALS = 3  # sampled trials per worker


@pytest.fixture(scope="session")
def postgres_url():
    """$XCTUNE_TEST_POSTGRES_URL (.ci/run starts a server and sets it), else a throwaway server of our own."""
    url = os.environ.get("XCTUNE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    try:
        import psycopg  # noqa: F401 - SQLAlchemy 2.1's default driver for postgresql:// URLs
    except ImportError:
        pytest.skip("PostgreSQL test skipped: the driver is missing (pip install -e '.[test,postgres]') and "
                    "XCTUNE_TEST_POSTGRES_URL is not set")
    if not (shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))):
        pytest.skip("PostgreSQL test skipped: no XCTUNE_TEST_POSTGRES_URL and no initdb/pg_ctl to start a "
                    "throwaway server (apt-get install postgresql)")
    parent = tempfile.mkdtemp(prefix="xctune-pg-")
    os.chmod(parent, 0o755)  # the server runs as `postgres` when we are root
    folder = os.path.join(parent, "pg")
    script = str(ROOT / "scripts" / "throwaway-postgres")
    started = subprocess.run([script, "start", folder], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        yield started.stdout.strip()
    finally:
        subprocess.run([script, "stop", folder], capture_output=True, timeout=120)
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgres_url")


def start(args, log: Path, hang_at: int = 0, **env):
    e = {**os.environ, "SLOW_WORKER_LOG": str(log), "SLOW_WORKER_HANG_AT": str(hang_at), **env}
    return subprocess.Popen(WORKER + args, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=150):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for_lines(log: Path, proc, n: int, timeout=150):
    """Until worker `proc` has started its n-th evaluation."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if log.exists() and sum(line.split()[0] == str(proc.pid) for line in log.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker ended (exit {proc.returncode}) before evaluation {n}: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"worker {proc.pid} did not start evaluation {n}")


def wait_until_set_up(storage: str, name: str, procs, timeout=150):
    """Until the study exists and its creator has written its identity (written last, after the baselines)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if "identity" in optuna.load_study(study_name=name, storage=storage).user_attrs:
                return
        except KeyError:  # not created yet
            pass
        if all(p.poll() is not None for p in procs):
            raise AssertionError(f"every worker ended before the study was set up: {[p.communicate() for p in procs]}")
        time.sleep(0.2)
    raise AssertionError(f"study {name} was not set up within {timeout} s")


def queued(t) -> bool:
    return "fixed_params" in t.system_attrs or "failed_trial" in t.system_attrs


@pytest.mark.may_skip("PostgreSQL test skipped")  # a machine without PostgreSQL; CI starts one
def test_three_workers_a_kill_and_a_resume_keep_exact_counts(storage, tmp_path, capsys):
    name = f"w{os.getpid()}-{time.monotonic_ns()}"  # one study per run (the PostgreSQL server may be shared)
    common = ["--storage", storage, "--study-name", name, "--out", str(tmp_path / "out"), "--trials", str(TRIALS)]
    log = tmp_path / "evaluations.log"
    workers = [start(common, log) for _ in range(2)]
    # the victim starts once the study is set up: the creator's first evaluations are accelerate's
    # raw maps, judged while it queues the baselines, and a victim killed there would hold no trial
    wait_until_set_up(storage, name, workers)
    victim = start(common, log, hang_at=2)  # its 2nd trial hangs: killed there
    wait_for_lines(log, victim, 2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    for w in workers:
        code, out, err = finish(w)
        assert code == 0 and "Traceback" not in err, err
        assert f"run by this worker" in out
    # a resume right away (in this process): it re-runs the killed trial if the others have not yet, and adds one
    code = main(WORKER[2:] + common[:-1] + ["1"])
    out = capsys.readouterr().out
    assert code == 0

    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.trials
    ids = {t.user_attrs.get("worker", "").rpartition(":")[2] for t in trials}
    assert str(victim.pid) in ids and len(ids) == 4  # 2 workers, the victim, the resume (this process)
    # nothing left behind: no trial running or waiting
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # exactly one trial failed: the victim's, killed while it ran; re-run once, with the same plan
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["worker"].endswith(f":{victim.pid}")
    reruns = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(reruns) == 1 and reruns[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert reruns[0].params == failed[0].params and reruns[0].user_attrs.get("baseline") == failed[0].user_attrs.get("baseline")
    # the baselines once each (the killed one's re-run standing in for it)
    done = [t for t in trials if t.state != TrialState.FAIL]
    labels = [t.user_attrs["baseline"] for t in done if t.user_attrs.get("baseline")]
    enqueued = [t for t in trials if "fixed_params" in t.system_attrs and "failed_trial" not in t.system_attrs]
    assert len(labels) == len(set(labels)) == len(enqueued) >= 3 and any(l.startswith("authors") for l in labels)
    # sampled trials: TRIALS per surviving worker, 1 for the resume, and the victim's until it died
    sampled = {}
    for t in trials:
        if not queued(t):
            pid = t.user_attrs["worker"].rpartition(":")[2]
            sampled[pid] = sampled.get(pid, 0) + 1
    victim_sampled = sampled.pop(str(victim.pid), 0)
    assert sorted(sampled.values()) == [1, TRIALS, TRIALS]
    assert victim_sampled <= 2  # it hung on its 2nd evaluation
    assert len(trials) == len(enqueued) + 2 * TRIALS + 1 + victim_sampled + 1  # + the re-run
    # every worker counted its own trials and the study's
    assert "the study holds" in out and "from 4 worker(s)" in out


def test_ctrl_c_exits_130_in_one_line_and_writes_the_finished_trials(tmp_path):
    out = tmp_path / "out"
    common = ["--out", str(out), "--trials", "4"]
    log = tmp_path / "evaluations.log"
    # evaluations 1-3 are accelerate's raw balanced map at three precisions, judged while the
    # baselines are queued; 4 and 5 are trials of the study; the 6th hangs and is interrupted
    proc = start(common, log, hang_at=6)
    wait_for_lines(log, proc, 6)
    proc.send_signal(signal.SIGINT)
    code, stdout, err = finish(proc)
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1].startswith("xctune: interrupted: the finished trials are kept")
    assert "interrupted: the finished trials are kept" in stdout
    board = (out / "leaderboard.csv").read_text().splitlines()
    assert len(board) - 1 >= 2  # the two finished trials (plus the raw accelerate map, outside the space)
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == 2
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    interrupted = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 1 and any(t.system_attrs.get("failed_trial") == interrupted[0].number for t in waiting)
    # the resume (in this process) runs the interrupted trial again, first
    assert main(WORKER[2:] + common[:-1] + ["0"]) == 0
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{out / 'study.db'}")
    assert not [t for t in study.trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_run_again(storage, tmp_path):
    """Optuna never judges a RUNNING trial without a heartbeat; the worker's sweep fails it and queues it again."""
    import datetime

    from optuna.distributions import FloatDistribution

    from xctune.search.storage import Liveness, never_beaten, open_storage
    from xctune.search.worker import Worker

    liveness = Liveness(1, 2)
    name = f"never-beaten-{tmp_path.name}"  # one PostgreSQL server serves every test of the session
    storage = open_storage(storage, liveness)
    study = optuna.create_study(study_name=name, storage=storage)
    study_id = storage.get_study_id_from_name(name)
    x = FloatDistribution(0.0, 1.0)

    def running_since(seconds_ago: float) -> int:
        start = datetime.datetime.now() - datetime.timedelta(seconds=seconds_ago)
        frozen = optuna.trial.FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, datetime_start=start,
                                          datetime_complete=None, params={"x": 0.25}, distributions={"x": x},
                                          user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=-1)
        return storage.create_new_trial(study_id, template_trial=frozen)

    dead = running_since(3600)  # taken an hour ago, never a heartbeat: its worker died in between
    young = running_since(0)  # just taken: its first heartbeat may still be on its way
    assert never_beaten(storage, study_id, liveness.grace) == [dead]
    storage.record_heartbeat(young)
    storage.set_trial_state_values(young, state=TrialState.COMPLETE, values=[1.0])

    seen = []
    tally = Worker(study, storage, lambda t: seen.append(t.suggest_float("x", 0.0, 1.0)) or 0.0, liveness).run(quota=0)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[2].params == {"x": 0.25} and seen == [0.25]  # the same plan, run again once
    assert tally.queued == 1 and tally.sampled == 0
