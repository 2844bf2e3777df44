"""Models of a known shape with random weights, for benchmarks without a download.

    shape = get_shape("llama-7b")
    weights = synthetic_weights(shape)              # INT4 layer matrices, Q8_0 embedding and output
    Transformer(shape.config(), weights, backend, ctx)

Layer matrices are perfx's INT4 form with groups of 128 (64 or 32 where the shape's widths need it):
random nibbles, small random fp16 scales and zeros chosen so that each matrix keeps activations at
unit scale. The token embedding (and the output matrix, unless tied) is Q8_0, the norms F32. Values
come from a seeded generator, one stream per tensor, and are written straight into their packed
form: no float32 copy of a matrix is ever made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .errors import PerfxError
from .formats.tensors import INT4_GROUPS, QTensor
from .model import LayerWeights, Weights

Q8_BLOCK, Q8_BYTES = 32, 34
UNIFORM_NIBBLE_STD = math.sqrt((16 * 16 - 1) / 12)   # std of q uniform in 0..15
UNIFORM_INT8_STD = math.sqrt((255 * 255 - 1) / 12)   # std of q uniform in -127..127


@dataclass(frozen=True)
class Shape:
    """The hyper-parameters of a LLaMA-family model."""

    name: str
    label: str                  # size as people say it: "7B", "135M"
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    ctx_len: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def group(self) -> int:
        """The largest INT4 group that divides every matrix's input width."""
        widths = (self.dim, self.n_heads * self.head_dim, self.ffn_dim)
        for g in sorted(INT4_GROUPS, reverse=True):
            if all(w % g == 0 for w in widths):
                return g
        raise PerfxError(f"shape {self.name}: widths {widths} are not multiples of {min(INT4_GROUPS)}")

    def config(self) -> ModelConfig:
        return ModelConfig(
            arch="llama", n_layers=self.n_layers, dim=self.dim, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim, ffn_dim=self.ffn_dim, vocab_size=self.vocab_size, ctx_len=self.ctx_len,
            norm_eps=self.norm_eps, rope_base=self.rope_base, rope_dim=self.head_dim, tied_embedding=self.tied,
            name=f"{self.name} (synthetic)",
        )

    def matrices(self) -> list[tuple[str, int, int]]:
        """(name, rows, cols) of one layer's matrices."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return [("attn_q", q, self.dim), ("attn_k", kv, self.dim), ("attn_v", kv, self.dim),
                ("attn_output", self.dim, q), ("ffn_gate", self.ffn_dim, self.dim),
                ("ffn_up", self.ffn_dim, self.dim), ("ffn_down", self.dim, self.ffn_dim)]

    @property
    def n_params(self) -> int:
        layer = sum(r * c for _, r, c in self.matrices()) + 2 * self.dim
        embeddings = self.vocab_size * self.dim * (1 if self.tied else 2)
        return self.n_layers * layer + embeddings + self.dim

    @property
    def nbytes(self) -> int:
        """Bytes of the weights as synthetic_weights stores them."""
        g = self.group
        layer = sum(r * c // 2 + 2 * 2 * r * (c // g) for _, r, c in self.matrices()) + 2 * 4 * self.dim
        q8 = self.vocab_size * self.dim // Q8_BLOCK * Q8_BYTES
        return self.n_layers * layer + q8 * (1 if self.tied else 2) + 4 * self.dim

    def kv_bytes(self, ctx: int, element_bytes: int = 2) -> int:
        """Bytes of a KV cache of ctx positions (K and V, every layer)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * ctx * element_bytes

    @property
    def description(self) -> str:
        """The model column of a benchmark: "llama 7B INT4 g128 (synthetic)"."""
        return f"llama {self.label} INT4 g{self.group} (synthetic)"


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("llama-7b", "7B", n_layers=32, dim=4096, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000,
          ctx_len=4096),
    Shape("llama-3-8b", "8B", n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
          ctx_len=8192, rope_base=500000.0),
    Shape("smollm2-135m", "135M", n_layers=30, dim=576, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
          ctx_len=8192, rope_base=100000.0, tied=True),
    Shape("tiny", "0.4M", n_layers=2, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=512, ctx_len=1024,
          tied=True),
)}


