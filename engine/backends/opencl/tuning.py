"""Tuned kernel parameters, kept as data: kernels/tuning.toml, shipped with perfx, and the tuner's
file for each device.

`params_for(info, kernel, defaults)` merges, each layer over the one before:

1. `defaults`: the kernel's built-in parameters, from the caller;
2. tuning.toml `[<type>.default.<kernel>]`, type being cpu, gpu or accelerator;
3. tuning.toml `[<type>.vendor."<substring>".<kernel>]`, matching the vendor or platform name;
4. tuning.toml `[<type>.device."<substring>".<kernel>]`, matching the device name;
5. `<root>/tuning/<device>.toml` `[<kernel>]`, written by the tuner (write_override).

Substrings match regardless of case; where several vendor (or device) sections match, the longer
substring wins. Parameters are -D defines: integers, floats, booleans or strings, opaque here.
"""
from __future__ import annotations

import functools
import json
import math
import numbers
import re
import sys
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
LEVELS = ("default", "vendor", "device")
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
    """kernels/tuning.toml (or `path`), checked: {type: {"default": {kernel: params},
    "vendor": {substring: {kernel: params}}, "device": {substring: {kernel: params}}}}."""
    if path is None:
        return _packaged_database()
    return _checked_database(Path(path).read_text(encoding="utf-8"), path)


@functools.lru_cache(maxsize=1)
def _packaged_database() -> dict:
    text = resources.files("perfx.kernels").joinpath("tuning.toml").read_text(encoding="utf-8")
    return _checked_database(text, "kernels/tuning.toml")


def _checked_database(text: str, source: Path | str) -> dict:
    data = _parse(text, source)
    for kind, levels in data.items():
        if kind not in DEVICE_TYPES or not isinstance(levels, dict) or set(levels) - set(LEVELS):
            raise PerfxError(
                f"{source}: [{kind}] is not a device type with default/vendor/device sections "
                f"(types: {', '.join(DEVICE_TYPES)})"
            )
        sections = {f"{kind}.default": levels.get("default", {})}
        for level in ("vendor", "device"):
            tables = levels.get(level, {})
            if not isinstance(tables, dict):
                raise PerfxError(f"{source}: [{kind}.{level}] must hold one table per device substring")
            sections.update({f'{kind}.{level}."{match}"': kernels for match, kernels in tables.items()})
        for name, kernels in sections.items():
            if not isinstance(kernels, dict):
                raise PerfxError(f"{source}: [{name}] must hold one table per kernel")
            for kernel, params in kernels.items():
                _check_params(params, f"[{name}.{kernel}]", source)
    return data


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


# ---- merging --------------------------------------------------------------------------------------


def _matching(sections: dict, text: str, kernel: str) -> list[Params]:
    """The kernel's params of each section whose key is in `text`, shortest key first."""
    hits = sorted((k for k in sections if k.lower() in text.lower()), key=lambda k: (len(k), k))
    return [sections[k][kernel] for k in hits if kernel in sections[k]]


def params_for(info: DeviceInfo, kernel: str, defaults: Params | None = None,
               database: Path | None = None) -> Params:
    """The parameters of `kernel` on the device: `defaults` < tuning.toml (type default < vendor <
    device name) < the tuner's file. `database` replaces kernels/tuning.toml."""
    levels = load_database(database).get(info.type, {})
    layers = [defaults or {}, levels.get("default", {}).get(kernel, {})]
    layers += _matching(levels.get("vendor", {}), f"{info.vendor} {info.platform_name}", kernel)
    layers += _matching(levels.get("device", {}), info.name, kernel)
    layers.append(load_override(info).get(kernel, {}))
    merged: Params = {}
    for layer in layers:
        merged.update(layer)
    return merged


def vendor_params(kind: str, vendor: str, kernel: str, defaults: Params | None = None) -> Params:
    """`defaults` with the database's entry for a vendor (e.g. "gpu", "nvidia", "matmul"), for running
    one device's tuned values on another (tests, kernel benchmarks)."""
    entry = load_database().get(kind, {}).get("vendor", {}).get(vendor, {}).get(kernel, {})
    return {**(defaults or {}), **entry}
