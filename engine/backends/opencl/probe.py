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
