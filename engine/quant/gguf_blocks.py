"""GGML tensor block formats and vectorized NumPy dequantization.

A GGUF tensor is stored row by row (last dimension fastest); each row is a
run of fixed-size blocks. All multi-byte fields are little-endian.

- F32   1 element, 4 bytes: IEEE float32.
- F16   1 element, 2 bytes: IEEE float16.
- BF16  1 element, 2 bytes: the top half of a float32.
- Q8_0  32 elements, 34 bytes: fp16 d, int8 q[32]; w = d * q.
- Q4_0  32 elements, 18 bytes: fp16 d, 16 bytes of nibbles; element j is
        the low nibble of byte j, element j + 16 its high nibble;
        w = d * (q - 8).
- Q4_1  32 elements, 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles laid
        out as in Q4_0; w = d * q + m.
- Q4_K  256 elements, 144 bytes: fp16 d, fp16 dmin, 12 bytes holding eight
        6-bit scales and eight 6-bit mins (one pair per 32-element
        sub-block), 128 bytes of nibbles. Bytes 0-3 carry scales 0-3 in their
        low 6 bits, bytes 4-7 mins 0-3; bytes 8-11 carry the low 4 bits of
        scales 4-7 (low nibble) and mins 4-7 (high nibble), whose top 2 bits
        sit in the top 2 bits of bytes 0-3 (scales) and 4-7 (mins). Each
        32-byte run of nibbles covers 64 elements: low nibbles the first
        sub-block, high nibbles the second;
        w = d * scale * q - dmin * min.
- Q6_K  256 elements, 210 bytes: ql[128] (low 4 bits), qh[64] (high 2
        bits), int8 scales[16] (one per 16 elements), fp16 d. Each half of
        128 elements uses 64 bytes of ql and 32 of qh; for l in 0..31 the
        elements l, l+32, l+64, l+96 take the low nibble of ql[l], the low
        nibble of ql[l+32], the high nibble of ql[l], the high nibble of
        ql[l+32], and bits 0-1, 2-3, 4-5, 6-7 of qh[l];
        w = d * scale * (q - 32).
- Q5_0  32 elements, 22 bytes: fp16 d, 32-bit qh, 16 bytes of nibbles laid out
        as in Q4_0; bit j of qh is bit 4 of element j; w = d * (q - 16).
- Q5_1  32 elements, 24 bytes: fp16 d, fp16 m, qh, nibbles as in Q5_0;
        w = d * q + m.
- Q5_K  256 elements, 176 bytes: fp16 d, fp16 dmin, the 12 scale bytes of
        Q4_K, qh[32], 128 bytes of nibbles as in Q4_K; bit i of qh[l] is bit 4
        of element l of sub-block i; w = d * scale * q - dmin * min.
- IQ4_NL 32 elements, 18 bytes: fp16 d, nibbles as in Q4_0;
        w = d * KVALUES[q].
- IQ4_XS 256 elements, 136 bytes: fp16 d, 16-bit scales_h, scales_l[4],
        128 bytes of nibbles, 16 per 32-element sub-block laid out as in Q4_0.
        Sub-block i's 6-bit scale: nibble i % 2 of scales_l[i / 2] and bits
        2i, 2i+1 of scales_h above it; w = d * (scale - 32) * KVALUES[q].

Every block type is also split exactly into integers and float32 factors,
w = q * scale (+ zero) per group of 16 or 32 (`split`): fp16 d times a 6- or
8-bit scale is exact in float32, so these values equal the dequantized ones bit
for bit (the order of operations is the reference's).
"""

from __future__ import annotations

import math

import numpy as np

from perfx.engine.errors import PerfxError

BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q5_K": (256, 176),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (256, 136),
}
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)

_NIBBLE_SHIFTS = np.array([0, 4], dtype=np.uint8)
_CRUMB_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)


def _check_type(qtype: str) -> None:
    if qtype not in BLOCK_SIZES:
        supported = ", ".join(BLOCK_SIZES)
        raise PerfxError(f"tensor type {qtype} is not supported (supported: {supported})")


