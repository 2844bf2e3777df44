"""`perfx models`, `perfx show` and `perfx rm`: what the registry knows and what is on disk, read from
the registry and the GGUF header (never by loading the weights)."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from perfx.engine.errors import PerfxError
from perfx.cli.main import command

MB = 1e6
DEFAULT_CTX = 2048                 # the context `perfx run` and `chat` use when none is given


@dataclass
class ModelInfo:
    """One model as `perfx models --json` and `perfx show --json` print it."""

    name: str
    architecture: str
    params: str
    quantization: str
    size: int | None               # bytes of the file (the registry's, else the local file's)
    file: str
    path: str                      # where the file is, or will be once downloaded
    downloaded: bool
    default: bool = False
    context: int | None = None     # the model's trained context, from the GGUF header
    template: str | None = None    # the chat template the file defines
    memory_need: int | None = None  # bytes to run it at memory_ctx: the file + an f32 KV cache + headroom
    memory_ctx: int | None = None   # DEFAULT_CTX, or the model's context where shorter
    fits: bool | None = None       # memory_need <= memory available now (None: not known)
    source: str | None = None
    license: str | None = None
    description: str | None = None


def header_facts(path: Path) -> dict:
    """Architecture, quantization, context, template, parameter count and KV bytes a token from a GGUF
    header; {} for a file that is not GGUF."""
    from gguf.constants import LlamaFileType

    from perfx.engine.formats.gguf_file import parse_header

    try:
        header = parse_header(path)
    except (OSError, ValueError, ImportError, Exception):  # not GGUF, cut short, or unreadable
        return {}
    md = header.metadata
    arch = str(md.get("general.architecture", "?"))
    facts: dict = {"architecture": arch, "context": md.get(f"{arch}.context_length"),
                   "template": md.get("tokenizer.chat_template")}
    try:
        facts["quantization"] = LlamaFileType(int(md["general.file_type"])).name.removeprefix("MOSTLY_")
    except (KeyError, ValueError):
        pass
    count = sum(int(_prod(t.shape)) for t in header.tensors)
    facts["params"] = (f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M" if count >= 1e6
                       else f"{count / 1e3:.0f}K")
    heads = md.get(f"{arch}.attention.head_count")
    kv_heads = md.get(f"{arch}.attention.head_count_kv", heads)
    dim = md.get(f"{arch}.embedding_length")
    key_length = md.get(f"{arch}.attention.key_length") or (dim // heads if dim and heads else None)
    layers = md.get(f"{arch}.block_count")
    if isinstance(kv_heads, list):
        kv_heads = max(kv_heads)
    if layers and kv_heads and key_length:
        facts["kv_bytes_per_token"] = 2 * layers * kv_heads * key_length * 4
    return facts


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def describe(entry, path: Path | None = None, default: bool = False) -> ModelInfo:
    """A registry entry (or a bare file when `entry` is None) with what its local file says."""
    from perfx.engine.hub import download
    from perfx.engine.memory import HEADROOM, available_bytes
    from perfx.engine.hub.registry import local_path

    path = path or local_path(entry)
    here = path.is_file() and (entry is None or entry.size is None or path.stat().st_size == entry.size)
    info = ModelInfo(
        name=entry.name if entry else path.name, architecture=entry.architecture if entry else "?",
        params=entry.params if entry else "?", quantization=entry.quantization if entry else "?",
        size=(entry.size or download.expected_digest(entry)[0]) if entry else None, file=path.name,
        path=str(path), downloaded=here, default=default,
        source=entry.source.describe() if entry else None, license=entry.license if entry else None,
        description=entry.description if entry else None)
    facts = header_facts(path) if here else {}
    for key in ("architecture", "quantization", "params", "context", "template"):
        if facts.get(key) is not None:
            setattr(info, key, facts[key])
    if here:
        info.size = path.stat().st_size
    if info.size:
        ctx = info.memory_ctx = min(DEFAULT_CTX, info.context or DEFAULT_CTX)
        info.memory_need = info.size + facts.get("kv_bytes_per_token", 0) * ctx + HEADROOM
        available = available_bytes()
        info.fits = None if available is None else info.memory_need <= available
    return info


def _size(n: int | None) -> str:
    return "?" if not n else f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / MB:.0f} MB" if n >= MB else f"{n / 1e3:.0f} kB"


def _fits(flag: bool | None) -> str:
    return "[dim]?[/]" if flag is None else "[green]yes[/]" if flag else "[red]no[/]"


@command
def models(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")):
    """List the registry's models: architecture, size, quantization, downloaded, fits in memory."""
    from perfx.engine.hub.registry import load_registry

    registry = load_registry()
    infos = [describe(e, default=e.name == registry.default) for e in registry.models.values()]
    if as_json:
        print(json.dumps([asdict(i) for i in infos], indent=2))
        return
    out = Console() if sys.stdout.isatty() else Console(width=200)
    table = Table(title="perfx models")
    for col in ("name", "arch", "params", "quant", "size", "local", "fits"):
        table.add_column(col, justify="right" if col in ("size", "params") else "left",
                         no_wrap=col == "name", overflow="fold")
    for i in infos:
        label = f"{i.name} [dim](default)[/]" if i.default else i.name
        table.add_row(label, i.architecture, i.params, i.quantization, _size(i.size),
                      "[green]yes[/]" if i.downloaded else "[dim]no[/]", _fits(i.fits))
    out.print(table)
    out.print("[dim]fits: the file, a float32 KV cache of 2048 tokens and headroom, against the memory "
              "available now; `perfx show NAME` for details[/]", soft_wrap=True)


