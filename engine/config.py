"""Model hyper-parameters, read from a model file's metadata."""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields

from .errors import PerfxError


@dataclass(frozen=True)
class ModelConfig:
    arch: str             # "llama", "qwen2" (the same block with Q, K and V biases), "gemma3", "phi3"
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
    # Variations of the block (engine/model.py); the defaults are the LLaMA block.
    act: str = "silu"                 # gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    embed_scale: float = 1.0          # the token embedding is multiplied by this (Gemma: sqrt(dim))
    post_norms: bool = False          # RMSNorm of the attention and FFN outputs before the residual add (Gemma)
    qk_norm: bool = False             # RMSNorm of each Q and K head before RoPE (Gemma 3)
    attn_scale: float = 0.0           # softmax scale of QK^T; 0: 1/sqrt(head_dim)
    sliding_window: int = 0           # keys of a windowed layer: positions pos-window+1 .. pos; 0: none
    swa_layers: tuple = ()            # per layer, whether it attends through the sliding window
    rope_base_swa: float = 0.0        # RoPE base of the windowed layers; 0: rope_base
    rope_scale: float = 1.0           # linear RoPE scaling of the full-attention layers: positions / rope_scale
    rope_freq_factors: tuple = ()     # per rotated pair, its frequency divided by this (Llama 3: rope_freqs)

    def __post_init__(self) -> None:          # lists (as JSON gives them back) held as tuples
        for name in ("swa_layers", "rope_freq_factors"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def variations(self) -> list[str]:
        """The fields by which this model differs from the plain LLaMA block."""
        return [f.name for f in fields(self)
                if f.name != "name" and f.default is not MISSING and getattr(self, f.name) != f.default]

    def check_plain(self, what: str) -> None:
        """Refuses, in one line, to carry a model with variations through `what` (convert, export)."""
        if self.variations():
            raise PerfxError(f"{what} does not carry {self.arch}'s {', '.join(self.variations())} yet")

    def window(self, layer: int) -> int:
        """The sliding window of a layer, 0 for full attention."""
        return self.sliding_window if self.swa_layers and self.swa_layers[layer] else 0

    @property
    def scale(self) -> float:
        return self.attn_scale or self.head_dim ** -0.5

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


# ---- checking a config read from a file ------------------------------------------------------------
# Every field is checked by its annotation (int, float, bool, str) and, where listed here, its range, before
# anything is sized by it; fields of other types pass as they are. A new field needs only a default (and a
# range here where it sizes something).
INT_RANGES = {                   # (lowest, highest); other int fields: 0..2^31-1
    "n_layers": (1, 4096), "dim": (1, 1 << 20), "n_heads": (1, 1 << 14), "n_kv_heads": (1, 1 << 14),
    "head_dim": (2, 1 << 16), "ffn_dim": (1, 1 << 22), "vocab_size": (1, 1 << 24),
    "ctx_len": (1, (1 << 31) - 1), "rope_dim": (2, 1 << 16),
}
POSITIVE_FLOATS = {"norm_eps": 1.0, "rope_base": math.inf}   # above 0 and below this; other floats: finite


def checked_config(values: dict, where: str, keys: dict[str, str] | None = None) -> ModelConfig:
    """A ModelConfig from a file's values, each checked for its type and range (a ModelFileError in one
    line, naming the file's own key from `keys` where given). Fields with a default may be left out."""
    from .errors import ModelFileError

    keys = keys or {}

    def bad(field: str, why: str) -> ModelFileError:
        return ModelFileError(f"{where}: {keys.get(field, field)} {why}; the file is corrupt")

    out = {}
    for f in fields(ModelConfig):
        if f.name not in values:
            if f.default is MISSING and f.default_factory is MISSING:
                raise bad(f.name, "is missing")
            continue
        v = values[f.name]
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if f.type == "int":
            if number and isinstance(v, float) and math.isfinite(v) and v.is_integer():
                v = int(v)
            if not number or not isinstance(v, int):
                raise bad(f.name, f"is {v!r:.40}, not an integer")
            lo, hi = INT_RANGES.get(f.name, (0, (1 << 31) - 1))
            if not lo <= v <= hi:
                raise bad(f.name, f"is {v}, outside {lo}..{hi}")
        elif f.type == "float":
            if not number or not math.isfinite(v):
                raise bad(f.name, f"is {v!r:.40}, not a finite number")
            if f.name in POSITIVE_FLOATS and not 0 < v < POSITIVE_FLOATS[f.name]:
                raise bad(f.name, f"is {v!r:.40}, not a finite number above 0"
                                  + (f" and below {POSITIVE_FLOATS[f.name]:g}" if f.name == "norm_eps" else ""))
            v = float(v)
        elif f.type == "bool":
            if not isinstance(v, (bool, int)) or v not in (0, 1):
                raise bad(f.name, f"is {v!r:.40}, not true or false")
            v = bool(v)
        elif f.type == "str" and not isinstance(v, str):
            raise bad(f.name, f"is {v!r:.40}, not a string")
        out[f.name] = v
    c = ModelConfig(**out)
    if c.n_heads % c.n_kv_heads:
        raise bad("n_kv_heads", f"({c.n_kv_heads}) does not divide the {c.n_heads} attention heads")
    if c.head_dim % 2 or c.rope_dim % 2 or c.rope_dim > c.head_dim:
        raise bad("rope_dim", f"is {c.rope_dim} for heads of {c.head_dim} dimensions (RoPE needs an even number, "
                              "at most the head's)")
    return c
