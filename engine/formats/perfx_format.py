"""perfx's model format: one safetensors file holding the whole model.

Tensors (GGUF names; `N` is the tensor's own name):

    F32, F16   N                      float32 / float16 [rows, cols] (or [dim] for norms)
    INT4       N.q  N.scale  N.zero   uint8 [rows, cols/2] (low nibble first), fp16 [rows, cols/group] x2
    INT8       N.q  N.scale           int8 [rows, cols], fp16 [rows, cols/32]

Metadata (safetensors' string-to-string header):

    format            "perfx"
    format_version    "1"
    config            ModelConfig as JSON
    tensors           {name: {"qtype", "shape", "group"}} as JSON
    quantization      the scheme as JSON: {"scheme", "group_size", "embedding", "source", "calibration"}
    tokenizer_file    "tokenizer.json" or "tokenizer.model"
    tokenizer         that file's bytes, base64
    tokenizer_config  JSON (bos/eos tokens, add_bos_token)
    chat_template     the Jinja chat template ("" when the model has none)

Files are written to a temporary name and renamed when complete, and read memory-mapped.
"""
from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..config import ModelConfig, checked_config
from ..errors import ModelFileError, PerfxError
from ..text.tokenizer import Tokenizer
from .features import LLAMA, refuse_unsupported, tensor_requests
from .tensors import QTensor

FORMAT_NAME = "perfx"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
STORED_QTYPES = ("F32", "F16", "INT8", "INT4")

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I8": np.int8,
           "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}
_MAX_HEADER = 256 * 1024 * 1024


@dataclass
class SafetensorsFile:
    """A safetensors file's metadata and its tensors as read-only memory maps."""

    path: Path
    metadata: dict[str, str]
    arrays: dict[str, np.ndarray]      # BF16 tensors come back as uint16 bit patterns
    dtypes: dict[str, str]             # safetensors dtype name of each tensor


