"""The many-token GEMM on matrix units (kernels/gemm_mma.cl): int4 weights dequantized to fp16 tiles in
local memory, activations converted to fp16 beside them, products by NVIDIA's mma.sync through inline
PTX with f32 accumulators.

`MmaGemm` is made by `Matmul` when the tuning database asks for it (matmul parameter gemm_mma):
  "off"       never (the default; CPUs and GPUs without the instruction);
  "ptx"       the PTX instruction, checked at load (`probe`: a small product against NumPy); a device whose
              compiler rejects it, or whose result is wrong, falls back to the portable tiled GEMM, and
              the reason goes to stderr once;
  "emulated"  the same kernel with the instruction replaced by ordinary arithmetic (slow), so that a CPU
              checks the staging, tiles and epilogue.
It takes int4 matrices with K % 64 == 0 and T >= mma_min_tokens; everything else keeps its scheme.

The pipeline's options (mma_ks, mma_buffers, mma_words_once, mma_deq, mma_ldmatrix: gemm_mma.cl's
header; mma_maxrreg: a register budget for the compiler) are each a parameter, so that a sweep measures
each alone. Where a device fails the probe with any of them on, the same tiles are probed again with the
options at their defaults (the pipeline measured first), and that is said too: a device whose compiler
makes a shared-window address of a __local pointer otherwise than mma_ldmatrix assumes keeps the
32-bit fragment loads.
"""
from __future__ import annotations


import numpy as np
import pyopencl as cl

from ...errors import PerfxError
from .probe import int4_product, passed, verdict
from .runtime import Runtime
from .specs import GEMM_MMA, check_rules, over_limits

MODES = ("off", "ptx", "emulated")
CHUNK = 64                            # K must be a multiple of it (gemm_mma.cl's chunks of 128 and 64)
DEQ = {"f32": 0, "half2": 1}          # mma_deq -> DEQ_H2
LDSM = {"off": 0, "auto": 1, "value": 2, "cvta": 3}     # mma_ldmatrix -> LDSM
PIPELINE = ("mma_ks", "mma_buffers", "mma_words_once", "mma_deq", "mma_ldmatrix", "mma_maxrreg")


def _choice(params: dict, key: str, values: dict) -> int:
    if params[key] not in values:
        raise PerfxError(f"{key} must be one of {tuple(values)}, got {params[key]!r}")
    return values[params[key]]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class MmaGemm:
    """Launches of gemm_mma for one device, with its tile parameters (mma_bn, mma_bt, mma_wm, mma_wn) and
    pipeline options (PIPELINE)."""

    def __init__(self, rt: Runtime, params: dict):
        mode = params["gemm_mma"]
        if mode not in MODES:
            raise PerfxError(f"gemm_mma must be one of {MODES}, got {mode!r}")
        self.rt, self.mode = rt, mode
        self.bn, self.bt, self.wm, self.wn = (int(params[k]) for k in ("mma_bn", "mma_bt", "mma_wm", "mma_wn"))
        self.min_tokens = int(params["mma_min_tokens"])
        self.options = {k: params[k] for k in PIPELINE}
        self.tile = {"BN": self.bn, "BT": self.bt, "WM": self.wm, "WN": self.wn,
                     "KS": int(params["mma_ks"]), "BUFS": int(params["mma_buffers"]),
                     "WORDS_ONCE": int(params["mma_words_once"]), "DEQ_H2": _choice(params, "mma_deq", DEQ),
                     "LDSM": _choice(params, "mma_ldmatrix", LDSM), "MMA": int(mode == "ptx")}
        check_rules("gemm_mma", self.tile)
        self.maxrreg = int(params["mma_maxrreg"]) if mode == "ptx" else 0     # an NVIDIA compiler's option
        self.nwi = GEMM_MMA.work_group(self.tile)

    def takes(self, fmt: str, K: int) -> bool:
        """Whether it can multiply a matrix of this format and width (T >= min_tokens: Matmul.scheme)."""
        return fmt == "int4" and K % CHUNK == 0

    def _defines(self, G: int, swiglu: bool, gelu: bool = False) -> dict:
        return {"G": G, **self.tile, "SWIGLU": swiglu, "GELU": swiglu and gelu}

    def steps(self, w, x: cl.Buffer, y: cl.Buffer, T: int, K: int, N: int, accumulate: bool,
              swiglu: bool, gelu: bool = False) -> tuple[list, tuple]:
        """The launches (kernel with arguments set, global size, local size) of y [T, N] (+)= x @ W^T
        (swiglu: N outputs from 2N rows, act(gate) * up with act silu, or with gelu GELU-tanh: GeGLU): x to
        fp16, then the product; and the buffers they hold."""
        program = self.rt.program("gemm_mma", maxrreg=self.maxrreg, **self._defines(w.group, swiglu, gelu))
        xh = self.rt.empty(2 * T * K)                                  # fp16 [T, K]
        to_half = cl.Kernel(program, "x_to_half")
        to_half.set_args(x, xh, np.int32(T * K))
        kernel = cl.Kernel(program, "gemm_mma")
        kernel.set_args(w.buf, xh, y, np.int32(T), np.int32(K), np.int32(N), np.int32(accumulate))
        out_n = self.bn // 2 if swiglu else self.bn
        return [(to_half, (_ceil_div(T * K // 4, 256) * 256,), (256,)),
                (kernel, (self.nwi * _ceil_div(T, self.bt), _ceil_div(N, out_n)), (self.nwi, 1))], (xh,)

    def probe(self) -> str | None:
        """None when the kernel builds, fits the device and matches NumPy on a small product (two
        work-groups each way, a 64-chunk, partial tiles); else why not."""
        dev = self.rt.device        # drivers keep some local memory for themselves (1 KiB per block on NVIDIA)
        why = over_limits("gemm_mma", self.tile, dev.local_mem_size - 1024, dev.max_work_group_size)
        if why is not None:
            return why
        T, K, N = self.bt + 3, 192, self.bn + 5
        run, (q, scale, zero, x) = int4_product(
            self.rt, 7, T, K, N, lambda dm, xb, yb: self.steps(dm, xb, yb, T, K, N, False, False))
        w = (q * np.repeat(scale, 32, axis=1).astype(np.float32) + np.repeat(zero, 32, axis=1)).astype(np.float16)
        want = x.astype(np.float16).astype(np.float64) @ w.astype(np.float64).T
        return verdict(run, want, 1e-3)


def make(rt: Runtime, params: dict) -> MmaGemm | None:
    """The device's MmaGemm, or None where gemm_mma is off or the probe fails (said on stderr); with
    pipeline options that fail, the same tiles with the default pipeline."""
    if params["gemm_mma"] == "off":
        return None
    gemm = MmaGemm(rt, params)
    plain = {**params, **{k: GEMM_MMA.defaults()[k] for k in PIPELINE}}
    if plain != params:
        changed = ", ".join(f"{k} = {params[k]}" for k in PIPELINE if params[k] != plain[k])
        if passed(rt.device, gemm.probe(), f"the tensor-core GEMM with {changed}",
                  "it runs with the default pipeline"):
            return gemm
        gemm = MmaGemm(rt, plain)
    ok = passed(rt.device, gemm.probe(), "the tensor-core GEMM", "prefill uses the portable tiled GEMM")
    return gemm if ok else None
