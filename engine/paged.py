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

    def last_rows(self) -> np.ndarray:
        """int32 [S']: the index of each sequence's last token in this step (its logits row), by row of
        block_table, for the sequences present in the step."""
        last = {}
        for t, s in enumerate(self.seq):
            last[int(s)] = t
        return np.array([last[s] for s in sorted(last)], np.int32)