def safetensors_header(path: Path) -> tuple[dict, int] | None:
    """(header JSON, byte offset of the data) when `path` is laid out as safetensors, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (size,) = struct.unpack("<Q", head)
            if not 2 <= size <= min(_MAX_HEADER, path.stat().st_size - 8):
                return None
            text = f.read(size)
    except OSError as e:
        raise PerfxError(f"cannot read {path}: {e.strerror}") from None
    if text[:1] != b"{":
        return None
    try:
        header = json.loads(text)
    except ValueError:
        return None
    return (header, 8 + size) if isinstance(header, dict) else None


def read_safetensors(path: str | Path) -> SafetensorsFile:
    """Map every tensor of a safetensors file without reading it; checks that each lies inside the file."""
    path = Path(path)
    found = safetensors_header(path)
    if found is None:
        raise PerfxError(f"{path} is not a safetensors file")
    header, start = found
    metadata = header.pop("__metadata__", None) or {}
    size = path.stat().st_size
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    arrays, dtypes, spans = {}, {}, []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise PerfxError(f"{path}: the entry for tensor {name} is malformed; the file is corrupt") from None
        if dtype not in _DTYPES:
            raise PerfxError(f"{path}: tensor {name} has dtype {dtype}, which perfx does not read")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end and min(shape, default=0) >= 0):
            raise ModelFileError(f"{path}: tensor {name} has offsets {[begin, end]} and shape {shape}; "
                                 "the file is corrupt")
        if start + end > size:
            raise PerfxError(f"{path} is truncated: tensor {name} ends past the end of the file")
        np_dtype = np.dtype(_DTYPES[dtype])
        if end - begin != math.prod(shape) * np_dtype.itemsize:
            raise PerfxError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape}; the file is corrupt")
        arrays[name] = data[start + begin:start + end].view(np_dtype).reshape(shape)
        dtypes[name] = dtype
        spans.append((begin, end, name))
    check_layout(spans, path)
    return SafetensorsFile(path, dict(metadata), arrays, dtypes)


def check_layout(spans: list[tuple[int, int, str]], path: Path) -> None:
    """The tensors' data, (begin, end, name) each, tile the data section without overlap or gap, as the
    safetensors format requires."""
    expected, before = 0, "the header"
    for begin, end, name in sorted(spans):
        if begin != expected:
            how = f"overlaps {before}" if begin < expected else f"leaves {begin - expected} unused bytes after {before}"
            raise ModelFileError(f"{path}: tensor {name} {how}; the file is corrupt")
        expected, before = end, name


def is_perfx(path: Path) -> bool:
    found = safetensors_header(path)
    return found is not None and (found[0].get("__metadata__") or {}).get("format") == FORMAT_NAME


# ---- reading ----------------------------------------------------------------------------------------


@dataclass
class PerfxModel:
    path: Path
    config: ModelConfig
    tensors: dict[str, QTensor]
    tokenizer: Tokenizer
    quantization: dict
    metadata: dict[str, str]


def read_perfx(path: str | Path) -> PerfxModel:
    """Open a perfx model file: tensors memory-mapped, tokenizer and chat template from its metadata."""
    path = Path(path)
    st = read_safetensors(path)
    md = st.metadata
    if md.get("format") != FORMAT_NAME:
        raise PerfxError(f"{path} is a safetensors file but not a perfx model; "
                         "for a Hugging Face checkpoint give its directory to `perfx convert`")
    version = md.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise PerfxError(f"{path} is perfx format version {version}, this perfx reads version {FORMAT_VERSION}; "
                         "convert the model again with this perfx (or upgrade perfx)")
    config = _config(_json(md, "config", path), path)
    index = _json(md, "tensors", path)
    if not isinstance(index, dict) or not all(isinstance(e, dict) for e in index.values()):
        raise ModelFileError(f"{path}: metadata 'tensors' is not an object of tensor entries; the file is corrupt")
    refuse_unsupported(path, config.arch, tensor_requests(index, config.n_layers), supported=LLAMA)  # the plain block
    tensors = {name: _tensor(name, entry, st, path) for name, entry in index.items()}
    tokenizer = tokenizer_from_metadata(md, path)
    return PerfxModel(path, config, tensors, tokenizer, _json(md, "quantization", path), md)


def _json(md: dict[str, str], key: str, path: Path):
    try:
        return json.loads(md[key])
    except (KeyError, ValueError):
        raise PerfxError(f"{path}: metadata '{key}' is missing or not JSON; the file is corrupt") from None


def _config(d, path: Path) -> ModelConfig:
    if not isinstance(d, dict):
        raise ModelFileError(f"{path}: metadata 'config' is not an object; the file is corrupt")
    names = {f.name for f in fields(ModelConfig)}
    return checked_config({k: v for k, v in d.items() if k in names}, str(path))


def _tensor(name: str, entry: dict, st: SafetensorsFile, path: Path) -> QTensor:
    qtype, shape, group = entry.get("qtype"), entry.get("shape"), entry.get("group", 0)
    if not (isinstance(shape, list) and 1 <= len(shape) <= 2 and all(_count(d) for d in shape)
            and (group == 0 or _count(group))):
        raise ModelFileError(f"{path}: tensor {name} has shape {shape!r:.40} and group {group!r:.20}; "
                             "the file is corrupt")
    shape = tuple(shape)
    parts = {"F32": {"": "F32"}, "F16": {"": "F16"}, "INT8": {".q": "I8", ".scale": "F16"},
             "INT4": {".q": "U8", ".scale": "F16", ".zero": "F16"}}.get(qtype)
    if parts is None:
        raise PerfxError(f"{path}: tensor {name} has type {qtype}; this perfx reads {', '.join(STORED_QTYPES)}")
    arrays = {}
    for suffix, dtype in parts.items():
        key = name + suffix
        if key not in st.arrays:
            raise PerfxError(f"{path}: tensor {key} is missing; the file is incomplete")
        if st.dtypes[key] != dtype:
            raise PerfxError(f"{path}: tensor {key} is {st.dtypes[key]}, expected {dtype}; the file is corrupt")
        arrays[suffix] = st.arrays[key]
    expected = {"": shape}
    if qtype in ("INT4", "INT8"):
        if len(shape) != 2 or group <= 0 or shape[1] % group:
            raise PerfxError(f"{path}: tensor {name} has shape {list(shape)} and group {group}; the file is corrupt")
        expected = {".q": (shape[0], shape[1] // 2 if qtype == "INT4" else shape[1]),
                    ".scale": (shape[0], shape[1] // group), ".zero": (shape[0], shape[1] // group)}
    for suffix, a in arrays.items():
        if tuple(a.shape) != expected[suffix]:
            raise PerfxError(f"{path}: tensor {name + suffix} has shape {list(a.shape)}, "
                             f"expected {list(expected[suffix])}")
    return QTensor(name, qtype, shape, arrays.get("", arrays.get(".q")), arrays.get(".scale"), arrays.get(".zero"),
                   group)


# ---- tokenizer --------------------------------------------------------------------------------------


def tokenizer_metadata(tokenizer: Tokenizer) -> dict[str, str]:
    """The tokenizer as metadata entries: its file (base64), its config and the chat template."""
    with tempfile.TemporaryDirectory(prefix="perfx-tok-") as tmp:
        tokenizer.save(tmp)
        name = next(n for n in TOKENIZER_FILES if (Path(tmp) / n).is_file())
        blob = (Path(tmp) / name).read_bytes()
        config = json.loads((Path(tmp) / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config.pop("chat_template", None) or ""
    return {"tokenizer_file": name, "tokenizer": base64.b64encode(blob).decode("ascii"),
            "tokenizer_config": json.dumps(config, ensure_ascii=False), "chat_template": template}


def _count(v) -> bool:
    """v is a positive integer (a dimension or a group size)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 40


