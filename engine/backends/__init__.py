"""Backends: each one implements the operators of `engine.model` on one kind of device.

The contract between the transformer (engine/model.py) and a backend, written once:

    backend, notices = open_backend("auto")     # numpy | auto | opencl | cpu | gpu | opencl:P:D
    backend.capabilities                        # what it can do, declared, never probed
    w = backend.load(config, weights, ctx)      # the weights on the device, the KV cache allocated
    with backend.profile() as launches: ...     # with capabilities.profiling: each kernel launch, timed

Operators take and return activations, backend handles (a NumPy array [T, width], or a device
buffer that knows its own token count). Optional abilities are declared in `Capabilities`; the
defaults below give every backend the same methods, so callers branch on a flag, not on `hasattr`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from ..errors import PerfxError

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..model import Weights
    from ..paged import PagedBatch

Act = Any        # an activation: the backend's handle for [T, width] float32 values
DeviceW = Any    # a weight as the backend holds it


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares it can do."""

    max_tokens: int | None   # the longest pass: a longer prompt runs in passes of this many tokens (None: any)
    device_argmax: bool      # argmax_async keeps the chosen token on the device and embed(None) reads it there
    paged_kv: bool           # kv_pool, begin_paged and paged_attention: batched steps (serving)
    kv_bytes: int            # bytes of one K or V element in the cache: 2 (fp16) or 4 (f32)
    profiling: bool = False  # profile() times each kernel launch on the device


