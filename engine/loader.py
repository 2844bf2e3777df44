"""Opening a model file of any supported kind into one shape: config, tensors, tokenizer.

Tensors are named as in GGUF ("blk.0.attn_q.weight", ...) whatever the file's own names, so that
`engine.model.weights_from_tensors` reads every kind alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .errors import PerfxError
from .tensors import QTensor
from .tokenizer import Tokenizer


@dataclass
class ModelFile:
    path: Path
    kind: str                       # "gguf"
    config: ModelConfig
    tensors: dict[str, QTensor]     # GGUF tensor names
    tokenizer: Tokenizer
    metadata: dict                  # the file's own key/values, for display


def open_model(path: str | Path) -> ModelFile:
    """Reads the file's header and maps its tensors; the kind is recognised from the content."""
    path = Path(path)
    if path.is_dir():
        raise PerfxError(f"{path} is a directory; give the model file inside it")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise PerfxError(f"cannot read {path}: {e.strerror}") from None
    if head[:4] == b"GGUF":
        from .gguf_file import read_gguf

        g = read_gguf(path)
        return ModelFile(path, "gguf", g.config, g.tensors, Tokenizer.from_gguf(g.metadata), g.metadata)
    raise PerfxError(f"{path} is not a GGUF model file (it does not start with 'GGUF')")
