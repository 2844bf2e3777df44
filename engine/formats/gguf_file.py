"""GGUF model files: metadata into a ModelConfig, tensors memory-mapped and kept as stored.

Tensors stay in their quantized blocks (`engine.formats.tensors.QTensor`).

"qwen2" files hold the LLaMA block plus Q, K and V biases (`blk.N.attn_{q,k,v}.bias`), with Q and K
rows in Hugging Face's rotate_half order (llama.cpp runs them with NEOX RoPE): reading permutes those
rows, and the Q and K biases alike, into the adjacent-pair order of "llama" files (`engine.formats.hf.permute_qk`).
"gemma3" files too (and their per-head Q and K norm weights); their block is described by
`arch_variations`. "phi3" files too, whose Q, K and V are one `attn_qkv` matrix and gate and up one
`ffn_up` matrix [2 * ffn, dim] (gate rows first): reading cuts them into the tensors of "llama" files,
as views of the same rows.

Nothing read is trusted: counts and lengths against the file's size, array nesting, tensor dimensions
(Python ints, no overflow), the tensor table's layout (aligned, in order, no overlap or gap, inside the
file), the type of every metadata key perfx reads, and the model's hyper-parameters (`checked_config`).
What the file asks for beyond what perfx runs is refused (`engine.formats.features`); any other failure while
reading is one line, "FILE is corrupt (...)" (`engine.errors.reading_model`).
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


from ..config import ModelConfig, checked_config
from ..errors import ModelFileError, PerfxError, reading_model
from ..quant.gguf_blocks import BLOCK_SIZES
from .features import gguf_requests, refuse_unsupported
from .tensors import QTensor

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3", "phi3")
ROTATE_HALF_ARCHS = ("qwen2", "gemma3", "phi3")   # Q and K rows stored in rotate_half order (NEOX RoPE)
GGUF_MAGIC = b"GGUF"


@dataclass
class GGUFModel:
    path: Path
    config: ModelConfig
    metadata: dict          # every key/value of the file, as Python values
    tensors: dict[str, QTensor]


def read_gguf(path: str | Path) -> GGUFModel:
    """Open a GGUF file, check it is complete, consistent and of a supported kind, and map its tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise PerfxError(f"cannot read {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise PerfxError(f"{path} is not a GGUF model file (it does not start with 'GGUF')")
    with reading_model(path):
        return _read(path)


def _read(path: Path) -> GGUFModel:
    try:
        header = parse_header(path)
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise ModelFileError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
            "download it again (`perfx download` re-fetches registry models)"
        ) from None
    metadata = header.metadata
    check_metadata(metadata, path)

    data = np.memmap(path, np.uint8, mode="r")     # the tensors are views of this one mapping
    check_tensor_table(header, len(data), path)
    tensors: dict[str, QTensor] = {}
    for info in header.tensors:
        start = header.data_start + info.offset
        raw = data[start:start + info.nbytes]
        if info.qtype in PLAIN_TYPES:
            raw = raw.view(PLAIN_TYPES[info.qtype]).reshape(info.shape)
        else:                                         # quantized blocks: [rows..., bytes per row]
            raw = raw.reshape(*info.shape[:-1], info.nbytes // math.prod(info.shape[:-1]))
        tensors[info.name] = QTensor(info.name, info.qtype, info.shape, raw)

    config = config_from_metadata(metadata, tensors, path)
    refuse_unsupported(path, config.arch, gguf_requests(config.arch, metadata, tensors, config.n_layers))
    if config.arch == "phi3":
        tensors = split_fused(tensors, config, path)
    if config.arch in ROTATE_HALF_ARCHS:
        tensors = adjacent_pairs(tensors, config)
    return GGUFModel(path=path, config=config, metadata=metadata, tensors=tensors)


# ---- the file's header ---------------------------------------------------------------------------
# GGUF v2/v3: magic, version u32, tensor count u64, metadata count u64; metadata as (key string, value
# type u32, value); tensor infos as (name, n_dims u32, dims u64 x n_dims fastest first, type u32, offset
# u64); tensor data from the next multiple of general.alignment (32 by default). Strings are a u64
# length and UTF-8 bytes. Parsed straight from the mapped file into Python values, so that opening a
# model costs little more memory than its vocabulary.

PLAIN_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
               "I32": np.int32, "I64": np.int64}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    qtype: str                  # GGML type name ("Q4_1", "F32", ...)
    shape: tuple[int, ...]      # math order: the contiguous dimension last
    offset: int                 # from the start of the data section
    nbytes: int


@dataclass
class Header:
    version: int
    metadata: dict
    tensors: list[TensorInfo]
    data_start: int
    alignment: int


