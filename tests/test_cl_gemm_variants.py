"""The tiled int4 GEMM's device variants (kernels/gemm_half.cl, kernels/gemm_dot8.cl through Matmul)
against a float64 NumPy oracle, on whatever platform offers their extension: cl_khr_fp16 and
cl_khr_integer_dot_product. PoCL offers neither (the tests skip, saying so); Intel's CPU runtime offers
both: `PERFX_TEST_CL_PLATFORM="Intel(R) OpenCL"` (scripts/test runs them so with PERFX_TEST_INTEL=1).

Outputs are poisoned, with a guard region after them (tests/test_cl_matmul.py's `run`).
- int8 dot: the oracle multiplies x in int8 blocks of 32 as quantize_x8 makes them (x8_view) by the
  exact weights; the integer products are exact, so the f32 path's tolerance holds: 1e-4 of the output's
  largest magnitude.
- fp16: the oracle multiplies x and the dequantized weights rounded to fp16, as the kernel stores them;
  tolerance HALF_RTOL = 5e-4 of the output's largest magnitude (fp16 resolves 2^-11 = 4.9e-4 of a value),
  which the products in fp16 hold for the half_fold values up to 4 (docs/performance.md).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.test_cl_matmul import rt  # noqa: F401 (fixture)
from tests.test_cl_matmul import assert_close, oracle, rand_int4, rand_int8, run, silu_mul

HALF_RTOL = 5e-4
EXTENSION = {"half": "cl_khr_fp16", "dot8": "cl_khr_integer_dot_product"}

# gemm_tiled's CPU defaults (all of K staged, X from global memory), and GPU-style tiles: small work-groups
# whose odd sizes cover partial tiles, one chunk staged per barrier, X staged in local memory.
CPU_TILES: dict = {}
GPU_TILES = {"tiled_vec": 4, "tiled_bn": 32, "tiled_bt": 16, "tiled_rr": 2, "tiled_tr": 2, "tiled_kc": 1,
             "tiled_x_local": 1}


def h(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float64).astype(np.float16).astype(np.float64)


def _has(rt, mode: str) -> None:
    ext = EXTENSION[mode]
    if ext not in rt.device.extensions.split():
        pytest.skip(f"{rt.device.name.strip()} ({rt.device.platform.name}) lacks {ext}; "
                    'PERFX_TEST_CL_PLATFORM="Intel(R) OpenCL" picks a platform that has it')


@pytest.fixture(scope="module", params=[("half", CPU_TILES), ("half", GPU_TILES), ("dot8", CPU_TILES),
                                        ("dot8", GPU_TILES)], ids=["half-cpu", "half-gpu", "dot8-cpu", "dot8-gpu"])
def mm(rt, request):
    from perfx.engine.backends.opencl.matmul import Matmul

    mode, tiles = request.param
    _has(rt, mode)
    mm = Matmul(rt, {"tiled_arith": mode, **tiles})
    assert mm.variant is not None and mm.variant.mode == mode, "the variant failed its own probe"
    return mm


def want_of(mm, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What the variant computes, in float64."""
    from perfx.engine.backends.opencl.gemm_variants import x8_view

    return oracle(x8_view(x), w) if mm.variant.mode == "dot8" else h(x) @ h(w).T


def check(mm, got: np.ndarray, want: np.ndarray, scale: float | None = None) -> None:
    """got against want; fp16 within HALF_RTOL of `scale` (default: want's largest magnitude)."""
    if mm.variant.mode == "dot8":
        assert_close(got, want)
    else:
        assert np.all(np.isfinite(got)), "output has NaN/inf (unwritten or poisoned entries)"
        err, scale = np.abs(got - want).max(), np.abs(want).max() if scale is None else scale
        assert err <= HALF_RTOL * scale, f"max error {err:.3g} > {HALF_RTOL} x {scale:.3g}"


def swiglu_scale(gu: np.ndarray) -> float:
    """The magnitude that fp16 errors of gate and up (each within HALF_RTOL of its largest) reach in
    silu(gate) * up: d(silu(g) u) = silu'(g) u dg + silu(g) du, |silu'| < 1.1."""
    gate, up = np.split(gu, 2, axis=-1)
    silu = gate / (1.0 + np.exp(-gate))
    return float((1.1 * np.abs(gate).max() + np.abs(silu).max()) * np.abs(up).max())


CASES = [
    # N, K, G, T, op
    (577, 576, 32, 40, "linear"),      # 4 chunks of 128 and one of 64; partial row and token tiles
    (960, 1536, 64, 77, "linear"),
    (1001, 1536, 128, 33, "linear"),
    (64, 608, 32, 50, "linear"),       # K = 4*128 + 64 + 32: every tail chunk
    (37, 224, 32, 3, "linear"),        # fewer rows than a work-group, three tokens
    (2 * 40, 320, 32, 23, "swiglu"),   # 40 outputs: gate rows then up rows
    (2 * 1536, 576, 32, 61, "swiglu"),
]


