"""The fused, non-matmul operators of the forward pass on OpenCL: residual add + RMSNorm, attention
(RoPE, KV-cache write, QK^T, causal online softmax, .V in one kernel, with a split-KV path for long
contexts), the token embedding gather and the greedy argmax.

`FusedOps` builds the kernels and allocates everything they need once (KV cache, RoPE table,
split-KV partials, argmax partials); its methods only enqueue kernels. All buffers are f32 and
row-major unless said otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyopencl as cl

from ...config import ModelConfig
from ...errors import PerfxError
from ..numpy_backend import rope_tables
from . import attention_mma
from .matmul import XPrep
from .runtime import Runtime
from .specs import check_fits, defaults

DEFAULT_PARAMS: dict[str, Any] = defaults("fused")   # declared, with their meaning, in specs.py

# The attention defaults (specs.py) were measured on an NVIDIA H100. CPUs (PoCL) want wide vectors per
# work-item (the work-item loop is not vectorised across work-items) and smaller work-groups;
# measured on PoCL 3.1 (AVX-512).
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rope_table(config: ModelConfig, ctx: int, local: bool = False) -> np.ndarray:
    """f32 [ctx, 2, head_dim]: per position, cos and signed sin per dimension, so that
    roped(x) = x * table[pos, 0] + swap_pairs(x) * table[pos, 1] with swap_pairs(x)[2i] = x[2i+1]:
    dims 2i and 2i+1 both carry cos(a_i), and -sin(a_i), +sin(a_i), a_i = pos * base^(-2i/rope_dim);
    dims past rope_dim carry cos 1 and sin 0."""
    cos, sin = rope_tables(config, ctx, local)   # [ctx, rope_dim / 2] (local: the windowed layers' base)
    table = np.zeros((ctx, 2, config.head_dim), np.float32)
    table[:, 0, :] = 1.0
    table[:, 0, 0:config.rope_dim:2] = table[:, 0, 1:config.rope_dim:2] = cos
    table[:, 1, 0:config.rope_dim:2] = -sin
    table[:, 1, 1:config.rope_dim:2] = sin
    return table


@dataclass
class EmbeddingTable:
    """A token-embedding table on the device: Q8_0 (q int8 [vocab, dim], scale f32 [vocab, dim/32]),
    f32 (w [vocab, dim]), or an int8 matrix in row tiles (tiles: the output projection's buffer when
    the embedding is tied, so the table is held once)."""

    vocab: int
    dim: int
    q: cl.Buffer | None = None        # int8 [vocab, dim]
    scale: cl.Buffer | None = None    # f32 [vocab, dim / 32]
    w: cl.Buffer | None = None        # f32 [vocab, dim]
    tiles: cl.Buffer | None = None    # int8 DeviceMatrix [vocab, dim] (matmul.py layout)

    @classmethod
    def from_tiles(cls, matrix) -> EmbeddingTable:
        """The rows of an int8 DeviceMatrix, read where they are."""
        if matrix.fmt != "int8":
            raise PerfxError(f"an embedding read from row tiles must be int8, got {matrix.fmt}")
        return cls(matrix.rows, matrix.cols, tiles=matrix.buf)

    @classmethod
    def from_q8(cls, rt: Runtime, q: np.ndarray, scale: np.ndarray) -> EmbeddingTable:
        vocab, dim = q.shape
        if dim % 32 or scale.shape != (vocab, dim // 32):
            raise PerfxError(f"Q8_0 embedding: q {q.shape} and scale {scale.shape} do not match")
        return cls(vocab, dim, q=rt.to_device(q.astype(np.int8, copy=False)),
                   scale=rt.to_device(scale.astype(np.float32, copy=False)))

    @classmethod
    def from_f32(cls, rt: Runtime, w: np.ndarray) -> EmbeddingTable:
        vocab, dim = w.shape
        return cls(vocab, dim, w=rt.to_device(w.astype(np.float32, copy=False)))


class FusedOps:
    """The fused operators of one model on one device, with its KV cache.

    k_cache, v_cache: [n_layers, n_kv_heads, ctx, head_dim], f32 or fp16 (params["kv_half"]);
    K is stored after RoPE. One (layer, KV head) is a contiguous [ctx, head_dim] matrix.
    """

    def __init__(self, rt: Runtime, config: ModelConfig, ctx: int, n_layers: int,
                 params: dict[str, Any] | None = None):
        unknown = set(params or {}) - set(DEFAULT_PARAMS)
        if unknown:
            raise PerfxError(f"unknown fused-operator parameters: {', '.join(sorted(unknown))}")
        self.rt, self.config, self.ctx, self.n_layers = rt, config, ctx, n_layers
        self.params = p = {**DEFAULT_PARAMS, **(params or {})}   # per-device values: kernels/tuning.toml
        if not p["split_wgs"]:
            p["split_wgs"] = rt.device.max_compute_units
        c = config
        self.group = c.n_heads // c.n_kv_heads     # ModelConfig: n_kv_heads divides n_heads
        self.qt_max = 1 << (max(1, p["att_rows"] // self.group).bit_length() - 1)
        dev = rt.device          # each kernel's declared rules and limits (specs.py), before any build;
                                 # the largest query tile must fit the device
        limits = dev.local_mem_size, dev.max_work_group_size
        for qt in {self.qt_max, 1}:
            check_fits("attention", self._attention_defines(qt), *limits)
        check_fits("rmsnorm", {"RMS_WG": p["rms_wg"]}, *limits)
        check_fits("argmax", {"ARGMAX_WG": p["argmax_wg"], "ARGMAX_GROUPS": p["argmax_groups"]}, *limits)

        # RMSNorm and embedding, argmax.
        self.xs_group = 0                   # group of the sums the norms also write (group_sums)
        self.xs_int16 = False               # and whether they write h in int16 too
        self._norm_kernels()
        emb = rt.program("embed")
        self._embed_q8, self._embed_f32 = cl.Kernel(emb, "embed_q8"), cl.Kernel(emb, "embed_f32")
        self._embed_q8.set_scalar_arg_dtypes([None, None, None, None, np.int32, np.int32])
        self._embed_f32.set_scalar_arg_dtypes([None, None, None, np.int32, np.int32])
        self._embed_tiles = cl.Kernel(emb, "embed_tiles")
        self._embed_tiles.set_scalar_arg_dtypes([None, None, None, np.int32, np.int32])
        self._scale = cl.Kernel(emb, "scale")
        self._scale.set_scalar_arg_dtypes([None, np.float32])
        am = rt.program("argmax", ARGMAX_WG=p["argmax_wg"], ARGMAX_GROUPS=p["argmax_groups"])
        self._argmax_partial = cl.Kernel(am, "argmax_partial")
        self._argmax_final = cl.Kernel(am, "argmax_final")
        self._argmax_partial.set_scalar_arg_dtypes([None, np.int32, None, None])
        self.argmax_val = rt.empty(4 * p["argmax_groups"])   # f32 [argmax_groups]
        self.argmax_idx = rt.empty(4 * p["argmax_groups"])   # int32 [argmax_groups]

        # Attention: KV cache, RoPE table, split-KV partials; kernels built per query-tile size.
        self.kv_bytes = 2 if p["kv_half"] else 4
        cache_bytes = n_layers * c.n_kv_heads * ctx * c.head_dim * self.kv_bytes
        # Never cleared: attention reads only positions written before (tests poison the cache), so
        # on a CPU a position's pages become resident only once a token reaches it.
        self.k_cache = rt.empty(cache_bytes)   # [n_layers, n_kv_heads, ctx, head_dim]
        self.v_cache = rt.empty(cache_bytes)   # [n_layers, n_kv_heads, ctx, head_dim]
        self.rope = rt.to_device(rope_table(c, ctx))   # [ctx, 2, head_dim]
        # Prefill attention on matrix units where the tuning database asks for it (attention_mma.py).
        self.mma = attention_mma.make(rt, c, p)
        # The windowed layers' own RoPE (Gemma 3's local base), where the model has one.
        self.rope_local = rt.to_device(rope_table(c, ctx, local=True)) if c.rope_base_swa else self.rope
        slots = p["max_splits"] * p["split_max_t"] * c.n_heads
        self.part_o = rt.empty(4 * slots * c.head_dim)  # [max_splits, split_max_t, n_heads, head_dim]
        self.part_ml = rt.empty(4 * slots * 2)          # [max_splits, split_max_t, n_heads, 2]
        # int32 [split_max_t, n_kv_heads]: finished slices per (query tile, KV head), 0 between launches
        self.split_done = rt.to_device(np.zeros(p["split_max_t"] * c.n_kv_heads, np.int32))
        self._attend: dict[int, cl.Kernel] = {}
        self._combine = cl.Kernel(self._attention_program(1), "combine")
        self._combine.set_scalar_arg_dtypes([None, None, None, np.int32, np.int32])
        self._attend_one = cl.Kernel(self._attention_program(1), "attend_one")
        self._attend_one.set_scalar_arg_dtypes([None] * 5 + [np.int32] * 4)

    def _norm_kernels(self) -> None:
        rms = self.rt.program("rmsnorm", RMS_WG=self.params["rms_wg"], XS_G=self.xs_group or False,
                              XQ=self.xs_int16)
        self._add_rmsnorm, self._rmsnorm = cl.Kernel(rms, "add_rmsnorm"), cl.Kernel(rms, "rmsnorm")
        self._add_rmsnorm.set_scalar_arg_dtypes([None, None, None, None, np.int32, np.float32, None, None, None])
        self._post_add_rmsnorm = cl.Kernel(rms, "post_add_rmsnorm")
        self._post_add_rmsnorm.set_scalar_arg_dtypes([None] * 5 + [np.int32, np.float32] + [None] * 3)
        self._head_rmsnorm = cl.Kernel(rms, "head_rmsnorm")
        self._head_rmsnorm.set_scalar_arg_dtypes([None] * 3 + [np.int32] * 4 + [np.float32])
        self._rmsnorm.set_scalar_arg_dtypes([None, None, None, np.int32, np.float32, None, None, None])

    def group_sums(self, group: int, int16: bool = False) -> None:
        """From now on the norms also write the group sums of h (xs [T, dim/group]) that an int4 GEMV
        reading h needs for its zero terms, and with int16 h in int16 blocks for the int-dot GEMV
        (kernels/xq.h), so that GEMV runs without its own xsum or quantize launch."""
        if self.config.dim % group or group % 16 or (int16 and self.config.dim % 32):
            raise PerfxError(f"group sums of {group} do not fit dim {self.config.dim}")
        self.xs_group, self.xs_int16 = group, int16
        self._norm_kernels()

    def _attention_defines(self, qt: int) -> dict[str, Any]:
        c, p = self.config, self.params
        return dict(HEAD_DIM=c.head_dim, N_KV_HEADS=c.n_kv_heads, GROUP=self.group, QT=qt,
                    ATT_WG=p["att_wg"], VW=p["att_vec"], KV_HALF=bool(p["kv_half"]),
                    KL=p["att_key_lanes"] if qt == 1 else 1,
                    SPLIT_COMBINE=bool(p["split_combine"]),
                    ATT_SCALE=f"{c.attn_scale!r}f" if c.attn_scale else False)

    def _attention_program(self, qt: int) -> cl.Program:
        return self.rt.program("attention", **self._attention_defines(qt))

    def _attend_kernel(self, qt: int) -> cl.Kernel:
        knl = self._attend.get(qt)
        if knl is None:
            knl = cl.Kernel(self._attention_program(qt), "attend")
            knl.set_scalar_arg_dtypes([None] * 7 + [np.int32] * 7 + [None])
            self._attend[qt] = knl
        return knl

    # --- operators ------------------------------------------------------------------------------

    def add_rmsnorm(self, x: cl.Buffer, delta: cl.Buffer | None, w: cl.Buffer, T: int,
                    h: cl.Buffer, xs: XPrep | None = None) -> None:
        """x [T, dim] += delta [T, dim] (skipped when delta is None); h [T, dim] = rmsnorm(x) * w [dim];
        after group_sums(G), xs.sums [T, dim/G] = the group sums of h (and with int16, xs.q, xs.scale)."""
        wg = self.params["rms_wg"]
        c = self.config
        if self.xs_group and (xs is None or (self.xs_int16 and xs.q is None)):
            raise PerfxError("the norms write group sums (and int16 h): give them the buffers")
        outs = [h if b is None else b for b in (xs.sums, xs.q, xs.scale)] if xs else [h] * 3   # unused: h
        if delta is None:
            self._rmsnorm(self.rt.queue, (wg * T,), (wg,), x, w, h, c.dim, c.norm_eps, *outs)
        else:
            self._add_rmsnorm(self.rt.queue, (wg * T,), (wg,), x, delta, w, h, c.dim, c.norm_eps, *outs)

    def post_add_rmsnorm(self, x: cl.Buffer, delta: cl.Buffer, post: cl.Buffer, w: cl.Buffer, T: int,
                         h: cl.Buffer, xs: XPrep | None = None) -> None:
        """x [T, dim] += rmsnorm(delta [T, dim]) * post [dim] (delta is overwritten), then h and xs as
        add_rmsnorm: Gemma's post-norm in the residual epilogue, one launch."""
        wg, c = self.params["rms_wg"], self.config
        outs = [h if b is None else b for b in (xs.sums, xs.q, xs.scale)] if xs else [h] * 3
        self._post_add_rmsnorm(self.rt.queue, (wg * T,), (wg,), x, delta, post, w, h, c.dim, c.norm_eps, *outs)

    def head_rmsnorm(self, qkv: cl.Buffer, q_norm: cl.Buffer, k_norm: cl.Buffer, T: int) -> None:
        """Each Q and K head of qkv [T, q_dim + 2 kv_dim] = rmsnorm(head) * q_norm or k_norm [head_dim],
        in place (Gemma 3's QK-norm, before the attention's RoPE)."""
        wg, c = self.params["rms_wg"], self.config
        heads = c.n_heads + c.n_kv_heads
        self._head_rmsnorm(self.rt.queue, (wg * T * heads,), (wg,), qkv, q_norm, k_norm, c.n_heads,
                           c.n_kv_heads, c.head_dim, c.q_dim + 2 * c.kv_dim, c.norm_eps)

    def scale(self, x: cl.Buffer, n: int, s: float) -> None:
        """x [n] *= s."""
        self._scale(self.rt.queue, (n,), None, x, s)

    def rmsnorm(self, x: cl.Buffer, w: cl.Buffer, T: int, h: cl.Buffer, xs: XPrep | None = None) -> None:
        """h [T, dim] = rmsnorm(x [T, dim]) * w [dim] (and xs, as add_rmsnorm)."""
        self.add_rmsnorm(x, None, w, T, h, xs)

    def splits_for(self, T: int, end: int) -> int:
        """How many key slices per KV head the attention of T tokens ending at position `end` uses:
        enough work-groups to fill the device, each slice at least split_min_chunk keys long."""
        p = self.params
        if T > p["split_max_t"]:
            return 1
        groups = self.config.n_kv_heads * _ceil_div(T, self._tile(T))
        return max(1, min(p["max_splits"], end // p["split_min_chunk"], _ceil_div(p["split_wgs"], groups)))

    def _tile(self, T: int) -> int:
        """Query tokens per work-group: the next power of two of T, capped by att_rows."""
        return min(self.qt_max, 1 << (T - 1).bit_length())

    def attention(self, qkv: cl.Buffer, T: int, layer: int, start_pos: int, out: cl.Buffer,
                  *, n_splits: int | None = None) -> None:
        """out [T, q_dim] = causal attention of the T tokens of qkv [T, q_dim + 2 kv_dim] at positions
        start_pos.., whose K (roped) and V are written to the layer's cache. n_splits forces the
        number of key slices (1: no split)."""
        c, p = self.config, self.params
        end = start_pos + T
        if T < 1 or start_pos < 0 or end > self.ctx:
            raise PerfxError(f"attention: positions {start_pos}..{end - 1} do not fit "
                             f"the context of {self.ctx}")
        if not 0 <= layer < self.n_layers:
            raise PerfxError(f"attention: layer {layer} is outside 0..{self.n_layers - 1}")
        if n_splits is None:
            n_splits = self.splits_for(T, end)
        elif n_splits > 1 and (T > p["split_max_t"] or n_splits > p["max_splits"]):
            raise PerfxError(f"attention: split-KV needs T <= {p['split_max_t']} and "
                             f"n_splits <= {p['max_splits']}")
        q = self.rt.queue
        window = c.window(layer)
        rope = self.rope_local if window else self.rope
        if T == 1 and n_splits <= 1 and p["att_serial"]:
            self._attend_one(q, (c.n_kv_heads,), (1,), qkv, rope, self.k_cache, self.v_cache, out,
                             start_pos, self.ctx, layer, window)
            return
        if self.mma is not None and n_splits <= 1 and T >= self.mma.min_tokens:
            self.mma.enqueue(qkv, rope, self.k_cache, self.v_cache, out, T, start_pos, self.ctx, layer, window)
            return
        qt = self._tile(T)
        step = p["att_wg"] // self._attention_defines(qt)["KL"]     # keys per pass of the score step
        chunk = _ceil_div(_ceil_div(end, max(n_splits, 1)), step) * step
        n_splits = _ceil_div(end, chunk)
        partial = int(n_splits > 1)
        wg = p["att_wg"]
        knl = self._attend_kernel(qt)
        knl(q, (wg * _ceil_div(T, qt), c.n_kv_heads, n_splits), (wg, 1, 1),
            qkv, rope, self.k_cache, self.v_cache, out, self.part_o, self.part_ml,
            T, start_pos, self.ctx, layer, chunk, partial, window, self.split_done)
        if partial and not p["split_combine"]:      # with split_combine the attend launch merged them
            self._combine(q, (c.head_dim // 4, c.n_heads, T), None,
                          self.part_o, self.part_ml, out, T, n_splits)

    def embed(self, table: EmbeddingTable, ids: cl.Buffer, T: int, x: cl.Buffer) -> None:
        """x [T, dim] = table[ids [T] int32] as f32."""
        q, gsize = self.rt.queue, (_ceil_div(table.dim, 4), T)
        if table.tiles is not None:
            self._embed_tiles(q, gsize, None, ids, table.tiles, x, table.dim, table.vocab)
        elif table.q is not None:
            self._embed_q8(q, gsize, None, ids, table.q, table.scale, x, table.dim, table.vocab)
        else:
            self._embed_f32(q, gsize, None, ids, table.w, x, table.dim, table.vocab)

    def argmax(self, logits: cl.Buffer, n: int, out: cl.Buffer) -> None:
        """out [1] int32 = the index of the largest of logits [n] (the first of equals)."""
        p, q = self.params, self.rt.queue
        wg, groups = p["argmax_wg"], p["argmax_groups"]
        self._argmax_partial(q, (wg * groups,), (wg,), logits, n, self.argmax_val, self.argmax_idx)
        self._argmax_final(q, (wg,), (wg,), self.argmax_val, self.argmax_idx, out)

    # --- inspection -----------------------------------------------------------------------------

    def read_kv(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's K and V caches as f32 [ctx, n_kv_heads, head_dim] (the NumPy backend's layout)."""
        c = self.config
        dtype = np.float16 if self.params["kv_half"] else np.float32
        shape = (self.n_layers, c.n_kv_heads, self.ctx, c.head_dim)
        k = self.rt.read(self.k_cache, shape, dtype)[layer]
        v = self.rt.read(self.v_cache, shape, dtype)[layer]
        return (np.ascontiguousarray(k.transpose(1, 0, 2), dtype=np.float32),
                np.ascontiguousarray(v.transpose(1, 0, 2), dtype=np.float32))
