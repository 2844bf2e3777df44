"""Tuned kernel parameters, kept as data: kernels/tuning.toml, shipped with perfx, and the tuner's
file for each device.

The database is keyed in CLBlast's manner, device type -> vendor -> architecture -> device name,
each level with its defaults (device_keys.py finds a device's keys):

    [<type>.default.<section>]                                    every device of the type
    [<type>.<vendor>.default.<section>]                           the vendor's devices
    [<type>.<vendor>.<architecture>.default.<section>]            the architecture's devices
    [<type>.<vendor>.<architecture>."<device name>".<section>]    one device, by its name (any case)

A section ("matmul", "fused") holds -D parameters (numbers, booleans or strings) and where they come
from: `measured`, a list of {device, date, commit, params} (params: the keys that run measured; absent:
all of them), which every entry below the type's default must have; a type's default may instead give
a `reason` for a choice that is not a speed (a kernel a GPU cannot build). Every parameter of an entry
is covered by its records; a database that breaks this is refused when read.

`params_for(info, kernel, defaults)` merges, each layer over the one before: `defaults` (the kernel's
built-in parameters, from the caller), the levels of the database that match the device, from the
type's default to the device's name, then `<root>/tuning/<device>.toml` `[<kernel>]`, written by the
tuner (write_override).
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import numbers
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ...dirs import tuning_dir
from ...errors import PerfxError
from .devices import DeviceInfo, atomic_write_text

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DEVICE_TYPES = ("cpu", "gpu", "accelerator")
DEFAULT = "default"
PROVENANCE = ("measured", "reason")     # the keys of a section that are not parameters
RECORD_KEYS = {"device": str, "date": datetime.date, "commit": str}
Params = dict[str, Any]


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, str, numbers.Real))


def _check_params(params: Any, where: str, source: Path | str) -> Params:
    if not isinstance(params, dict) or not all(isinstance(k, str) and _is_scalar(v) for k, v in params.items()):
        raise PerfxError(
            f"{source}: {where} must be a table of parameters (numbers, booleans or strings); "
            "fix or delete the file"
        )
    return params


def _parse(text: str, source: Path | str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PerfxError(f"{source} is not valid TOML ({e}); fix or delete the file") from None


# ---- the shipped database -------------------------------------------------------------------------


def load_database(path: Path | None = None) -> dict:
    """kernels/tuning.toml (or `path`), checked: {type: {"default": {section: entry}, vendor: {"default":
    ..., architecture: {"default": ..., device name: {section: entry}}}}}."""
    if path is None:
        return _packaged_database()
    return _checked_database(Path(path).read_text(encoding="utf-8"), path)


@functools.lru_cache(maxsize=1)
def _packaged_database() -> dict:
    text = resources.files("perfx.kernels").joinpath("tuning.toml").read_text(encoding="utf-8")
    return _checked_database(text, "kernels/tuning.toml")


def _checked_database(text: str, source: Path | str) -> dict:
    data = _parse(text, source)
    for kind, tree in data.items():
        if kind not in DEVICE_TYPES or not isinstance(tree, dict):
            raise PerfxError(f"{source}: [{kind}] is not a device type (types: {', '.join(DEVICE_TYPES)})")
        for name, sections in _levels_of(kind, tree, source):
            if not isinstance(sections, dict):
                raise PerfxError(f"{source}: [{name}] must hold one table per kernel section")
            for section, entry in sections.items():
                _check_entry(entry, f"{name}.{section}", source, typed_default=name == f"{kind}.{DEFAULT}")
    return data


def _levels_of(kind: str, tree: dict, source: Path | str):
    """(level's name, its {section: entry}) of every level of a type's tree."""
    def children(node: Any, name: str) -> dict:
        if not isinstance(node, dict):
            raise PerfxError(f"{source}: [{name}] must be a table")
        return node

    yield f"{kind}.{DEFAULT}", tree.get(DEFAULT, {})
    for vendor, vtree in tree.items():
        if vendor == DEFAULT:
            continue
        vname = f"{kind}.{_toml_key(vendor)}"
        for arch, atree in children(vtree, vname).items():
            aname = f"{vname}.{_toml_key(arch)}"
            if arch == DEFAULT:
                yield aname, atree
                continue
            for device, sections in children(atree, aname).items():
                yield f"{aname}.{_toml_key(device)}", sections


def _check_entry(entry: Any, name: str, source: Path | str, typed_default: bool) -> None:
    """A section's table: parameters, and the records of the runs that measured them."""
    if not isinstance(entry, dict):
        raise PerfxError(f"{source}: [{name}] must be a table of parameters")
    params = {k: v for k, v in entry.items() if k not in PROVENANCE}
    _check_params(params, f"[{name}]", source)
    if "reason" in entry and (not typed_default or not isinstance(entry["reason"], str)):
        raise PerfxError(f"{source}: [{name}] gives a reason: only a type's default may, as a string; "
                         "other entries say where they were measured")
    records = entry.get("measured", [])
    if isinstance(records, dict):
        records = [records]
    covered: set[str] = set()
    for record in records if isinstance(records, list) else [None]:
        if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in RECORD_KEYS.items()) \
                or not isinstance(record.get("params", []), list):
            raise PerfxError(f"{source}: [{name}] measured: each record needs device (a string), date "
                             "(a TOML date), commit (a string) and optionally params (a list of keys)")
        stray = sorted(set(record.get("params", [])) - set(params))
        if stray:
            raise PerfxError(f"{source}: [{name}] measured names {', '.join(stray)}, which the entry does not set")
        covered |= set(record.get("params", params))
    uncovered = sorted(set(params) - covered) if "reason" not in entry else []
    if uncovered:
        raise PerfxError(f"{source}: [{name}] does not say where {', '.join(uncovered)} was measured "
                         "(a measured record with the device, date and commit)")


