"""Attention over a paged KV cache on OpenCL (engine.paged): the block pool shared by the sequences
of a serving batch, each step's metadata, and the kernels of kernels/paged_attention.cl.

`PagedAttention` allocates everything once: the pool, and one int32 metadata buffer sized for
max_tokens tokens, as many tiles, and a block table of max_tokens rows by ceil(ctx / block_size)
columns (a step's table is cut down to the rows of the sequences in the step and the columns its
positions reach, so any number of rows and columns in the caller's table fits). `begin` checks a
step and uploads its metadata in one copy; `attention` only enqueues kernels.
"""
from __future__ import annotations

import numpy as np
import pyopencl as cl

from ...config import ModelConfig
from ...errors import PerfxError
from ...paged import PagedBatch, check_batch
from .fused import FusedOps
from .runtime import Runtime


class PagedAttention:
    """The block pool of one model on one device and the paged attention operator.

    k_pool, v_pool: [n_layers, n_blocks, n_kv_heads, block_size, head_dim], f32 or fp16 (the fused
    operators' kv_half); K is stored after RoPE. Work-group size, vector width and the most query
    rows per work-group are the fused operators' att_wg, att_vec and att_rows.
    """

    def __init__(self, rt: Runtime, config: ModelConfig, fused: FusedOps, max_tokens: int,
                 n_blocks: int, block_size: int, qt_max: int | None = None):
        """qt_max: the most tokens of one sequence per work-group (default from att_rows); 1 makes each
        token's attention independent of the other tokens of its step."""
        if n_blocks < 1 or block_size < 1:
            raise PerfxError(f"KV pool: {n_blocks} blocks of {block_size} positions; both must be at least 1")
        c, p = config, fused.params
        self.rt, self.config, self.fused = rt, c, fused
        self.ctx, self.n_layers, self.max_tokens = fused.ctx, fused.n_layers, max_tokens
        self.n_blocks, self.block_size = n_blocks, block_size
        self.group = c.n_heads // c.n_kv_heads
        self.wg, self.vec = p["att_wg"], p["att_vec"]
        self.dtype = np.float16 if p["kv_half"] else np.float32
        self.shape = (self.n_layers, n_blocks, c.n_kv_heads, block_size, c.head_dim)
        pool_bytes = int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize
        # Not cleared, like the contiguous cache: a block's positions are read only once written.
        self.k_pool = rt.empty(pool_bytes)   # [n_layers, n_blocks, n_kv_heads, block_size, head_dim]
        self.v_pool = rt.empty(pool_bytes)
        self.nbytes = 2 * pool_bytes

        # int32 [pos T | row T | tiles 2 n_tiles | table rows x cols], n_tiles and rows <= T.
        self.max_cols = -(-self.ctx // block_size)
        self.meta_host = np.zeros(4 * max_tokens + max_tokens * self.max_cols, np.int32)
        self.meta = rt.empty(self.meta_host.nbytes)
        self.upload: cl.Event | None = None
        self.qt_max = qt_max or 1 << (max(1, p["att_rows"] // self.group).bit_length() - 1)
        self._write = cl.Kernel(self._program(1), "kv_write")
        self._write.set_scalar_arg_dtypes([None] * 5 + [np.int32] * 5)
        self._attend: dict[int, cl.Kernel] = {}
        self.T = 0
        self.launches: list[tuple[int, int, int]] = []   # (QT, tile_off, n_tiles) per launch of a step
        self.table_off = self.table_stride = 0

    def _program(self, qt: int) -> cl.Program:
        c = self.config
        return self.rt.program(
            "paged_attention", HEAD_DIM=c.head_dim, N_KV_HEADS=c.n_kv_heads, GROUP=self.group,
            BLOCK_SIZE=self.block_size, QT=qt, ATT_WG=self.wg, VW=self.vec, KV_HALF=self.dtype == np.float16,
            ATT_SCALE=f"{c.attn_scale!r}f" if c.attn_scale else False)

    def _attend_kernel(self, qt: int) -> cl.Kernel:
        knl = self._attend.get(qt)
        if knl is None:
            knl = cl.Kernel(self._program(qt), "paged_attend")
            knl.set_scalar_arg_dtypes([None] * 6 + [np.int32] * 6)
            self._attend[qt] = knl
        return knl

    def tiles(self, pos: np.ndarray, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First token and token count [n_tiles] of each tile: runs of consecutive positions of one
        sequence, cut every qt_max tokens."""
        T = len(pos)
        new_run = np.ones(T, bool)
        new_run[1:] = (seq[1:] != seq[:-1]) | (pos[1:] != pos[:-1] + 1)
        starts = np.flatnonzero(new_run)
        lengths = np.diff(np.append(starts, T))
        per_run = -(-lengths // self.qt_max)
        within = np.arange(per_run.sum()) - np.repeat(np.cumsum(per_run) - per_run, per_run)
        first = np.repeat(starts, per_run) + within * self.qt_max
        count = np.minimum(self.qt_max, np.repeat(starts + lengths, per_run) - first)
        return first, count

    def begin(self, batch: PagedBatch) -> None:
        """Checks one step (engine.paged.check_batch) and uploads its metadata."""
        check_batch(batch, self.n_blocks, self.block_size, self.ctx, self.max_tokens)
        pos, seq = batch.pos, batch.seq
        T = len(pos)
        rows, row_of = np.unique(seq, return_inverse=True)   # the step's table: its sequences only
        cols = int(pos.max()) // self.block_size + 1
        first, count = self.tiles(pos, seq)
        qt = np.left_shift(1, np.ceil(np.log2(count)).astype(np.int64))   # tile size: next power of two
        order = np.argsort(qt, kind="stable")
        n_tiles = len(first)
        tile_off, table_off = 2 * T, 2 * T + 2 * n_tiles
        end = table_off + len(rows) * cols

        if self.upload is not None:
            self.upload.wait()              # the previous step's copy has read meta_host
        m = self.meta_host
        m[:T] = pos
        m[T:2 * T] = row_of.reshape(-1)
        m[tile_off:table_off] = np.stack([first[order], count[order]], axis=1).reshape(-1)
        m[table_off:end] = batch.block_table[rows, :cols].reshape(-1)
        self.upload = cl.enqueue_copy(self.rt.queue, self.meta, m[:end], is_blocking=False)

        sizes, starts, counts = np.unique(qt[order], return_index=True, return_counts=True)
        self.launches = [(int(q), tile_off + 2 * int(s), int(n)) for q, s, n in zip(sizes, starts, counts)]
        self.T, self.table_off, self.table_stride = T, table_off, cols

    def attention(self, qkv: cl.Buffer, T: int, layer: int, out: cl.Buffer) -> None:
        """out [T, q_dim] = paged attention of the step's T tokens of qkv [T, q_dim + 2 kv_dim],
        whose K (roped) and V are first written to the pool."""
        if not 0 <= layer < self.n_layers:
            raise PerfxError(f"paged attention: layer {layer} is outside 0..{self.n_layers - 1}")
        if T != self.T:
            raise PerfxError(f"paged attention: {T} tokens in the pass, but the step begun with "
                             f"begin_paged has {self.T}")
        c, launch = self.config, self.rt.launch
        args = (T, layer, self.n_blocks)
        launch(self._write, (c.head_dim // self.vec, c.n_kv_heads, T), None,
               qkv, self.fused.rope, self.k_pool, self.v_pool, self.meta,
               *args, self.table_off, self.table_stride)
        for qt, tile_off, n_tiles in self.launches:
            launch(self._attend_kernel(qt), (self.wg * n_tiles, c.n_kv_heads), (self.wg, 1),
                   qkv, self.fused.rope, self.k_pool, self.v_pool, self.meta, out,
                   *args, tile_off, self.table_off, self.table_stride)

    def read_pool(self) -> tuple[np.ndarray, np.ndarray]:
        """K and V pools as stored (f32 or fp16) [n_layers, n_blocks, n_kv_heads, block_size, head_dim]."""
        return self.rt.read(self.k_pool, self.shape, self.dtype), self.rt.read(self.v_pool, self.shape, self.dtype)


def check_rows(rows: np.ndarray, T: int) -> np.ndarray:
    """rows as int32 [n], each a token of the pass: 0 <= row < T; PerfxError otherwise."""
    rows = np.asarray(rows, np.int32).reshape(-1)
    bad = np.flatnonzero((rows < 0) | (rows >= T))
    if len(bad):
        raise PerfxError(f"logits_rows: row {rows[bad[0]]} is not a token of the pass (0..{T - 1})")
    return rows
