"""The check a device-specific kernel passes at load before perfx uses it (tensor-core GEMM and attention,
the tiled GEMM's fp16 and int8-dot variants, the dot-product GEMV): a small case against NumPy, and the
one line said when it fails and the portable kernel is used instead."""
from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import pyopencl as cl

from ...errors import PerfxError


def verdict(run: Callable[[], np.ndarray], want: np.ndarray, rel: float) -> str | None:
    """None when run() builds, runs and returns want within rel of want's largest magnitude; else why not,
    in one line."""
    try:
        got = run()
    except (PerfxError, cl.Error) as e:
        return str(e).splitlines()[0][:200]
    err = float(np.abs(got - want).max()) if np.isfinite(got).all() else float("inf")
    if not err <= rel * np.abs(want).max():
        return f"its result differs from NumPy's by {err:.3g}"
    return None


def passed(device: cl.Device, why: str | None, what: str, instead: str) -> bool:
    """Whether a probe passed; if not, says on stderr that `what` is not used and what runs `instead`."""
    if why is not None:
        print(f"perfx: {device.name.strip()}: {what} is not used ({why}); {instead}", file=sys.stderr)
    return why is None


def int4_gemv(mm, check: Callable[[], None] = lambda: None) -> str | None:
    """A GEMV's probe through the Matmul mm (with the GEMV layout to check): a small int4 product, two
    tokens, rows not a multiple of 4, a 64- and a 32-element tail, against NumPy; check() runs first
    (a configuration check that raises PerfxError). None when it passes, else why not."""
    from ...quant.quantize import quantize_int4
    from .packing import DeviceMatrix

    rng = np.random.default_rng(11)
    T, K, N = 2, 352, 45
    q, scale, zero = quantize_int4(rng.standard_normal((N, K)).astype(np.float32), 32)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = q * np.repeat(scale, 32, axis=1).astype(np.float64) + np.repeat(zero, 32, axis=1)
    want = x.astype(np.float64) @ w.T
    rt = mm.rt

    def run() -> np.ndarray:
        check()
        dm = DeviceMatrix.from_int4(rt, q, scale, zero, 32)
        xb = rt.to_device(x)
        yb = rt.to_device(np.full((T, N), np.nan, np.float32))
        mm.linear(xb, dm, T, yb, scheme="gemv")
        return rt.read(yb, (T, N))

    return verdict(run, want, 1e-3)


def int4_product(rt, seed: int, T: int, K: int, N: int,
                 steps: Callable[[object, cl.Buffer, cl.Buffer], tuple[list, tuple]]
                 ) -> tuple[Callable[[], np.ndarray], tuple]:
    """A random int4 product for a GEMM's probe: q [N, K] in 0..15, fp16 scales per 32 and zeros of -8
    scales, x [T, K]; returns (run, (q, scale, zero, x)) where run() packs the matrix, launches
    steps(matrix, x, y) (a list of (kernel, global size, local size), and the buffers the launches use,
    kept until y [T, N] is read) and reads y."""
    from .packing import DeviceMatrix

    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (N, K)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.02, (N, K // 32)).astype(np.float16)
    zero = (-8 * scale).astype(np.float16)
    x = rng.standard_normal((T, K)).astype(np.float32)

    def run() -> np.ndarray:
        dm = DeviceMatrix.from_int4(rt, q, scale, zero, 32)
        xb = rt.to_device(x)
        yb = rt.to_device(np.full((T, N), np.nan, np.float32))
        launches, keep = steps(dm, xb, yb)
        for kernel, gsize, lsize in launches:
            rt.launch(kernel, gsize, lsize)
        got = rt.read(yb, (T, N))
        del keep
        return got

    return run, (q, scale, zero, x)
