"""A weight as a model file stores it: quantized blocks kept as they are, memory-mapped where possible.

Backends decide what to do with it: the NumPy reference dequantizes to float32; the OpenCL backend
repacks the int4 and int8 forms for its kernels.

qtype is a GGUF type name ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", ...), whose bytes are `raw`,
or one of perfx's own forms:

- "INT4": `raw` uint8 [rows, cols/2] (element 2j in the low nibble of byte j, 2j+1 in the high one),
  `scale` and `zero` fp16 [rows, cols/group], w = q * scale + zero. AWQ's (q - z) * s is held with
  zero = fp16(-z * s): exact for Q4_0 / Q4_1 (group 32), within one fp16 rounding of the zero otherwise.
- "INT8": `raw` int8 [rows, cols], `scale` fp16 [rows, cols/32], w = q * scale (GGUF Q8_0's values, unblocked).
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from ..errors import PerfxError
from ..quant.gguf_blocks import dequantize, split_q4, split_q8_0

INT4_GROUPS = (32, 64, 128)
INT8_GROUP = 32


@dataclass(frozen=True)
class QTensor:
    name: str
    qtype: str
    shape: tuple[int, ...]          # [rows, cols] in math order: cols (the input dimension) is contiguous
    raw: np.ndarray
    scale: np.ndarray | None = None  # INT4, INT8: fp16 [rows, cols/group]
    zero: np.ndarray | None = None   # INT4 only: fp16 [rows, cols/group]
    group: int = 0                   # INT4, INT8

    @property
    def nbytes(self) -> int:
        extra = sum(int(a.nbytes) for a in (self.scale, self.zero) if a is not None)
        return int(self.raw.nbytes) + extra

    def rows(self, start: int, stop: int) -> QTensor:
        """Rows start..stop-1 of a 2-D tensor, sharing its memory (the raw data is [rows, row bytes])."""
        if len(self.shape) != 2 or self.raw.ndim != 2 or self.raw.shape[0] != self.shape[0]:
            raise PerfxError(f"tensor {self.name} of shape {list(self.shape)} cannot be cut into rows")
        cut = [None if a is None else a[start:stop] for a in (self.scale, self.zero)]
        return QTensor(self.name, self.qtype, (min(stop, self.shape[0]) - start, self.shape[1]),
                       self.raw[start:stop], *cut, self.group)

    def drop_pages(self) -> None:
        """Let the file pages under this tensor leave the process's memory (a memory-mapped file is read
        again from the page cache if touched later); a no-op for arrays in ordinary memory."""
        for a in (self.raw, self.scale, self.zero):
            if a is not None:
                _drop_pages(a)

    def dequantize(self) -> np.ndarray:
        """float32 values of the whole tensor."""
        if self.qtype == "INT4":
            return dequantize_int4(*self.int4())
        if self.qtype == "INT8":
            q, scale, group = self.int8()
            return q.astype(np.float32) * np.repeat(scale, group, axis=1)
        return dequantize(self.raw, self.qtype, self.shape)

    def int4(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(q uint8 [rows, cols] in 0..15, scale, zero float32 [rows, cols/group], group) with
        w = q * scale + zero exactly, for INT4, Q4_0 and Q4_1."""
        if self.qtype == "INT4":
            rows, cols = self.shape
            q = np.empty((rows, cols), np.uint8)
            q[:, 0::2] = self.raw & 0x0F
            q[:, 1::2] = self.raw >> 4
            return q, self.scale.astype(np.float32), self.zero.astype(np.float32), self.group
        if self.qtype in ("Q4_0", "Q4_1"):
            return (*split_q4(self.raw, self.qtype, self.shape), 32)
        raise PerfxError(f"tensor {self.name} of type {self.qtype} has no exact int4 form")

    def int8(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(q int8 [rows, cols], scale float32 [rows, cols/32], 32) with w = q * scale exactly, for INT8 and Q8_0."""
        if self.qtype == "INT8":
            return np.asarray(self.raw, np.int8), self.scale.astype(np.float32), self.group
        if self.qtype == "Q8_0":
            return (*split_q8_0(self.raw, self.shape), INT8_GROUP)
        raise PerfxError(f"tensor {self.name} of type {self.qtype} has no exact int8 form")


def _drop_pages(a: np.ndarray) -> None:
    """madvise(MADV_DONTNEED) over the whole pages that a view of an np.memmap spans."""
    base = a
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    mm = getattr(base, "_mmap", None)
    if mm is None or mm.closed or not hasattr(mmap, "MADV_DONTNEED") or a.nbytes == 0:
        return
    start = a.ctypes.data - np.frombuffer(mm, np.uint8).ctypes.data
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    stop = min(start + a.nbytes, len(mm))
    if 0 <= first < stop:
        mm.madvise(mmap.MADV_DONTNEED, first, stop - first)


def dequantize_int4(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> np.ndarray:
    """float32 q * scale + zero, w for q uint8 [rows, cols] and scale, zero [rows, cols/group]."""
    return (q * np.repeat(scale.astype(np.float32), group, axis=1)
            + np.repeat(zero.astype(np.float32), group, axis=1)).astype(np.float32)


def int4_tensor(name: str, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> QTensor:
    """An INT4 QTensor from q uint8 [rows, cols] in 0..15 and scale, zero [rows, cols/group] (stored as fp16)."""
    rows, cols = q.shape
    if group not in INT4_GROUPS or cols % group:
        raise PerfxError(f"tensor {name}: int4 group must be one of {INT4_GROUPS} and divide {cols} columns")
    q = np.asarray(q, np.uint8)
    raw = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return QTensor(name, "INT4", (rows, cols), raw, np.asarray(scale, np.float16), np.asarray(zero, np.float16), group)


def int8_tensor(name: str, q: np.ndarray, scale: np.ndarray) -> QTensor:
    """An INT8 QTensor from q int8 [rows, cols] and scale [rows, cols/32] (stored as fp16)."""
    rows, cols = q.shape
    if cols % INT8_GROUP:
        raise PerfxError(f"tensor {name}: int8 needs a multiple of {INT8_GROUP} columns, got {cols}")
    return QTensor(name, "INT8", (rows, cols), np.asarray(q, np.int8), np.asarray(scale, np.float16), None, INT8_GROUP)
