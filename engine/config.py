"""Model hyper-parameters, read from a model file's metadata."""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields


@dataclass(frozen=True)
class ModelConfig:
    arch: str             # "llama", or "qwen2" (the same block with Q, K and V biases)
    n_layers: int
    dim: int              # residual width
    n_heads: int
    n_kv_heads: int       # grouped-query attention: n_heads % n_kv_heads == 0
    head_dim: int
    ffn_dim: int          # SwiGLU hidden width
    vocab_size: int
    ctx_len: int          # context the model was trained for
    norm_eps: float
    rope_base: float
    rope_dim: int         # rotated dimensions of each head (== head_dim for LLaMA)
    tied_embedding: bool  # output matrix is the token embedding
    name: str = ""

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


# ---- checking a config read from a file ------------------------------------------------------------
# Every field's type and range; a file's values are checked against these before anything is sized by them.
LIMITS = {                       # integer fields: (lowest, highest)
    "n_layers": (1, 4096), "dim": (1, 1 << 20), "n_heads": (1, 1 << 14), "n_kv_heads": (1, 1 << 14),
    "head_dim": (2, 1 << 16), "ffn_dim": (1, 1 << 22), "vocab_size": (1, 1 << 24),
    "ctx_len": (1, (1 << 31) - 1), "rope_dim": (2, 1 << 16),
}


def checked_config(values: dict, where: str, keys: dict[str, str] | None = None) -> ModelConfig:
    """A ModelConfig from a file's values, each checked for its type and range (PerfxError in one line,
    naming the file's own key from `keys` where given). Fields the dataclass defaults may be left out."""
    from .errors import ModelFileError

    keys = keys or {}

    def bad(field: str, why: str) -> ModelFileError:
        return ModelFileError(f"{where}: {keys.get(field, field)} {why}; the file is corrupt")

    out = {}
    for f in fields(ModelConfig):
        if f.name not in values:
            if f.default is MISSING:
                raise bad(f.name, "is missing")
            continue
        v = values[f.name]
        if f.name in LIMITS:
            if isinstance(v, float) and math.isfinite(v) and v.is_integer():
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(f.name, f"is {v!r:.40}, not an integer")
            lo, hi = LIMITS[f.name]
            if not lo <= v <= hi:
                raise bad(f.name, f"is {v}, outside {lo}..{hi}")
        elif f.name in ("norm_eps", "rope_base"):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise bad(f.name, f"is {v!r:.40}, not a finite number above 0")
            if f.name == "norm_eps" and v >= 1:
                raise bad(f.name, f"is {v}, not below 1")
            v = float(v)
        elif f.name == "tied_embedding":
            v = bool(v) if isinstance(v, (bool, int)) else v
            if not isinstance(v, bool):
                raise bad(f.name, f"is {v!r:.40}, not true or false")
        elif not isinstance(v, str):
            raise bad(f.name, f"is {v!r:.40}, not a string")
        out[f.name] = v
    c = ModelConfig(**out)
    if c.n_heads % c.n_kv_heads:
        raise bad("n_kv_heads", f"({c.n_kv_heads}) does not divide the {c.n_heads} attention heads")
    if c.head_dim % 2 or c.rope_dim % 2 or c.rope_dim > c.head_dim:
        raise bad("rope_dim", f"is {c.rope_dim} for heads of {c.head_dim} dimensions (RoPE needs an even number, "
                              "at most the head's)")
    return c
