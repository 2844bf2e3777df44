"""One OpenCL device in use: its context, its queue, and the kernels built for it.

Kernels are `.cl` files in the `kernels` package, one per operator; tunables are `-D NAME=VALUE`
defines with defaults in the source. Built programs are cached on disk by pyopencl, keyed by
source, options and device, so a second start builds nothing.
"""
from __future__ import annotations

import threading
import warnings
from importlib import resources

import numpy as np
import pyopencl as cl

from ...dirs import kernel_cache_dir
from ...errors import PerfxError
from .drivers import driver_of
from .specs import source_defaults

# A compiler's remarks on a build that succeeded (PoCL's vector-ABI notes on CPUs without AVX-512) are no
# user's business; a failed build raises with its log.
warnings.filterwarnings("ignore", category=cl.CompilerWarning)


def kernel_source(name: str) -> str:
    """The text of kernels/<name>.cl, with each `#include "<file>"` line replaced by that file of the
    kernels package (shared device functions, kernels/*.h), so that a program's text is all of its
    source and the build cache keys on it."""
    kernels = resources.files("perfx.kernels")
    lines = kernels.joinpath(f"{name}.cl").read_text(encoding="utf-8").splitlines(keepends=True)
    return "".join(kernels.joinpath(line.split('"')[1]).read_text(encoding="utf-8")
                   if line.startswith('#include "') else line for line in lines)


class Runtime:
    def __init__(self, device: cl.Device, profiling: bool = False):
        self.device = device
        self.ctx = cl.Context([device])
        props = cl.command_queue_properties.PROFILING_ENABLE if profiling else 0
        self.queue = cl.CommandQueue(self.ctx, properties=props)
        self._programs: dict[tuple, cl.Program] = {}
        # Relaxed math, except on Intel's CPU runtime, whose relaxed rsqrt, exp and division are off by
        # up to 1e-4 relative (PoCL's and GPU drivers' stay within the tests' 1e-5).
        intel = driver_of(device.platform.name) == "intel"
        self.math_options = ("-w", "-cl-mad-enable") + (() if intel else ("-cl-fast-relaxed-math",))   # -w: no remarks
        self._building: dict[tuple, threading.Lock] = {}   # one lock per program: built once across threads
        self._lock = threading.Lock()
        self.requested: dict[tuple, tuple[str, dict]] = {}  # key -> (name, defines) of each program asked for

    def program(self, name: str, std: str | None = None, **defines) -> cl.Program:
        """kernels/<name>.cl built with -D NAME=VALUE for each define (True means a bare -D NAME); a
        tunable define not given takes its declared default (specs.py). std: the OpenCL C version asked
        for ("CL3.0": the built-ins of cl_khr_integer_dot_product), else the compiler's default."""
        defines = {**source_defaults(f"{name}.cl"), **defines}
        options = tuple(
            f"-D{k}" if v is True else f"-D{k}={v}" for k, v in sorted(defines.items()) if v is not False
        ) + self.math_options + ((f"-cl-std={std}",) if std else ())
        key = (name, options)
        if key in self._programs:
            return self._programs[key]
        with self._lock:
            lock = self._building.setdefault(key, threading.Lock())
            self.requested.setdefault(key, (name, {**defines, **({"std": std} if std else {})}))
        with lock:
            if key in self._programs:
                return self._programs[key]
            directory = kernel_cache_dir()
            directory.mkdir(parents=True, exist_ok=True)
            try:
                prg = cl.Program(self.ctx, kernel_source(name)).build(options=list(options), cache_dir=str(directory))
            except cl.RuntimeError as e:
                log = str(e).strip().splitlines()
                raise PerfxError(
                    f"{self.device.name}: building kernel {name}.cl failed: " + " | ".join(log[:6])
                ) from None
            self._programs[key] = prg
            return prg

    def kernel(self, name: str, entry: str, **defines) -> cl.Kernel:
        return getattr(self.program(name, **defines), entry)

    # --- buffers --------------------------------------------------------------------------

    def to_device(self, array: np.ndarray) -> cl.Buffer:
        array = np.ascontiguousarray(array)
        return cl.Buffer(self.ctx, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR, hostbuf=array)

    def empty(self, nbytes: int) -> cl.Buffer:
        return cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, size=max(int(nbytes), 4))

    def read(self, buf: cl.Buffer, shape, dtype=np.float32) -> np.ndarray:
        out = np.empty(shape, dtype)
        cl.enqueue_copy(self.queue, out, buf)
        return out