MAX_NESTING = 4                 # arrays of arrays: deeper is refused
MAX_DIMS = 4                    # GGML tensors have at most 4 dimensions
MAX_NAME = 256
_MIN_BYTES = {_STRING: 8, _ARRAY: 12}   # the least a value of a type can take


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def count(self, n: int, item_bytes: int, what: str) -> int:
        """n, checked to fit in the rest of the file at item_bytes or more each (`what` names n as "{}")."""
        if n * item_bytes > len(self.buf) - self.pos:
            raise ValueError(what.format(n) + ", more than the rest of the file holds")
        return n

    def string(self) -> str:
        n = self.count(self.scalar("<Q"), 1, "a string of {} bytes")
        text = str(self.buf[self.pos:self.pos + n], "utf-8")
        self.pos += n
        return text

    def value(self, vtype: int, depth: int = 0):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_NESTING:
                raise ValueError(f"a metadata array is nested more than {MAX_NESTING} deep")
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in _ARRAY_DTYPES:
                dtype = np.dtype(_ARRAY_DTYPES[etype])
                self.count(n, dtype.itemsize, "an array of {} values")
                values = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
                self.pos += n * dtype.itemsize
                return values
            if etype not in _MIN_BYTES:
                raise ValueError(f"unknown metadata array element type {etype}")
            n = self.count(n, _MIN_BYTES[etype], "an array of {} values")
            return [self.value(etype, depth + 1) for _ in range(n)]
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        raise ValueError(f"unknown metadata value type {vtype}")


