"""The trace cache holds data only: it round-trips exactly, and never runs what it finds."""

import logging
import pickle
import shutil

import numpy as np
import pytest

from conftest import two_gpu_map
from xctune.worlds import trace_cache
from xctune.hardware import make_cluster
from xctune.plans.plan import Plan
from xctune.worlds.trace import Trace
from xctune.workload import Workload

W = Workload(prompt_tokens=8, new_tokens=4)


class _Planted:
    """A pickle that creates a file when unpickled: the cache must never do that."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _estimate(trace, tiny):
    plan = Plan.uniform(two_gpu_map(tiny), "fp16")
    est = trace.evaluate(plan, make_cluster("2x24GiB"))
    return est.e2e_s, sorted(est.peak_bytes.items()), len(est.moves), sum(m[3] for m in est.moves)


@pytest.fixture
def cache(tmp_path):
    trace_cache._seen_foreign.clear()
    return tmp_path / "traces"


def _entry(cache, tiny):
    plan = Plan.uniform(two_gpu_map(tiny), "fp16")
    key = trace_cache.cache_key(tiny.config, W, (2, 2, 2), plan.skip_keys)
    return trace_cache.entry_path(cache, key)


def test_round_trip_is_exact_and_data_only(cache, tiny):
    fresh = Trace(tiny, W, cache_dir=cache)
    expected = _estimate(fresh, tiny)
    files = list(cache.iterdir())
    assert [f.suffix for f in files] == [".npz"]
    with np.load(files[0], allow_pickle=False) as z:  # every array loads without pickle
        assert all(z[k].dtype != object for k in z.files)
    again = Trace(tiny, W, cache_dir=cache)
    assert _estimate(again, tiny) == expected and again.seconds == 0  # read, not recorded
    a, b = fresh._recordings, again._recordings
    (ra,), (rb,) = a.values(), b.values()
    assert [(c.unit, c.phase, c.loc, c.live_at_entry, c.weight_chunks, c.ops) for c in ra.run.calls] == \
           [(c.unit, c.phase, c.loc, c.live_at_entry, c.weight_chunks, c.ops) for c in rb.run.calls]
    assert ra.run.moves == rb.run.moves and ra.run.joins == rb.run.joins and ra.run.kv_bytes == rb.run.kv_bytes


def test_key_covers_model_workload_and_library_versions(tiny, tiny_hd):
    key = trace_cache.cache_key(tiny.config, W, (2, 2, 2), ("past_key_values",))
    assert set(key["versions"]) == {"xctune", "torch", "transformers", "accelerate", "numpy"}
    others = [
        trace_cache.cache_key(tiny_hd.config, W, (2, 2, 2), ("past_key_values",)),
        trace_cache.cache_key(tiny.config, Workload(prompt_tokens=9, new_tokens=4), (2, 2, 2), ("past_key_values",)),
        trace_cache.cache_key(tiny.config, W, (4, 2, 2), ("past_key_values",)),
        trace_cache.cache_key(tiny.config, W, (2, 2, 2), ()),
        {**key, "versions": {**key["versions"], "torch": "0.0"}},
    ]
    paths = {trace_cache.entry_path("c", k) for k in [key, *others]}
    assert len(paths) == 6


def test_planted_pickles_never_run(cache, tiny, caplog):
    marker = cache.parent / "pwned"
    cache.mkdir()
    payload = pickle.dumps(_Planted(marker))
    entry = _entry(cache, tiny)
    entry.write_bytes(payload)  # a pickle under the entry's own name
    (cache / "trace-0123456789abcdef.pkl").write_bytes(payload)  # where older versions kept their pickles
    with caplog.at_level(logging.WARNING, logger="xctune.cache"):
        got = _estimate(Trace(tiny, W, cache_dir=cache), tiny)
    assert not marker.exists()
    text = caplog.text
    assert f"ignoring {entry}: not a readable trace" in text and "recording it again" in text
    assert "trace-0123456789abcdef.pkl: not a trace cache entry" in text
    assert (cache / "trace-0123456789abcdef.pkl").read_bytes() == payload  # left alone, never read
    assert got == _estimate(Trace(tiny, W), tiny)  # rebuilt: the same answer as no cache at all

    # an npz whose arrays hold the pickle as an object array
    np.savez(entry.with_suffix(".tmp.npz"), header=np.array([_Planted(marker)], dtype=object))
    shutil.move(entry.with_suffix(".tmp.npz"), entry)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xctune.cache"):
        assert _estimate(Trace(tiny, W, cache_dir=cache), tiny) == got
    assert not marker.exists() and "not a readable trace" in caplog.text


def test_corrupt_or_foreign_entries_are_rebuilt(cache, tiny, caplog):
    expected = _estimate(Trace(tiny, W, cache_dir=cache), tiny)
    entry = _entry(cache, tiny)
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="xctune.cache"):
        assert _estimate(Trace(tiny, W, cache_dir=cache), tiny) == expected
    assert "not a readable trace" in caplog.text
    key = trace_cache.cache_key(tiny.config, W, (2, 2, 2), ("past_key_values",))
    assert trace_cache.load(entry, key, W) is not None  # rewritten whole

    other = Workload(prompt_tokens=12, new_tokens=4)
    Trace(tiny, other, cache_dir=cache).evaluate(Plan.uniform(two_gpu_map(tiny), "fp16"), make_cluster("2x24GiB"))
    foreign = next(p for p in cache.iterdir() if p != entry)
    shutil.copy(foreign, entry)  # another workload's trace under this key's name
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xctune.cache"):
        assert _estimate(Trace(tiny, W, cache_dir=cache), tiny) == expected
    assert "a trace for another model, workload or library version" in caplog.text
