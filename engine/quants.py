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
"""

from __future__ import annotations

import math

import numpy as np

from engine.errors import PerfxError

BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}

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


_BLOCK_DEQUANT = {
    "Q8_0": _dequant_q8_0,
    "Q4_0": _dequant_q4_0,
    "Q4_1": _dequant_q4_1,
    "Q4_K": _dequant_q4_k,
    "Q6_K": _dequant_q6_k,
}


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


# ---- what the OpenCL device path cannot hold exactly -----------------------------------------------
NOTICE_SAMPLE_ROWS = 64      # rows of each requantized tensor measured for the notice


def requantization_notice(weights) -> str | None:
    """One line for the weight matrices that the OpenCL backend requantizes to int4 with groups of 32
    (Q4_K, Q6_K, BF16, a stack of mixed kinds: see engine.backends.opencl.matmul), with the weight error
    that costs, measured on the first rows of each; None when every matrix is held exactly."""
    from .backends.opencl.matmul import _kind, quantize_int4

    stacks = [s for l in weights.layers for s in (l.wqkv, [l.wo], l.w_gate_up, [l.w_down])] + [[weights.output]]
    requantized = [s for s in stacks if _kind(s)[0] == "requant"]
    if not requantized:
        return None
    err = ref = 0.0
    for t in {id(t): t for s in requantized for t in s}.values():
        w = t.rows(0, NOTICE_SAMPLE_ROWS).dequantize().astype(np.float64)
        q, scale, zero = quantize_int4(w, 32)
        held = q * np.repeat(scale, 32, axis=1) + np.repeat(zero, 32, axis=1)
        err, ref = err + float(((held - w) ** 2).sum()), ref + float((w * w).sum())
    types = ", ".join(sorted({t.qtype for s in requantized for t in s}))
    return (f"{len(requantized)} of {len(stacks)} weight matrices ({types}) have no exact form on this device and "
            f"are requantized to int4 in groups of 32: {100 * math.sqrt(err / max(ref, 1e-30)):.1f}% RMS weight "
            "error (convert the model to Q4_0, Q4_1 or Q8_0 to avoid it)")