def _as_bytes(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array, checked against its shape."""
    _check_type(qtype)
    block_elems, block_bytes = BLOCK_SIZES[qtype]
    shape = tuple(int(n) for n in shape)
    if block_elems > 1 and (not shape or shape[-1] % block_elems):
        raise PerfxError(
            f"tensor of type {qtype} needs a last dimension that is a multiple of "
            f"{block_elems}, got shape {shape}"
        )
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    expected = math.prod(shape) // block_elems * block_bytes
    if data.size != expected:
        raise PerfxError(
            f"tensor of type {qtype} and shape {shape} needs {expected} bytes, got {data.size}"
        )
    return data


def _blocks(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor's bytes as a [n_blocks, bytes per block] uint8 array."""
    return _as_bytes(raw, qtype, shape).reshape(-1, BLOCK_SIZES[qtype][1])


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte `offset` of every block, as float32 [n_blocks, 1]."""
    field = np.ascontiguousarray(blocks[:, offset : offset + 2])
    return field.view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Split [..., n] bytes into [..., 2n] nibbles: all low nibbles, then all high."""
    halves = (packed[..., None, :] >> _NIBBLE_SHIFTS[:, None]) & np.uint8(0x0F)
    return halves.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _q4_parts(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 / Q4_1 nibbles in element order, uint8 [n_blocks, 32]."""
    return _nibbles(blocks[:, -16:])


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    q = _q4_parts(blocks).astype(np.float32)
    return _f16(blocks, 0) * (q - np.float32(8))


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    q = _q4_parts(blocks).astype(np.float32)
    return _f16(blocks, 0) * q + _f16(blocks, 2)


def _q4_k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte Q4_K field into 6-bit scales and mins, each [n_blocks, 8]."""
    lo_sc, lo_m, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales_hi = (rest & np.uint8(0x0F)) | ((lo_sc >> np.uint8(6)) << np.uint8(4))
    mins_hi = (rest >> np.uint8(4)) | ((lo_m >> np.uint8(6)) << np.uint8(4))
    scales = np.concatenate([lo_sc & np.uint8(0x3F), scales_hi], axis=1)
    mins = np.concatenate([lo_m & np.uint8(0x3F), mins_hi], axis=1)
    return scales, mins


def _dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    scales, mins = _q4_k_scales_mins(blocks[:, 4:16])
    sub_scale = (_f16(blocks, 0) * scales.astype(np.float32))[:, :, None]
    sub_min = (_f16(blocks, 2) * mins.astype(np.float32))[:, :, None]
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
    return (sub_scale * q - sub_min).reshape(n, 256)


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    low = _nibbles(ql).reshape(n, 2, 4, 32)
    high = (qh >> _CRUMB_SHIFTS[:, None]) & np.uint8(0x03)
    q = (low | (high << np.uint8(4))).astype(np.float32) - np.float32(32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    sub_scale = (_f16(blocks, 208) * scales)[:, :, None]
    return (sub_scale * q.reshape(n, 16, 16)).reshape(n, 256)


def _bits(packed: np.ndarray) -> np.ndarray:
    """[n, b] bytes -> [n, 8b] bits, bit i of byte j at 8j + i."""
    return np.unpackbits(packed, axis=1, bitorder="little")


def _split_q5(blocks: np.ndarray, qh_at: int) -> np.ndarray:
    """Q5_0 / Q5_1 5-bit values in element order, uint8 [n_blocks, 32]."""
    return _q4_parts(blocks) | (_bits(blocks[:, qh_at : qh_at + 4]) << np.uint8(4))


def _k_parts(blocks: np.ndarray, nibbles_at: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: (4-bit values [n, 256], scale d*sc and zero -dmin*m float32 [n, 8])."""
    n = blocks.shape[0]
    scales, mins = _q4_k_scales_mins(blocks[:, 4:16])
    q = _nibbles(blocks[:, nibbles_at:nibbles_at + 128].reshape(n, 4, 32)).reshape(n, 256)
    return q, _f16(blocks, 0) * scales.astype(np.float32), -(_f16(blocks, 2) * mins.astype(np.float32))


def _split_blocks(blocks: np.ndarray, qtype: str):
    """(q [n_blocks, elems] (int8 or uint8), scale [n_blocks, elems/group] f32, zero or None, group)."""
    n = blocks.shape[0]
    if qtype in ("Q4_0", "Q4_1"):
        d = _f16(blocks, 0)
        return _q4_parts(blocks), d, -8 * d if qtype == "Q4_0" else _f16(blocks, 2), 32
    if qtype == "Q8_0":
        return blocks[:, 2:].view(np.int8), _f16(blocks, 0), None, 32
    if qtype == "Q5_0":
        return (_split_q5(blocks, 2).view(np.int8) - np.int8(16)), _f16(blocks, 0), None, 32
    if qtype == "Q5_1":
        return _split_q5(blocks, 4), _f16(blocks, 0), _f16(blocks, 2), 32
    if qtype == "Q4_K":
        return _k_parts(blocks, 16) + (32,)
    if qtype == "Q5_K":
        q, scale, zero = _k_parts(blocks, 48)
        high = _bits(blocks[:, 16:48]).reshape(n, 32, 8).transpose(0, 2, 1).reshape(n, 256)
        return q | (high << np.uint8(4)), scale, zero, 32
    if qtype == "Q6_K":
        ql = blocks[:, 0:128].reshape(n, 2, 64)
        qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
        low = _nibbles(ql).reshape(n, 2, 4, 32)
        high = (qh >> _CRUMB_SHIFTS[:, None]) & np.uint8(0x03)
        q = (low | (high << np.uint8(4))).reshape(n, 256).view(np.int8) - np.int8(32)
        return q, _f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32), None, 16
    if qtype == "IQ4_NL":
        return KVALUES[_q4_parts(blocks)], _f16(blocks, 0), None, 32
    if qtype == "IQ4_XS":
        low = _nibbles(blocks[:, 4:8])                                       # [n, 8]: l0 l2 l4 l6 then l1 l3 l5 l7
        low = low.reshape(n, 2, 4).transpose(0, 2, 1).reshape(n, 8)
        high = (blocks[:, 2:4].view("<u2").astype(np.uint16) >> (2 * np.arange(8, dtype=np.uint16))) & 3
        ls = (low | (high.astype(np.uint8) << np.uint8(4))).astype(np.float32) - np.float32(32)
        q = KVALUES[_nibbles(blocks[:, 8:].reshape(n, 8, 16)).reshape(n, 256)]
        return q, _f16(blocks, 0) * ls, None, 32
    raise PerfxError(f"tensor type {qtype} has no integer form")


def _dequant_split(qtype: str):
    def dequant(blocks: np.ndarray) -> np.ndarray:
        q, scale, zero, group = _split_blocks(blocks, qtype)
        n, elems = q.shape
        w = scale[:, :, None] * q.reshape(n, elems // group, group).astype(np.float32)
        return (w if zero is None else w + zero[:, :, None]).reshape(n, elems)
    return dequant


_BLOCK_DEQUANT = {
    "Q8_0": _dequant_q8_0,
    "Q4_0": _dequant_q4_0,
    "Q4_1": _dequant_q4_1,
    "Q4_K": _dequant_q4_k,
    "Q6_K": _dequant_q6_k,
    **{t: _dequant_split(t) for t in ("Q5_0", "Q5_1", "Q5_K", "IQ4_NL", "IQ4_XS")},
}
SPLIT_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS")


def dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a GGUF tensor's data into a float32 array of `shape`."""
    data = _as_bytes(raw, qtype, shape)
    if qtype == "F32":
        values = data.view("<f4").astype(np.float32)
    elif qtype == "F16":
        values = data.view("<f2").astype(np.float32)
    elif qtype == "BF16":
        values = (data.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
    else:
        values = _BLOCK_DEQUANT[qtype](data.reshape(-1, BLOCK_SIZES[qtype][1]))
    return values.reshape(shape)


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    cols = int(shape[-1])
    return math.prod(shape) // cols, cols


def split_q4(
    raw: np.ndarray, qtype: str, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split Q4_0 / Q4_1 data into (q, scale, zero) with w = q * scale + zero.

    q is uint8 [rows, cols] with values 0..15 in element order; scale and
    zero are float32 [rows, cols // 32], one per block.
    """
    if qtype not in ("Q4_0", "Q4_1"):
        raise PerfxError(f"split_q4 needs a Q4_0 or Q4_1 tensor, got {qtype}")
    blocks = _blocks(raw, qtype, shape)
    rows, cols = _rows_cols(shape)
    q = _q4_parts(blocks).reshape(rows, cols)
    d = _f16(blocks, 0)
    zero = -8 * d if qtype == "Q4_0" else _f16(blocks, 2)
    return q, d.reshape(rows, cols // 32), zero.reshape(rows, cols // 32)


def split_q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Split Q8_0 data into (q int8 [rows, cols], scale float32 [rows, cols // 32])."""
    blocks = _blocks(raw, "Q8_0", shape)
    rows, cols = _rows_cols(shape)
    q = blocks[:, 2:].view(np.int8).reshape(rows, cols)
    return q, _f16(blocks, 0).reshape(rows, cols // 32)


def split(
    raw: np.ndarray, qtype: str, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Split any block type of SPLIT_TYPES exactly into (q [rows, cols], scale float32
    [rows, cols/group], zero float32 like scale or None, group) with w = q * scale (+ zero), the
    float32 products equal to `dequantize`'s values. q is uint8 (0..15 for the 4-bit types Q4_0,
    Q4_1, Q4_K, which take zero = -8d, m, -dmin*min; 0..31 for Q5_1, Q5_K) or int8 (Q5_0 q - 16,
    Q6_K q - 32 with groups of 16, Q8_0, IQ4_NL and IQ4_XS their codebook values)."""
    blocks = _blocks(raw, qtype, shape)
    rows, cols = _rows_cols(shape)
    q, scale, zero, group = _split_blocks(blocks, qtype)
    scale = scale.reshape(rows, cols // group)
    return q.reshape(rows, cols), scale, None if zero is None else zero.reshape(scale.shape), group
