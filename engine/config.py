"""Model hyper-parameters, read from a model file's metadata."""
from __future__ import annotations

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