@dataclass(frozen=True)
class DeviceReport:
    """The device a backend runs on, as bench reports it."""

    backend: str             # "OpenCL", "NumPy"
    device: str              # the spec that selects it again: "opencl:0:0", "numpy"
    name: str                # the device's own name
    kind: str                # "cpu", "gpu" or "accelerator"


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the device timed it (Backend.profile)."""

    kernel: str              # the kernel's name: "gemv", "attend"
    start_ns: int            # when it started and ended, on the device's clock
    end_ns: int
    bytes: int | None = None     # bytes it moves and FLOPs it does, at least, where the kernel declares them
    flops: int | None = None
    host_ns: int | None = None   # when the host had enqueued it, on time.perf_counter_ns's clock


class Chosen(Protocol):
    """A greedy token being computed; result() waits for it."""

    def result(self) -> int: ...


@dataclass(frozen=True)
class Ready:
    """A token already known on the host."""

    token: int

    def result(self) -> int:
        return self.token


class Backend(ABC):
    """The operators the transformer calls (see engine/model.py's header for how a layer uses them)."""

    name: str                # "numpy", "opencl"
    description: str         # the device in words, for the user
    capabilities: Capabilities

    @abstractmethod
    def load(self, config: ModelConfig, weights: Weights, ctx: int) -> Any:
        """Puts the weights on the device and allocates the KV cache for ctx positions; the device weights."""

    @property
    @abstractmethod
    def device_bytes(self) -> int:
        """Bytes this backend holds on its device: weights, KV cache, activations."""

    @abstractmethod
    def report(self) -> DeviceReport: ...

    def prepare(self, transformer: Any, progress: Callable[[str, int, int], None]) -> None:
        """Builds now what the first reply would otherwise wait for (OpenCL: the model's kernels);
        progress(what, done, total). Nothing to do by default."""

    @abstractmethod
    def copy_bandwidth(self) -> float:
        """The device's copy bandwidth, bytes/s (read + written), measured now."""

    @contextmanager
    def profile(self) -> Iterator[list[Launch]]:
        """Times every kernel launch enqueued inside the block (with capabilities.profiling): the list
        yielded is filled, in launch order, when the block ends."""
        raise PerfxError(f"{self.description} launches no kernels to profile; use an OpenCL device "
                         "(--device cpu or gpu)")
        yield []

    # --- the operators of a layer ----------------------------------------------------------
    @abstractmethod
    def embed(self, table: DeviceW, ids: np.ndarray | None, scale: float = 1.0) -> Act:
        """x [T, dim]: the rows of ids times scale (ids None: the token the last argmax_async chose,
        with device_argmax)."""

    @abstractmethod
    def rmsnorm(self, x: Act, w: DeviceW) -> Act: ...

    @abstractmethod
    def linear(self, x: Act, w: DeviceW) -> Act:
        """x @ w^T (+ w's bias)."""

    @abstractmethod
    def qk_norm(self, qkv: Act, q_norm: DeviceW, k_norm: DeviceW) -> Act:
        """Each Q head of qkv = rmsnorm(head) * q_norm, each K head by k_norm (Gemma 3)."""

    @abstractmethod
    def attention(self, qkv: Act, layer: int, start_pos: int) -> Act:
        """RoPE, K and V written to the contiguous cache at start_pos.., causal attention: [T, q_dim]."""

    @abstractmethod
    def residual_rmsnorm(self, x: Act, a: Act, w: DeviceW, norm: DeviceW,
                         post: DeviceW | None = None) -> tuple[Act, Act]:
        """x += a @ w^T (with post: x += rmsnorm(a @ w^T) * post, Gemma); h = rmsnorm(x) * norm: (x, h)."""

    @abstractmethod
    def swiglu(self, h: Act, w_gate_up: DeviceW) -> Act:
        """act(gate) * up of h @ w_gate_up^T: SiLU (SwiGLU) or GELU (GeGLU, Gemma), per the config."""

    @abstractmethod
    def logits(self, h: Act, output: DeviceW, all_logits: bool) -> np.ndarray:
        """Logits [T, vocab] of every row of h, or [1, vocab] of the last one, on the host."""

    @abstractmethod
    def logits_rows(self, h: Act, output: DeviceW, rows: np.ndarray) -> np.ndarray:
        """Logits [len(rows), vocab] of the given rows of h, on the host."""

    # --- greedy choice: on the host unless the backend declares device_argmax ----------------
    def argmax_async(self, h: Act, output: DeviceW) -> Chosen:
        """The most likely token after h's last row, being computed."""
        return Ready(int(np.argmax(self.logits(h, output, False)[-1])))

    def argmax_last(self, h: Act, output: DeviceW) -> int:
        return self.argmax_async(h, output).result()

    # --- paged KV cache (engine.paged), with paged_kv ------------------------------------------
    def kv_pool(self, n_blocks: int, block_size: int) -> None:
        """Allocates the block pool; from then on products are batch-invariant."""
        raise PerfxError(f"{self.description} cannot run batched steps yet; serve with --device numpy")

    @property
    def kv_pool_bytes(self) -> int:
        return 0

    def begin_paged(self, batch: PagedBatch) -> None:
        raise PerfxError(f"{self.description} has no paged KV cache")

    def paged_attention(self, qkv: Act, layer: int) -> Act:
        raise PerfxError(f"{self.description} has no paged KV cache")


def open_backend(spec: str) -> tuple[Backend, list[str]]:
    """The backend for a device spec (auto | numpy | opencl | cpu | gpu | opencl:P:D), and the
    notices about the choice (a device skipped, a fallback to NumPy)."""
    from .numpy_backend import NumpyBackend

    if spec == "numpy":
        return NumpyBackend(), []
    try:
        from .opencl.devices import select
    except ImportError as e:  # pyopencl not installed (e.g. Termux without a compiler)
        if spec == "auto":
            return NumpyBackend(), [f"OpenCL unavailable ({e}): using NumPy"]
        raise PerfxError(f"OpenCL is unavailable ({e}); install 'perfx-llm[opencl]' or use --device numpy") from None
    selection = select(spec)
    if selection.backend == "numpy":
        return NumpyBackend(), selection.notices
    from .opencl.backend import OpenCLBackend

    return OpenCLBackend.from_selection(selection), selection.notices
