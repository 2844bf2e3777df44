"""Matrix products with quantized weights: y[T, N] (+)= x[T, K] @ W[N, K]^T on OpenCL.

`Matmul` picks a kernel by token count: GEMV for T == 1 (int4: preceded by `xsum`, the group sums of x
for the zero terms, unless gemv_zero_inline: kernels/gemv.cl; on x86 CPUs with AVX-512BW by `quantize`, x
in int16 blocks of 32 with integer products, `int_dot`, for int8 weights too: kernels/gemv_int.cl; the
norms write both for the int4 products that read h, `XPrep`), `gemm_few` (weights dequantized once per TT
tokens into registers) up to `few_max_tokens`, `gemm_tiled` (dequantized W, and optionally X, in local-memory
tiles; RR x TR register tiles) above, or with tiled_reg `gemm_reg` (two-level tiles, double-buffered local
memory: kernels/gemm_reg.cl); a gemm_tiled whose tiles do not fit the device falls back to `gemm_few`, a
gemm_reg tiling that does not fit is refused. Where the tuning database asks for it (NVIDIA), int4 products
of T >= mma_min_tokens run on the tensor cores instead (scheme "mma", gemm_mma.py), where it asks for
tiled_arith "half" or "dot8" the tiled GEMM of int4 matrices runs in fp16 or int8 dot products
(gemm_variants.py), and int4 GEMVs on integer dot products where it asks for gemv_dp (gemv_dp.py). The GEMV
also takes
T > 1 (scheme="gemv"): token by token, each row bit-identical to the same token alone, which serving
uses so that a reply does not depend on the batch it ran in. Kernels are built
once per set of defines (cached by Runtime); each distinct call (weights, x and y buffers, T, op) gets
its kernel objects with arguments set once, so a decode step only enqueues. A matrix with a bias
(`DeviceMatrix.with_bias`, Qwen2's Q/K/V) gets one more launch after the product: kernels/bias.cl.
The weights' layout on the device, and their packing at load: packing.py.
Tunables are the -D defines of the kernels; `params` overrides DEFAULT_PARAMS (PoCL, AVX-512) and
kernels/tuning.toml holds the values for other devices (NVIDIA GPUs among them).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyopencl as cl

from ...errors import PerfxError
from . import gemm_mma, gemm_variants, gemv_dp
from .packing import RT, DeviceMatrix, chunk_widths
from .runtime import Runtime
from .probe import int4_gemv, passed
from .specs import GEMM_REG, GEMM_TILED, GEMV_REDUCE, SPECS, check_fits, check_rules, defaults, over_limits

# Best found on PoCL 3.1 (pthread, AVX-512), 1 and 2 threads; see scripts/bench_kernels.py.
DEFAULT_PARAMS: dict[str, Any] = defaults("matmul")   # declared, with their meaning, in specs.py

SCHEMES = ("gemv", "few", "tiled", "mma")


# ---- launching ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class XPrep:
    """What the int4 GEMV needs of its input x [T, K] besides x itself, written by the kernel that
    wrote x (the norms) so that the GEMV needs no launch of its own for it."""

    sums: cl.Buffer                   # f32 [T, K/G]: the group sums of x (the zero terms)
    q: cl.Buffer | None = None        # int16 [T, K]: x in int16 blocks of 32 (kernels/xq.h), int-dot GEMV
    scale: cl.Buffer | None = None    # f32 [T, K/32]: the blocks' scales

    @cached_property
    def key(self) -> tuple:
        return tuple(0 if b is None else b.int_ptr for b in (self.sums, self.q, self.scale))


@dataclass(frozen=True)
class Norm:
    """The RMSNorm a residual projection's GEMV ends with (Matmul.residual_norm)."""

    w: cl.Buffer               # f32 [N]: norm weight
    h: cl.Buffer               # f32 [T, N]: out, rmsnorm(y) * w
    hx: XPrep | None           # out: h's group sums (of `group`) and, with hx.q, h in int16; None: not written
    group: int                 # group of hx.sums
    eps: float

    @cached_property
    def key(self) -> tuple:
        return (self.w.int_ptr, self.h.int_ptr, self.hx.key if self.hx is not None else 0, self.group, self.eps)


