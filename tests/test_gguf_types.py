"""GGUF block types on the OpenCL path, exactly: quants.split against gguf's dequantizers, the repacked
row tiles element by element against the dequantized weights, the GEMV / GEMM against a float64
product of them (outputs poisoned, odd sizes), mixed stacks, and whole random-weight models per type
on NumPy and OpenCL."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from perfx.engine.formats.tensors import QTensor
from perfx.engine.quant.gguf_blocks import BLOCK_SIZES, SPLIT_TYPES, split
from tests.conftest import TinySpec, random_blocks, write_tiny_gguf
from tests.test_cl_matmul import (assert_close, mm, mm_gpu_like, mm_nvidia, oracle, rt, run,  # noqa: F401 (fixtures)
                                  silu_mul, x_for)

FLOAT_TYPES = ("F16", "BF16", "F32")
# type -> (device form, group, scale_f32, zeros)
FORMS = {
    "Q4_0": ("int4", 32, False, False), "Q4_1": ("int4", 32, False, False), "Q4_K": ("int4", 32, True, False),
    "Q8_0": ("int8", 32, False, False), "Q5_0": ("int8", 32, False, False), "IQ4_NL": ("int8", 32, False, False),
    "Q5_1": ("int8x", 32, True, True), "Q5_K": ("int8x", 32, True, True), "Q6_K": ("int8x", 16, True, False),
    "IQ4_XS": ("int8x", 32, True, False), "F16": ("f16", 0, False, False), "BF16": ("bf16", 0, False, False),
    "F32": ("f32", 0, False, False),
}


def tensor(qtype: str, rows: int, cols: int, seed: int, name: str = "w") -> QTensor:
    """A tensor of random blocks (fp16 factors scaled for values of about 0.1) or random floats."""
    rng = np.random.default_rng(seed)
    if qtype in FLOAT_TYPES:
        values = rng.standard_normal((rows, cols)).astype(np.float32) * 0.1
        raw = gguf_quants.quantize(values, GGMLQuantizationType[qtype]) if qtype != "F32" else values
        return QTensor(name, qtype, (rows, cols), raw)
    return QTensor(name, qtype, (rows, cols), random_blocks(qtype, (rows, cols), rng, 0.1))


def cols_for(qtype: str) -> int:
    """Odd widths: 608 = 4*128 + 64 + 32 (every tail chunk) where blocks of 32 allow, else 3 x 256."""
    return 768 if BLOCK_SIZES[qtype][0] == 256 else 608


# ---- quants.split: integers and float32 factors, equal to gguf's dequantized values ----------------


@pytest.mark.parametrize("qtype", SPLIT_TYPES)
def test_split_equals_gguf_dequantize(qtype):
    t = tensor(qtype, 5, cols_for(qtype), seed=1)
    q, scale, zero, group = split(t.raw, qtype, t.shape)
    w = np.repeat(scale, group, axis=1) * q.astype(np.float32)
    if zero is not None:
        w = w + np.repeat(zero, group, axis=1)
    want = gguf_quants.dequantize(np.asarray(t.raw), GGMLQuantizationType[qtype]).reshape(t.shape)
    assert np.abs(want).max() > 0 and np.all(np.isfinite(want))
    np.testing.assert_array_equal(w, want)
    np.testing.assert_array_equal(t.dequantize(), want)


# ---- the row tiles, read back ----------------------------------------------------------------------


def unpack(words: np.ndarray, dm) -> np.ndarray:
    """The weights [rows, cols] float32 that the row tiles of DeviceMatrix dm hold (matmul.py layout),
    each computed as q * scale (+ zero) in float32."""
    from perfx.engine.backends.opencl.matmul import RT, chunk_widths

    sdt = np.float32 if dm.scale_f32 else np.float16
    ntiles = -(-dm.rows // RT)
    tiles = words.reshape(ntiles, -1)
    out = np.empty((ntiles, RT, dm.cols), np.float32)
    pos, k0 = 0, 0

    def take(n_words: int) -> np.ndarray:
        nonlocal pos
        pos += n_words
        return np.ascontiguousarray(tiles[:, pos - n_words:pos])

    for c in chunk_widths(dm.cols):
        if dm.fmt in ("f16", "f32"):
            dt = np.float16 if dm.fmt == "f16" else np.float32
            out[:, :, k0:k0 + c] = take(RT * c * np.dtype(dt).itemsize // 4).view(dt).reshape(ntiles, RT, c)
        elif dm.fmt == "bf16":
            bits = take(RT * c // 2).view(np.uint16).astype(np.uint32) << np.uint32(16)
            out[:, :, k0:k0 + c] = bits.view(np.float32).reshape(ntiles, RT, c)
        else:
            if dm.fmt == "int4":
                qw = take(RT * c // 8).reshape(ntiles, RT, c // 8)
                q = np.concatenate([(qw >> np.uint32(4 * p)) & np.uint32(15) for p in range(8)], axis=2)
            else:
                q = take(RT * c // 4).view(np.int8).reshape(ntiles, RT, c)
            n_sc = RT * c // dm.group * np.dtype(sdt).itemsize // 4
            scale = take(n_sc).view(sdt).reshape(ntiles, RT, -1).astype(np.float32)
            w = np.repeat(scale, dm.group, axis=2) * q.astype(np.float32)
            if dm.fmt == "int4" or dm.zeros:
                w = w + np.repeat(take(n_sc).view(sdt).reshape(ntiles, RT, -1).astype(np.float32), dm.group, axis=2)
            out[:, :, k0:k0 + c] = w
        k0 += c
    assert pos == tiles.shape[1]
    return out.reshape(-1, dm.cols)[:dm.rows]


def check_matrix(rt, mm, tensors: list[QTensor], form: tuple) -> None:
    """Tiles equal to the dequantized weights; linear (gemv, few, tiled) and swiglu against float64."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    dm = DeviceMatrix.from_qtensors(rt, tensors)
    assert (dm.fmt, dm.group, dm.scale_f32, dm.zeros) == form
    w = np.concatenate([t.dequantize() for t in tensors])
    np.testing.assert_array_equal(unpack(rt.read(dm.buf, dm.nbytes // 4, np.uint32), dm), w)
    w = w.astype(np.float64)
    rng = np.random.default_rng(dm.rows)
    for T, scheme in ((1, None), (5, "few"), (40, "tiled")):
        x = rng.standard_normal((T, dm.cols))
        assert_close(run(rt, mm, dm, x, dm.rows, scheme=scheme), oracle(x_for(mm, dm, x, scheme), w))
    if dm.rows % 8 == 0:
        for T in (1, 17):
            x = rng.standard_normal((T, dm.cols))
            assert_close(run(rt, mm, dm, x, dm.rows // 2, op="swiglu"), silu_mul(oracle(x_for(mm, dm, x), w)))


@pytest.mark.parametrize("qtype", list(FORMS))
def test_type_on_device_exact(rt, mm, qtype):
    check_matrix(rt, mm, [tensor(qtype, 77, cols_for(qtype), seed=2)], FORMS[qtype])


@pytest.mark.slow                   # 12 kernel builds per define set: minutes on a cold cache
@pytest.mark.parametrize("params", ["mm_gpu_like", "mm_nvidia"])
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "Q5_K", "Q6_K", "IQ4_XS", "BF16"])
def test_type_with_gpu_params(rt, request, params, qtype):
    """The GPU layouts of the kernels (VEC 4, K split, x through an image; NVIDIA's tuning entry)."""
    check_matrix(rt, request.getfixturevalue(params), [tensor(qtype, 77, cols_for(qtype), seed=3)], FORMS[qtype])


@pytest.mark.parametrize("qtypes,form", [
    (("Q5_0", "Q5_0", "Q8_0"), ("int8", 32, False, False)),    # Gemma 3 270M Q4_K_M: Q, K, V
    (("Q4_K", "Q4_K", "Q6_K"), ("int8x", 16, True, True)),     # Q4_K_M files: V in Q6_K
    (("Q4_0", "Q4_K"), ("int4", 32, True, False)),
    (("Q5_0", "Q4_K"), ("int8x", 32, True, True)),
    (("IQ4_NL", "IQ4_XS"), ("int8x", 32, True, False)),
    (("Q6_K", "BF16"), ("f32", 0, False, False)),
])
def test_mixed_stack_exact(rt, mm, qtypes, form):
    check_matrix(rt, mm, [tensor(t, 64, 768, seed=i, name=f"t{i}") for i, t in enumerate(qtypes)], form)


# ---- whole models ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cl_device() -> str:
    from perfx.engine.backends.opencl.devices import select
    from perfx.engine.errors import PerfxError

    try:
        return select("opencl").info.id
    except PerfxError as e:
        pytest.skip(f"no usable OpenCL device: {e}")


@pytest.mark.parametrize("qtype,types", [
    ("Q4_K", (("attn_v", "Q6_K"), ("ffn_down", "Q6_K"))), ("Q5_K", ()), ("Q6_K", ()), ("Q5_0", (("attn_v", "Q8_0"),)),
    ("Q5_1", ()), ("IQ4_NL", ()), ("IQ4_XS", ()), ("BF16", ()),
])
def test_model_per_type_matches_numpy(tmp_path, cl_device, qtype, types):
    from perfx.engine import load_model

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec(dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, qtype=qtype, types=types,
                                   tied=False, ctx_len=64, seed=7))
    ref = load_model(path, device="numpy", ctx=64)
    dev = load_model(path, device=cl_device, ctx=64)
    ids = np.random.default_rng(0).integers(0, ref.config.vocab_size, size=19).tolist()
    expected = ref.forward(ids)
    # The device path's own float error (int16 x in the int-dot GEMV, the KV cache) reaches 2.3e-3 of
    # the largest logit at these widths with Q8_0 weights too; a wrong block decode is off by O(1).
    atol = 5e-3 * np.abs(expected).max()
    np.testing.assert_allclose(dev.forward(ids), expected, atol=atol, rtol=0)
    more = [5, 77, 140]
    np.testing.assert_allclose(dev.forward(more, len(ids)), ref.forward(more, len(ids)), atol=atol, rtol=0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS", "F16", "BF16"])
def test_device_bytes_count_the_device_form(qtype):
    """The memory check counts a stack as the device holds it (Q5 and Q6 widened to 8 bits, Q4_K's f32
    factors), which is never less than the file's bytes."""
    from perfx.engine.backends.opencl.weights import device_bytes, form_of, pack

    t = tensor(qtype, 64, 512, 3)
    assert device_bytes([t]) == pack([t], form_of([t])).nbytes >= t.nbytes
