"""GGUF model files: metadata into a ModelConfig, tensors memory-mapped and kept as stored.

Tensors stay in their quantized blocks (`engine.tensors.QTensor`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from .config import ModelConfig
from .errors import PerfxError
from .quants import BLOCK_SIZES
from .tensors import QTensor

SUPPORTED_ARCHS = ("llama",)
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

    from gguf import GGUFReader  # imported here: it is the slowest import of the engine

    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # the reader fails in many ways on a cut file
        raise PerfxError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
            "download it again (`perfx download` re-fetches registry models)"
        ) from None

    file_size = path.stat().st_size
    metadata = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception:  # a value type the reader cannot render: not needed by perfx
            continue

    tensors: dict[str, QTensor] = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype not in BLOCK_SIZES:
            raise PerfxError(
                f"{path}: tensor {t.name} has type {qtype}, which perfx does not support "
                f"(supported: {', '.join(BLOCK_SIZES)})"
            )
        if t.data_offset + t.n_bytes > file_size:
            raise PerfxError(f"{path} is truncated: tensor {t.name} ends past the end of the file; download it again")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
        tensors[t.name] = QTensor(t.name, qtype, shape, t.data)

    config = config_from_metadata(metadata, tensors, path)
    return GGUFModel(path=path, config=config, metadata=metadata, tensors=tensors)


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
    )