# ---- the tuner's files ----------------------------------------------------------------------------


def device_slug(info: DeviceInfo) -> str:
    """The device key as a file name: platform_device_driver, lower case, [a-z0-9.+-] only."""
    parts = (info.platform_name, info.name, info.driver_version)
    return "_".join(re.sub(r"[^a-z0-9.+-]+", "-", p.lower()).strip("-.") or "unknown" for p in parts)


def override_path(info: DeviceInfo) -> Path:
    return tuning_dir() / f"{device_slug(info)}.toml"


def load_override(info: DeviceInfo) -> dict[str, Params]:
    """The tuner's {kernel: params} for the device; empty when it has none."""
    path = override_path(info)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise PerfxError(f"cannot read {path}: {e.strerror}") from None
    data = _parse(text, path)
    for kernel, params in data.items():
        _check_params(params, f"[{kernel}]", path)
    return data


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def write_override(info: DeviceInfo, kernel: str, params: Params, note: str = "") -> Path:
    """Stores the tuner's `params` for `kernel` on the device, replacing that kernel's entry and
    keeping the others; written to a temporary file, then renamed over the old one. `note` (how and
    when it was measured) goes in a comment above the kernel's table."""
    params = dict(params)
    if not all(isinstance(k, str) and _is_scalar(v) for k, v in params.items()):
        raise PerfxError(f"the tuned parameters of {kernel} must be numbers, booleans or strings: {params}")
    data = load_override(info)
    data[kernel] = params
    lines = [f"# perfx tuned parameters for {info.key}", ""]
    notes = _notes(override_path(info))
    if note:
        notes[kernel] = note
    for name in sorted(data):
        if notes.get(name):
            lines.append(f"# {notes[name]}")
        lines.append(f"[{_toml_key(name)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in sorted(data[name].items())]
        lines.append("")
    path = override_path(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines))
    return path


def override_notice(info: DeviceInfo, resolved: dict[str, Params]) -> str | None:
    """What a run says when the tuner's file sets some of its parameters: their values as `resolved`
    ({section: params}, what the run uses) holds them, the file's date and path; None without a file."""
    override = load_override(info)
    values = [f"{k}={_toml_value(resolved[section][k])}" for section in sorted(override) if section in resolved
              for k in sorted(override[section]) if k in resolved[section]]
    if not values:
        return None
    when = override_date(info)
    return f"tuned by perfx tune{f' on {when}' if when else ''}: {', '.join(values)} ({override_path(info)})"


def _notes(path: Path) -> dict[str, str]:
    """The comment line above each kernel's table in an override file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    return {line.strip("[]"): prev[2:] for prev, line in zip(lines, lines[1:])
            if line.startswith("[") and prev.startswith("# ") and not prev.startswith("# perfx tuned")}


def is_tuned(info: DeviceInfo) -> bool:
    """Whether the tuner has written parameters for the device."""
    return override_path(info).exists()


def override_date(info: DeviceInfo) -> datetime.date | None:
    """When the tuner last wrote the device's file (its modification date); None without one."""
    try:
        return datetime.date.fromtimestamp(override_path(info).stat().st_mtime)
    except OSError:
        return None


# ---- merging --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One level of the database that applies to a device."""

    name: str                    # as written in tuning.toml: 'gpu.nvidia.sm_90."NVIDIA H200"'
    sections: dict[str, dict]    # {section: entry}


def matching_levels(info: DeviceInfo, database: Path | None = None) -> list[Level]:
    """The levels of the database that hold entries for the device, from its type's default to its name."""
    tree = load_database(database).get(info.type, {})
    levels = [Level(f"{info.type}.{DEFAULT}", tree.get(DEFAULT, {}))]
    vendor = tree.get(info.vendor_key, {}) if info.vendor_key != DEFAULT else {}
    vname = f"{info.type}.{_toml_key(info.vendor_key)}"
    levels.append(Level(f"{vname}.{DEFAULT}", vendor.get(DEFAULT, {})))
    arch = vendor.get(info.architecture, {}) if info.architecture not in ("", DEFAULT) else {}
    aname = f"{vname}.{_toml_key(info.architecture)}"
    levels.append(Level(f"{aname}.{DEFAULT}", arch.get(DEFAULT, {})))
    named = [k for k in arch if k != DEFAULT and k.strip().lower() == info.name.strip().lower()]
    levels += [Level(f"{aname}.{_toml_key(k)}", arch[k]) for k in named]
    return [level for level in levels if level.sections]


def _params(entry: dict) -> Params:
    return {k: v for k, v in entry.items() if k not in PROVENANCE}


def params_for(info: DeviceInfo, kernel: str, defaults: Params | None = None,
               database: Path | None = None) -> Params:
    """The parameters of `kernel` (a section) on the device: `defaults` < tuning.toml (type < vendor <
    architecture < device name, each level's entry) < the tuner's file. `database` replaces kernels/tuning.toml."""
    merged: Params = dict(defaults or {})
    for level in matching_levels(info, database):
        merged.update(_params(level.sections.get(kernel, {})))
    merged.update(load_override(info).get(kernel, {}))
    return merged


def vendor_params(kind: str, vendor: str, kernel: str, defaults: Params | None = None) -> Params:
    """`defaults` with the database's default entry for a vendor (e.g. "gpu", "nvidia", "matmul"), for
    running one device's tuned values on another (tests, kernel benchmarks)."""
    entry = load_database().get(kind, {}).get(vendor, {}).get(DEFAULT, {}).get(kernel, {})
    return {**(defaults or {}), **_params(entry)}
