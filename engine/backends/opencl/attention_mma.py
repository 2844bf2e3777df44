"""Prefill attention on matrix units (kernels/attention_mma.cl): flash attention whose Q K^T and P V run
through NVIDIA's mma.sync (fp16 operands, f32 accumulators) by inline PTX, the online softmax on the
fragments in registers.

`MmaAttention` is made by `FusedOps` when the tuning database asks for it (fused parameter attention_mma):
  "off"       never (the default; CPUs and GPUs without the instruction);
  "ptx"       the PTX instructions, checked at load (`probe`: a small prefill over a cache against NumPy);
              a device whose compiler rejects them, or whose result is wrong, keeps `attend`, and the
              reason goes to stderr once;
  "emulated"  the same kernel with the instructions replaced by ordinary arithmetic on the same
              fragments (slow), so that a CPU checks the layouts, staging, softmax and epilogue.
It takes prefill passes of T >= att_mma_min_tokens that are not split; everything else keeps `attend`.
"""
from __future__ import annotations


import numpy as np
import pyopencl as cl

from ...config import ModelConfig
from ...errors import PerfxError
from .probe import passed, verdict
from .runtime import Runtime
from .specs import check_fits

MODES = ("off", "ptx", "emulated")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def oracle16(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start_pos: int, window: int,
             scale: float) -> np.ndarray:
    """Causal attention of q [T, n_heads, D] (roped) over keys, values [S, n_kv_heads, D] (K roped,
    S = start_pos + T) in float64 from the kernel's fp16 operands: Q scaled to log2 units in f32 then
    rounded to fp16, K and V rounded to fp16. -> [T, n_heads * D]."""
    T, H, D = q.shape
    kvh = keys.shape[1]

    def h(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float32).astype(np.float16).astype(np.float64)

    qs = h(q.astype(np.float32) * (np.float32(np.log2(np.e)) * np.float32(scale)))
    s = np.einsum("tkgd,skd->kgts", qs.reshape(T, kvh, H // kvh, D), h(keys))   # [kv, group, T, S]
    dist = (start_pos + np.arange(T))[:, None] - np.arange(keys.shape[0])[None, :]
    s[..., (dist < 0) | ((dist >= window) if window else False)] = -np.inf
    p = np.exp2(s - s.max(axis=-1, keepdims=True))
    out = np.einsum("kgts,skd->tkgd", p / p.sum(axis=-1, keepdims=True), h(values))
    return out.reshape(T, H * D)


def roped(x: np.ndarray, table: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """x [T, heads, D] after RoPE from fused.rope_table's table [ctx, 2, D] (x * cos + swap_pairs(x) * sin)."""
    swapped = x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    rows = table[positions][:, :, None, :]                 # [T, 2, 1, D]
    return x * rows[:, 0] + swapped * rows[:, 1]


class MmaAttention:
    """Launches of attend_mma for one model on one device (att_mma_warps, att_mma_bk)."""

    def __init__(self, rt: Runtime, config: ModelConfig, params: dict):
        mode = params["attention_mma"]
        if mode not in MODES:
            raise PerfxError(f"attention_mma must be one of {MODES}, got {mode!r}")
        self.rt, self.config, self.mode = rt, config, mode
        self.min_tokens = int(params["att_mma_min_tokens"])
        c, warps = config, int(params["att_mma_warps"])
        self.nwi = 32 * warps
        self.qt = 16 * warps // (c.n_heads // c.n_kv_heads)       # query tokens per work-group
        self.defines = dict(HEAD_DIM=c.head_dim, N_KV_HEADS=c.n_kv_heads, GROUP=c.n_heads // c.n_kv_heads,
                            WARPS=warps, BK=int(params["att_mma_bk"]), MMA=int(mode == "ptx"),
                            KV_HALF=bool(params["kv_half"]),
                            ATT_SCALE=f"{c.attn_scale!r}f" if c.attn_scale else False)
        self._kernel: cl.Kernel | None = None

    def kernel(self) -> cl.Kernel:
        if self._kernel is None:
            dev = self.rt.device
            check_fits("attention_mma", self.defines, dev.local_mem_size, dev.max_work_group_size)
            self._kernel = cl.Kernel(self.rt.program("attention_mma", **self.defines), "attend_mma")
            self._kernel.set_scalar_arg_dtypes([None] * 5 + [np.int32] * 5)
        return self._kernel

    def enqueue(self, qkv: cl.Buffer, rope: cl.Buffer, k_cache: cl.Buffer, v_cache: cl.Buffer, out: cl.Buffer,
                T: int, start_pos: int, ctx: int, layer: int, window: int, cost: tuple[int, int] | None = None) -> None:
        """out [T, q_dim] = attention of the T tokens of qkv at start_pos.. (fused.FusedOps.attention); cost:
        the launch's (bytes, FLOPs) for a profile."""
        self.rt.launch(self.kernel(), (self.nwi * self.config.n_kv_heads, _ceil_div(T, self.qt)), (self.nwi, 1),
                       qkv, rope, k_cache, v_cache, out, T, start_pos, ctx, layer, window, cost=cost)

    def probe(self) -> str | None:
        """None when the kernel builds, fits the device and matches NumPy on a small prefill (two query
        tiles, the second partial, after 37 cached positions, keys in several blocks) with the model's
        head shape and a random RoPE table; else why not."""
        c = self.config
        rng = np.random.default_rng(11)
        start, T = 37, self.qt + 3
        end = start + T
        kv_dtype = np.float16 if self.defines["KV_HALF"] else np.float32
        width = c.q_dim + 2 * c.kv_dim
        qkv = rng.standard_normal((T, width)).astype(np.float32)
        table = rng.uniform(-1, 1, (end, 2, c.head_dim)).astype(np.float32)
        cached = rng.standard_normal((2, c.n_kv_heads, end, c.head_dim)).astype(kv_dtype)   # K, V [kvh, pos, D]
        positions = np.arange(start, end)
        k_new = roped(qkv[:, c.q_dim:c.q_dim + c.kv_dim].reshape(T, c.n_kv_heads, c.head_dim), table, positions)
        keys = np.concatenate([cached[0, :, :start].transpose(1, 0, 2), k_new])
        values = np.concatenate([cached[1, :, :start].transpose(1, 0, 2),
                                 qkv[:, c.q_dim + c.kv_dim:].reshape(T, c.n_kv_heads, c.head_dim)])
        q = roped(qkv[:, :c.q_dim].reshape(T, c.n_heads, c.head_dim), table, positions)
        want = oracle16(q, keys, values, start, 0, c.scale)

        def run() -> np.ndarray:
            bufs = [self.rt.to_device(a) for a in (qkv, table, cached[0], cached[1])]
            out = self.rt.to_device(np.full((T, c.q_dim), np.nan, np.float32))
            self.enqueue(bufs[0], bufs[1], bufs[2], bufs[3], out, T, start, end, 0, 0)
            return self.rt.read(out, (T, c.q_dim))

        return verdict(run, want, 2e-3)


def make(rt: Runtime, config: ModelConfig, params: dict) -> MmaAttention | None:
    """The model's MmaAttention on the device, or None where attention_mma is off or the probe fails
    (said on stderr)."""
    if params["attention_mma"] == "off":
        return None
    att = MmaAttention(rt, config, params)
    ok = passed(rt.device, att.probe(), "the tensor-core attention", "prefill attention uses attend")
    return att if ok else None
