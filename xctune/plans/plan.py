"""A plan: a device map in accelerate's own format, plus a dtype per precision group.

The device map is exactly what `from_pretrained(device_map=...)` and
`accelerate.dispatch_model` take: {module or parameter name: GPU index | "cpu" | "disk"}.
A plan file may be that bare map, or an object with `device_map`, `dtypes` and `skip_keys`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput, shown
from ..models.profile import DTYPES, GROUPS, ModelProfile

Device = int | str  # a GPU index, "cpu" or "disk"
DEFAULT_SKIP_KEYS = ("past_key_values",)


def parse_device(value, key: str) -> Device:
    """One map value -> int GPU index, "cpu" or "disk"; anything else is bad input."""
    if isinstance(value, bool):
        raise BadInput(f"device for {shown(key)} is {value!r}; use a GPU index (0, 1, ...), 'cpu' or 'disk'")
    if isinstance(value, int):
        if value < 0:
            raise BadInput(f"device for {shown(key)} is {shown(value)}; GPU indices start at 0")
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("cpu", "disk"):
            return v
        m = re.fullmatch(r"cuda:(\d+)", v)
        if m:
            return int(m.group(1))
    raise BadInput(f"device for {shown(key)} is {shown(value)}; use a GPU index (0, 1, ...), 'cpu' or 'disk'")


def _read_json(source) -> tuple[object, str]:
    if isinstance(source, Mapping):
        return dict(source), "the map"
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path} is not a text file") from None
    try:
        return json.loads(text), str(path)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise BadInput(f"{path} is not usable JSON: nested too deeply") from None


def parse_device_map(data, where: str = "the map") -> dict[str, Device]:
    if isinstance(data, str) and data in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise BadInput(
            f"{where} is the strategy {data!r}, not a map; see `xctune bench --baseline accelerate-{data}`"
        )
    if not isinstance(data, Mapping):
        raise BadInput(f"{where} must be a JSON object {{module name: device}}, not {type(data).__name__}")
    if not data:
        raise BadInput(f"{where} is empty: name at least one module")
    out: dict[str, Device] = {}
    for key, value in data.items():
        if type(value) is int and value >= 0 and type(key) is str:  # the common case, fast for huge maps
            out[key] = value
            continue
        if not isinstance(key, str):
            raise BadInput(f"{where}: module names must be strings, got {shown(key)}")
        out[key] = parse_device(value, key)
    return out


@dataclass(frozen=True)
class Plan:
    device_map: dict[str, Device]
    dtypes: dict[str, str] = field(default_factory=lambda: {g: "fp32" for g in GROUPS})
    skip_keys: tuple[str, ...] = DEFAULT_SKIP_KEYS
    label: str = ""

    def __post_init__(self):
        for g, d in self.dtypes.items():
            if g not in GROUPS:
                raise BadInput(f"unknown precision group {g!r}; groups: {', '.join(GROUPS)}")
            if d not in DTYPES:
                raise BadInput(f"unknown dtype {d!r} for {g}; use one of {', '.join(DTYPES)}")
        missing = [g for g in GROUPS if g not in self.dtypes]
        if missing:
            raise BadInput(f"plan gives no dtype for {', '.join(missing)}")

    @staticmethod
    def uniform(device_map: Mapping[str, Device], dtype: str = "fp32", **kw) -> "Plan":
        if dtype not in DTYPES:
            raise BadInput(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return Plan(dict(device_map), {g: dtype for g in GROUPS}, **kw)

    @property
    def mixed(self) -> bool:
        return len(set(self.dtypes.values())) > 1

    @property
    def dtype_label(self) -> str:
        if not self.mixed:
            return self.dtypes["lm"]
        return "/".join(self.dtypes[g] for g in GROUPS)

    def unit_dtype(self, unit: str, profile: ModelProfile) -> str:
        return self.dtypes[profile.group_of(profile.unit_of(unit))]

    @property
    def gpus(self) -> tuple[int, ...]:
        return tuple(sorted({d for d in self.device_map.values() if isinstance(d, int)}))

    def to_dict(self) -> dict:
        return {"device_map": dict(self.device_map), "dtypes": dict(self.dtypes), "skip_keys": list(self.skip_keys)}

    @property
    def plan_id(self) -> str:
        canon = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(canon.encode()).hexdigest()[:10]

    @staticmethod
    def from_dict(data, where: str = "the plan", dtype: str | None = None) -> "Plan":
        if isinstance(data, Mapping) and "device_map" in data:
            dmap = parse_device_map(data["device_map"], where)
            dtypes = data.get("dtypes") or {}
            if not isinstance(dtypes, Mapping):
                raise BadInput(f"{where}: 'dtypes' must be an object {{group: dtype}}")
            if dtype is not None:
                dtypes = {g: dtype for g in GROUPS}
            dtypes = {g: dtypes.get(g, "fp32") for g in GROUPS} | dict(dtypes)
            skip = data.get("skip_keys", list(DEFAULT_SKIP_KEYS))
            if not isinstance(skip, list) or not all(isinstance(k, str) for k in skip):
                raise BadInput(f"{where}: 'skip_keys' must be a list of strings")
            return Plan(dmap, {str(k): v for k, v in dtypes.items()}, tuple(skip), str(data.get("label", "")))
        return Plan.uniform(parse_device_map(data, where), dtype or "fp32")


def load_plan(source, dtype: str | None = None) -> Plan:
    """Read a map or plan file. `dtype` (from the CLI) overrides the file's dtypes."""
    data, where = _read_json(source)
    return Plan.from_dict(data, where, dtype)


