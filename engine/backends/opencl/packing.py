"""How the matrix products' weights lie on the device: packed once at load, read by kernels/gemv.cl,
kernels/gemv_int.cl (the layout: kernels/gemv_tiles.h), kernels/gemm.cl and kernels/gemm_mma.cl
(launched by matmul.py).

Weights live on the device as one `DeviceMatrix` per linear layer, repacked once at load into the
"row tile" layout:

- rows are grouped in tiles of RT = 4 (N padded with zero rows to a multiple of 4); a tile is one
  contiguous run of 32-bit words, so a work-item streams a single address range;
- along K a tile is cut into chunks of 128 elements, then 64 if K % 128 >= 64, then 32 if K % 64 == 32;
  a chunk of C elements is 8 planes of L = C/8 consecutive elements;
- one chunk's block holds the data of its 4 rows, then their scales and zeros:
    int4  uint q[4][L] (nibble p of word l = q of element p*L + l), half scale[4][C/G], half zero[4][C/G]
    int8  char q[4][C], half scale[4][C/32]
    int8x char q[4][C], float scale[4][C/G], with zeros float zero[4][C/G] (G 16 or 32)
    f16   half w[4][C]
    bf16  ushort w[4][C] (the top halves of floats)
    f32   float w[4][C]
  (int4 with scale_f32: float scales and zeros). Which form a stack of GGUF tensors takes, exactly: weights.py.
  With the int4 packing one 64-byte load, shifted and masked per plane, gives 16 consecutive weights
  that line up with a plain vector load of x.

The int-dot GEMV's input, x in int16 blocks of 32 (kernels/xq.h), is described here too
(quantize_xq, xq_view, xq_positions), as the host computes it for the tests.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyopencl as cl

from ...errors import PerfxError
from ...formats.tensors import QTensor
from . import weights
from .runtime import Runtime

RT = 4                                # rows per tile
FORMAT_CODE = {"int4": 4, "int8": 8, "int8x": 8, "f16": 16, "bf16": 17, "f32": 32}
GROUPS = (32, 64, 128)
LOAD_ROWS = 4096                      # rows packed at a time when a large matrix is loaded


# ---- layout ---------------------------------------------------------------------------------------


def chunk_widths(cols: int) -> list[int]:
    """Widths of the chunks a row is cut into: 128s, then 64 and/or 32 for the rest."""
    if cols % 32:
        raise PerfxError(f"matrix needs a multiple of 32 columns, got {cols}")
    rest = cols % 128
    return [128] * (cols // 128) + ([64] if rest >= 64 else []) + ([32] if rest % 64 else [])


def _tiles(a: np.ndarray) -> np.ndarray:
    """[rows, ...] -> [ceil(rows/4), 4, ...], padding with zero rows."""
    pad = (-a.shape[0]) % RT
    if pad:
        a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
    return a.reshape(a.shape[0] // RT, RT, *a.shape[1:])


def _as_words(a: np.ndarray) -> np.ndarray:
    """[tiles, 4, n] of any dtype -> [tiles, words] uint32."""
    a = np.ascontiguousarray(a.reshape(a.shape[0], -1))
    return a.view(np.uint32)


def pack_int4(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int, dtype=np.float16) -> np.ndarray:
    """q uint8 [N, K] in 0..15, scale and zero [N, K/group] (w = q*scale + zero), stored as dtype (fp16 or
    float32) -> uint32 row tiles."""
    rows, cols = q.shape
    if group not in GROUPS or cols % group:
        raise PerfxError(f"int4 group must be one of {GROUPS} and divide the {cols} columns, got {group}")
    if scale.shape != (rows, cols // group) or zero.shape != scale.shape:
        raise PerfxError(f"int4 scale and zero must be [{rows}, {cols // group}], got {scale.shape}, {zero.shape}")
    q = np.asarray(q, np.uint8)
    if q.size and q.max() > 15:
        raise PerfxError(f"int4 values must be 0..15, got {int(q.max())}")
    qt = _tiles(q)                                          # [tiles, 4, K]
    st = _tiles(np.asarray(scale, dtype))                   # [tiles, 4, K/G]
    zt = _tiles(np.asarray(zero, dtype))
    blocks, k0 = [], 0
    for c in chunk_widths(cols):
        lanes = c // 8
        planes = qt[:, :, k0 : k0 + c].reshape(qt.shape[0], RT, 8, lanes).astype(np.uint32)
        words = np.zeros((qt.shape[0], RT, lanes), np.uint32)
        for p in range(8):
            words |= planes[:, :, p, :] << np.uint32(4 * p)
        g0, g1 = k0 // group, (k0 + c) // group
        blocks += [_as_words(words), _as_words(st[:, :, g0:g1]), _as_words(zt[:, :, g0:g1])]
        k0 += c
    return np.concatenate(blocks, axis=1).reshape(-1)


def pack_int8(q: np.ndarray, scale: np.ndarray, group: int = 32, zero: np.ndarray | None = None,
              dtype=np.float16) -> np.ndarray:
    """q int8 [N, K], scale (and zero) [N, K/group] (w = q*scale (+ zero)), group 32 or 16, stored as
    dtype (fp16 or float32) -> uint32 row tiles."""
    rows, cols = q.shape
    if group not in (16, 32) or scale.shape != (rows, cols // group):
        raise PerfxError(f"int8 scale must be [{rows}, {cols // group}] with a group of 16 or 32, got {scale.shape}")
    qt, st = _tiles(np.asarray(q, np.int8)), _tiles(np.asarray(scale, dtype))
    zt = None if zero is None else _tiles(np.asarray(zero, dtype))
    blocks, k0 = [], 0
    for c in chunk_widths(cols):
        g0, g1 = k0 // group, (k0 + c) // group
        blocks += [_as_words(qt[:, :, k0 : k0 + c]), _as_words(st[:, :, g0:g1])]
        blocks += [] if zt is None else [_as_words(zt[:, :, g0:g1])]
        k0 += c
    return np.concatenate(blocks, axis=1).reshape(-1)


def pack_f16(w: np.ndarray) -> np.ndarray:
    """w [N, K] -> uint32 row tiles of fp16 values."""
    return pack_floats(w, np.float16)


def pack_floats(w: np.ndarray, dtype) -> np.ndarray:
    """w [N, K] -> uint32 row tiles of its values as dtype (fp16, float32, or uint16: bfloat16 bits)."""
    wt = _tiles(np.asarray(w, dtype))
    blocks, k0 = [], 0
    for c in chunk_widths(w.shape[1]):
        blocks.append(_as_words(wt[:, :, k0 : k0 + c]))
        k0 += c
    return np.concatenate(blocks, axis=1).reshape(-1)



def quantize_blocks(x: np.ndarray, qmax: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """x [T, K] (K a multiple of 32) in symmetric integer blocks of 32, as the kernels compute them:
    (q [T, K] of dtype, scale f32 [T, K/32]) with x ~ q * scale and |q| <= qmax."""
    T, K = x.shape
    blocks = np.asarray(x, np.float32).reshape(T, K // 32, 32)
    m = np.abs(blocks).max(axis=-1)
    inv = np.divide(np.float32(qmax), m, out=np.zeros_like(m), where=m > 0)
    q = np.rint(blocks * inv[..., None]).astype(dtype)
    return q.reshape(T, K), (m / np.float32(qmax)).astype(np.float32)


def quantize_xq(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [T, K] in int16 blocks of 32 as kernels/xq.h computes them, in natural order."""
    return quantize_blocks(x, 32767, np.int16)