def _lookup(model: str):
    """A registry entry or hub file by name (None for a path), and where its file is."""
    from perfx.engine.hub.registry import load_registry, local_path

    path = Path(model).expanduser()
    if path.is_file():
        return None, path
    entry = load_registry().get(model)
    return entry, local_path(entry)


@command
def show(
    model: str = typer.Argument(..., help="Registry name, hf:ORG/REPO/FILE or a GGUF file."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
):
    """A model's details: architecture, quantization, context, chat template, file (without loading it)."""
    entry, path = _lookup(model)
    info = describe(entry, path)
    if as_json:
        print(json.dumps(asdict(info), indent=2))
        return
    for line in show_lines(info):
        print(line)


def show_lines(info: ModelInfo) -> list[str]:
    """`perfx show`'s text, also shown by the chat's /show."""
    template = info.template
    rows = [("model", info.name), ("description", info.description), ("architecture", info.architecture),
            ("parameters", info.params), ("quantization", info.quantization),
            ("context", f"{info.context} tokens" if info.context else None), ("size", _size(info.size)),
            ("license", info.license), ("source", info.source),
            ("file", info.path + ("" if info.downloaded else "  (not downloaded: `perfx download`)")),
            ("memory", f"{_size(info.memory_need)} at ctx {info.memory_ctx}, "
                       + {True: "fits", False: "does not fit", None: "?"}[info.fits] + " in the memory available"
             if info.memory_need else None),
            ("template", (template.strip().splitlines() or [""])[0][:100] + (" …" if template.strip().count("\n")
                                                                               else "") if template else
             ("none in the file" if info.downloaded else None))]
    return [f"{key:<13}{value}" for key, value in rows if value is not None]


@command
def rm(
    names: list[str] = typer.Argument(..., help="Registry names or hf:ORG/REPO/FILE specs."),
):
    """Delete downloaded models (and unfinished downloads) from the model cache."""
    from perfx.engine.hub import download
    from perfx.engine.hub.registry import local_path

    for name in names:
        entry, path = _lookup(name)
        if entry is None:
            raise PerfxError(f"{name} is a file of yours, not one perfx downloaded; delete it yourself")
        target = local_path(entry)
        leftovers = [target, download.recorded_path(entry), target.with_name(target.name + ".part")]
        if target.parent.is_dir() and entry.source.kind == "pypi":
            leftovers += [p for p in target.parent.iterdir() if p.name.endswith((".whl", ".whl.part"))]
        freed = 0
        for p in leftovers:
            if p.is_file():
                freed += p.stat().st_size
                p.unlink()
        if not freed:
            print(f"{escape(entry.name)} is not downloaded", file=sys.stderr)
            continue
        if target.parent.is_dir() and not any(target.parent.iterdir()):
            target.parent.rmdir()
        print(f"deleted {target} ({_size(freed)})")
