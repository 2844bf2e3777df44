"""The many-token int4 GEMM's device variants: gemm_tiled's scheme (kernels/gemm.cl) in fp16 arithmetic
(kernels/gemm_half.cl, cl_khr_fp16) or in 8-bit integer dot products (kernels/gemm_dot8.cl,
cl_khr_integer_dot_product), with gemm_tiled's tile parameters.

`TiledVariant` is made by `Matmul` when the tuning database asks for it (matmul parameter tiled_arith):
  "f32"   never (the default): gemm_tiled in f32;
  "half"  W dequantized to fp16 and X converted to fp16 (x_to_half), half fma, folded into f32 accumulators
          every half_fold products;
  "dot8"  X in int8 blocks of 32 (quantize_x8), int4 weights as int8, exact integer dot products per block.
The device must report the extension, and the kernel must build and match NumPy on a small product
(`probe`); otherwise the f32 tiled GEMM is used and the reason goes to stderr once. It takes int4 matrices
(fp16 or float32 scales); other formats, and tiles that do not fit the device, keep gemm_tiled.
"""
from __future__ import annotations


import numpy as np
import pyopencl as cl

from ...errors import PerfxError
from .packing import quantize_blocks
from .probe import int4_product, passed, verdict
from .runtime import Runtime
from .specs import SPECS

MODES = ("f32", "half", "dot8")
EXTENSION = {"half": "cl_khr_fp16", "dot8": "cl_khr_integer_dot_product"}
WHAT = {"half": "fp16", "dot8": "int8-dot"}
MAX_HALF_FOLD = 4          # fp16 products per accumulator before a fold into f32 that keep within 5e-4
TILE_DEFINES = {"VEC": "tiled_vec", "BN": "tiled_bn", "BT": "tiled_bt", "RR": "tiled_rr", "TR": "tiled_tr",
                "X_LOCAL": "tiled_x_local"}


