"""Shared fixtures (small models, the field maps copied into tests/data/field) and the skip policy.

Skip policy: with `--strict-skips` (scripts/test passes it), a test that is skipped fails the
session unless the test itself names the reason: a `skip`/`skipif` marker with a reason, or,
for a skip decided inside the test or a fixture (`pytest.skip`, `importorskip`),
`@pytest.mark.may_skip("reason")` on the function, its class or the module's `pytestmark`,
whose reason the actual skip reason starts with.
So a test cannot vanish silently from the gate (a missing data file, an optional dependency).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIELD = ROOT / "tests" / "data" / "field"  # copied unchanged from the project's shared/field


def field_map(name: str) -> Path:
    path = FIELD / f"ixc2-vl-7b.{name}.json"
    assert path.is_file(), f"field map {path} is missing from the checkout"
    return path


def _profile(preset: str):
    from xctune.models import get_config  # imported here: the conftest itself stays light (tests/test_suite_policy.py)
    from xctune.models.profile import profile_of

    return profile_of(get_config(preset))


@pytest.fixture(scope="session")
def tiny():
    return _profile("tiny")


@pytest.fixture(scope="session")
def tiny_hd():
    return _profile("tiny-hd")


@pytest.fixture(scope="session")
def vl7b():
    return _profile("ixc2-vl-7b")



def sampled_plans(space, n, seed=0):
    """n plans drawn from the search space by Optuna's random sampler (what a study's trials would suggest)."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.suggest(trial))
        study.tell(trial, 0.0)
    return out

def two_gpu_map(profile, split_layer: int | None = None) -> dict:
    """Vision + embeddings on 0, layers split in half, head on 1."""
    layers = profile.layers
    split = len(layers) // 2 if split_layer is None else split_layer
    m = {u.name: 0 for u in profile.units}
    for i, name in enumerate(layers):
        m[name] = 0 if i < split else 1
    m["model.norm"] = m["output"] = 1
    return m


def write_json(tmp_path: Path, obj, name="map.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


@pytest.fixture(scope="session", autouse=True)
def _trace_cache(tmp_path_factory):
    """Traces recorded once per test run and shared by the tests (never the user's cache)."""
    import os

    path = tmp_path_factory.mktemp("xctune-cache")
    old = os.environ.get("XCTUNE_CACHE")
    os.environ["XCTUNE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("XCTUNE_CACHE", None)
    else:
        os.environ["XCTUNE_CACHE"] = old


# --- skip policy ------------------------------------------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--strict-skips", action="store_true",
                     help="fail the run when a test is skipped for a reason it does not declare with @pytest.mark.may_skip")


def pytest_configure(config):
    config.addinivalue_line("markers", "may_skip(reason): this test may be skipped, for a reason starting with `reason`")
    config.stash[_UNDECLARED] = []


_UNDECLARED = pytest.StashKey[list]()


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        declared = [m.kwargs.get("reason", "") for name in ("skip", "skipif") for m in item.iter_markers(name)]
        declared += [m.args[0] if m.args else m.kwargs.get("reason", "") for m in item.iter_markers("may_skip")]
        if not any(d and reason.startswith(d) for d in declared):
            item.config.stash[_UNDECLARED].append(f"{item.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    undeclared = config.stash[_UNDECLARED]
    if undeclared and config.getoption("--strict-skips"):
        terminalreporter.section("skipped for a reason the test does not declare (--strict-skips)", red=True)
        for line in undeclared:
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus):
    if session.config.stash[_UNDECLARED] and session.config.getoption("--strict-skips") and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