@pytest.mark.parametrize("N,K,G,T,op", CASES)
def test_variant(rt, mm, N, K, G, T, op):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    rng = np.random.default_rng(N * 7 + K + G + T)
    parts, w = rand_int4(rng, N, K, G)
    dm = DeviceMatrix.from_int4(rt, *parts, G)
    x = rng.standard_normal((T, K))
    want = want_of(mm, x, w)
    if op == "swiglu":
        check(mm, run(rt, mm, dm, x, N // 2, op="swiglu", scheme="tiled"), silu_mul(want), swiglu_scale(want))
    else:
        check(mm, run(rt, mm, dm, x, N, scheme="tiled"), want)


def test_variant_accumulate(rt, mm):
    """y += x W^T (the residual projections), over random values already in y."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    rng = np.random.default_rng(11)
    parts, w = rand_int4(rng, 577, 1536, 32)
    x, y0 = rng.standard_normal((45, 1536)), rng.standard_normal((45, 577)).astype(np.float32)
    got = run(rt, mm, DeviceMatrix.from_int4(rt, *parts, 32), x, 577, y0=y0, scheme="tiled")
    check(mm, got - y0, want_of(mm, x, w))


def test_variant_float32_scales(rt, mm):
    """int4 with float32 scales and zeros (GGUF K-quants)."""
    from perfx.engine.backends.opencl.packing import DeviceMatrix, pack_int4

    rng = np.random.default_rng(12)
    (q, scale, zero), _ = rand_int4(rng, 101, 576, 32)
    scale, zero = scale * np.float32(1.0001), zero * np.float32(0.9999)       # not held by fp16
    w = q * np.repeat(scale, 32, axis=1).astype(np.float64) + np.repeat(zero, 32, axis=1)
    words = pack_int4(q, scale, zero, 32, dtype=np.float32)
    dm = replace(DeviceMatrix._upload(rt, "int4", 101, 576, 32, words), scale_f32=True)
    x = rng.standard_normal((29, 576))
    check(mm, run(rt, mm, dm, x, 101, scheme="tiled"), want_of(mm, x, w))


def test_other_formats_keep_the_f32_gemm(rt, mm):
    """int8 weights are not the variants': the f32 tiled GEMM runs them, exact to 1e-4 with x unrounded."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    rng = np.random.default_rng(5)
    parts, w = rand_int8(rng, 40, 96)
    x = rng.standard_normal((9, 96))
    assert_close(run(rt, mm, DeviceMatrix.from_q8(rt, *parts), x, 40, scheme="tiled"), oracle(x, w.reshape(40, 96)))


def test_variant_is_not_the_f32_gemm(rt, mm):
    """The variant is what runs: its result differs from the f32 GEMM's by more than float rounding."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix, Matmul

    rng = np.random.default_rng(13)
    parts, w = rand_int4(rng, 64, 576, 32)
    dm, x = DeviceMatrix.from_int4(rt, *parts, 32), rng.standard_normal((40, 576))
    f32 = run(rt, Matmul(rt), dm, x, 64, scheme="tiled")
    assert np.abs(run(rt, mm, dm, x, 64, scheme="tiled") - f32).max() > 1e-5 * np.abs(f32).max()


class Without:
    """The test device with one extension taken out of its list."""

    def __init__(self, device, ext: str):
        self._device, self.extensions = device, " ".join(e for e in device.extensions.split() if e != ext)

    def __getattr__(self, name):
        return getattr(self._device, name)


@pytest.mark.parametrize("mode", ["half", "dot8"])
def test_a_device_without_the_extension_keeps_the_f32_gemm_and_says_so_once(rt, capsys, mode):
    from perfx.engine.backends.opencl.matmul import Matmul

    device = rt.device
    rt.device = Without(device, EXTENSION[mode])
    try:
        mm = Matmul(rt, {"tiled_arith": mode})
    finally:
        rt.device = device
    assert mm.variant is None and mm.scheme(300) == "tiled"
    err = capsys.readouterr().err
    assert err.count("tiled GEMM is not used") == 1 and f"lacks {EXTENSION[mode]}" in err
    assert "prefill uses the f32 tiled GEMM" in err


def test_unknown_arithmetic_is_refused(rt):
    from perfx.engine.backends.opencl.matmul import Matmul
    from perfx.engine.errors import PerfxError

    with pytest.raises(PerfxError, match="tiled_arith must be one of"):
        Matmul(rt, {"tiled_arith": "int4"})


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("mode,top1", [("half", 0.99), ("dot8", 0.95)])
def test_smollm2_prefill_agrees_with_numpy(rt, smollm, monkeypatch, mode, top1):
    """300 tokens of text teacher-forced in one prefill, so that every layer matrix goes through the
    variant: fp16 gives NumPy's top-1 token at >= 99% of positions and its perplexity within 0.5%; int8
    activations cost more (96.7% measured, docs/performance.md): >= 95% and within 3%."""
    import math
    from pathlib import Path

    from perfx.engine import load_model
    from perfx.engine.backends.opencl import tuning
    from perfx.engine.backends.opencl.devices import describe
    from tests.test_cl_model import next_token_nll

    _has(rt, mode)
    params_for = tuning.params_for
    monkeypatch.setattr(tuning, "params_for", lambda info, kernel, defaults=None, database=None: {
        **params_for(info, kernel, defaults, database), **({"tiled_arith": mode} if kernel == "matmul" else {})})
    dev = load_model(smollm.path, device=describe(rt.device).id, ctx=1024)
    assert dev.transformer.backend.matmul.variant is not None
    gpl = Path("/usr/share/common-licenses/GPL-3")
    text = gpl.read_text() if gpl.exists() else "The quick brown fox jumps over the lazy dog. " * 80
    ids = smollm.tokenizer.encode(text, special=False)[:300]
    smollm.reset()
    expected, got = smollm.forward(ids), dev.forward(ids)
    agreement = float(np.mean(expected.argmax(-1) == got.argmax(-1)))
    assert agreement >= top1, agreement
    ppl, ref_ppl = math.exp(next_token_nll(got, ids)), math.exp(next_token_nll(expected, ids))
    assert math.isclose(ppl, ref_ppl, rel_tol=0.005 if mode == "half" else 0.03), (ppl, ref_ppl)
