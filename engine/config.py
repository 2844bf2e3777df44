"""Model hyper-parameters, read from a model file's metadata."""
from __future__ import annotations

from dataclasses import dataclass, asdict


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
