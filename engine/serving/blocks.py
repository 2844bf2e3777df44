"""The KV block allocator: which blocks of the backend's pool each sequence owns.

The pool is `n_blocks` blocks of `block_size` token positions. A sequence owns a list of blocks
(logical block i of the sequence is physical block blocks[i]); it gets more as it grows and gives
all of them back at once when it finishes, is cancelled or is preempted. Free blocks are a stack,
so any free block serves any sequence: lengths never fragment the pool.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class BlockAllocator:
    n_blocks: int
    block_size: int
    free: list[int] = field(init=False)
    owned: dict[int, list[int]] = field(init=False, default_factory=dict)   # sequence id -> its blocks
    allocated_total: int = field(init=False, default=0)                      # blocks handed out, ever
    freed_total: int = field(init=False, default=0)                          # blocks given back, ever

    def __post_init__(self):
        if self.n_blocks < 1 or self.block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of one token (got {self.n_blocks} x {self.block_size})")
        self.free = list(range(self.n_blocks - 1, -1, -1))   # pop() hands out block 0 first

    @property
    def n_free(self) -> int:
        return len(self.free)

    @property
    def n_used(self) -> int:
        return self.n_blocks - len(self.free)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks that hold n_tokens positions."""
        return -(-n_tokens // self.block_size)

    def extra_for(self, seq: int, n_tokens: int) -> int:
        """Blocks seq still needs to hold n_tokens positions."""
        return max(0, self.blocks_for(n_tokens) - len(self.owned.get(seq, ())))

    def grow(self, seq: int, n_tokens: int) -> bool:
        """Gives seq the blocks to hold n_tokens positions; False (and nothing taken) if too few are free."""
        need = self.extra_for(seq, n_tokens)
        if need > len(self.free):
            return False
        blocks = self.owned.setdefault(seq, [])
        for _ in range(need):
            blocks.append(self.free.pop())
        self.allocated_total += need
        return True

    def release(self, seq: int) -> int:
        """Returns all of seq's blocks to the pool; how many."""
        blocks = self.owned.pop(seq, [])
        self.free.extend(reversed(blocks))
        self.freed_total += len(blocks)
        return len(blocks)

    def table(self, seqs: list[int]) -> np.ndarray:
        """int32 [len(seqs), max blocks]: each sequence's blocks in order, -1 past its end."""
        width = max((len(self.owned.get(s, ())) for s in seqs), default=0)
        out = np.full((len(seqs), max(width, 1)), -1, np.int32)
        for row, s in enumerate(seqs):
            blocks = self.owned.get(s, ())
            out[row, :len(blocks)] = blocks
        return out