@dataclass(frozen=True)
class NormIn:
    """The RMSNorm of a GEMV's input, done in its prologue (kernels/norm_in.h): the product reads
    x [T, K] as rmsnorm(x) * w."""

    w: cl.Buffer               # f32 [K]: norm weight
    eps: float

    @cached_property
    def key(self) -> tuple:
        return (self.w.int_ptr, self.eps)


@dataclass
class _Plan:
    """The kernel launches of one call, arguments set; `keep` holds what the arguments refer to."""

    steps: list[tuple[cl.Kernel, tuple[int, ...], tuple[int, ...]]]   # (kernel, global size, local size)
    keep: tuple
    costs: list[tuple[int, int] | None]   # (bytes, FLOPs) of each step, where its kernel declares them


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Matmul:
    """y = x @ W^T (linear) and silu(x @ Wg^T) * (x @ Wu^T) (swiglu) with device-resident weights."""

    MAX_PLANS = 1024

    def __init__(self, rt: Runtime, params: dict | None = None):
        unknown = set(params or {}) - set(DEFAULT_PARAMS)
        if unknown:
            raise PerfxError(f"unknown matmul parameters: {sorted(unknown)}")
        self.rt = rt
        self.params = {**DEFAULT_PARAMS, **(params or {})}
        self._plans: dict[tuple, _Plan] = {}
        self.done: cl.Buffer | None = None    # int32 [1]: the NORM epilogue's work-group count, 0 between launches
        self.int_dot = self._int_dot_works()
        self.mma = gemm_mma.make(rt, self.params)     # the tensor-core GEMM, None where not used
        self.variant = gemm_variants.make(rt, self.params)   # gemm_tiled in fp16 or int8 dots, None: f32
        self.dp = gemv_dp.make(rt, self.params)       # the int4 GEMV by dot products, None where not used
        self.dp = gemv_dp.checked(self, self.dp)      # ... kept where its probe through this Matmul passes
        self._shfl_checked()
        self._plans.clear()

    def _shfl_checked(self) -> None:
        """gemv_reduce "shfl" (NVIDIA inline PTX) is kept where a small product through this Matmul builds
        and matches NumPy; elsewhere the partial sums meet in local memory once ("once"), said on stderr."""
        reduce = self.params["gemv_reduce"]
        if reduce not in GEMV_REDUCE:
            raise PerfxError(f"gemv_reduce must be one of {tuple(GEMV_REDUCE)}, got {reduce!r}")
        if reduce != "shfl":
            return
        dp, self.dp = self.dp, None              # the probe's product through gemv.cl, not gemv_dp.cl
        try:
            why = int4_gemv(self)
        finally:
            self.dp = dp
        if not passed(self.rt.device, why, "the GEMV's shfl.sync reduction", "its partial sums meet in local memory"):
            self.params["gemv_reduce"] = "once"

    def _int_dot_works(self) -> bool:
        """Whether the int4 and int8 GEMVs take x in int16 (kernels/gemv_int.cl): asked for (gemv_int_dot), the CPU
        layout of the GEMV (VEC 16, no K split), and a device whose compiler builds it (x86 with
        AVX-512BW or AVX2; elsewhere the build fails and the float GEMV is used)."""
        p = self.params
        if not (p["gemv_int_dot"] and p["gemv_vec"] == 16 and p["gemv_ksplit"] == 1):
            return False
        try:
            self.rt.program("gemv_int", FORMAT=4, G=32, VEC=16, KSPLIT=1, WG_ROWS=p["gemv_wg_rows"],
                            INT_DOT_256=bool(p["gemv_int_dot_256"]))
        except PerfxError:
            return False
        return True

    def scheme(self, T: int) -> str:
        """The kernel used for T tokens: "gemv", "few" or "tiled"."""
        if T == 1:
            return "gemv"
        if self.mma is not None and T >= self.mma.min_tokens:
            return "mma"
        return "few" if T <= self.params["few_max_tokens"] else "tiled"

    def linear(self, x: cl.Buffer, w: DeviceMatrix, T: int, y: cl.Buffer, accumulate: bool = False,
               scheme: str | None = None, xs: XPrep | None = None,
               norm_in: NormIn | None = None) -> list[cl.Event]:
        """y [T, N] = x [T, K] @ W^T, or y += x @ W^T with accumulate (float32 buffers). xs: x's group
        sums [T, K/group] (and, for the int-dot GEMV, x in int16) when already computed (the norms write
        them), used by the int4 GEMV in place of its own xsum or quantize launch. norm_in: the GEMV
        takes rmsnorm(x) * norm_in.w in place of x (its prologue normalises). Returns the events of
        its launches."""
        return self._enqueue("linear", x, w, T, y, accumulate, scheme, xs, norm_in=norm_in)

    def swiglu(self, x: cl.Buffer, w_gate_up: DeviceMatrix, T: int, y: cl.Buffer, scheme: str | None = None,
               xs: XPrep | None = None, act: str = "silu", norm_in: NormIn | None = None) -> list[cl.Event]:
        """y [T, F] = silu(x @ Wg^T) * (x @ Wu^T) where w_gate_up [2F, K] holds gate rows then up rows;
        act "gelu_tanh": GeGLU, the gate through tanh-approximated GELU. norm_in as in linear. Returns the
        events of its launches."""
        return self._enqueue("geglu" if act == "gelu_tanh" else "swiglu", x, w_gate_up, T, y, False, scheme, xs,
                             norm_in=norm_in)

    def residual_norm(self, x: cl.Buffer, w: DeviceMatrix, T: int, y: cl.Buffer, norm: Norm,
                      xs: XPrep | None = None) -> None:
        """y [T, N] += x @ W^T, y being the residual stream; then norm.h [T, N] = rmsnorm(y) * norm.w and,
        with norm.hx, its group sums [T, N/norm.group] (and h in int16 with norm.hx.q): one GEMV launch,
        whose last work-item to finish normalises (kernels/gemv_kernel.h NORM)."""
        if w.bias is not None:
            raise PerfxError("residual_norm takes no bias")
        self._enqueue("linear", x, w, T, y, True, "gemv", xs, norm)

    def _enqueue(self, op: str, x: cl.Buffer, w: DeviceMatrix, T: int, y: cl.Buffer, accumulate: bool,
                 scheme: str | None, xs: XPrep | None = None, norm: Norm | None = None,
                 norm_in: NormIn | None = None) -> list[cl.Event]:
        """Enqueues the call's launches (built once per distinct call); their events."""
        key = (op, id(w), x.int_ptr, y.int_ptr, T, accumulate, scheme, xs and xs.key, norm and norm.key,
               norm_in and norm_in.key)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = self._plan(op, x, w, T, y, accumulate, scheme or self.scheme(T), xs, norm,
                                                 norm_in)
        launch = self.rt.launch
        return [launch(kernel, global_size, local_size, cost=cost)
                for (kernel, global_size, local_size), cost in zip(plan.steps, plan.costs)]

    # -- building the launches of one call --

    def _plan(self, op: str, x: cl.Buffer, w: DeviceMatrix, T: int, y: cl.Buffer, accumulate: bool,
              scheme: str, xs: XPrep | None = None, norm: Norm | None = None,
              norm_in: NormIn | None = None) -> _Plan:
        if scheme not in SCHEMES:
            raise PerfxError(f"unknown matmul scheme {scheme!r} (one of {SCHEMES})")
        if norm_in is not None and (scheme != "gemv" or norm is not None):
            raise PerfxError(f"the input's norm runs in the GEMV's prologue only, not in the {scheme} scheme "
                             "or with the norm epilogue")
        if T < 1:
            raise PerfxError(f"the {scheme} scheme cannot take T={T} tokens")
        K, N = w.cols, w.rows
        if op in ("swiglu", "geglu"):
            if N % (2 * RT):
                raise PerfxError(f"{op} needs gate and up halves of a multiple of {RT} rows, got {N} rows")
            N //= 2
        if x.size < T * K * 4 or y.size < T * N * 4:
            raise PerfxError(f"matmul buffers too small for x [{T}, {K}] and y [{T}, {N}]")
        defines = {**w.defines, "SWIGLU": op in ("swiglu", "geglu"), "GELU": op == "geglu"}
        if scheme == "mma" and (self.mma is None or not self.mma.takes(w.fmt, K) or w.scale_f32):
            scheme = "tiled"                     # int8, f16, float32 scales or K % 64 != 0: the portable GEMM
        if scheme == "gemv":
            steps, keep = self._gemv(defines, x, w, T, K, N, y, np.int32(accumulate), xs, norm, norm_in)
        elif scheme == "mma":
            steps, keep = self.mma.steps(w, x, y, T, K, N, accumulate, op in ("swiglu", "geglu"), op == "geglu")
        else:
            build = {"few": self._gemm_few, "tiled": self._gemm_tiled}[scheme]
            steps, keep = build(defines, x, w, T, K, N, y, np.int32(accumulate))
        spec = SPECS.get(steps[-1][0].function_name)     # the product, after any step preparing x (xsum, quantize)
        cost = spec.cost(T=T, N=w.rows, K=K, n_out=N, weight_bytes=w.nbytes) if spec and spec.traffic else None
        costs = [None] * (len(steps) - 1) + [cost]
        if w.bias is not None:                   # y [T, N] += bias [N], after the product
            if op != "linear":
                raise PerfxError(f"{op} takes no bias; only linear adds one")
            add_bias = cl.Kernel(self.rt.program("bias"), "add_bias")
            add_bias.set_args(y, w.bias, np.int32(N))
            steps.append((add_bias, (N, T), None))
            costs.append(None)
            keep += (w.bias,)
        return _Plan(steps, (x, y, w.buf) + keep, costs)

    def _gemv(self, defines: dict, x: cl.Buffer, w: DeviceMatrix, T: int, K: int, N: int, y: cl.Buffer,
              accumulate: np.int32, given: XPrep | None = None, norm: Norm | None = None,
              norm_in: NormIn | None = None) -> tuple[list, tuple]:
        p = self.params
        dp = self.dp is not None and self.dp.takes(w, norm, norm_in)     # int4 by dot products (gemv_dp.cl)
        ks, wgr, tpw = int(p["gemv_ksplit"]), int(p["gemv_wg_rows"]), int(p["gemv_tpw"])
        shape = {"VEC": p["gemv_vec"], "KSPLIT": ks, "WG_ROWS": wgr, "TPW": tpw, "PREFETCH": int(p["gemv_prefetch"]),
                 **GEMV_REDUCE[p["gemv_reduce"]]}
        spec = "gemv"
        if dp:
            shape, spec = self.dp.defines(), "gemv_dp"
            ks, wgr, tpw = self.dp.ksplit, self.dp.wg_rows, self.dp.tpw
        dev = self.rt.device
        check_fits(spec, shape, dev.local_mem_size, dev.max_work_group_size)     # before the build
        # With the input's norm in the prologue (norm_in.h), x is a plain float buffer, read with the norm
        # weight, and the int4 zero terms are summed inline from it.
        use_image = bool(p["use_image"]) and dev.image_support and T * K // 4 <= self._max_image_texels() \
            and norm_in is None
        int_dot = dp or (w.fmt in ("int4", "int8") and self.int_dot and norm_in is None)
        inline = w.fmt == "int4" and not int_dot and (bool(p["gemv_zero_inline"]) or norm_in is not None)
        scratch = 4 * (ks * wgr + K)              # norm_in.h: the partial sums, then x * w * r [K] (NORM_STAGE)
        stage = norm_in is not None and bool(p["gemv_norm_stage"]) and ks > 1 \
            and self._local_fits(scratch, ks, wgr, tpw)
        hx = norm.hx if norm is not None else None
        if hx is not None and hx.q is not None and N % 32:
            raise PerfxError(f"h in int16 needs rows in blocks of 32, got {N}")
        defines.update(**shape, USE_IMAGE=use_image, ZERO_INLINE=inline,
                       INT_DOT_256=int_dot and bool(p["gemv_int_dot_256"]),
                       NORM=norm is not None, HS_G=norm.group if hx is not None else False,
                       HQ=hx is not None and hx.q is not None, NORM_IN=norm_in is not None, NORM_STAGE=stage,
                       GRID_STRIDE=int(p["gemv_waves"]) > 0)
        if dp:
            defines.update(self.dp.defines(), INT_DOT_256=False)
        program = self.rt.program("gemv_dp" if dp else "gemv_int" if int_dot else "gemv", **defines)
        steps, keep = [], ()
        xs = x                                   # group sums of x [K/G] (int4 without ZERO_INLINE)
        if (w.fmt == "int4" and not inline) or int_dot:
            # int8 weights take x in natural order (kernels/xq.h XQ_NATURAL), which the norms do not write.
            # gemv_dp.cl takes x in its own order (xq.h XQ_PAIRS): always its own quantize launch.
            if given is None or (int_dot and given.q is None) or w.fmt == "int8" or dp:
                # This launch's own first step: x's group sums (xsum), and x in int16 (quantize).
                group = w.group or 32
                given = XPrep(self.rt.empty(4 * T * (K // group)),                      # f32 [T, K/G]
                              *((self.rt.empty(2 * T * K), self.rt.empty(4 * T * K // 32)) if int_dot else ()))
                first = cl.Kernel(program, "quantize" if int_dot else "xsum")
                first.set_args(x, given.sums, *((given.q, given.scale, np.int32(K)) if int_dot else ()))
                steps.append((first, (T * K // group,), None))
                keep += (given.sums, given.q, given.scale)
            xs = given.sums
        xarg = x
        if use_image:                            # x [K] as K/4 float4 texels
            fmt = cl.ImageFormat(cl.channel_order.RGBA, cl.channel_type.FLOAT)
            make_image = getattr(cl, "create_image", cl.Image)
            xarg = make_image(self.rt.ctx, cl.mem_flags.READ_ONLY, fmt, shape=(T * K // 4,), buffer=x)
            keep += (xarg,)
        gemv = cl.Kernel(program, "gemv")     # the built kernel's own limit (its registers) may be lower
        check_fits(spec, shape, dev.local_mem_size, self._max_work_group(gemv))
        args = [w.buf, xarg, y, np.int32(K), np.int32(N), accumulate, xs, np.int32(T)]
        if int_dot:
            args += [given.q, given.scale]
        if norm is not None:
            if self.done is None:
                self.done = self.rt.to_device(np.zeros(1, np.int32))    # int32 [1]: finished work-groups
            outs = [norm.h if b is None else b for b in (hx.sums, hx.q, hx.scale)] if hx else [norm.h] * 3
            args += [norm.w, norm.h, *outs, self.done, np.float32(norm.eps)]
            keep += (norm.w, norm.h, hx, self.done)
        if norm_in is not None:
            local = scratch if stage else 4 * ks * wgr          # (unused without a K split)
            args += [norm_in.w, np.float32(norm_in.eps), cl.LocalMemory(local)]
            keep += (norm_in.w,)
        gemv.set_args(*args)
        tiles = -(-N // RT)
        items = -(-tiles // tpw)                 # work-items along the rows
        groups = -(-items // wgr)                # work-groups along the rows
        if int(p["gemv_waves"]) > 0:             # ... or whole waves, looping over the rest (GRID_STRIDE)
            groups = min(groups, int(p["gemv_waves"]) * dev.max_compute_units)
        steps.append((gemv, (ks, groups * wgr), (ks, wgr)))
        return steps, keep

    def _gemm_few(self, defines: dict, x: cl.Buffer, w: DeviceMatrix, T: int, K: int, N: int, y: cl.Buffer,
                  accumulate: np.int32) -> tuple[list, tuple]:
        p = self.params
        tt, wgr = min(int(p["few_tt"]), T), int(p["few_wg_rows"])
        defines.update(VEC=p["few_vec"], TT=tt)
        kernel = cl.Kernel(self.rt.program("gemm", **defines), "gemm_few")
        kernel.set_args(w.buf, x, y, np.int32(T), np.int32(K), np.int32(N), accumulate)
        limit = self._max_work_group(kernel)
        wgr = max(1, min(wgr, limit))
        local = (max(1, min(-(-T // tt), limit // wgr)), wgr)      # token tiles x row tiles
        return [(kernel, (_round_up(-(-T // tt), local[0]), _round_up(-(-N // RT), wgr)), local)], ()

    def _gemm_tiled(self, defines: dict, x: cl.Buffer, w: DeviceMatrix, T: int, K: int, N: int, y: cl.Buffer,
                    accumulate: np.int32) -> tuple[list, tuple]:
        if self.variant is not None and self.variant.takes(w):
            planned = self.variant.steps(defines, x, w, T, K, N, y, accumulate)
            if planned is not None:
                return planned
        p = self.params
        if p["tiled_reg"]:
            return self._gemm_reg(defines, x, w, T, K, N, y, accumulate)
        tile = {k.upper(): int(p[f"tiled_{k}"]) for k in ("bn", "bt", "rr", "tr", "x_local")}
        bn, bt, x_local = tile["BN"], tile["BT"], tile["X_LOCAL"]
        check_rules("gemm_tiled", tile)
        few_defines = dict(defines)
        defines.update(VEC=p["tiled_vec"], **tile)
        kernel = cl.Kernel(self.rt.program("gemm", **defines), "gemm_tiled")
        local = (bt // tile["TR"], bn // tile["RR"])
        # Local memory left for the tiles: drivers keep some for themselves (1 KiB per block on NVIDIA).
        static = kernel.get_work_group_info(cl.kernel_work_group_info.LOCAL_MEM_SIZE, self.rt.device)
        budget = self.rt.device.local_mem_size - static - 1024
        nchunks = len(chunk_widths(K))
        per_chunk = GEMM_TILED.local_bytes(tile)               # one chunk of K staged
        kc = max(1, min(int(p["tiled_kc"]) or nchunks, nchunks, budget // per_chunk))   # chunks per barrier
        if over_limits("gemm_tiled", tile, budget // kc, self._max_work_group(kernel)):
            # The tiles do not fit this device (local memory, or registers for the work-group size).
            return self._gemm_few(few_defines, x, w, T, K, N, y, accumulate)
        w_local = cl.LocalMemory(4 * bn * 128 * kc)                        # [BN][kc*128]
        x_tile = cl.LocalMemory(4 * max(x_local * bt * 128 * kc, 1))        # [BT][kc*128]
        kernel.set_args(w.buf, x, y, np.int32(T), np.int32(K), np.int32(N), accumulate, w_local, x_tile,
                        np.int32(kc))
        return [(kernel, (local[0] * -(-T // bt), local[1] * -(-N // bn)), local)], ()

    def _gemm_reg(self, defines: dict, x: cl.Buffer, w: DeviceMatrix, T: int, K: int, N: int, y: cl.Buffer,
                  accumulate: np.int32) -> tuple[list, tuple]:
        """gemm_reg.cl: MWG x NWG tiles (with SWIGLU MWG/2 gate and MWG/2 up rows) of MDIMC x NDIMC work-items;
        a tiling the device cannot hold is refused before the build (its local memory is static)."""
        tile = {q.define: int(self.params[q.key]) for q in GEMM_REG.params if q.define}
        dev = self.rt.device
        budget = dev.local_mem_size - 1024      # drivers keep some for themselves (1 KiB per block on NVIDIA)
        check_fits("gemm_reg", tile, budget, dev.max_work_group_size)
        kernel = cl.Kernel(self.rt.program("gemm_reg", **defines, **tile), "gemm_reg")
        check_fits("gemm_reg", tile, budget, self._max_work_group(kernel))
        kernel.set_args(w.buf, x, y, np.int32(T), np.int32(K), np.int32(N), accumulate)
        rows = tile["MWG"] // (2 if defines["SWIGLU"] else 1)              # output rows per work-group
        local = (tile["NDIMC"], tile["MDIMC"])
        return [(kernel, (local[0] * -(-T // tile["NWG"]), local[1] * -(-N // rows)), local)], ()

    def _local_fits(self, scratch: int, ks: int, wgr: int, tpw: int) -> bool:
        """Whether `scratch` bytes of local memory fit beside the GEMV's own reduction array (and the
        1 KiB per work-group some drivers keep)."""
        # part[WG_ROWS][NT * RT][KSPLIT] (tree), part[WG_ROWS][KSPLIT][NT * RT + 1] (once); NT <= 2 TPW
        once = self.params["gemv_reduce"] == "once"
        own = 4 * wgr * (2 * tpw * RT + once) * ks if ks > 1 else 0
        return scratch + own + 1024 <= self.rt.device.local_mem_size

    def _max_work_group(self, kernel: cl.Kernel) -> int:
        """The largest work-group this compiled kernel can run with on the device."""
        return int(kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, self.rt.device))

    def _max_image_texels(self) -> int:
        try:
            return int(self.rt.device.image_max_buffer_size)
        except cl.Error:
            return 0
