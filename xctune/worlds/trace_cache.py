"""The trace cache on disk: data only, never code.

A recorded trace (trace.py) is a pure function of the model's config, the workload, the
element widths and skip keys, and the versions of the libraries that ran it. One cache entry is
one `trace-<digest>.npz` file (numpy's zip of arrays, read with `allow_pickle=False`): the op
costs as numeric arrays, and a JSON header (stored as bytes) holding the key itself and the run's
calls, moves, joins and memory figures. The digest is a SHA-256 of the key; the key is also
stored and compared on load, so a file copied from another model, workload or library version
is never used.

Small results are kept as plain JSON holding their key, `<kind>-<digest>.json`: the dry-run verdict
on a search's best plan (`verdict`), so that a warm search of the same study runs no dry run, and
the constraints dry runs discovered for a model (`constraints`, plans/constraints.py), so that
`check`'s static rules cost milliseconds after the first time.

Nothing in the cache directory is ever unpickled or executed. A file that is not a readable
entry for this key (corrupt, truncated, foreign, a planted `*.pkl`) is ignored with a warning
and the trace is recorded again (over it, when it has our entry's name).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np

from .instrument import Move, OpCost, UnitCall
from ..plans.plan import Plan
from .virtual import VirtualRun
from ..workload import Workload

# 2: joins confirmed by dry runs (constraints.confirmed_joins); 3: move kind "return"; 4: the model's own
# copies of the operands of joins a dry run does not confirm, logged as moves (kind "model", trace.py)
FORMAT = "xctune-trace/4"
JSON_KINDS = ("verdict", "constraints")
ENTRY = re.compile(r"(trace-[0-9a-f]{24}\.npz|(verdict|constraints)-[0-9a-f]{24}\.json)")
log = logging.getLogger("xctune.cache")
_seen_foreign: set[Path] = set()  # warn once per process about each file that is not ours


def default_dir() -> Path:
    """Where recorded traces are kept between runs: $XCTUNE_CACHE, else ~/.cache/xctune."""
    root = os.environ.get("XCTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xctune"
    return Path(root) / "traces"


def library_versions() -> dict[str, str]:
    """The versions a trace depends on: ours and those of the libraries that produce the ops."""
    out = {}
    for dist in ("xctune", "torch", "transformers", "accelerate", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def cache_key(config, workload: Workload, widths: tuple, skip_keys: tuple) -> dict:
    return {
        "format": FORMAT,
        "model": json.loads(json.dumps(asdict(config), sort_keys=True, default=repr)),
        "workload": workload.to_dict(),
        "widths": list(widths),
        "skip_keys": list(skip_keys),
        "versions": library_versions(),
    }


def entry_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"trace-{digest}.npz"


def cached_json(cache_dir: Path | None, kind: str, key: dict, compute, encode, decode):
    """`decode(data)` of the `kind` entry stored for `key` in `cache_dir`; else `compute()`, whose result is
    written there as `encode(result)`. Without a cache folder, `compute()` alone. An entry of this key
    that `decode` cannot read (KeyError, TypeError, ValueError) is computed again and written over."""
    if cache_dir is None:
        return compute()
    key = json.loads(json.dumps(key, sort_keys=True, default=repr))  # as it reads back from the file
    path = json_entry_path(cache_dir, kind, key)
    data = load_json_entry(path, key)
    if data is not None:
        try:
            return decode(data)
        except (KeyError, TypeError, ValueError):
            pass
    result = compute()
    save_json_entry(path, key, encode(result))
    return result


def json_entry_path(cache_dir: Path, kind: str, key: dict) -> Path:
    assert kind in JSON_KINDS, kind
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{kind}-{digest}.json"


def load_json_entry(path: Path, key: dict) -> dict | None:
    """The data stored at `path` for `key`, or None (with a warning when the file is not such an entry)."""
    if not path.is_file():
        return None
    kind = path.name.partition("-")[0]
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            _warn(f"ignoring {path}: a {kind} for another plan, model or library version; computing it again")
            return None
        if not isinstance(data["data"], dict):
            raise TypeError("data is not an object")
        return data["data"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        _warn(f"ignoring {path}: not a readable {kind} entry ({type(e).__name__}); computing it again")
        return None


def save_json_entry(path: Path, key: dict, data: dict) -> None:
    from ..atomic import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps({"key": key, "data": data}))


def _warn(message: str) -> None:
    log.warning(f"xctune: warning: {message}")


def warn_foreign_files(cache_dir: Path) -> None:
    """Name (once) each file in the cache folder that is not a cache entry: it is left alone and never read."""
    try:
        names = [p for p in Path(cache_dir).iterdir() if not ENTRY.fullmatch(p.name) and not p.name.endswith(".tmp")]
    except OSError:
        return
    for p in names:
        if p not in _seen_foreign:
            _seen_foreign.add(p)
            _warn(f"ignoring {p}: not a trace cache entry (the cache holds data only; nothing in it is loaded as code)")


def load(path: Path, key: dict, workload: Workload) -> VirtualRun | None:
    """The run stored at `path` for `key`, or None (with a warning) when the file is not one."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            arrays = {k: z[k] for k in ("op_count", "op_flops", "op_nbytes", "op_matmul", "op_name")}
        if header.get("key") != key:
            _warn(f"ignoring {path}: a trace for another model, workload or library version; recording it again")
            return None
        return _run_from(header, arrays, workload)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, zipfile.BadZipFile, EOFError) as e:
        _warn(f"ignoring {path}: not a readable trace ({type(e).__name__}: {str(e)[:120]}); recording it again")
        return None


