"""Opening a model file of any supported kind into one shape: config, tensors, tokenizer.

Tensors are named as in GGUF ("blk.0.attn_q.weight", ...) whatever the file's own names, so that
`engine.model.weights_from_tensors` reads every kind alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig
from ..errors import PerfxError, reading_model
from ..text.tokenizer import Tokenizer
from .tensors import QTensor

VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.merges")


@dataclass
class ModelFile:
    path: Path
    kind: str                       # "gguf", "perfx", "hf" or "awq" (an AutoAWQ checkpoint)
    config: ModelConfig
    tensors: dict[str, QTensor]     # GGUF tensor names
    tokenizer: Tokenizer
    metadata: dict                  # the file's own key/values, for display


def open_model(path: str | Path) -> ModelFile:
    """Reads the file's header and maps its tensors; the kind is recognised from the content:
    a GGUF file, a perfx file, or a Hugging Face checkpoint directory (plain or AutoAWQ).
    Whatever the file holds, the only exception is a PerfxError in one line."""
    path = Path(path)
    with reading_model(path):
        return _open(path)


def _open(path: Path) -> ModelFile:
    if path.is_dir():
        if (path / "config.json").is_file():
            from .hf import read_hf

            return read_hf(path)
        raise PerfxError(f"{path} is a directory without config.json; give a model file or a Hugging Face "
                         "checkpoint directory")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise PerfxError(f"cannot read {path}: {e.strerror}") from None
    if head[:4] == b"GGUF":
        from .gguf_file import read_gguf

        g = read_gguf(path)
        tokenizer = Tokenizer.from_gguf(g.metadata)
        # The vocabulary lives on in the tokenizer; the metadata keeps the file's other keys.
        metadata = {k: v for k, v in g.metadata.items() if k not in VOCABULARY_KEYS}
        return ModelFile(path, "gguf", g.config, g.tensors, tokenizer, metadata)
    from .perfx_format import read_perfx, safetensors_header

    if safetensors_header(path) is not None:
        p = read_perfx(path)
        return ModelFile(path, "perfx", p.config, p.tensors, p.tokenizer, p.metadata)
    raise PerfxError(f"{path} is not a GGUF model file (it does not start with 'GGUF') nor a perfx model file")