def write_device_map(plan: Plan, path: Path) -> None:
    """The product users carry: a bare map, loadable by `from_pretrained(device_map=json.load(f))`."""
    from ..atomic import write_text

    write_text(path, json.dumps(plan.device_map, indent=1) + "\n")


# ------------------------------------------------------------------------------------------
# Resolving a map against a model's parameters (accelerate's prefix rule)


@dataclass(frozen=True)
class Resolution:
    param_device: dict[str, Device]  # every covered parameter -> its device
    uncovered: tuple[str, ...]
    covered_twice: tuple[tuple[str, tuple[str, ...]], ...]  # (parameter, the keys that cover it)
    unknown_keys: tuple[str, ...]
    unit_devices: dict[str, tuple[Device, ...]]  # devices a unit's parameters are spread over

    def device_of_unit(self, unit: str) -> Device | None:
        devs = self.unit_devices.get(unit, ())
        return devs[0] if len(devs) == 1 else None


def _prefixes(name: str) -> list[str]:
    """The map keys that can cover `name` by accelerate's prefix rule: "", "a", "a.b", ..., the name itself."""
    parts = name.split(".")
    return ["", *(".".join(parts[: i + 1]) for i in range(len(parts)))]


def resolve(device_map: Mapping[str, Device], profile: ModelProfile) -> Resolution:
    # by lookups of each parameter's prefixes: time grows with the model's names, not with the map's size
    param_device: dict[str, Device] = {}
    uncovered, twice = [], []
    for name, _ in profile.param_numels:
        keys = [k for k in _prefixes(name) if k in device_map]
        if not keys:
            uncovered.append(name)
            continue
        if len(keys) > 1:
            twice.append((name, tuple(keys)))
        # accelerate's hooks end up honouring the most specific entry
        param_device[name] = device_map[max(keys, key=len)]
    listed = {n for n, _ in profile.param_numels}
    for alias in (n for group in profile.tied for n in group if n not in listed):
        keys = [k for k in _prefixes(alias) if k in device_map]
        if keys:  # where the map puts a tied alias (the head): the co-location rule reads it
            param_device[alias] = device_map[max(keys, key=len)]
    tied_names = [n for group in profile.tied for n in group]  # a tied head: its weight is listed once, under the embeddings
    known = {p for name in (*(n for n, _ in (*profile.param_numels, *profile.buffer_numels)), *tied_names)
             for p in _prefixes(name)} | set(profile.by_name)
    unknown = [k for k in device_map if k not in known]
    unit_devices: dict[str, list] = {}
    for name, dev in param_device.items():
        devs = unit_devices.setdefault(profile.unit_of(name), [])
        if dev not in devs:
            devs.append(dev)
    for name, _ in profile.buffer_numels:  # a unit of buffers only (a rotary table) is where its buffers are
        unit = profile.unit_of(name)
        keys = [k for k in _prefixes(name) if k in device_map]
        if keys and unit in profile.by_name and profile.by_name[unit].params == 0:
            devs = unit_devices.setdefault(unit, [])
            if device_map[max(keys, key=len)] not in devs:
                devs.append(device_map[max(keys, key=len)])
    return Resolution(
        param_device,
        tuple(uncovered),
        tuple(twice),
        tuple(unknown),
        {u: tuple(d) for u, d in unit_devices.items()},
    )
