"""Matrix products with quantized weights: y[T, N] (+)= x[T, K] @ W[N, K]^T on OpenCL.

Weights live on the device as one `DeviceMatrix` per linear layer, repacked once at load into the
"row tile" layout that kernels/gemv.cl and kernels/gemm.cl read:

- rows are grouped in tiles of RT = 4 (N padded with zero rows to a multiple of 4); a tile is one
  contiguous run of 32-bit words, so a work-item streams a single address range;
- along K a tile is cut into chunks of 128 elements, then 64 if K % 128 >= 64, then 32 if K % 64 == 32;
  a chunk of C elements is 8 planes of L = C/8 consecutive elements;
- one chunk's block holds the data of its 4 rows, then their scales and zeros:
    int4  uint q[4][L] (nibble p of word l = q of element p*L + l), half scale[4][C/G], half zero[4][C/G]
    int8  char q[4][C], half scale[4][C/32]
    int8x char q[4][C], float scale[4][C/G], with zeros float zero[4][C/G] (G 16 or 32)
    f16   half w[4][C]
    bf16  ushort w[4][C] (the top halves of floats)
    f32   float w[4][C]
  (int4 with scale_f32: float scales and zeros). Which form a stack of GGUF tensors takes, exactly: weights.py.
  With the int4 packing one 64-byte load, shifted and masked per plane, gives 16 consecutive weights
  that line up with a plain vector load of x.

`Matmul` picks a kernel by token count: GEMV for T == 1 (int4: preceded by `xsum`, the group sums of x
for the zero terms, unless gemv_zero_inline; on x86 CPUs with AVX-512BW by `quantize`, x in int16 blocks
of 32 with integer products, `int_dot`, for int8 weights too; the norms write both for the int4 products
that read h, `XPrep`), `gemm_few` (weights dequantized once per TT tokens into registers) up to
`few_max_tokens`, `gemm_tiled` (dequantized W, and optionally X, in local-memory tiles; RR x TR register
tiles) above; a tiled GEMM whose tiles do not fit the device falls back to `gemm_few`. Where the tuning
database asks for it (NVIDIA), int4 products of T >= mma_min_tokens run on the tensor cores instead
(scheme "mma", gemm_mma.py). The GEMV also takes
T > 1 (scheme="gemv"): token by token, each row bit-identical to the same token alone, which serving
uses so that a reply does not depend on the batch it ran in. Kernels are built
once per set of defines (cached by Runtime); each distinct call (weights, x and y buffers, T, op) gets
its kernel objects with arguments set once, so a decode step only enqueues. A matrix with a bias
(`DeviceMatrix.with_bias`, Qwen2's Q/K/V) gets one more launch after the product: kernels/bias.cl.
Tunables are the -D defines of the kernels; `params` overrides DEFAULT_PARAMS (PoCL, AVX-512) and kernels/tuning.toml holds the values for other devices (NVIDIA GPUs among them).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyopencl as cl

from ...errors import PerfxError
from ...formats.tensors import QTensor
from . import gemm_mma, weights
from .runtime import Runtime
from .specs import defaults

RT = 4                                # rows per tile
FORMAT_CODE = {"int4": 4, "int8": 8, "int8x": 8, "f16": 16, "bf16": 17, "f32": 32}
GROUPS = (32, 64, 128)

# Best found on PoCL 3.1 (pthread, AVX-512), 1 and 2 threads; see scripts/bench_kernels.py.
DEFAULT_PARAMS: dict[str, Any] = defaults("matmul")   # declared, with their meaning, in specs.py

SCHEMES = ("gemv", "few", "tiled", "mma")
LOAD_ROWS = 4096                      # rows packed at a time when a large matrix is loaded


# ---- layout ---------------------------------------------------------------------------------------


def chunk_widths(cols: int) -> list[int]:
    """Widths of the chunks a row is cut into: 128s, then 64 and/or 32 for the rest."""
    if cols % 32:
        raise PerfxError(f"matrix needs a multiple of 32 columns, got {cols}")
    rest = cols % 128
    return [128] * (cols // 128) + ([64] if rest >= 64 else []) + ([32] if rest % 64 else [])


def _tiles(a: np.ndarray) -> np.ndarray:
    """[rows, ...] -> [ceil(rows/4), 4, ...], padding with zero rows."""
    pad = (-a.shape[0]) % RT
    if pad:
        a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
    return a.reshape(a.shape[0] // RT, RT, *a.shape[1:])


def _as_words(a: np.ndarray) -> np.ndarray:
    """[tiles, 4, n] of any dtype -> [tiles, words] uint32."""
    a = np.ascontiguousarray(a.reshape(a.shape[0], -1))
    return a.view(np.uint32)


def pack_int4(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int, dtype=np.float16) -> np.ndarray:
    """q uint8 [N, K] in 0..15, scale and zero [N, K/group] (w = q*scale + zero), stored as dtype (fp16 or
    float32) -> uint32 row tiles."""
    rows, cols = q.shape
    if group not in GROUPS or cols % group:
        raise PerfxError(f"int4 group must be one of {GROUPS} and divide the {cols} columns, got {group}")
    if scale.shape != (rows, cols // group) or zero.shape != scale.shape:
        raise PerfxError(f"int4 scale and zero must be [{rows}, {cols // group}], got {scale.shape}, {zero.shape}")
    q = np.asarray(q, np.uint8)
    if q.size and q.max() > 15:
        raise PerfxError(f"int4 values must be 0..15, got {int(q.max())}")
    qt = _tiles(q)                                          # [tiles, 4, K]
    st = _tiles(np.asarray(scale, dtype))                   # [tiles, 4, K/G]
    zt = _tiles(np.asarray(zero, dtype))
    blocks, k0 = [], 0
    for c in chunk_widths(cols):
        lanes = c // 8
        planes = qt[:, :, k0 : k0 + c].reshape(qt.shape[0], RT, 8, lanes).astype(np.uint32)
        words = np.zeros((qt.shape[0], RT, lanes), np.uint32)
        for p in range(8):
            words |= planes[:, :, p, :] << np.uint32(4 * p)
        g0, g1 = k0 // group, (k0 + c) // group
        blocks += [_as_words(words), _as_words(st[:, :, g0:g1]), _as_words(zt[:, :, g0:g1])]
        k0 += c
    return np.concatenate(blocks, axis=1).reshape(-1)


def pack_int8(q: np.ndarray, scale: np.ndarray, group: int = 32, zero: np.ndarray | None = None,
              dtype=np.float16) -> np.ndarray:
    """q int8 [N, K], scale (and zero) [N, K/group] (w = q*scale (+ zero)), group 32 or 16, stored as
    dtype (fp16 or float32) -> uint32 row tiles."""
    rows, cols = q.shape
    if group not in (16, 32) or scale.shape != (rows, cols // group):
        raise PerfxError(f"int8 scale must be [{rows}, {cols // group}] with a group of 16 or 32, got {scale.shape}")
    qt, st = _tiles(np.asarray(q, np.int8)), _tiles(np.asarray(scale, dtype))
    zt = None if zero is None else _tiles(np.asarray(zero, dtype))
    blocks, k0 = [], 0
    for c in chunk_widths(cols):
        g0, g1 = k0 // group, (k0 + c) // group
        blocks += [_as_words(qt[:, :, k0 : k0 + c]), _as_words(st[:, :, g0:g1])]
        blocks += [] if zt is None else [_as_words(zt[:, :, g0:g1])]
        k0 += c
    return np.concatenate(blocks, axis=1).reshape(-1)


def pack_f16(w: np.ndarray) -> np.ndarray:
    """w [N, K] -> uint32 row tiles of fp16 values."""
    return pack_floats(w, np.float16)


def pack_floats(w: np.ndarray, dtype) -> np.ndarray:
    """w [N, K] -> uint32 row tiles of its values as dtype (fp16, float32, or uint16: bfloat16 bits)."""
    wt = _tiles(np.asarray(w, dtype))
    blocks, k0 = [], 0
    for c in chunk_widths(w.shape[1]):
        blocks.append(_as_words(wt[:, :, k0 : k0 + c]))
        k0 += c
    return np.concatenate(blocks, axis=1).reshape(-1)


def quantize_int4(w: np.ndarray, group: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest asymmetric int4 per group: (q uint8 [N, K], scale, zero [N, K/group]) with
    scale and zero rounded to fp16 first, so w ~ q*scale + zero holds for the stored values."""
    rows, cols = w.shape
    g = np.asarray(w, np.float32).reshape(rows, cols // group, group)
    lo, hi = g.min(axis=2), g.max(axis=2)
    scale = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
    zero = lo.astype(np.float16).astype(np.float32)
    safe = np.where(scale > 0, scale, 1)[..., None]
    q = np.clip(np.rint((g - zero[..., None]) / safe), 0, 15).astype(np.uint8)
    return q.reshape(rows, cols), scale, zero


def quantize_xq(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [T, K] (K a multiple of 32) in int16 blocks of 32 as kernels/xq.h computes them, in natural
    order: (q int16 [T, K], scale f32 [T, K/32]) with x ~ q * scale."""
    T, K = x.shape
    blocks = np.asarray(x, np.float32).reshape(T, K // 32, 32)
    m = np.abs(blocks).max(axis=-1)
    inv = np.divide(np.float32(32767), m, out=np.zeros_like(m), where=m > 0)
    q = np.rint(blocks * inv[..., None]).astype(np.int16)
    return q.reshape(T, K), (m / np.float32(32767)).astype(np.float32)


def xq_view(x: np.ndarray) -> np.ndarray:
    """The x [T, K] that the int-dot GEMV multiplies (f64): its int16 blocks (quantize_xq) as values over
    the whole 128-element chunks, the float x in the tail past them."""
    x = np.asarray(x, np.float32)
    T, K = x.shape
    q, scale = quantize_xq(x)
    out = x.astype(np.float64)
    whole = K // 128 * 128
    out[:, :whole] = (q.reshape(T, K // 32, 32) * scale[..., None].astype(np.float64)).reshape(T, K)[:, :whole]
    return out


def xq_positions(K: int) -> np.ndarray:
    """Where kernels/xq.h stores element k of a row of K values (int64 [K])."""
    k = np.arange(K)
    base, e = k & ~127, k & 127
    g, h, m, j = e >> 5, (e >> 4) & 1, (e >> 2) & 3, e & 3
    permuted = base + 32 * (h + 2 * (j & 1)) + 8 * m + 2 * g + (j >> 1)
    return np.where(base + 128 <= K, permuted, k)


@dataclass(eq=False)
class DeviceMatrix:
    """A weight matrix W [rows, cols] (rows = outputs N, cols = inputs K) in row tiles on the device."""

    fmt: str          # "int4", "int8", "int8x", "f16", "bf16" or "f32"
    rows: int
    cols: int
    group: int        # int4 group size (32, 64 or 128); 32 for int8; 16 or 32 for int8x; 0 for f16, f32
    buf: cl.Buffer    # uint32 row tiles, see the module docstring
    nbytes: int
    bias: cl.Buffer | None = None   # f32 [rows]: added to each output row by linear (kernels/bias.cl), or None
    scale_f32: bool = False         # scales (and zeros) as float32 (int4 of Q4_K, int8x)
    zeros: bool = False             # int8x with zeros: w = q*scale + zero

    @property
    def defines(self) -> dict:
        """The kernel defines of this matrix's format (kernels/wformat.h)."""
        return {"FORMAT": FORMAT_CODE[self.fmt], "G": self.group if self.fmt in ("int4", "int8x") else False,
                "SCALE_F32": self.scale_f32, "ZERO8": self.zeros}

    @classmethod
    def _upload(cls, rt: Runtime, fmt: str, rows: int, cols: int, group: int, words: np.ndarray) -> DeviceMatrix:
        return cls(fmt, rows, cols, group, rt.to_device(words), int(words.nbytes))

    @classmethod
    def from_int4(cls, rt: Runtime, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> DeviceMatrix:
        """q uint8 [N, K] (0..15), scale and zero [N, K/group]: w = q*scale + zero (stored as fp16)."""
        return cls._upload(rt, "int4", *q.shape, group, pack_int4(q, scale, zero, group))

    @classmethod
    def from_q8(cls, rt: Runtime, q: np.ndarray, scale: np.ndarray) -> DeviceMatrix:
        """q int8 [N, K], scale [N, K/32]: w = q*scale (GGUF Q8_0)."""
        return cls._upload(rt, "int8", *q.shape, 32, pack_int8(q, scale))

    @classmethod
    def from_f16(cls, rt: Runtime, w: np.ndarray) -> DeviceMatrix:
        """w [N, K], stored as fp16."""
        return cls._upload(rt, "f16", *w.shape, 0, pack_f16(w))

    @classmethod
    def from_qtensors(cls, rt: Runtime, tensors: list[QTensor]) -> DeviceMatrix:
        """The rows of `tensors` stacked in order (Q, K, V as one matrix; gate then up).

        Every type is held exactly, in the form weights.form_of picks: with mixed group sizes the
        smallest is used and the larger groups' scales and zeros repeated.

        A large matrix is packed LOAD_ROWS rows at a time straight into its device buffer, and the file
        pages of each packed piece are let go (QTensor.drop_pages), so loading needs little more host
        memory than the weights themselves.
        """
        if not tensors:
            raise PerfxError("from_qtensors needs at least one tensor")
        cols = {t.shape[-1] for t in tensors}
        if len(cols) != 1 or any(len(t.shape) != 2 for t in tensors):
            raise PerfxError(f"tensors to stack must be 2-D with equal columns: {[t.shape for t in tensors]}")
        form = weights.form_of(tensors)
        fmt, group, extra = form.fmt, form.group, {"scale_f32": form.scale_f32, "zeros": form.zeros}
        rows = sum(t.shape[0] for t in tensors)
        if rows <= LOAD_ROWS or any(t.shape[0] % RT for t in tensors[:-1]):
            words = weights.pack(tensors, form)
            for t in tensors:
                t.drop_pages()
            return replace(cls._upload(rt, fmt, rows, cols.pop(), group, words), **extra)
        ntiles = -(-rows // RT)
        buf, tile_words, tile0 = None, 0, 0
        for t in tensors:
            for r in range(0, t.shape[0], LOAD_ROWS):
                piece = t.rows(r, r + LOAD_ROWS)
                words = weights.pack([piece], form)             # uint32 [piece tiles * tile_words]
                piece.drop_pages()
                if buf is None:
                    tile_words = words.size // -(-piece.shape[0] // RT)
                    buf = rt.empty(4 * ntiles * tile_words)
                cl.enqueue_copy(rt.queue, buf, words, dst_offset=4 * tile0 * tile_words, is_blocking=True)
                tile0 += words.size // tile_words
        return cls(fmt, rows, cols.pop(), group, buf, 4 * ntiles * tile_words, **extra)

    def with_bias(self, rt: Runtime, biases: list[QTensor] | None) -> DeviceMatrix:
        """This matrix with `biases` stacked in order (Q, K, V) as its f32 bias [rows]; itself when None."""
        if biases is None:
            return self
        b = np.concatenate([t.dequantize().reshape(-1) for t in biases]).astype(np.float32)
        if b.shape != (self.rows,):
            raise PerfxError(f"a bias of {b.size} values for a matrix of {self.rows} rows")
        return replace(self, bias=rt.to_device(b), nbytes=self.nbytes + int(b.nbytes))


# ---- launching ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class XPrep:
    """What the int4 GEMV needs of its input x [T, K] besides x itself, written by the kernel that
    wrote x (the norms) so that the GEMV needs no launch of its own for it."""

    sums: cl.Buffer                   # f32 [T, K/G]: the group sums of x (the zero terms)
    q: cl.Buffer | None = None        # int16 [T, K]: x in int16 blocks of 32 (kernels/xq.h), int-dot GEMV
    scale: cl.Buffer | None = None    # f32 [T, K/32]: the blocks' scales

    @property
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

    @property
    def key(self) -> tuple:
        return (self.w.int_ptr, self.h.int_ptr, self.hx.key if self.hx is not None else 0, self.group, self.eps)


@dataclass
class _Plan:
    """The kernel launches of one call, arguments set; `keep` holds what the arguments refer to."""

    steps: list[tuple[cl.Kernel, tuple[int, ...], tuple[int, ...]]]   # (kernel, global size, local size)
    keep: tuple


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

    def _int_dot_works(self) -> bool:
        """Whether the int4 and int8 GEMVs take x in int16 (gemv.cl INT_DOT): asked for (gemv_int_dot), the CPU
        layout of the GEMV (VEC 16, no K split), and a device whose compiler builds it (x86 with
        AVX-512BW or AVX2; elsewhere the build fails and the float GEMV is used)."""
        p = self.params
        if not (p["gemv_int_dot"] and p["gemv_vec"] == 16 and p["gemv_ksplit"] == 1):
            return False
        try:
            self.rt.program("gemv", FORMAT=4, G=32, VEC=16, KSPLIT=1, WG_ROWS=p["gemv_wg_rows"], INT_DOT=True,
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
               scheme: str | None = None, xs: XPrep | None = None) -> list[cl.Event]:
        """y [T, N] = x [T, K] @ W^T, or y += x @ W^T with accumulate (float32 buffers). xs: x's group
        sums [T, K/group] (and, for the int-dot GEMV, x in int16) when already computed (the norms write
        them), used by the int4 GEMV in place of its own xsum or quantize launch. Returns the events of
        its launches."""
        return self._enqueue("linear", x, w, T, y, accumulate, scheme, xs)

    def swiglu(self, x: cl.Buffer, w_gate_up: DeviceMatrix, T: int, y: cl.Buffer, scheme: str | None = None,
               xs: XPrep | None = None, act: str = "silu") -> None:
        """y [T, F] = silu(x @ Wg^T) * (x @ Wu^T) where w_gate_up [2F, K] holds gate rows then up rows;
        act "gelu_tanh": GeGLU, the gate through tanh-approximated GELU."""
        self._enqueue("geglu" if act == "gelu_tanh" else "swiglu", x, w_gate_up, T, y, False, scheme, xs)

    def residual_norm(self, x: cl.Buffer, w: DeviceMatrix, T: int, y: cl.Buffer, norm: Norm,
                      xs: XPrep | None = None) -> None:
        """y [T, N] += x @ W^T, y being the residual stream; then norm.h [T, N] = rmsnorm(y) * norm.w and,
        with norm.hx, its group sums [T, N/norm.group] (and h in int16 with norm.hx.q): one GEMV launch,
        whose last work-item to finish normalises (kernels/gemv.cl NORM)."""
        if w.bias is not None:
            raise PerfxError("residual_norm takes no bias")
        self._enqueue("linear", x, w, T, y, True, "gemv", xs, norm)

    def _enqueue(self, op: str, x: cl.Buffer, w: DeviceMatrix, T: int, y: cl.Buffer, accumulate: bool,
                 scheme: str | None, xs: XPrep | None = None, norm: Norm | None = None) -> list[cl.Event]:
        """Enqueues the call's launches (built once per distinct call); their events."""
        key = (op, id(w), x.int_ptr, y.int_ptr, T, accumulate, scheme, xs and xs.key, norm and norm.key)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = self._plan(op, x, w, T, y, accumulate, scheme or self.scheme(T), xs, norm)
        return [cl.enqueue_nd_range_kernel(self.rt.queue, kernel, global_size, local_size)
                for kernel, global_size, local_size in plan.steps]

    # -- building the launches of one call --

    def _plan(self, op: str, x: cl.Buffer, w: DeviceMatrix, T: int, y: cl.Buffer, accumulate: bool,
              scheme: str, xs: XPrep | None = None, norm: Norm | None = None) -> _Plan:
        if scheme not in SCHEMES:
            raise PerfxError(f"unknown matmul scheme {scheme!r} (one of {SCHEMES})")
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
            steps, keep = self._gemv(defines, x, w, T, K, N, y, np.int32(accumulate), xs, norm)
        elif scheme == "mma":
            steps, keep = self.mma.steps(w, x, y, T, K, N, accumulate, op == "swiglu")
        else:
            build = {"few": self._gemm_few, "tiled": self._gemm_tiled}[scheme]
            steps, keep = build(defines, x, w, T, K, N, y, np.int32(accumulate))
        if w.bias is not None:                   # y [T, N] += bias [N], after the product
            if op != "linear":
                raise PerfxError(f"{op} takes no bias; only linear adds one")
            add_bias = cl.Kernel(self.rt.program("bias"), "add_bias")
            add_bias.set_args(y, w.bias, np.int32(N))
            steps.append((add_bias, (N, T), None))
            keep += (w.bias,)
        return _Plan(steps, (x, y, w.buf) + keep)

    def _gemv(self, defines: dict, x: cl.Buffer, w: DeviceMatrix, T: int, K: int, N: int, y: cl.Buffer,
              accumulate: np.int32, given: XPrep | None = None, norm: Norm | None = None) -> tuple[list, tuple]:
        p = self.params
        ks, wgr, tpw = int(p["gemv_ksplit"]), int(p["gemv_wg_rows"]), int(p["gemv_tpw"])
        if ks < 1 or ks & (ks - 1) or tpw < 1:
            raise PerfxError(f"gemv_ksplit must be a power of two and gemv_tpw at least 1, got {ks} and {tpw}")
        use_image = bool(p["use_image"]) and self.rt.device.image_support and T * K // 4 <= self._max_image_texels()
        int_dot = w.fmt in ("int4", "int8") and self.int_dot
        inline = w.fmt == "int4" and not int_dot and bool(p["gemv_zero_inline"])
        hx = norm.hx if norm is not None else None
        if hx is not None and hx.q is not None and N % 32:
            raise PerfxError(f"h in int16 needs rows in blocks of 32, got {N}")
        defines.update(VEC=p["gemv_vec"], KSPLIT=ks, WG_ROWS=wgr, TPW=tpw, USE_IMAGE=use_image, ZERO_INLINE=inline,
                       INT_DOT=int_dot, INT_DOT_256=int_dot and bool(p["gemv_int_dot_256"]),
                       NORM=norm is not None, HS_G=norm.group if hx is not None else False,
                       HQ=hx is not None and hx.q is not None)
        program = self.rt.program("gemv", **defines)
        steps, keep = [], ()
        xs = x                                   # group sums of x [K/G] (int4 without ZERO_INLINE)
        if (w.fmt == "int4" and not inline) or int_dot:
            # int8 weights take x in natural order (kernels/xq.h XQ_NATURAL), which the norms do not write.
            if given is None or (int_dot and given.q is None) or w.fmt == "int8":
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
        gemv = cl.Kernel(program, "gemv")
        if ks * wgr > self._max_work_group(gemv):
            raise PerfxError(f"{self.rt.device.name}: gemv work-group of {ks} x {wgr} work-items is too large "
                             f"(kernel limit {self._max_work_group(gemv)}); lower gemv_ksplit or gemv_wg_rows")
        args = [w.buf, xarg, y, np.int32(K), np.int32(N), accumulate, xs, np.int32(T)]
        if int_dot:
            args += [given.q, given.scale]
        if norm is not None:
            if self.done is None:
                self.done = self.rt.to_device(np.zeros(1, np.int32))    # int32 [1]: finished work-groups
            outs = [norm.h if b is None else b for b in (hx.sums, hx.q, hx.scale)] if hx else [norm.h] * 3
            args += [norm.w, norm.h, *outs, self.done, np.float32(norm.eps)]
            keep += (norm.w, norm.h, hx, self.done)
        gemv.set_args(*args)
        tiles = -(-N // RT)
        items = -(-tiles // tpw)                 # work-items along the rows
        steps.append((gemv, (ks, _round_up(items, wgr)), (ks, wgr)))
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
        p = self.params
        bn, bt, rr, tr = (int(p[k]) for k in ("tiled_bn", "tiled_bt", "tiled_rr", "tiled_tr"))
        x_local = int(p["tiled_x_local"])
        few_defines = dict(defines)
        defines.update(VEC=p["tiled_vec"], BN=bn, BT=bt, RR=rr, TR=tr, X_LOCAL=x_local)
        kernel = cl.Kernel(self.rt.program("gemm", **defines), "gemm_tiled")
        local = (bt // tr, bn // rr)
        # Local memory left for the tiles: drivers keep some for themselves (1 KiB per block on NVIDIA).
        static = kernel.get_work_group_info(cl.kernel_work_group_info.LOCAL_MEM_SIZE, self.rt.device)
        budget = self.rt.device.local_mem_size - static - 1024
        nchunks = len(chunk_widths(K))
        kc = min(int(p["tiled_kc"]) or nchunks, nchunks)       # chunks staged per barrier
        while kc > 1 and 4 * 128 * kc * (bn + x_local * bt) > budget:
            kc -= 1
        if 4 * 128 * kc * (bn + x_local * bt) > budget or local[0] * local[1] > self._max_work_group(kernel):
            # The tiles do not fit this device (local memory, or registers for the work-group size).
            return self._gemm_few(few_defines, x, w, T, K, N, y, accumulate)
        w_local = cl.LocalMemory(4 * bn * 128 * kc)                        # [BN][kc*128]
        x_tile = cl.LocalMemory(4 * max(x_local * bt * 128 * kc, 1))        # [BT][kc*128]
        kernel.set_args(w.buf, x, y, np.int32(T), np.int32(K), np.int32(N), accumulate, w_local, x_tile,
                        np.int32(kc))
        return [(kernel, (local[0] * -(-T // bt), local[1] * -(-N // bn)), local)], ()

    def _max_work_group(self, kernel: cl.Kernel) -> int:
        """The largest work-group this compiled kernel can run with on the device."""
        return int(kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, self.rt.device))

    def _max_image_texels(self) -> int:
        try:
            return int(self.rt.device.image_max_buffer_size)
        except cl.Error:
            return 0
