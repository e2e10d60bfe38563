"""Where a study lives: Optuna's RDB storage, opened so that many workers can share it.

Several processes (on one machine or many) may open the same storage URL at the same moment.
What that takes with today's Optuna 5 / SQLAlchemy 2:
- the first open of a fresh database creates Optuna's tables; two workers racing there fail
  ("table ... already exists" on SQLite, `UniqueViolation pg_type_typname_nsp_index` on
  PostgreSQL). Opening is retried a few times on exactly those race errors: the loser finds the
  winner's tables on the next try.
- SQLite: Python's driver runs a SELECT outside any transaction, so Optuna's "claim a queued
  trial" (read the state, then write RUNNING) lets two workers claim the same trial, and the
  second `tell` then crashes ("Cannot tell a COMPLETE trial"). Every transaction here starts
  with `BEGIN IMMEDIATE` instead (the write lock up front: claims are serialised) and waits up
  to a minute for the lock. PostgreSQL locks the row itself (`SELECT ... FOR UPDATE`).
- heartbeats: a running trial records a heartbeat every `heartbeat` seconds; a trial silent for
  `grace` seconds (its process died) is failed and re-queued by the next worker that looks
  (Optuna's `fail_stale_trials` with `RetryFailedTrialCallback`). Optuna skips a RUNNING trial
  that never recorded a heartbeat (its worker died between taking it and the first beat):
  `never_beaten` finds those, by their start time, for the worker to fail and re-queue too.

Storage URLs may carry a password: `mask_url` is what every message and file shows instead.
"""

from __future__ import annotations

import random
import re
import sqlite3
import time
import warnings
from dataclasses import dataclass

from ..errors import BadInput

# the messages of a lost race while creating Optuna's tables or its version rows
_RACE = re.compile(r"already exists|UniqueViolation|duplicate key|UNIQUE constraint failed|database is locked",
                   re.IGNORECASE)


def mask_url(url: str) -> str:
    """The URL with its password (and any password-like query value) replaced by ***."""
    masked = re.sub(r"(://[^/:@]*:)([^@/]*)(@)", r"\1***\3", url)
    return re.sub(r"((?:password|passwd|pwd|secret|token)=)[^&]*", r"\1***", masked, flags=re.IGNORECASE)


def mask_secrets(text: str, url: str) -> str:
    """A message that may quote the URL or its password: both masked."""
    m = re.search(r"://[^/:@]*:([^@/]*)@", url)
    text = text.replace(url, mask_url(url))
    if m and m.group(1):
        text = text.replace(m.group(1), "***")
    return text


@dataclass(frozen=True)
class Liveness:
    """How a dead worker is noticed: a heartbeat every `heartbeat` s; `grace` s of silence and its
    running trial is failed and queued again."""

    heartbeat: int = 5
    grace: int = 20

    def __post_init__(self):
        if not (isinstance(self.heartbeat, int) and self.heartbeat >= 1 and isinstance(self.grace, int)
                and self.grace > self.heartbeat):
            raise BadInput(f"heartbeat must be a whole number of seconds >= 1 and grace longer than it, "
                           f"got heartbeat {self.heartbeat!r}, grace {self.grace!r}")

    @classmethod
    def every(cls, heartbeat: int) -> "Liveness":
        """The usual pairing: a worker is given up after four missed heartbeats."""
        return cls(heartbeat, 4 * heartbeat)


class _ImmediateCursor(sqlite3.Cursor):
    def execute(self, sql, parameters=()):
        if not self.connection.in_transaction:
            super().execute("BEGIN IMMEDIATE")
        return super().execute(sql, parameters)

    def executemany(self, sql, seq_of_parameters):
        if not self.connection.in_transaction:
            super().execute("BEGIN IMMEDIATE")
        return super().executemany(sql, seq_of_parameters)