def xq_view(x: np.ndarray) -> np.ndarray:
    """The x [T, K] that the int-dot GEMV multiplies (f64): its int16 blocks (quantize_xq) as values over
    the whole 128-element chunks, the float x in the tail past them."""
    x = np.asarray(x, np.float32)
    T, K = x.shape
    q, scale = quantize_xq(x)
    out = x.astype(np.float64)
    whole = K // 128 * 128
    out[:, :whole] = (q.reshape(T, K // 32, 32) * scale[..., None].astype(np.float64)).reshape(T, K)[:, :whole]
    return out


def xq_positions(K: int) -> np.ndarray:
    """Where kernels/xq.h stores element k of a row of K values (int64 [K])."""
    k = np.arange(K)
    base, e = k & ~127, k & 127
    g, h, m, j = e >> 5, (e >> 4) & 1, (e >> 2) & 3, e & 3
    permuted = base + 32 * (h + 2 * (j & 1)) + 8 * m + 2 * g + (j >> 1)
    return np.where(base + 128 <= K, permuted, k)


@dataclass(eq=False)
class DeviceMatrix:
    """A weight matrix W [rows, cols] (rows = outputs N, cols = inputs K) in row tiles on the device."""

    fmt: str          # "int4", "int8", "int8x", "f16", "bf16" or "f32"
    rows: int
    cols: int
    group: int        # int4 group size (32, 64 or 128); 32 for int8; 16 or 32 for int8x; 0 for f16, f32
    buf: cl.Buffer    # uint32 row tiles, see the module docstring
    nbytes: int
    bias: cl.Buffer | None = None   # f32 [rows]: added to each output row by linear (kernels/bias.cl), or None
    scale_f32: bool = False         # scales (and zeros) as float32 (int4 of Q4_K, int8x)
    zeros: bool = False             # int8x with zeros: w = q*scale + zero

    @property
    def defines(self) -> dict:
        """The kernel defines of this matrix's format (kernels/wformat.h)."""
        return {"FORMAT": FORMAT_CODE[self.fmt], "G": self.group if self.fmt in ("int4", "int8x") else False,
                "SCALE_F32": self.scale_f32, "ZERO8": self.zeros}

    @classmethod
    def _upload(cls, rt: Runtime, fmt: str, rows: int, cols: int, group: int, words: np.ndarray) -> DeviceMatrix:
        return cls(fmt, rows, cols, group, rt.to_device(words), int(words.nbytes))

    @classmethod
    def from_int4(cls, rt: Runtime, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> DeviceMatrix:
        """q uint8 [N, K] (0..15), scale and zero [N, K/group]: w = q*scale + zero (stored as fp16)."""
        return cls._upload(rt, "int4", *q.shape, group, pack_int4(q, scale, zero, group))

    @classmethod
    def from_q8(cls, rt: Runtime, q: np.ndarray, scale: np.ndarray) -> DeviceMatrix:
        """q int8 [N, K], scale [N, K/32]: w = q*scale (GGUF Q8_0)."""
        return cls._upload(rt, "int8", *q.shape, 32, pack_int8(q, scale))

    @classmethod
    def from_f16(cls, rt: Runtime, w: np.ndarray) -> DeviceMatrix:
        """w [N, K], stored as fp16."""
        return cls._upload(rt, "f16", *w.shape, 0, pack_f16(w))

    @classmethod
    def from_qtensors(cls, rt: Runtime, tensors: list[QTensor]) -> DeviceMatrix:
        """The rows of `tensors` stacked in order (Q, K, V as one matrix; gate then up).

        Every type is held exactly, in the form weights.form_of picks: with mixed group sizes the
        smallest is used and the larger groups' scales and zeros repeated.

        A large matrix is packed LOAD_ROWS rows at a time straight into its device buffer, and the file
        pages of each packed piece are let go (QTensor.drop_pages), so loading needs little more host
        memory than the weights themselves.
        """
        if not tensors:
            raise PerfxError("from_qtensors needs at least one tensor")
        cols = {t.shape[-1] for t in tensors}
        if len(cols) != 1 or any(len(t.shape) != 2 for t in tensors):
            raise PerfxError(f"tensors to stack must be 2-D with equal columns: {[t.shape for t in tensors]}")
        form = weights.form_of(tensors)
        fmt, group, extra = form.fmt, form.group, {"scale_f32": form.scale_f32, "zeros": form.zeros}
        rows = sum(t.shape[0] for t in tensors)
        if rows <= LOAD_ROWS or any(t.shape[0] % RT for t in tensors[:-1]):
            words = weights.pack(tensors, form)
            for t in tensors:
                t.drop_pages()
            return replace(cls._upload(rt, fmt, rows, cols.pop(), group, words), **extra)
        ntiles = -(-rows // RT)
        buf, tile_words, tile0 = None, 0, 0
        for t in tensors:
            for r in range(0, t.shape[0], LOAD_ROWS):
                piece = t.rows(r, r + LOAD_ROWS)
                words = weights.pack([piece], form)             # uint32 [piece tiles * tile_words]
                piece.drop_pages()
                if buf is None:
                    tile_words = words.size // -(-piece.shape[0] // RT)
                    buf = rt.empty(4 * ntiles * tile_words)
                cl.enqueue_copy(rt.queue, buf, words, dst_offset=4 * tile0 * tile_words, is_blocking=True)
                tile0 += words.size // tile_words
        return cls(fmt, rows, cols.pop(), group, buf, 4 * ntiles * tile_words, **extra)

    def with_bias(self, rt: Runtime, biases: list[QTensor] | None) -> DeviceMatrix:
        """This matrix with `biases` stacked in order (Q, K, V) as its f32 bias [rows]; itself when None."""
        if biases is None:
            return self
        b = np.concatenate([t.dequantize().reshape(-1) for t in biases]).astype(np.float32)
        if b.shape != (self.rows,):
            raise PerfxError(f"a bias of {b.size} values for a matrix of {self.rows} rows")
        return replace(self, bias=rt.to_device(b), nbytes=self.nbytes + int(b.nbytes))
