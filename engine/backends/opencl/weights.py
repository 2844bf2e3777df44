"""The exact device form of a stack of weight tensors (Q, K, V as one matrix; gate then up), and its
row-tile words (the layouts of kernels/gemv_tiles.h and kernels/wformat.h).

No type is requantized: every form holds the tensor's own integers and factors, so the device weights
equal `QTensor.dequantize()` bit for bit (`engine.quant.gguf_blocks.split`). Per stack, the first form that holds
all of its types:

| form    | types                                   | per weight                       | kernel defines           |
| ------- | --------------------------------------- | -------------------------------- | ------------------------ |
| int4    | Q4_0, Q4_1, INT4                        | 4 bits + fp16 scale, zero per G  | FORMAT 4                 |
| int4    | ... with Q4_K                           | 4 bits + f32 d*sc, -dmin*m per 32| FORMAT 4, SCALE_F32      |
| int8    | Q8_0, INT8, Q5_0 (q - 16), IQ4_NL (codebook values) | 8 bits + fp16 d per 32 | FORMAT 8          |
| f16     | F16                                     | fp16                             | FORMAT 16                |
| bf16    | BF16                                    | bfloat16 as stored               | FORMAT 17                |
| int8x   | any mix of the block types above and Q5_1, Q5_K, Q6_K (groups of 16), IQ4_XS | 8 bits + f32 scale (+ zero) per 32 or 16 | FORMAT 8, SCALE_F32, G 16/32, ZERO8 where a type has zeros |
| f32     | F32, and stacks mixing float types or float and block types | float32      | FORMAT 32                |

int4 and int8 are the tuned GEMVs (int8 with the int-dot path on x86); int8x takes the float GEMV.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import PerfxError
from ...formats.tensors import QTensor
from ...quant.gguf_blocks import SPLIT_TYPES, split

INT4_TYPES = {"Q4_0", "Q4_1", "Q4_K", "INT4"}
INT8_TYPES = {"Q8_0", "INT8", "Q5_0", "IQ4_NL"}         # int8 values with their fp16 d per 32
ZERO_TYPES = {"Q4_0", "Q4_1", "Q4_K", "INT4", "Q5_1", "Q5_K"}   # split with a zero term
BLOCK_TYPES = set(SPLIT_TYPES) | {"INT4", "INT8"}


@dataclass(frozen=True)
class Form:
    fmt: str                 # "int4", "int8", "int8x", "f16", "bf16" or "f32"
    group: int               # scales per group of this many weights along K (0 for f16, f32)
    scale_f32: bool = False  # scales (and zeros) stored as float32 rather than fp16
    zeros: bool = False      # int8x: w = q * scale + zero


def form_of(tensors: list[QTensor]) -> Form:
    """The exact form that holds every tensor of the stack (table above)."""
    types = {t.qtype for t in tensors}
    if types <= INT4_TYPES:
        return Form("int4", min(t.group if t.qtype == "INT4" else 32 for t in tensors), "Q4_K" in types)
    if types <= INT8_TYPES:
        return Form("int8", 32)
    if types == {"F16"}:
        return Form("f16", 0)
    if types == {"BF16"}:
        return Form("bf16", 0)
    if types <= BLOCK_TYPES:
        return Form("int8x", 16 if "Q6_K" in types else 32, True, bool(types & ZERO_TYPES))
    return Form("f32", 0)


def device_bytes(tensors: list[QTensor]) -> int:
    """Bytes the stack takes on the device in its form (the memory check counts these, not the file's)."""
    form = form_of(tensors)
    n = sum(int(np.prod(t.shape)) for t in tensors)
    per_group = (4 if form.scale_f32 else 2) * (2 if form.fmt == "int4" or form.zeros else 1)
    bits = {"int4": 4, "int8": 8, "int8x": 8, "f16": 16, "bf16": 16, "f32": 32}[form.fmt]
    return n * bits // 8 + (n // form.group * per_group if form.group else 0)


def _parts(t: QTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """(q [rows, cols], scale float32 [rows, cols/group], zero like scale or None, group), exact."""
    if t.qtype == "INT4":
        return t.int4()
    if t.qtype == "INT8":
        q, scale, group = t.int8()
        return q, scale, None, group
    return split(t.raw, t.qtype, t.shape)


def _stacked(tensors: list[QTensor], group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stack's q, and its scales and zeros (0 where a type has none) repeated to `group`."""
    parts = [_parts(t) for t in tensors]
    for p in parts:
        if p[3] % group:
            raise PerfxError(f"a group of {p[3]} cannot be held in groups of {group}")
    q = np.concatenate([p[0] for p in parts])
    scale = np.concatenate([np.repeat(p[1], p[3] // group, axis=1) for p in parts])
    zero = np.concatenate([np.repeat(np.zeros_like(p[1]) if p[2] is None else p[2], p[3] // group, axis=1)
                           for p in parts])
    return q, scale, zero


def pack(tensors: list[QTensor], form: Form) -> np.ndarray:
    """The row tiles (uint32) of the stacked tensors in `form`."""
    from .packing import pack_f16, pack_floats, pack_int4, pack_int8

    dtype = np.float32 if form.scale_f32 else np.float16
    if form.fmt == "int4":
        return pack_int4(*_stacked(tensors, form.group), form.group, dtype)
    if form.fmt in ("int8", "int8x"):
        q, scale, zero = _stacked(tensors, form.group)
        return pack_int8(q.astype(np.int8), scale, form.group, zero if form.zeros else None, dtype)
    if form.fmt == "bf16":
        return pack_floats(np.concatenate([np.asarray(t.raw).view("<u2").reshape(t.shape) for t in tensors]), np.uint16)
    w = np.concatenate([t.dequantize() for t in tensors])
    return pack_f16(w) if form.fmt == "f16" else pack_floats(w, np.float32)
