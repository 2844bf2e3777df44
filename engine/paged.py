"""One step of a batch of sequences over a paged KV cache: what the server hands the transformer.

The KV cache of a serving backend is a pool of fixed-size blocks shared by every sequence; a
sequence owns a list of blocks (its row of `block_table`), so sequences of any length share the
pool without fragmentation. A step carries T tokens from one or more sequences: one token of each
decoding sequence and, interleaved, chunks of prompts being prefilled. A sequence's tokens in one
step are consecutive positions, listed in order.

    pool K, V   [n_layers, n_blocks, n_kv_heads, block_size, head_dim]
    position p of the sequence in row s lives in block block_table[s, p // block_size],
    slot p % block_size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PerfxError


@dataclass
class PagedBatch:
    pos: np.ndarray          # int32 [T]: position of each token in its sequence
    seq: np.ndarray          # int32 [T]: row of block_table that holds the token's sequence
    block_table: np.ndarray  # int32 [S, max_blocks]: physical block of each logical block, -1 unused
    block_size: int

    def __post_init__(self):
        self.pos = np.ascontiguousarray(self.pos, np.int32)
        self.seq = np.ascontiguousarray(self.seq, np.int32)
        self.block_table = np.ascontiguousarray(self.block_table, np.int32)

    @property
    def n_tokens(self) -> int:
        return len(self.pos)


def check_batch(batch: PagedBatch, n_blocks: int, block_size: int, ctx: int,
                max_tokens: int | None = None) -> None:
    """A one-line PerfxError unless the step fits a pool of n_blocks blocks of block_size positions
    and a RoPE table of ctx positions: 1..max_tokens tokens, every seq a row of block_table, every
    position below ctx and inside its row, and every block that a token's positions 0..pos lie in
    a block id of the pool (not -1)."""
    pos, seq, table = batch.pos, batch.seq, batch.block_table
    if n_blocks <= 0:
        raise PerfxError("paged attention: no KV pool; allocate one with kv_pool(n_blocks, block_size)")
    if batch.block_size != block_size:
        raise PerfxError(f"paged batch: block_size {batch.block_size} differs from the pool's {block_size}")
    if pos.ndim != 1 or seq.shape != pos.shape or table.ndim != 2:
        raise PerfxError(f"paged batch: pos {list(pos.shape)} and seq {list(seq.shape)} must both be [T], "
                         f"block_table {list(table.shape)} [S, max_blocks]")
    T = len(pos)
    if T == 0:
        raise PerfxError("paged batch: a step needs at least one token")
    if max_tokens is not None and T > max_tokens:
        raise PerfxError(f"paged batch: {T} tokens in one step; the backend takes at most {max_tokens}")
    S, max_blocks = table.shape
    bad = np.flatnonzero((seq < 0) | (seq >= S))
    if len(bad):
        raise PerfxError(f"paged batch: token {bad[0]} names sequence row {seq[bad[0]]}, "
                         f"but block_table has rows 0..{S - 1}")
    limit = min(ctx, block_size * max_blocks)
    bad = np.flatnonzero((pos < 0) | (pos >= limit))
    if len(bad):
        t = bad[0]
        where = (f"the context of {ctx}" if pos[t] >= ctx else
                 f"its block table ({max_blocks} blocks of {block_size})")
        raise PerfxError(f"paged batch: token {t} at position {pos[t]} (sequence row {seq[t]}) is outside {where}")
    need = np.zeros(S, np.int64)                   # blocks each row's tokens reach: 0 .. need - 1
    np.maximum.at(need, seq, pos // block_size + 1)
    used = np.arange(max_blocks)[None, :] < need[:, None]
    bad = np.argwhere(used & ((table < 0) | (table >= n_blocks)))
    if len(bad):
        s, b = bad[0]
        raise PerfxError(f"paged batch: sequence row {s} needs logical block {b} (positions "
                         f"{b * block_size}..{(b + 1) * block_size - 1}) but block_table holds {table[s, b]}; "
                         f"the pool's block ids are 0..{n_blocks - 1}")
