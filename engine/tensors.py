"""A weight as a model file stores it: quantized blocks kept as they are, memory-mapped where possible.

Backends decide what to do with it: the NumPy reference dequantizes to float32; the OpenCL backend
repacks the int4 and int8 forms for its kernels.

qtype is a GGUF type name ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", ...), whose bytes are `raw`,
or "INT4", perfx's own int4 form: `raw` uint8 [rows, cols/2] (element 2j in the low nibble of byte j,
2j+1 in the high one), `scale` and `zero` fp16 [rows, cols/group], w = q * scale + zero. That holds
AWQ's (q - z) * s exactly, with zero = -z * s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PerfxError
from .quants import dequantize, split_q4

INT4_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class QTensor:
    name: str
    qtype: str
    shape: tuple[int, ...]          # [rows, cols] in math order: cols (the input dimension) is contiguous
    raw: np.ndarray
    scale: np.ndarray | None = None  # INT4 only: fp16 [rows, cols/group]
    zero: np.ndarray | None = None   # INT4 only: fp16 [rows, cols/group]
    group: int = 0                   # INT4 only

    @property
    def nbytes(self) -> int:
        extra = sum(int(a.nbytes) for a in (self.scale, self.zero) if a is not None)
        return int(self.raw.nbytes) + extra

    def dequantize(self) -> np.ndarray:
        """float32 values of the whole tensor."""
        if self.qtype == "INT4":
            q, scale, zero, group = self.int4()
            return (q * np.repeat(scale, group, axis=1) + np.repeat(zero, group, axis=1)).astype(np.float32)
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
