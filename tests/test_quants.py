"""Dequantization of GGML block formats: hand-built blocks, a gguf cross-check, splits, errors."""

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from perfx.engine.errors import PerfxError
from perfx.engine.quant.gguf_blocks import BLOCK_SIZES, dequantize, split_q4, split_q8_0
from tests.conftest import F16_FIELDS   # byte offsets of the fp16 fields in each block type


def f16(x: float) -> bytes:
    return struct.pack("<e", x)


def as_u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def assert_exact(got: np.ndarray, expected: list[float], shape: tuple[int, ...]) -> None:
    assert got.dtype == np.float32
    assert got.shape == shape
    np.testing.assert_array_equal(got.reshape(-1), np.array(expected, dtype=np.float32))


# ---- hand-built blocks -------------------------------------------------------


def test_block_sizes():
    assert BLOCK_SIZES == {
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


def test_f32_bytes_and_typed():
    values = [1.5, -2.25, 0.0, 3e-5, 1e20, -7.0]
    raw = struct.pack("<6f", *values)
    expected = list(struct.unpack("<6f", raw))
    assert_exact(dequantize(as_u8(raw), "F32", (2, 3)), expected, (2, 3))
    typed = np.array(values, dtype=np.float32).reshape(2, 3)
    assert_exact(dequantize(typed, "F32", (2, 3)), expected, (2, 3))


def test_f16_bytes_and_typed():
    values = [1.0, -0.5, 65504.0, 2.0**-24]
    raw = b"".join(f16(v) for v in values)
    assert_exact(dequantize(as_u8(raw), "F16", (4,)), values, (4,))
    typed = np.array(values, dtype=np.float16)
    assert_exact(dequantize(typed, "F16", (2, 2)), values, (2, 2))


def test_bf16_bytes_and_uint16():
    bits = [0x3F80, 0xC020, 0x0000, 0x4049, 0xBF00, 0x7F7F]
    expected = [struct.unpack("<f", struct.pack("<I", b << 16))[0] for b in bits]
    assert expected[:3] == [1.0, -2.5, 0.0]
    raw = struct.pack("<6H", *bits)
    assert_exact(dequantize(as_u8(raw), "BF16", (3, 2)), expected, (3, 2))
    assert_exact(dequantize(np.array(bits, dtype=np.uint16), "BF16", (6,)), expected, (6,))


def test_q8_0_block():
    q = list(range(-16, 16))
    raw = f16(0.25) + struct.pack("<32b", *q)
    assert_exact(dequantize(as_u8(raw), "Q8_0", (32,)), [0.25 * v for v in q], (32,))


def test_q8_0_extremes():
    q = [-128, 127] + [0] * 30
    raw = f16(-3.0) + struct.pack("<32b", *q)
    got = dequantize(as_u8(raw), "Q8_0", (1, 32))
    assert got[0, 0] == 384.0 and got[0, 1] == -381.0 and not got[0, 2:].any()


def q4_bytes(nibbles: list[int]) -> bytes:
    """Pack 32 nibbles: element j in the low half of byte j, element j + 16 in its high half."""
    return bytes(nibbles[j] | (nibbles[j + 16] << 4) for j in range(16))


NIBBLES = list(range(16)) + [15 - j for j in range(16)]


def test_q4_0_block():
    raw = f16(0.5) + q4_bytes(NIBBLES)
    expected = [0.5 * (v - 8) for v in NIBBLES]
    assert expected[:3] == [-4.0, -3.5, -3.0] and expected[16] == 3.5
    assert_exact(dequantize(as_u8(raw), "Q4_0", (32,)), expected, (32,))


def test_q4_0_byte_order():
    raw = f16(1.0) + bytes([0x21] + [0x88] * 15)
    got = dequantize(as_u8(raw), "Q4_0", (32,))
    assert got[0] == 1 - 8 and got[16] == 2 - 8
    assert not got[1:16].any() and not got[17:].any()


def test_q4_1_block():
    raw = f16(0.5) + f16(-1.0) + q4_bytes(NIBBLES)
    expected = [0.5 * v - 1.0 for v in NIBBLES]
    assert expected[:4] == [-1.0, -0.5, 0.0, 0.5] and expected[16] == 6.5
    assert_exact(dequantize(as_u8(raw), "Q4_1", (32,)), expected, (32,))


Q4K_SCALES = [1, 2, 3, 63, 17, 40, 5, 33]
Q4K_MINS = [0, 7, 20, 63, 48, 1, 31, 16]


def pack_q4_k_scales(scales: list[int], mins: list[int]) -> bytes:
    out = [scales[j] | ((scales[j + 4] >> 4) << 6) for j in range(4)]
    out += [mins[j] | ((mins[j + 4] >> 4) << 6) for j in range(4)]
    out += [(scales[j + 4] & 0xF) | ((mins[j + 4] & 0xF) << 4) for j in range(4)]
    return bytes(out)


def q4_k_expected(d: float, dmin: float, qs: bytes) -> list[float]:
    out = []
    for e in range(256):
        sub, chunk, l = e // 32, e // 64, e % 32
        byte = qs[chunk * 32 + l]
        q = byte & 0xF if sub % 2 == 0 else byte >> 4
        out.append(d * Q4K_SCALES[sub] * q - dmin * Q4K_MINS[sub])
    return out


def test_q4_k_block():
    qs = bytes((i * 37 + 11) & 0xFF for i in range(128))
    raw = f16(0.5) + f16(0.25) + pack_q4_k_scales(Q4K_SCALES, Q4K_MINS) + qs
    got = dequantize(as_u8(raw), "Q4_K", (256,))
    assert_exact(got, q4_k_expected(0.5, 0.25, qs), (256,))
    # Byte 0 of qs is 11: element 0 (sub-block 0) = 0.5*1*11 - 0; element 32 (sub-block 1) = 0.5*2*0 - 0.25*7.
    assert got[0] == 5.5 and got[32] == -1.75
    # Sub-block 7 starts at element 224 with the high nibble of qs[96] = (96*37+11) & 255 = 235 -> 14.
    assert got[224] == 0.5 * 33 * 14 - 0.25 * 16


def test_q4_k_packed_scales_by_hand():
    scales = bytes([0x41, 0x82, 0x03, 0xC4, 0x05, 0x46, 0x87, 0xC8, 0x21, 0x43, 0x65, 0x87])
    qs = bytes([0x11] * 128)
    raw = f16(1.0) + f16(1.0) + scales + qs
    got = dequantize(as_u8(raw), "Q4_K", (256,)).reshape(8, 32)
    sub_scale = [1, 2, 3, 4, 0x11, 0x23, 0x05, 0x37]
    sub_min = [5, 6, 7, 8, 0x02, 0x14, 0x26, 0x38]
    for s in range(8):
        assert (got[s] == sub_scale[s] * 1 - sub_min[s]).all(), s


Q6K_SCALES = [1, -2, 3, -4, 5, 127, -128, 8, 9, -10, 11, 12, -13, 14, 15, -16]


def q6_k_expected(d: float, ql: bytes, qh: bytes) -> list[float]:
    out = []
    for e in range(256):
        half, r = divmod(e, 128)
        group, l = divmod(r, 32)
        ql_byte = ql[64 * half + l + 32 * (group % 2)]
        low = ql_byte & 0xF if group < 2 else ql_byte >> 4
        high = (qh[32 * half + l] >> (2 * group)) & 3
        scale = Q6K_SCALES[8 * half + 2 * group + l // 16]
        out.append(d * scale * ((low | (high << 4)) - 32))
    return out


def test_q6_k_block():
    ql = bytes((i * 73 + 5) & 0xFF for i in range(128))
    qh = bytes((i * 151 + 29) & 0xFF for i in range(64))
    raw = ql + qh + struct.pack("<16b", *Q6K_SCALES) + f16(0.125)
    got = dequantize(as_u8(raw), "Q6_K", (256,))
    assert_exact(got, q6_k_expected(0.125, ql, qh), (256,))
    # Element 0: ql[0] = 5 (low 5), qh[0] = 29 (bits 0-1 = 1) -> q = 5 + 16 - 32 = -11, scale 1.
    assert got[0] == 0.125 * 1 * -11


def test_q6_k_extremes():
    raw = bytes([0xFF] * 128) + bytes([0xFF] * 64) + struct.pack("<16b", *[-1] * 16) + f16(2.0)
    np.testing.assert_array_equal(dequantize(as_u8(raw), "Q6_K", (256,)), np.full(256, -62.0))
    raw = bytes(128) + bytes(64) + struct.pack("<16b", *[3] * 16) + f16(2.0)
    np.testing.assert_array_equal(dequantize(as_u8(raw), "Q6_K", (256,)), np.full(256, -192.0))


def test_multi_row_layout():
    rows = [f16(1.0) + struct.pack("<32b", *([r] * 16 + [-r] * 16)) for r in (1, 2, 3)]
    got = dequantize(as_u8(b"".join(rows)), "Q8_0", (3, 32))
    for r in range(3):
        assert (got[r, :16] == r + 1).all() and (got[r, 16:] == -(r + 1)).all()


# ---- random cross-check against gguf.quants -----------------------------------



def random_tensor(qtype: str, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """Random uint8 data shaped [rows, bytes per row] as GGUFReader returns it, finite fp16 fields."""
    rng = np.random.default_rng(seed)
    block_elems, block_bytes = BLOCK_SIZES[qtype]
    n_blocks = rows * blocks_per_row
    if block_elems == 1:
        values = rng.standard_normal(n_blocks).astype(np.float32)
        if qtype == "F16":
            values = values.astype(np.float16)
        elif qtype == "BF16":
            values = (values.view(np.uint32) >> 16).astype(np.uint16)
        return values.view(np.uint8).reshape(rows, -1)
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        field = rng.uniform(-2.0, 2.0, n_blocks).astype(np.float16)
        blocks[:, offset : offset + 2] = field.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(BLOCK_SIZES))
@pytest.mark.parametrize("rows,blocks_per_row", [(3, 2), (1, 1), (5, 3)])
def test_matches_gguf_reference(qtype: str, rows: int, blocks_per_row: int):
    data = random_tensor(qtype, rows, blocks_per_row, seed=rows * 10 + blocks_per_row)
    cols = blocks_per_row * BLOCK_SIZES[qtype][0]
    expected = gguf_quants.dequantize(data, GGMLQuantizationType[qtype]).reshape(rows, cols)
    got = dequantize(data, qtype, (rows, cols))
    assert got.dtype == np.float32 and got.shape == (rows, cols)
    assert np.abs(got).max() > 0
    np.testing.assert_array_equal(got, expected)


def test_higher_rank_shape():
    data = random_tensor("Q4_K", 6, 1, seed=7)
    flat = dequantize(data, "Q4_K", (6, 256))
    np.testing.assert_array_equal(dequantize(data, "Q4_K", (2, 3, 256)), flat.reshape(2, 3, 256))


# ---- splits -------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_split_q4_identity(qtype: str):
    data = random_tensor(qtype, 3, 2, seed=11)
    q, scale, zero = split_q4(data, qtype, (3, 64))
    assert q.dtype == np.uint8 and q.shape == (3, 64) and q.max() <= 15
    assert scale.dtype == zero.dtype == np.float32
    assert scale.shape == zero.shape == (3, 2)
    w = q.astype(np.float32) * np.repeat(scale, 32, axis=1) + np.repeat(zero, 32, axis=1)
    np.testing.assert_array_equal(w, dequantize(data, qtype, (3, 64)))


def test_split_q4_values():
    raw = f16(0.5) + q4_bytes(NIBBLES)
    q, scale, zero = split_q4(as_u8(raw), "Q4_0", (32,))
    assert q.tolist() == [NIBBLES]
    assert scale.tolist() == [[0.5]] and zero.tolist() == [[-4.0]]
    raw = f16(0.5) + f16(-1.0) + q4_bytes(NIBBLES)
    q, scale, zero = split_q4(as_u8(raw), "Q4_1", (1, 32))
    assert q.tolist() == [NIBBLES]
    assert scale.tolist() == [[0.5]] and zero.tolist() == [[-1.0]]


def test_split_q8_0():
    data = random_tensor("Q8_0", 3, 2, seed=13)
    q, scale = split_q8_0(data, (3, 64))
    assert q.dtype == np.int8 and q.shape == (3, 64)
    assert scale.dtype == np.float32 and scale.shape == (3, 2)
    w = q.astype(np.float32) * np.repeat(scale, 32, axis=1)
    np.testing.assert_array_equal(w, dequantize(data, "Q8_0", (3, 64)))
    raw = f16(0.25) + struct.pack("<32b", *range(-16, 16))
    q, scale = split_q8_0(as_u8(raw), (32,))
    assert q.tolist() == [list(range(-16, 16))] and scale.tolist() == [[0.25]]


# ---- errors -------------------------------------------------------------------


def test_unsupported_type():
    with pytest.raises(PerfxError) as err:
        dequantize(np.zeros(110, dtype=np.uint8), "Q3_K", (256,))
    message = str(err.value)
    assert "Q3_K" in message and "not supported" in message and "Q4_K" in message
    assert "\n" not in message


def test_wrong_byte_size():
    with pytest.raises(PerfxError) as err:
        dequantize(np.zeros(35, dtype=np.uint8), "Q8_0", (32,))
    message = str(err.value)
    assert "Q8_0" in message and "34" in message and "35" in message
    with pytest.raises(PerfxError, match="F32"):
        dequantize(np.zeros(3, dtype=np.float32), "F32", (2, 2))


def test_row_not_multiple_of_block():
    with pytest.raises(PerfxError, match="Q4_K.*multiple of 256"):
        dequantize(np.zeros(144, dtype=np.uint8), "Q4_K", (2, 128))


def test_split_rejects_other_types():
    with pytest.raises(PerfxError, match="Q8_0"):
        split_q4(np.zeros(34, dtype=np.uint8), "Q8_0", (32,))
    with pytest.raises(PerfxError, match="Q8_0"):
        split_q8_0(np.zeros(33, dtype=np.uint8), (32,))


# ---- data as GGUFReader returns it --------------------------------------------


def test_gguf_reader_round_trip(tmp_path):
    import gguf

    x = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("f32", x)
    writer.add_tensor("f16", x.astype(np.float16))
    for qtype in ("BF16", "Q8_0", "Q4_0", "Q4_1"):
        kind = GGMLQuantizationType[qtype]
        writer.add_tensor(qtype, gguf_quants.quantize(x, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tolerance = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.3}
    tensors = gguf.GGUFReader(str(path)).tensors
    assert len(tensors) == 6
    for tensor in tensors:
        qtype = tensor.tensor_type.name
        shape = tuple(int(n) for n in reversed(tensor.shape))
        got = dequantize(tensor.data, qtype, shape)
        assert shape == (3, 64)
        np.testing.assert_allclose(got, x, rtol=0, atol=tolerance[qtype], err_msg=qtype)
        expected = gguf_quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        np.testing.assert_array_equal(got, expected.reshape(shape), err_msg=qtype)