def get_shape(name: str) -> Shape:
    """The shape called `name`; PerfxError listing the shapes otherwise."""
    shape = SHAPES.get(name.strip().lower())
    if shape is None:
        raise PerfxError(f"unknown synthetic shape '{name}' (shapes: {', '.join(SHAPES)})")
    return shape


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def random_int4(name: str, rows: int, cols: int, group: int, rng: np.random.Generator) -> QTensor:
    """An INT4 matrix [rows, cols] of random nibbles whose weights have mean 0 and std 1/sqrt(cols)."""
    raw = rng.bit_generator.random_raw(-(-rows * cols // 16)).view(np.uint8)[: rows * cols // 2]
    raw = raw.reshape(rows, cols // 2)
    groups = cols // group
    scale = (rng.uniform(0.75, 1.25, (rows, groups)) / (UNIFORM_NIBBLE_STD * math.sqrt(cols))).astype(np.float16)
    zero = (-7.5 * scale.astype(np.float32)).astype(np.float16)
    return QTensor(name, "INT4", (rows, cols), raw, scale=scale, zero=zero, group=group)


def random_q8_0(name: str, rows: int, cols: int, std: float, rng: np.random.Generator) -> QTensor:
    """A Q8_0 matrix [rows, cols] of random int8 values whose weights have mean 0 and std about `std`."""
    blocks = rows * cols // Q8_BLOCK
    raw = np.empty((blocks, Q8_BYTES), np.uint8)
    raw[:, 2:] = rng.bit_generator.random_raw(-(-blocks * Q8_BLOCK // 8)).view(np.uint8)[: blocks * Q8_BLOCK] \
        .reshape(blocks, Q8_BLOCK)
    raw[:, 2:][raw[:, 2:] == 0x80] = 0x81                  # -128 -> -127: Q8_0 keeps to -127..127
    d = (rng.uniform(0.75, 1.25, blocks) * std / UNIFORM_INT8_STD).astype(np.float16)
    raw[:, :2] = d.view(np.uint8).reshape(blocks, 2)
    return QTensor(name, "Q8_0", (rows, cols), raw.reshape(rows, cols // Q8_BLOCK * Q8_BYTES))


def _norm(name: str, dim: int, rng: np.random.Generator) -> QTensor:
    return QTensor(name, "F32", (dim,), rng.uniform(0.9, 1.1, dim).astype(np.float32))


def synthetic_weights(shape: Shape, seed: int = 0) -> Weights:
    """Random weights of `shape`, the same for the same seed."""
    g = shape.group
    layers = []
    for i in range(shape.n_layers):
        m = {name: random_int4(f"blk.{i}.{name}.weight", r, c, g, _rng(seed, i, k))
             for k, (name, r, c) in enumerate(shape.matrices())}
        layers.append(LayerWeights(
            attn_norm=_norm(f"blk.{i}.attn_norm.weight", shape.dim, _rng(seed, i, 100)),
            wqkv=[m["attn_q"], m["attn_k"], m["attn_v"]],
            wo=m["attn_output"],
            ffn_norm=_norm(f"blk.{i}.ffn_norm.weight", shape.dim, _rng(seed, i, 101)),
            w_gate_up=[m["ffn_gate"], m["ffn_up"]],
            w_down=m["ffn_down"],
        ))
    n = shape.n_layers
    embd = random_q8_0("token_embd.weight", shape.vocab_size, shape.dim, 1.0, _rng(seed, n, 0))
    output = embd if shape.tied else random_q8_0("output.weight", shape.vocab_size, shape.dim,
                                                 1 / math.sqrt(shape.dim), _rng(seed, n, 1))
    return Weights(embd, layers, _norm("output_norm.weight", shape.dim, _rng(seed, n, 2)), output)


# ---- as a GGUF file, for engines that load files (llama.cpp) ----------------------------------------

Q4_0_BLOCK, Q4_0_BYTES = 32, 18
UNIFORM_Q4_0_STD = math.sqrt((16 * 16 - 1) / 12)      # std of q - 8, q uniform in 0..15


def random_q4_0(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw Q4_0 blocks uint8 [rows, cols/32*18] (fp16 d, 16 bytes of nibbles; w = (q - 8) * d) whose weights
    have std about 1/sqrt(cols)."""
    blocks = rows * cols // Q4_0_BLOCK
    raw = np.empty((blocks, Q4_0_BYTES), np.uint8)
    raw[:, 2:] = rng.bit_generator.random_raw(-(-blocks * 16 // 8)).view(np.uint8)[: blocks * 16].reshape(blocks, 16)
    d = (rng.uniform(0.75, 1.25, blocks) / (UNIFORM_Q4_0_STD * math.sqrt(cols))).astype(np.float16)
    raw[:, :2] = d.view(np.uint8).reshape(blocks, 2)
    return raw.reshape(rows, cols // Q4_0_BLOCK * Q4_0_BYTES)


def tokenizer_fields(path: str) -> list[tuple[str, object, object, object]]:
    """The tokenizer.* metadata of a GGUF file: (key, value, type, array element type) each."""
    import gguf

    out = []
    for name, field in gguf.GGUFReader(path).fields.items():
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            out.append((name, field.contents(), vtype, field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None))
    return out


def add_block_params(w, *, n_layers: int, ctx_len: int, dim: int, ffn_dim: int, n_heads: int, n_kv_heads: int,
                     norm_eps: float, rope_base: float, rope_dim: int | None = None) -> None:
    """The block's hyper-parameters as llama.cpp's GGUF keys, into a gguf.GGUFWriter (of any architecture)."""
    w.add_block_count(n_layers)
    w.add_context_length(ctx_len)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(norm_eps)
    w.add_rope_freq_base(rope_base)
    if rope_dim is not None:
        w.add_rope_dimension_count(rope_dim)


def write_gguf(shape: Shape, path: str, tokenizer_from: str, seed: int = 0) -> int:
    """Writes a GGUF file of `shape` (llama architecture) with random Q4_0 layer matrices, Q8_0 embedding
    and output, F32 norms, and the tokenizer (and so the vocabulary) of the GGUF `tokenizer_from`, so that
    perfx and llama.cpp load the very same weights. Written to a temporary file, renamed into place.
    Returns the vocabulary size."""
    import os

    import gguf

    fields = tokenizer_fields(tokenizer_from)
    vocab = next((len(v) for k, v, *_ in fields if k == "tokenizer.ggml.tokens"), 0)
    if not vocab:
        raise PerfxError(f"{tokenizer_from} has no tokenizer.ggml.tokens: give a GGUF model file with a tokenizer")
    tmp = f"{path}.tmp{os.getpid()}"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"perfx synthetic {shape.name}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    add_block_params(w, n_layers=shape.n_layers, ctx_len=shape.ctx_len, dim=shape.dim, ffn_dim=shape.ffn_dim,
                     n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads, norm_eps=1e-5, rope_base=shape.rope_base,
                     rope_dim=shape.head_dim)
    w.add_vocab_size(vocab)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    q4, q8, f32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32
    n = shape.n_layers

    def q8_0(name: str, std: float, key: int) -> None:
        t = random_q8_0(name, vocab, shape.dim, std, _rng(seed, n, key))
        w.add_tensor(name, t.raw, raw_dtype=q8)

    q8_0("token_embd.weight", 1.0, 0)
    for i in range(n):
        for k, (name, rows, cols) in enumerate(shape.matrices()):
            w.add_tensor(f"blk.{i}.{name}.weight", random_q4_0(rows, cols, _rng(seed, i, k)), raw_dtype=q4)
        for name, key in (("attn_norm", 100), ("ffn_norm", 101)):
            w.add_tensor(f"blk.{i}.{name}.weight", _norm("", shape.dim, _rng(seed, i, key)).raw, raw_dtype=f32)
    w.add_tensor("output_norm.weight", _norm("", shape.dim, _rng(seed, n, 2)).raw, raw_dtype=f32)
    if not shape.tied:
        q8_0("output.weight", 1 / math.sqrt(shape.dim), 1)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return vocab