def save(path: Path, key: dict, run: VirtualRun) -> None:
    """Write the entry whole or not at all (a temporary file renamed into place)."""
    names = sorted({o.name for c in run.calls for o in c.ops})
    index = {n: i for i, n in enumerate(names)}
    header = {
        "key": key,
        "op_names": names,
        "plan": {"device_map": run.plan.device_map, "dtypes": run.plan.dtypes, "skip_keys": list(run.plan.skip_keys)},
        "main": run.main,
        "seconds": run.seconds,
        "calls": [
            {"unit": c.unit, "phase": c.phase, "loc": c.loc, "live_at_entry": c.live_at_entry,
             "peak_inside": int(c.peak_inside), "weight_chunks": [int(w) for w in c.weight_chunks],
             "module_calls": c.module_calls}
            for c in run.calls
        ],
        "moves": [[m.phase, m.src, m.dst, int(m.nbytes), m.kind, m.unit] for m in run.moves],
        "joins": [[op, list(locs), phase] for op, locs, phase in run.joins],
        "peak_bytes": run.peak_bytes,
        "kv_bytes": run.kv_bytes,
    }
    ops = [o for c in run.calls for o in c.ops]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(
            f,
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            op_count=np.array([len(c.ops) for c in run.calls], dtype=np.int64),
            op_flops=np.array([o.flops for o in ops], dtype=np.int64),
            op_nbytes=np.array([o.nbytes for o in ops], dtype=np.int64),
            op_matmul=np.array([o.matmul for o in ops], dtype=bool),
            op_name=np.array([index[o.name] for o in ops], dtype=np.int32),
        )
    tmp.replace(path)


def _run_from(header: dict, a: dict, workload: Workload) -> VirtualRun:
    names = header["op_names"]
    counts = a["op_count"]
    if len(counts) != len(header["calls"]) or int(counts.sum()) != len(a["op_flops"]):
        raise ValueError("op arrays do not match the calls")
    calls, start = [], 0
    for c, n in zip(header["calls"], counts.tolist()):
        end = start + n
        ops = [OpCost(int(f), int(b), bool(m), names[i]) for f, b, m, i in zip(
            a["op_flops"][start:end].tolist(), a["op_nbytes"][start:end].tolist(),
            a["op_matmul"][start:end].tolist(), a["op_name"][start:end].tolist())]
        calls.append(UnitCall(c["unit"], c["phase"], c["loc"], ops, dict(c["live_at_entry"]), int(c["peak_inside"]),
                              list(c["weight_chunks"]), int(c["module_calls"])))
        start = end
    p = header["plan"]
    run = VirtualRun(Plan(p["device_map"], p["dtypes"], tuple(p["skip_keys"])), workload, None)
    run.calls = calls
    run.moves = [Move(*m) for m in header["moves"]]
    run.joins = [(op, tuple(locs), phase) for op, locs, phase in header["joins"]]
    run.peak_bytes, run.kv_bytes = dict(header["peak_bytes"]), dict(header["kv_bytes"])
    run.main, run.seconds = header["main"], float(header["seconds"])
    return run
