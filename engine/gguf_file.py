"""GGUF model files: metadata into a ModelConfig, tensors memory-mapped and kept as stored.

Tensors stay in their quantized blocks (`engine.tensors.QTensor`).

"qwen2" files hold the LLaMA block plus Q, K and V biases (`blk.N.attn_{q,k,v}.bias`), with Q and K
rows in Hugging Face's rotate_half order (llama.cpp runs them with NEOX RoPE): reading permutes those
rows, and the Q and K biases alike, into the adjacent-pair order of "llama" files (`engine.hf.permute_qk`).
"gemma3" files too (and their per-head Q and K norm weights); their block is described by
`arch_variations`. "phi3" files too, whose Q, K and V are one `attn_qkv` matrix and gate and up one
`ffn_up` matrix [2 * ffn, dim] (gate rows first): reading cuts them into the tensors of "llama" files,
as views of the same rows.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


from .config import ModelConfig
from .errors import PerfxError
from .quants import BLOCK_SIZES
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
    """Open a GGUF file, check it is complete and of a supported kind, and map its tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise PerfxError(f"cannot read {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise PerfxError(f"{path} is not a GGUF model file (it does not start with 'GGUF')")

    try:
        header = parse_header(path)
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise PerfxError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
            "download it again (`perfx download` re-fetches registry models)"
        ) from None
    metadata = header.metadata

    data = np.memmap(path, np.uint8, mode="r")     # the tensors are views of this one mapping
    tensors: dict[str, QTensor] = {}
    for info in header.tensors:
        if info.qtype not in BLOCK_SIZES:
            raise PerfxError(
                f"{path}: tensor {info.name} has type {info.qtype}, which perfx does not support "
                f"(supported: {', '.join(BLOCK_SIZES)})"
            )
        start = header.data_start + info.offset
        nbytes = info.nbytes
        if start + nbytes > len(data):
            raise PerfxError(f"{path} is truncated: tensor {info.name} ends past the end of the file; download it again")
        raw = data[start:start + nbytes]
        if info.qtype in PLAIN_TYPES:
            raw = raw.view(PLAIN_TYPES[info.qtype]).reshape(info.shape)
        else:                                         # quantized blocks: [rows..., bytes per row]
            raw = raw.reshape(*info.shape[:-1], nbytes // max(1, int(np.prod(info.shape[:-1]))))
        tensors[info.name] = QTensor(info.name, info.qtype, info.shape, raw)

    config = config_from_metadata(metadata, tensors, path)
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


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        text = str(self.buf[self.pos:self.pos + n], "utf-8")
        self.pos += n
        return text

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in _ARRAY_DTYPES:
                dtype = np.dtype(_ARRAY_DTYPES[etype])
                if self.pos + n * dtype.itemsize > len(self.buf):
                    raise ValueError("an array runs past the end of the file")
                values = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
                self.pos += n * dtype.itemsize
                return values
            return [self.value(etype) for _ in range(n)]
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
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = c.string()
            metadata[key] = c.value(c.scalar("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
            type_id, offset = c.scalar("<I"), c.scalar("<Q")
            try:
                qtype = GGMLQuantizationType(type_id).name
            except ValueError:
                raise ValueError(f"tensor {name} has unknown type {type_id}") from None
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            count = int(np.prod(dims, dtype=np.int64)) if dims else 1
            tensors.append(TensorInfo(name, qtype, tuple(reversed(dims)), offset, count // block * type_size))
        align = int(metadata.get("general.alignment", 32))
        data_start = -(-c.pos // align) * align
    return Header(version, metadata, tensors, data_start)


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
        raise PerfxError(
            f"{path}: architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )

    def get(key: str, default=None):
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise PerfxError(f"{path}: metadata key {arch}.{key} is missing; the file is incomplete")
        return value

    dim = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = int(md.get(f"{arch}.attention.key_length", dim // n_heads))
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise PerfxError(f"{path}: tensor token_embd.weight is missing; the file is incomplete")
    return ModelConfig(
        arch=arch,
        n_layers=int(get("block_count")),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")),
        vocab_size=int(md.get(f"{arch}.vocab_size", embd.shape[0])),
        ctx_len=int(get("context_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_dim=int(get("rope.dimension_count", head_dim)),
        tied_embedding="output.weight" not in tensors,
        name=str(md.get("general.name", path.stem)),
        **arch_variations(arch, md, tensors, path, dim, n_heads, head_dim, int(get("block_count"))),
    )


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
        raise PerfxError(f"{path}: RoPE scaling '{scaling}' ({arch}.rope.scaling.type) is not supported "
                         "(supported: none, linear, and Llama 3's rope_freqs)")
    if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
        raise PerfxError(f"{path}: LongRoPE (rope_factors_long / rope_factors_short tensors) is not supported")
    if "rope_freqs.weight" in tensors:
        factors = tensors["rope_freqs.weight"].dequantize().reshape(-1)
        out["rope_freq_factors"] = tuple(float(f) for f in factors)
    window = int(md.get(f"{arch}.attention.sliding_window", 0) or 0)
    if arch == "gemma3":
        softcap = float(md.get(f"{arch}.final_logit_softcapping", 0.0) or 0.0)
        if softcap:
            raise PerfxError(f"{path}: final logit soft-capping ({arch}.final_logit_softcapping) is not supported")
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
