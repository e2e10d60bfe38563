"""Outputs written whole or not at all; unwritable outputs refused before any work; secrets masked."""

from __future__ import annotations

import errno
import json
import os

import optuna
import pytest

from xctune import atomic
from xctune.atomic import OutputSet, check_writable, write_text
from xctune.cli import main
from xctune.errors import BadInput
from xctune.search.storage import Liveness, mask_secrets, mask_url, open_storage

TINY = ["search", "--model", "tiny", "--gpus", "2x1GiB", "--json"]


def test_mask_url_hides_passwords_everywhere():
    assert mask_url("postgresql://ann:s3cr%40t@db.example:5432/xc") == "postgresql://ann:***@db.example:5432/xc"
    assert mask_url("postgresql+psycopg://u:p@h/db?sslmode=require&password=x1") == \
        "postgresql+psycopg://u:***@h/db?sslmode=require&password=***"
    assert mask_url("sqlite:////tmp/a:b/study.db") == "sqlite:////tmp/a:b/study.db"  # no user, nothing to hide
    url = "postgresql://ann:hunter2@127.0.0.1:1/xc"
    assert "hunter2" not in mask_secrets(f"cannot reach {url}: password hunter2 rejected", url)


def test_a_storage_error_never_prints_the_password(capsys, tmp_path):
    url = "postgresql://ann:hunter2@127.0.0.1:1/xc"  # nothing listens on port 1
    code = main(TINY + ["--trials", "1", "--storage", url, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "hunter2" not in err and "ann:***@" in err


def test_an_output_set_replaces_together_or_changes_nothing(tmp_path, monkeypatch):
    with OutputSet(tmp_path, names=("a.txt", "b.txt", "c.txt")) as out:
        out.write_text("a.txt", "old a")
        out.write_text("b.txt", "old b")
        out.write_text("c.txt", "old c")
    # a full disk while renaming the second file: no temporary file is left, nothing half-written
    real = os.replace
    calls = []

    def full(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(BadInput, match="cannot write .*b.txt: No space left on device"):
        with OutputSet(tmp_path, names=("a.txt", "b.txt", "c.txt")) as out:
            out.write_text("a.txt", "new a")
            out.write_text("b.txt", "new b")
    monkeypatch.setattr(atomic.os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt"]
    assert (tmp_path / "b.txt").read_text() == "old b"
    # a failure while staging (before any rename) changes nothing at all
    with pytest.raises(RuntimeError):
        with OutputSet(tmp_path, names=("a.txt", "b.txt", "c.txt")) as out:
            out.write_text("a.txt", "newer a")
            raise RuntimeError("the plot failed")
    assert (tmp_path / "a.txt").read_text() == "new a" and len(list(tmp_path.iterdir())) == 3
    # a run that produces fewer files removes the earlier run's others
    with OutputSet(tmp_path, names=("a.txt", "b.txt", "c.txt")) as out:
        out.write_text("a.txt", "only a")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    write_text(tmp_path / "d.txt", "x")
    assert oct((tmp_path / "d.txt").stat().st_mode & 0o777) != oct(0o600)  # a plain file's permissions


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    from xctune.worlds import calibrate as cal_mod
    from xctune.search import runner as search_mod

    monkeypatch.setattr(cal_mod, "calibrate", lambda *a, **k: pytest.fail("calibrate ran before --out was checked"))
    monkeypatch.setattr(search_mod, "resolve_model", lambda *a, **k: pytest.fail("search ran before --out was checked"))
    for args in (TINY + ["--out", str(blocker / "x")],
                 ["calibrate", "--out", str(blocker / "x" / "host.json")],
                 ["report", str(tmp_path), "--out", str(blocker / "x")]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot write to" in err and "Not a directory" in err, err


def test_a_failed_write_exits_2_and_keeps_the_trials(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    assert main(TINY + ["--trials", "2", "--out", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "study.db"}
    assert {"best_map.json", "leaderboard.csv", "history.png"} <= set(first)
    capsys.readouterr()
    real = os.replace

    def full(src, dst):
        if str(dst).endswith("leaderboard.md"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", full)
    code = main(TINY + ["--trials", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "leaderboard.md: No space left on device" in err and "finished trials are kept" in err
    # the trials of the failed run are in the study; the earlier outputs are intact, no temporary file left
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{out / 'study.db'}")
    assert len([t for t in study.trials if t.state.is_finished()]) == len(study.trials) >= 2 + 2 + 3
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "study.db"}
    assert sorted(kept) == sorted(first)
    assert json.loads(kept["best_map.json"]) == json.loads(first["best_map.json"])
    monkeypatch.setattr(atomic.os, "replace", real)
    # --trials 0 writes the outputs of what the study holds
    assert main(TINY + ["--trials", "0", "--out", str(out)]) == 0
    board = (out / "leaderboard.csv").read_text()
    assert board != first["leaderboard.csv"].decode()


def test_no_feasible_plan_removes_the_earlier_best_map(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(TINY + ["--trials", "2", "--out", str(out), "--study-name", "fits"]) == 0
    assert (out / "best_map.json").is_file()
    # the same folder, a study on cards far too small: nothing feasible, so no best map may be left
    small = tmp_path / "small.toml"
    small.write_text('name = "too-small"\nmodel = "tiny"\nbaselines = ["authors", "single"]\n[cluster]\ngpus = "2x2MiB"\n')
    code = main(["search", "--study", str(small), "--json", "--trials", "2", "--out", str(out)])
    assert code == 1
    names = {p.name for p in out.iterdir()}
    assert "best_map.json" not in names and "best_plan.json" not in names and "load_best_map.py" not in names
    assert "leaderboard.csv" in names


def test_liveness_and_storage_settings_are_checked(tmp_path):
    with pytest.raises(BadInput, match="heartbeat"):
        Liveness(0, 4)
    assert Liveness.every(2) == Liveness(2, 8)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    storage = open_storage(url, Liveness(1, 4))
    assert storage.get_heartbeat_interval() == 1 and storage.grace_period == 4
    open_storage(url)  # a second open of an existing storage