def quantize_x8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [T, K] in int8 blocks of 32 as quantize_x8 (kernels/gemm_dot8.cl) computes them: (q int8 [T, K],
    d f32 [T, K/32]) with x ~ q * d."""
    return quantize_blocks(x, 127, np.int8)


def x8_view(x: np.ndarray) -> np.ndarray:
    """The x [T, K] that the int8-dot GEMM multiplies (f64)."""
    q, d = quantize_x8(x)
    T, K = q.shape
    return (q.reshape(T, K // 32, 32) * d[..., None].astype(np.float64)).reshape(T, K)


class TiledVariant:
    """Launches of gemm_half or gemm_dot8 on one device."""

    def __init__(self, rt: Runtime, params: dict):
        mode = params["tiled_arith"]
        if mode not in MODES[1:]:
            raise PerfxError(f"tiled_arith must be one of {MODES}, got {mode!r}")
        self.rt, self.mode, self.kernel = rt, mode, "gemm_" + mode
        self.tile = {d: int(params[k]) for d, k in TILE_DEFINES.items()}
        self.kc = int(params["tiled_kc"])
        if mode == "half":
            self.tile["HALF_FOLD"] = int(params["half_fold"])
            if not 1 <= self.tile["HALF_FOLD"] <= MAX_HALF_FOLD:
                raise PerfxError(f"half_fold must be 1 to {MAX_HALF_FOLD} (longer runs of fp16 sums lose more than "
                                 f"5e-4 of the output), got {params['half_fold']}")
        else:
            del self.tile["VEC"]

    def takes(self, w) -> bool:
        """Whether it multiplies this matrix (int4 with any scale type; others keep gemm_tiled)."""
        return w.fmt == "int4"

    def steps(self, defines: dict, x: cl.Buffer, w, T: int, K: int, N: int, y: cl.Buffer,
              accumulate: np.int32) -> tuple[list, tuple] | None:
        """The launches (kernel with arguments set, global size, local size) of y [T, N] (+)= x @ W^T: X
        converted (x_to_half) or quantized (quantize_x8), then the product; and the buffers they hold.
        None where the tiles do not fit the device."""
        d = {k: v for k, v in defines.items() if k not in ("FORMAT", "ZERO8")}
        d.update(self.tile)
        program = self.rt.program(self.kernel, std="CL3.0" if self.mode == "dot8" else None, **d)
        kernel = cl.Kernel(program, self.kernel)
        bn, bt, rr, tr, x_local = (self.tile[k] for k in ("BN", "BT", "RR", "TR", "X_LOCAL"))
        local = (bt // tr, bn // rr)
        dev = self.rt.device
        static = kernel.get_work_group_info(cl.kernel_work_group_info.LOCAL_MEM_SIZE, dev)
        budget = dev.local_mem_size - static - 1024
        per_chunk = SPECS[self.kernel].local_bytes(self.tile)      # one chunk of 128 staged
        nchunks = -(-K // 128)
        kc = min(self.kc or nchunks, nchunks)
        while kc > 1 and kc * per_chunk > budget:
            kc -= 1
        limit = kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, dev)
        if kc * per_chunk > budget or local[0] * local[1] > limit:
            return None
        words = kc * 128                                          # staged columns
        gsize = (local[0] * -(-T // bt), local[1] * -(-N // bn))
        if self.mode == "half":
            xh = self.rt.empty(2 * T * K)                         # fp16 [T, K]
            first = cl.Kernel(program, "x_to_half")
            first.set_args(x, xh, np.int32(T * K))
            kernel.set_args(w.buf, xh, y, np.int32(T), np.int32(K), np.int32(N), accumulate,
                            cl.LocalMemory(2 * bn * words), cl.LocalMemory(2 * max(x_local * bt * words, 2)),
                            np.int32(kc))
            return [(first, (-(-T * K // 4),), None), (kernel, gsize, local)], (xh,)
        xq, xd = self.rt.empty(T * K), self.rt.empty(8 * T * K // 32)   # int8 [T, K], (d, d * sum q) [T, K/32]
        first = cl.Kernel(program, "quantize_x8")
        first.set_args(x, xq, xd)
        xl = x_local * bt * words                                  # staged int8 of x (X_LOCAL)
        kernel.set_args(w.buf, xq, xd, y, np.int32(T), np.int32(K), np.int32(N), accumulate,
                        cl.LocalMemory(bn * words), cl.LocalMemory(8 * bn * words // 32),
                        cl.LocalMemory(max(xl, 4)), cl.LocalMemory(max(8 * xl // 32, 8)), np.int32(kc))
        return [(first, (T * K // 32,), None), (kernel, gsize, local)], (xq, xd)

    def probe(self) -> str | None:
        """None when the device reports the extension and the kernel builds, fits and matches NumPy on a
        small product (several work-groups each way, 64 and 32 tails of K, partial tiles); else why not."""
        ext = EXTENSION[self.mode]
        if ext not in self.rt.device.extensions.split():
            return f"the device lacks {ext}"
        T, K, N = 2 * self.tile["BT"] + 3, 224, 2 * self.tile["BN"] + 4

        def steps(dm, xb, yb) -> tuple[list, tuple]:
            planned = self.steps({"G": 32}, xb, dm, T, K, N, yb, np.int32(0))
            if planned is None:
                raise PerfxError("its tiles do not fit the device")
            return planned

        run, (q, scale, zero, x) = int4_product(self.rt, 7, T, K, N, steps)
        w = q * np.repeat(scale, 32, axis=1).astype(np.float64) + np.repeat(zero, 32, axis=1)
        want = (x8_view(x) if self.mode == "dot8" else x.astype(np.float64)) @ w.T
        return verdict(run, want, 1e-2)


def make(rt: Runtime, params: dict) -> TiledVariant | None:
    """The device's TiledVariant, or None where tiled_arith is "f32" or the probe fails (said on stderr)."""
    if params["tiled_arith"] == "f32":
        return None
    variant = TiledVariant(rt, params)
    ok = passed(rt.device, variant.probe(), f"the {WHAT[variant.mode]} tiled GEMM", "prefill uses the f32 tiled GEMM")
    return variant if ok else None
