"""One OpenCL device in use: its context, its queue, and the kernels built for it.

Kernels are `.cl` files in the `kernels` package, one per operator, with shared headers written in
(sources.py); tunables are `-D NAME=VALUE` defines with defaults declared in specs.py. Built programs
are cached on disk by pyopencl, keyed by source (headers included), options and device, so a second
start builds nothing.

Every kernel launch goes through `launch`; inside `recording()` the launches go to a second queue
with profiling enabled, and each one's event is kept with its cost (bytes, FLOPs) for the profile.
"""
from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyopencl as cl

from ...dirs import kernel_cache_dir
from ...errors import PerfxError
from .drivers import driver_of
from .sources import kernel_source
from .specs import source_defaults

# A compiler's remarks on a build that succeeded (PoCL's vector-ABI notes on CPUs without AVX-512) are no
# user's business; a failed build raises with its log.
warnings.filterwarnings("ignore", category=cl.CompilerWarning)




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
        self.recorded: list[tuple] | None = None     # inside recording(): (name, event, cost, host ns) per launch
        self._profiling_queue: cl.CommandQueue | None = None

    def program(self, name: str, std: str | None = None, maxrreg: int = 0, **defines) -> cl.Program:
        """kernels/<name>.cl built with -D NAME=VALUE for each define (True means a bare -D NAME); a
        tunable define not given takes its declared default (specs.py). std: the OpenCL C version asked
        for ("CL3.0": the built-ins of cl_khr_integer_dot_product), else the compiler's default. maxrreg: at
        most this many registers per work-item (NVIDIA's -cl-nv-maxrregcount; 0: the compiler's choice)."""
        defines = {**source_defaults(f"{name}.cl"), **defines}
        options = tuple(
            f"-D{k}" if v is True else f"-D{k}={v}" for k, v in sorted(defines.items()) if v is not False
        ) + self.math_options + ((f"-cl-std={std}",) if std else ()) + (
            (f"-cl-nv-maxrregcount={maxrreg}",) if maxrreg else ())
        key = (name, options)
        if key in self._programs:
            return self._programs[key]
        with self._lock:
            lock = self._building.setdefault(key, threading.Lock())
            self.requested.setdefault(key, (name, {**defines, **({"std": std} if std else {}),
                                                **({"maxrreg": maxrreg} if maxrreg else {})}))
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

    # --- launches -------------------------------------------------------------------------

    def launch(self, kernel: cl.Kernel, global_size: tuple, local_size: tuple | None, *args,
               cost: tuple[int, int] | None = None) -> cl.Event:
        """Enqueues a kernel, with args (or with the arguments set on it before); inside recording(),
        its name, event, cost (bytes, FLOPs of the launch, where known) and the host's clock once it is
        enqueued are kept."""
        if args:
            event = kernel(self.queue, global_size, local_size, *args)
        else:
            event = cl.enqueue_nd_range_kernel(self.queue, kernel, global_size, local_size)
        if self.recorded is not None:
            self.recorded.append((kernel.function_name, event, cost, time.perf_counter_ns()))
        return event

    @contextmanager
    def recording(self) -> Iterator[list[tuple]]:
        """Every launch inside the block runs on a queue with profiling enabled, in order after the work
        enqueued before; the list yielded holds (kernel name, event, cost, host ns) of each, all finished
        when the block ends."""
        plain, profiling = self.queue, cl.command_queue_properties.PROFILING_ENABLE
        if self._profiling_queue is None:
            own = plain.properties & profiling        # a runtime made with profiling (the tuner's) keeps its queue
            self._profiling_queue = plain if own else cl.CommandQueue(self.ctx, properties=profiling)
        plain.finish()
        self.queue, self.recorded = self._profiling_queue, []
        try:
            yield self.recorded
        finally:
            self.queue.finish()
            self.queue, self.recorded = plain, None

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
