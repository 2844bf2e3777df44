"""Weight quantizers for perfx files.

- int4: asymmetric per group of `group` columns (a smaller group where `group` does not divide the columns): scale = (max - min) / 15 and zero = min, both rounded
  to fp16 first, q = round((w - zero) / scale) in 0..15, w ~ q * scale + zero. A clip value c per
  (row, group) first narrows the range to [max(min, -c), min(max, c)].
- int8: symmetric per group of 32 columns (GGUF Q8_0's rule): scale = max|w| / 127 in fp16,
  q = round(w / scale) in -127..127.
- fp16: the values rounded to float16.
"""
from __future__ import annotations

import numpy as np

from ..errors import PerfxError
from ..formats.tensors import INT8_GROUP, QTensor, dequantize_int4, int4_tensor, int8_tensor

FP16_MAX = 65504.0


def _fp16(a: np.ndarray, name: str) -> np.ndarray:
    if not np.all(np.isfinite(a)) or np.abs(a).max(initial=0) > FP16_MAX:
        raise PerfxError(f"tensor {name} has values beyond float16's range ({FP16_MAX:g}) or not finite; "
                         "the checkpoint is damaged")
    return a.astype(np.float16)


def int4_group(cols: int, group: int, name: str = "") -> int:
    """The group size for a matrix of `cols` columns: `group`, else the largest of 64, 32 below it that
    divides cols (SmolLM2's 576 columns take 64 when 128 is asked for)."""
    for g in (group, 64, 32):
        if g <= group and cols % g == 0:
            return g
    raise PerfxError(f"tensor {name} has {cols} columns; int4 needs a multiple of 32, use --quant int8 or fp16")


def quantize_int4(w: np.ndarray, group: int, clip: np.ndarray | None = None,
                  name: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q uint8 [rows, cols], scale, zero fp16 [rows, cols/group]) by rounding to nearest."""
    rows, cols = w.shape
    if cols % group:
        raise PerfxError(f"tensor {name} has {cols} columns, not a multiple of the group size {group}; "
                         "use --group-size 32")
    g = np.asarray(w, np.float32).reshape(rows, cols // group, group)
    lo, hi = g.min(axis=2), g.max(axis=2)
    if clip is not None:
        lo, hi = np.maximum(lo, -clip), np.minimum(hi, clip)
    zero = _fp16(lo, name)
    scale = _fp16((hi - zero.astype(np.float32)) / 15, name)
    s, z = scale.astype(np.float32)[..., None], zero.astype(np.float32)[..., None]
    q = np.rint((g - z) / np.where(s > 0, s, 1))
    return np.clip(q, 0, 15).astype(np.uint8).reshape(rows, cols), scale, zero


def fake_int4(w: np.ndarray, group: int, clip: np.ndarray | None = None) -> np.ndarray:
    """The values `w` takes once quantized to int4 and dequantized."""
    return dequantize_int4(*quantize_int4(w, group, clip), group)


def quantize_int8(w: np.ndarray, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [rows, cols], scale fp16 [rows, cols/32])."""
    rows, cols = w.shape
    if cols % INT8_GROUP:
        raise PerfxError(f"tensor {name} has {cols} columns, not a multiple of {INT8_GROUP}")
    g = np.asarray(w, np.float32).reshape(rows, cols // INT8_GROUP, INT8_GROUP)
    scale = _fp16(np.abs(g).max(axis=2) / 127, name)
    s = scale.astype(np.float32)[..., None]
    q = np.clip(np.rint(g / np.where(s > 0, s, 1)), -127, 127)
    return q.astype(np.int8).reshape(rows, cols), scale


def int4(name: str, w: np.ndarray, group: int, clip: np.ndarray | None = None) -> QTensor:
    return int4_tensor(name, *quantize_int4(w, group, clip, name), group)


def int8(name: str, w: np.ndarray) -> QTensor:
    return int8_tensor(name, *quantize_int8(w, name))


def fp16(name: str, w: np.ndarray) -> QTensor:
    return QTensor(name, "F16", tuple(w.shape), _fp16(np.asarray(w, np.float32), name))


def fp32(name: str, w: np.ndarray) -> QTensor:
    return QTensor(name, "F32", tuple(w.shape), np.ascontiguousarray(w, np.float32))


def relative_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    """||w_hat - w|| / ||w|| (0 for an all-zero w reproduced exactly)."""
    w = np.asarray(w, np.float64)
    norm = np.linalg.norm(w)
    diff = np.linalg.norm(np.asarray(w_hat, np.float64) - w)
    return float(diff / norm) if norm > 0 else float(diff)

