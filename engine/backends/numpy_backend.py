"""The NumPy reference backend: float32 arithmetic on dequantized weights.

Plain and obviously right: it is the oracle that every OpenCL kernel is tested against.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np

from . import Backend, Capabilities, DeviceReport
from ..config import ModelConfig
from ..errors import PerfxError
from ..formats.tensors import QTensor
from ..model import Weights
from ..paged import PagedBatch, check_batch


@dataclass
class Biased:
    """A matrix with a bias added to each of its outputs: y = x @ w^T + b."""

    w: np.ndarray          # [out, in]
    b: np.ndarray          # [out]

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.b.nbytes


@dataclass
class Layer:
    attn_norm: np.ndarray  # [dim]
    wqkv: np.ndarray | Biased  # [q_dim + 2*kv_dim, dim] (+ bias [q_dim + 2*kv_dim], Qwen2)
    wo: np.ndarray         # [dim, q_dim]
    ffn_norm: np.ndarray   # [dim]
    w_gate_up: np.ndarray  # [2*ffn, dim]
    w_down: np.ndarray     # [dim, ffn]
    q_norm: np.ndarray | None = None         # [head_dim] (Gemma 3)
    k_norm: np.ndarray | None = None         # [head_dim] (Gemma 3)
    post_attn_norm: np.ndarray | None = None  # [dim] (Gemma)
    post_ffn_norm: np.ndarray | None = None   # [dim] (Gemma)


@dataclass
class DeviceWeights:
    tok_embd: np.ndarray     # [vocab, dim]
    layers: list[Layer]
    output_norm: np.ndarray  # [dim]
    output: np.ndarray       # [vocab, dim]; the same array as tok_embd when tied

    @property
    def nbytes(self) -> int:
        """Bytes of the matrices (every layer's and the output), as a decode step reads them."""
        mats = [m for l in self.layers for m in (l.wqkv, l.wo, l.w_gate_up, l.w_down)] + [self.output]
        return sum(m.nbytes for m in mats)


def stack(tensors: list[QTensor]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([t.dequantize() for t in tensors], axis=0))


def stack_biased(tensors: list[QTensor], biases: list[QTensor] | None) -> np.ndarray | Biased:
    """The stacked matrix, with the stacked biases when there are any."""
    w = stack(tensors)
    return w if biases is None else Biased(w, stack(biases))


def rope_tables(config: ModelConfig, ctx: int, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [ctx, rope_dim/2] for rotating adjacent pairs (x[2i], x[2i+1]) by pos * base^(-2i/rope_dim)
    / factor_i (Llama 3's rope_freqs), with the windowed layers' own base (local) or the full-attention
    layers' base and linear scaling (positions / rope_scale)."""
    base = config.rope_base_swa if local and config.rope_base_swa else config.rope_base
    inv_freq = base ** (-np.arange(0, config.rope_dim, 2, dtype=np.float64) / config.rope_dim)
    if config.rope_freq_factors:
        inv_freq = inv_freq / np.asarray(config.rope_freq_factors, np.float64)
    positions = np.arange(ctx, dtype=np.float64) / (1.0 if local else config.rope_scale)
    angles = np.outer(positions, inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


OPTIONAL_NORMS = ("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU with the tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return np.float32(0.5) * x * (1 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x ** 3)))


def head_rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [T, heads, head_dim] with each head RMS-normalised and scaled by w [head_dim]."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_dim: int) -> np.ndarray:
    """x [T, heads, head_dim]; cos, sin [T, rope_dim/2]. Rotates the first rope_dim dims pairwise."""
    out = x.copy()
    even, odd = x[..., 0:rope_dim:2], x[..., 1:rope_dim:2]
    c, s = cos[:, None, :], sin[:, None, :]
    out[..., 0:rope_dim:2] = even * c - odd * s
    out[..., 1:rope_dim:2] = even * s + odd * c
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def numpy_copy_bandwidth(nbytes: int = 64 << 20, runs: int = 5) -> float:
    """Host copy bandwidth in bytes/s (bytes read + written) of a NumPy copy: one warm-up, median of runs."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    seconds = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        np.copyto(dst, src)
        seconds.append(time.perf_counter() - t)
    return 2 * src.nbytes / statistics.median(seconds[1:])


def check_pageable(c: ModelConfig) -> None:
    """The paged KV cache (serving) has no sliding window nor second RoPE table yet."""
    if c.sliding_window or c.rope_base_swa:
        raise PerfxError(f"serving (the paged KV cache) does not support {c.arch}'s sliding-window layers yet; "
                         "use perfx run or perfx chat")


class NumpyBackend(Backend):
    name = "numpy"
    description = "NumPy (float32 reference)"
    capabilities = Capabilities(max_tokens=None, device_argmax=False, paged_kv=True, kv_bytes=4)

    def load(self, config: ModelConfig, weights: Weights, ctx: int) -> DeviceWeights:
        self.config, self.ctx = config, ctx
        embd = weights.tok_embd.dequantize()
        output = embd if weights.output is weights.tok_embd else weights.output.dequantize()
        layers = [
            Layer(
                attn_norm=l.attn_norm.dequantize(),
                wqkv=stack_biased(l.wqkv, l.bqkv),
                wo=l.wo.dequantize(),
                ffn_norm=l.ffn_norm.dequantize(),
                w_gate_up=stack(l.w_gate_up),
                w_down=l.w_down.dequantize(),
                **{k: getattr(l, k).dequantize() for k in OPTIONAL_NORMS if getattr(l, k) is not None},
            )
            for l in weights.layers
        ]
        shape = (config.n_layers, ctx, config.n_kv_heads, config.head_dim)
        self.k_cache = np.zeros(shape, np.float32)  # [layer, pos, kv_head, head_dim]
        self.v_cache = np.zeros(shape, np.float32)
        self.cos, self.sin = rope_tables(config, ctx)
        self.rope_local = rope_tables(config, ctx, local=True) if config.rope_base_swa else (self.cos, self.sin)
        self.weights = DeviceWeights(embd, layers, weights.output_norm.dequantize(), output)
        return self.weights

    @property
    def device_bytes(self) -> int:
        """Bytes of the arrays this backend holds: weights (as float32), KV cache, RoPE tables."""
        w = self.weights
        arrays = [w.tok_embd, w.output, w.output_norm, self.k_cache, self.v_cache, self.cos, self.sin]
        arrays += [a for l in w.layers for a in vars(l).values() if a is not None]
        return sum(a.nbytes for a in {id(a): a for a in arrays}.values())

    def report(self) -> DeviceReport:
        return DeviceReport(backend="NumPy", device="numpy", name=cpu_name(), kind="cpu")

    def copy_bandwidth(self) -> float:
        return numpy_copy_bandwidth()

    # --- operators --------------------------------------------------------------------------

    def embed(self, table: np.ndarray, ids: np.ndarray, scale: float = 1.0) -> np.ndarray:
        x = table[np.asarray(ids)].astype(np.float32)  # [T, dim]
        return x * np.float32(scale) if scale != 1.0 else x

    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(ms + self.config.norm_eps) * w

    def add_rmsnorm(self, x: np.ndarray, delta: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = x + delta
        return x, self.rmsnorm(x, w)

    def residual_rmsnorm(self, x: np.ndarray, a: np.ndarray, w: np.ndarray | Biased, norm: np.ndarray,
                         post: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """x + a @ w^T (its rmsnorm * post first, where a post-norm is given), and the sum's rmsnorm * norm:
        a residual projection and the norm after it."""
        delta = self.linear(a, w)
        return self.add_rmsnorm(x, delta if post is None else self.rmsnorm(delta, post), norm)

    rowwise = False    # products one token at a time (serving: rows independent of the batch)
    k_pool = v_pool = None   # the serving pool (kv_pool)
    n_blocks = block_size = 0

    def _mm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """x [T, in] @ w [out, in]^T -> [T, out]; with rowwise, as T matrix-vector products, so that
        a row is the same whatever the other rows (BLAS rounds a matrix product differently)."""
        if self.rowwise:
            return np.stack([w @ row for row in x]) if len(x) else x @ w.T
        return x @ w.T

    def linear(self, x: np.ndarray, w: np.ndarray | Biased) -> np.ndarray:
        if isinstance(w, Biased):
            return self._mm(x, w.w) + w.b  # [T, in] x [out, in]^T + [out] -> [T, out]
        return self._mm(x, w)  # [T, in] x [out, in]^T -> [T, out]

    def swiglu(self, x: np.ndarray, w_gate_up: np.ndarray) -> np.ndarray:
        """act(x @ Wg^T) * (x @ Wu^T): silu (SwiGLU), or tanh-approximated GELU (GeGLU) by config.act."""
        gu = self._mm(x, w_gate_up)
        gate, up = np.split(gu, 2, axis=-1)
        if self.config.act == "gelu_tanh":
            return gelu_tanh(gate) * up
        return gate / (1.0 + np.exp(-gate)) * up

    def qk_norm(self, qkv: np.ndarray, q_norm: np.ndarray, k_norm: np.ndarray) -> np.ndarray:
        """qkv [T, q_dim + 2 kv_dim] with each Q head RMS-normalised and scaled by q_norm [head_dim], each K
        head by k_norm (Gemma 3, before RoPE)."""
        c, T = self.config, len(qkv)
        q = head_rmsnorm(qkv[:, :c.q_dim].reshape(T, c.n_heads, c.head_dim), q_norm, c.norm_eps)
        k = head_rmsnorm(qkv[:, c.q_dim:c.q_dim + c.kv_dim].reshape(T, c.n_kv_heads, c.head_dim), k_norm, c.norm_eps)
        return np.concatenate([q.reshape(T, -1), k.reshape(T, -1), qkv[:, c.q_dim + c.kv_dim:]], axis=1)

    def attention(self, qkv: np.ndarray, layer: int, start_pos: int) -> np.ndarray:
        c = self.config
        T, D = qkv.shape[0], c.head_dim
        end = start_pos + T
        q = qkv[:, : c.q_dim].reshape(T, c.n_heads, D)
        k = qkv[:, c.q_dim : c.q_dim + c.kv_dim].reshape(T, c.n_kv_heads, D)
        v = qkv[:, c.q_dim + c.kv_dim :].reshape(T, c.n_kv_heads, D)
        window = c.window(layer)
        cos, sin = self.rope_local if window else (self.cos, self.sin)
        cos, sin = cos[start_pos:end], sin[start_pos:end]
        q = apply_rope(q, cos, sin, c.rope_dim)
        self.k_cache[layer, start_pos:end] = apply_rope(k, cos, sin, c.rope_dim)
        self.v_cache[layer, start_pos:end] = v

        keys, values = self.k_cache[layer, :end], self.v_cache[layer, :end]   # [S, kv_heads, D]
        group = c.n_heads // c.n_kv_heads
        qg = q.reshape(T, c.n_kv_heads, group, D)
        scores = np.einsum("tkgd,skd->kgts", qg, keys) * np.float32(c.scale)    # [kv_heads, group, T, S]
        dist = (start_pos + np.arange(T))[:, None] - np.arange(end)[None, :]    # [T, S]: query pos - key pos
        masked = (dist < 0) | ((dist >= window) if window else False)
        scores[..., masked] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out = np.einsum("kgts,skd->tkgd", p, values)                         # [T, kv_heads, group, D]
        return out.reshape(T, c.q_dim)

    def logits(self, h: np.ndarray, output: np.ndarray, all_logits: bool) -> np.ndarray:
        if not all_logits:
            h = h[-1:]
        return h @ output.T  # [T, vocab]

    # --- paged KV cache (engine.paged) -------------------------------------------------------

    def kv_pool(self, n_blocks: int, block_size: int) -> None:
        """Allocates the block pool, K and V [n_layers, n_blocks, n_kv_heads, block_size, head_dim],
        and makes the products row by row (batch-invariant, as serving needs)."""
        c = self.config
        check_pageable(c)
        shape = (c.n_layers, n_blocks, c.n_kv_heads, block_size, c.head_dim)
        self.k_pool = np.zeros(shape, np.float32)
        self.v_pool = np.zeros(shape, np.float32)
        self.n_blocks, self.block_size = n_blocks, block_size
        self.rowwise = True

    @property
    def kv_pool_bytes(self) -> int:
        return self.k_pool.nbytes + self.v_pool.nbytes if self.k_pool is not None else 0

    def begin_paged(self, batch: PagedBatch) -> None:
        check_batch(batch, self.n_blocks, self.block_size, self.ctx)
        self.batch = batch

    def paged_attention(self, qkv: np.ndarray, layer: int) -> np.ndarray:
        """Per token t: RoPE at pos[t], K and V written to the pool, then causal attention over
        positions 0..pos[t] of the token's own sequence, read back from the pool."""
        c, b = self.config, self.batch
        T, D, bs = qkv.shape[0], c.head_dim, self.block_size
        q = qkv[:, : c.q_dim].reshape(T, c.n_heads, D)
        k = qkv[:, c.q_dim : c.q_dim + c.kv_dim].reshape(T, c.n_kv_heads, D)
        v = qkv[:, c.q_dim + c.kv_dim :].reshape(T, c.n_kv_heads, D)
        cos, sin = self.cos[b.pos], self.sin[b.pos]
        q = apply_rope(q, cos, sin, c.rope_dim)
        k = apply_rope(k, cos, sin, c.rope_dim)
        for t in range(T):
            block = b.block_table[b.seq[t], b.pos[t] // bs]
            self.k_pool[layer, block, :, b.pos[t] % bs] = k[t]
            self.v_pool[layer, block, :, b.pos[t] % bs] = v[t]

        group = c.n_heads // c.n_kv_heads
        out = np.empty((T, c.n_kv_heads, group, D), np.float32)
        for t in range(T):
            positions = np.arange(b.pos[t] + 1)
            blocks = b.block_table[b.seq[t], positions // bs]
            keys = self.k_pool[layer, blocks, :, positions % bs]      # [S, kv_heads, D]
            values = self.v_pool[layer, blocks, :, positions % bs]
            qg = q[t].reshape(c.n_kv_heads, group, D)
            scores = np.einsum("kgd,skd->kgs", qg, keys) * np.float32(c.scale)
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            out[t] = np.einsum("kgs,skd->kgd", p, values)
        return out.reshape(T, c.q_dim)

    def logits_rows(self, h: np.ndarray, output: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Logits [len(rows), vocab] of the given rows of the final hidden states h [T, dim]."""
        return self._mm(h[np.asarray(rows, np.int64)], output)