class _ImmediateConnection(sqlite3.Connection):
    """A connection whose every transaction, reads included, starts with BEGIN IMMEDIATE.

    The database runs in WAL mode with `synchronous=NORMAL`: a commit is appended to the log
    without waiting for the disk (the log is synced at checkpoints). A worker killed at any point
    loses nothing it committed; only a crash of the machine itself can lose the last commits.
    Optuna writes every step of a trial in its own transaction, so this is most of a trial's
    cost on a slow disk."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plain = sqlite3.Cursor(self)  # outside BEGIN IMMEDIATE: journal_mode cannot change in a transaction
        plain.execute("PRAGMA journal_mode=WAL")
        plain.execute("PRAGMA synchronous=NORMAL")
        plain.close()

    def cursor(self, factory=_ImmediateCursor):
        return super().cursor(factory)


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # isolation_level=None: the driver opens no transaction of its own; our cursor opens them
        return {"connect_args": {"factory": _ImmediateConnection, "isolation_level": None, "timeout": 60,
                                 "check_same_thread": False}}
    return {"pool_pre_ping": True}


def open_storage(url: str, liveness: Liveness = Liveness(), attempts: int = 8):
    """Optuna's RDB storage for `url`, with heartbeats and retries of trials whose worker died."""
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    if url.startswith("sqlite"):
        # Optuna's schema set-up holds one connection open while it opens another: with BEGIN IMMEDIATE
        # the two would wait for each other. Set the schema up with the driver's own transactions first.
        _retry_races(url, attempts, lambda: RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}).engine.dispose())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat_interval is marked experimental
        return _retry_races(url, attempts, lambda: RDBStorage(
            url,
            engine_kwargs=_engine_kwargs(url),
            heartbeat_interval=liveness.heartbeat,
            grace_period=liveness.grace,
            # a trial is re-run at most twice: a plan that kills its worker every time stays failed
            heartbeat_stale_trial_callback=RetryFailedTrialCallback(max_retry=2),
            skip_table_creation=url.startswith("sqlite"),
            skip_compatibility_check=url.startswith("sqlite"),  # checked by the set-up above
        ))


def _retry_races(url: str, attempts: int, make):
    """make(), again after a short random pause when it lost a race with another worker."""
    for attempt in range(attempts):
        try:
            return make()
        except Exception as e:  # noqa: BLE001 - SQLAlchemy, the driver and Optuna each have their own
            text = f"{type(e).__name__}: {e} {e.__cause__}"
            if _RACE.search(text) and attempt + 1 < attempts:
                time.sleep(0.2 + random.random() * 0.5 * (attempt + 1))  # another worker is creating it
                continue
            if isinstance(e, ImportError):
                raise BadInput(f"cannot use storage {mask_url(url)}: its database driver is not installed "
                               f"(PostgreSQL: pip install 'xctune[postgres]')") from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BadInput(f"cannot use storage {mask_url(url)}: {mask_secrets(first, url)[:300]}") from None


def never_beaten(storage, study_id: int, older_than_s: float) -> list[int]:
    """RUNNING trials of a study with no heartbeat at all, started more than `older_than_s` ago.

    A live worker records its trial's first heartbeat within milliseconds of taking it, so such a
    trial lost its worker. Optuna keeps each trial's heartbeat in its own table, which its public
    API does not expose; this reads it the way Optuna's own stale-trial query does. Start times
    are the workers' clocks (Optuna writes `datetime_start` in Python): across machines, the grace
    period must cover their skew."""
    import datetime

    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState
    from sqlalchemy import orm

    if not hasattr(storage, "scoped_session"):
        return []  # not an RDB storage (an in-memory study has one process: nothing dies unseen)
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=older_than_s)
    with _create_scoped_session(storage.scoped_session) as session:
        running = (session.query(models.TrialModel)
                   .options(orm.selectinload(models.TrialModel.heartbeats))
                   .filter(models.TrialModel.state == TrialState.RUNNING, models.TrialModel.study_id == study_id)
                   .all())
        return [t.trial_id for t in running
                if not t.heartbeats and t.datetime_start is not None and t.datetime_start < cutoff]