def tokenizer_from_metadata(md: dict[str, str], path: Path) -> Tokenizer:
    name = md.get("tokenizer_file")
    if name not in TOKENIZER_FILES or "tokenizer" not in md:
        raise PerfxError(f"{path}: the embedded tokenizer is missing; the file is incomplete")
    config = _json(md, "tokenizer_config", path)
    if md.get("chat_template"):
        config["chat_template"] = md["chat_template"]
    with tempfile.TemporaryDirectory(prefix="perfx-tok-") as tmp:
        (Path(tmp) / name).write_bytes(base64.b64decode(md["tokenizer"]))
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return Tokenizer.from_files(tmp)


# ---- writing ----------------------------------------------------------------------------------------


def tensor_arrays(t: QTensor) -> dict[str, np.ndarray]:
    """The arrays a QTensor is stored as, keyed by their names in the file."""
    if t.qtype == "F32":
        return {t.name: np.asarray(t.dequantize(), np.float32).reshape(t.shape)}
    if t.qtype == "F16":
        return {t.name: np.frombuffer(np.ascontiguousarray(t.raw).tobytes(), np.float16).reshape(t.shape)}
    if t.qtype == "INT8":
        return {f"{t.name}.q": np.asarray(t.raw, np.int8), f"{t.name}.scale": np.asarray(t.scale, np.float16)}
    if t.qtype == "INT4":
        return {f"{t.name}.q": np.asarray(t.raw, np.uint8), f"{t.name}.scale": np.asarray(t.scale, np.float16),
                f"{t.name}.zero": np.asarray(t.zero, np.float16)}
    raise PerfxError(f"tensor {t.name} of type {t.qtype} cannot be stored in a perfx file "
                     f"(stored types: {', '.join(STORED_QTYPES)})")


def perfx_metadata(config: ModelConfig, tensors: dict[str, QTensor], tokenizer: Tokenizer,
                   quantization: dict) -> dict[str, str]:
    index = {name: {"qtype": t.qtype, "shape": list(t.shape), **({"group": t.group} if t.group else {})}
             for name, t in tensors.items()}
    return {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
            "config": json.dumps(config.to_dict()), "tensors": json.dumps(index),
            "quantization": json.dumps(quantization), **tokenizer_metadata(tokenizer)}


def write_perfx(path: str | Path, config: ModelConfig, tensors: dict[str, QTensor], tokenizer: Tokenizer,
                quantization: dict, force: bool = False) -> Path:
    """Write a perfx model file; it appears at `path` only once complete."""
    from safetensors.numpy import save_file

    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for t in tensors.values():
        arrays.update({k: np.ascontiguousarray(v) for k, v in tensor_arrays(t).items()})
    metadata = perfx_metadata(config, tensors, tokenizer, quantization)
    with atomic_path(path, force) as tmp:
        save_file(arrays, str(tmp), metadata=metadata)
    return path


def check_output(path: Path, force: bool) -> None:
    """Refuse a directory, an existing file unless forced, and a file whose folder does not exist."""
    if path.is_dir():
        raise PerfxError(f"{path} is a directory; give a file name")
    if path.exists() and not force:
        raise PerfxError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise PerfxError(f"the folder {path.parent} does not exist; create it first")


@contextlib.contextmanager
def atomic_path(path: Path, force: bool) -> Iterator[Path]:
    """A temporary path next to `path`, renamed onto it when the block completes, removed otherwise."""
    check_output(path, force)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
