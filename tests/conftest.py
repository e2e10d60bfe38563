"""Shared fixtures: small models and the field maps shipped in ../shared/field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xctune.models import get_config
from xctune.profile import profile_of

ROOT = Path(__file__).resolve().parent.parent
FIELD = ROOT / "tests" / "data" / "field"  # copied unchanged from ../shared/field


def field_map(name: str) -> Path:
    path = FIELD / f"ixc2-vl-7b.{name}.json"
    if not path.exists():
        pytest.skip(f"field map {path} not present")
    return path


@pytest.fixture(scope="session")
def tiny():
    return profile_of(get_config("tiny"))


@pytest.fixture(scope="session")
def tiny_hd():
    return profile_of(get_config("tiny-hd"))


@pytest.fixture(scope="session")
def vl7b():
    return profile_of(get_config("ixc2-vl-7b"))


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