def parse_header(path: Path) -> Header:
    """The metadata and tensor table of a GGUF file (ValueError / struct.error on a cut or bad file)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        c = _Cursor(mm)
        if c.scalar("<4s") != GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        version = c.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors = c.count(c.scalar("<Q"), 24, "a tensor table of {} tensors")
        n_kv = c.count(c.scalar("<Q"), 13, "metadata of {} keys")
        metadata = {}
        for _ in range(n_kv):
            key = c.string()
            if key in metadata:
                raise ValueError(f"metadata key {key!r:.60} appears twice")
            metadata[key] = c.value(c.scalar("<I"))
        tensors, names = [], set()
        for _ in range(n_tensors):
            name = c.string()
            if not 0 < len(name) <= MAX_NAME or name in names:
                raise ValueError(f"tensor name {name!r:.60} is empty, too long or appears twice")
            names.add(name)
            n_dims = c.scalar("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ValueError(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} are possible)")
            dims = [c.scalar("<Q") for _ in range(n_dims)]
            type_id, offset = c.scalar("<I"), c.scalar("<Q")
            try:
                qtype = GGMLQuantizationType(type_id).name
            except ValueError:
                raise ValueError(f"tensor {name} has unknown type {type_id}") from None
            if qtype not in BLOCK_SIZES:
                raise ModelFileError(f"{path}: tensor {name} has type {qtype}, which perfx does not support "
                                     f"(supported: {', '.join(BLOCK_SIZES)})")
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            count = math.prod(dims)                   # Python ints: no overflow
            if min(dims) < 1 or dims[0] % block or count * type_size // block > len(mm):
                raise ValueError(f"tensor {name} of type {qtype} has impossible dimensions {dims}")
            tensors.append(TensorInfo(name, qtype, tuple(reversed(dims)), offset, count // block * type_size))
        align = metadata.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or not 0 < align <= 1 << 20 or align & (align - 1):
            raise ModelFileError(f"{path}: general.alignment is {align!r:.40}, not a power of two up to 2^20; "
                                 "the file is corrupt")
        data_start = -(-c.pos // align) * align
    return Header(version, metadata, tensors, data_start, align)


def check_tensor_table(header: Header, file_size: int, path: Path) -> None:
    """Each tensor's data starts where the one before it ends, padded to the alignment, as GGUF writers
    lay them out and llama.cpp requires: no misaligned start, overlap, gap or data past the file's end
    (a tensor re-typed to a larger size runs into the next one and is caught here)."""
    expected, before = 0, None
    for t in header.tensors:
        where = f"{path}: tensor {t.name} starts at data offset {t.offset}"
        if t.offset % header.alignment:
            raise ModelFileError(f"{where}, not a multiple of the alignment {header.alignment}; the file is corrupt")
        if t.offset < expected:
            raise ModelFileError(f"{where}, inside {before} (which ends at {expected}); the file is corrupt")
        if t.offset > expected:
            raise ModelFileError(f"{where}, leaving {t.offset - expected} unused bytes after "
                                 f"{before or 'the header'}; the file is corrupt")
        end = header.data_start + t.offset + t.nbytes
        if end > file_size:
            raise ModelFileError(f"{path} is truncated: tensor {t.name} ends past the end of the file; "
                                 "download it again")
        expected, before = -(-(t.offset + t.nbytes) // header.alignment) * header.alignment, t.name


# ---- metadata ---------------------------------------------------------------------------------------
# The type of every key perfx reads: int, float, str, bool, [T] (a list of T) or "id" (a token id).
KEY_TYPES = {
    "general.architecture": str, "general.name": str, "general.alignment": int,
    "tokenizer.ggml.model": str, "tokenizer.ggml.pre": str, "tokenizer.chat_template": str,
    "tokenizer.ggml.tokens": [str], "tokenizer.ggml.merges": [str], "tokenizer.ggml.scores": [float],
    "tokenizer.ggml.token_type": [int], "tokenizer.ggml.add_bos_token": bool,
    "tokenizer.ggml.add_eos_token": bool, "tokenizer.ggml.add_space_prefix": bool,
    **{f"tokenizer.ggml.{k}_token_id": "id" for k in ("bos", "eos", "eot", "eom", "padding", "unknown",
                                                      "seperator", "mask")},
}
USED_IDS = [f"tokenizer.ggml.{k}_token_id" for k in ("bos", "eos", "eot", "eom")]   # must be in the vocabulary
ARCH_KEY_TYPES = {   # "{arch}." keys
    "block_count": int, "context_length": int, "embedding_length": int, "feed_forward_length": int,
    "attention.head_count": int, "attention.head_count_kv": int, "attention.key_length": int,
    "attention.value_length": int, "vocab_size": int, "rope.dimension_count": int,
    "attention.layer_norm_rms_epsilon": float, "rope.freq_base": float,
}


def _is(value, kind) -> bool:
    if isinstance(kind, list):
        return isinstance(value, list) and all(_is(v, kind[0]) for v in value)
    if kind in (int, "id"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_metadata(md: dict, path: Path) -> None:
    """Every key perfx reads has the type it must have; token ids and per-token lists fit the vocabulary."""
    arch = md.get("general.architecture")
    types = {**KEY_TYPES, **{f"{arch}.{k}": t for k, t in ARCH_KEY_TYPES.items()}}
    for key, kind in types.items():
        if key in md and not _is(md[key], kind):
            name = "int (a token id)" if kind == "id" else (f"list of {kind[0].__name__}" if isinstance(kind, list)
                                                             else kind.__name__)
            raise ModelFileError(f"{path}: metadata {key} is {md[key]!r:.40}, not of type {name}; "
                                 "the file is corrupt")
    n = len(md.get("tokenizer.ggml.tokens") or ())
    for key in USED_IDS:
        if n and key in md and not 0 <= md[key] < n:
            raise ModelFileError(f"{path}: metadata {key} is {md[key]}, outside the {n} tokens of the vocabulary; "
                                 "the file is corrupt")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in md and len(md[key]) != n:
            raise ModelFileError(f"{path}: metadata {key} has {len(md[key])} entries for {n} tokens; "
                                 "the file is corrupt")


def adjacent_pairs(tensors: dict[str, QTensor], config: ModelConfig) -> dict[str, QTensor]:
    """Q and K weight rows and bias values permuted from rotate_half order into adjacent pairs; the
    raw data (quantized blocks included) is permuted by whole rows, so nothing is requantized."""
    from .hf import permute_qk

    heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads, "attn_q_norm": 1, "attn_k_norm": 1}
    out = dict(tensors)
    for name, t in tensors.items():
        n = heads.get(name.split(".")[-2]) if name.startswith("blk.") else None
        if n and t.shape[0] == n * config.head_dim:   # other shapes are refused by weights_from_tensors
            out[name] = replace(t, raw=np.ascontiguousarray(permute_qk(np.asarray(t.raw), n)))
    return out


def split_fused(tensors: dict[str, QTensor], config: ModelConfig, path: Path) -> dict[str, QTensor]:
    """phi3's attn_qkv into attn_q, attn_k, attn_v and its ffn_up [2 ffn, dim] into ffn_gate, ffn_up:
    row views of the same data (a missing or misshapen tensor is named)."""
    c, out = config, dict(tensors)
    for i in range(c.n_layers):
        parts = {"attn_qkv": [("attn_q", c.q_dim), ("attn_k", c.kv_dim), ("attn_v", c.kv_dim)],
                 "ffn_up": [("ffn_gate", c.ffn_dim), ("ffn_up", c.ffn_dim)]}
        for fused, pieces in parts.items():
            name = f"blk.{i}.{fused}.weight"
            t = tensors.get(name)
            if t is None:
                raise PerfxError(f"{path}: tensor {name} is missing; the file is incomplete")
            rows = sum(n for _, n in pieces)
            if len(t.shape) != 2 or t.shape[0] != rows:
                raise PerfxError(f"{path}: tensor {name} has shape {list(t.shape)}, expected [{rows}, {c.dim}]")
            start = 0
            for piece, n in pieces:
                out[f"blk.{i}.{piece}.weight"] = replace(t.rows(start, start + n), name=f"blk.{i}.{piece}.weight")
                start += n
        out.pop(f"blk.{i}.attn_qkv.weight")
    return out


def config_from_metadata(md: dict, tensors: dict[str, QTensor], path: Path) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFileError(
            f"{path}: architecture '{arch!s:.40}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ModelFileError(f"{path}: tensor token_embd.weight is missing; the file is incomplete")
    keys = {field: f"{arch}.{key}" for field, key in CONFIG_KEYS.items()}
    values = {field: md[key] for field, key in keys.items() if key in md}
    for field in ("n_layers", "dim", "n_heads", "ffn_dim", "ctx_len", "norm_eps"):
        if field not in values:
            raise ModelFileError(f"{path}: metadata key {keys[field]} is missing; the file is incomplete")
    n_heads = values["n_heads"]
    if "head_dim" not in values and isinstance(n_heads, int) and n_heads > 0:
        values["head_dim"] = values["dim"] // n_heads
    values.setdefault("n_kv_heads", n_heads)
    values.setdefault("vocab_size", embd.shape[0])
    values.setdefault("rope_base", 10000.0)
    values.setdefault("rope_dim", values.get("head_dim", 0))
    values.update(arch=arch, tied_embedding="output.weight" not in tensors, name=md.get("general.name", path.stem))
    c = checked_config(values, str(path), keys)
    return replace(c, **arch_variations(arch, md, tensors, path, c.dim, c.n_heads, c.head_dim, c.n_layers))


CONFIG_KEYS = {   # ModelConfig field: its "{arch}." key
    "n_layers": "block_count", "dim": "embedding_length", "n_heads": "attention.head_count",
    "n_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length", "ffn_dim": "feed_forward_length",
    "vocab_size": "vocab_size", "ctx_len": "context_length", "norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_base": "rope.freq_base", "rope_dim": "rope.dimension_count",
}


# ---- what each architecture changes in the LLaMA block (ModelConfig's variation fields) -----------------

GEMMA3_SWA_PERIOD = 6          # llama.cpp: every 6th layer attends globally, the other 5 through the window
GEMMA3_ROPE_BASE_SWA = 10000.0  # llama.cpp's fixed RoPE base of Gemma 3's windowed layers


def arch_variations(arch: str, md: dict, tensors: dict, path: Path, dim: int, n_heads: int, head_dim: int,
                    n_layers: int) -> dict:
    """The ModelConfig fields by which `arch` differs from the plain LLaMA block, read as llama.cpp reads
    them; a setting perfx does not implement is refused in one line."""
    out: dict = {}
    scaling = md.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        out["rope_scale"] = float(md.get(f"{arch}.rope.scaling.factor", 1.0))
    elif scaling != "none":
        raise ModelFileError(f"{path}: RoPE scaling '{scaling}' ({arch}.rope.scaling.type) is not supported "
                         "(supported: none, linear, and Llama 3's rope_freqs)")
    if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
        raise ModelFileError(f"{path}: LongRoPE (rope_factors_long / rope_factors_short tensors) is not supported")
    if "rope_freqs.weight" in tensors:
        factors = tensors["rope_freqs.weight"].dequantize().reshape(-1)
        out["rope_freq_factors"] = tuple(float(f) for f in factors)
    window = int(md.get(f"{arch}.attention.sliding_window", 0) or 0)
    if arch == "gemma3":
        softcap = float(md.get(f"{arch}.final_logit_softcapping", 0.0) or 0.0)
        if softcap:
            raise ModelFileError(f"{path}: final logit soft-capping ({arch}.final_logit_softcapping) is not supported")
        out.update(act="gelu_tanh", embed_scale=float(np.sqrt(np.float32(dim))), post_norms=True, qk_norm=True,
                   # llama.cpp: 1/sqrt(query_pre_attn_scalar), which is dim / n_heads for the 27B (62 layers)
                   attn_scale=float((dim // n_heads if n_layers == 62 else head_dim) ** -0.5))
        if window:
            pattern = md.get(f"{arch}.attention.sliding_window_pattern")
            if isinstance(pattern, list):
                swa = tuple(bool(p) for p in pattern)
            else:
                period = int(pattern or GEMMA3_SWA_PERIOD)
                swa = tuple(i % period < period - 1 for i in range(n_layers))
            out.update(sliding_window=window, swa_layers=swa,
                       rope_base_swa=float(md.get(f"{arch}.rope.freq_base_swa", GEMMA3_ROPE_BASE_SWA)))
    elif window:                  # Mistral-style: every layer attends through the window, one RoPE
        out.update(sliding_window=window, swa_layers=(True,) * n_layers)
    return out
