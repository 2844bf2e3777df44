"""The OpenCL kernels of Gemma 3's operators against the NumPy reference, on random data at odd sizes with
poisoned outputs: QK-norm, the post-norm residual epilogue, GeGLU in the gate/up product, and attention
through a sliding window with its own RoPE table and scale."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("pyopencl")

from perfx.engine.backends.numpy_backend import gelu_tanh  # noqa: E402
from tests.test_cl_fused import (CPU_PARAMS, GPU_LIKE, _check_attention, cl_rt, fused_ops, make_config,  # noqa: E402,F401
                                 poisoned, reference, rw_buffer)
from tests.test_cl_matmul import assert_close, mm, rand_int8, rt, x_for  # noqa: E402,F401


def gemma_config(window: int, **kw):
    c = make_config(**kw)
    return dataclasses.replace(c, arch="gemma3", sliding_window=window, swa_layers=(True, False),
                               rope_base_swa=10000.0, rope_base=1000000.0, attn_scale=0.0625, qk_norm=True,
                               post_norms=True, act="gelu_tanh", norm_eps=1e-6)


@pytest.mark.parametrize("T", [1, 5, 33])
def test_head_rmsnorm(cl_rt, T):
    c = gemma_config(8, dim=200, n_heads=5, n_kv_heads=1, head_dim=32)
    ops, ref = fused_ops(cl_rt, c, 8), reference(c, 8)
    rng = np.random.default_rng(T)
    qkv = rng.standard_normal((T, c.q_dim + 2 * c.kv_dim)).astype(np.float32) * 3
    qn, kn = (rng.standard_normal(c.head_dim).astype(np.float32) for _ in range(2))
    buf = rw_buffer(cl_rt, qkv)
    ops.head_rmsnorm(buf, cl_rt.to_device(qn), cl_rt.to_device(kn), T)
    got = cl_rt.read(buf, qkv.shape)
    want = ref.qk_norm(qkv, qn, kn)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, c.q_dim + c.kv_dim:], qkv[:, c.q_dim + c.kv_dim:])   # V untouched


@pytest.mark.parametrize("dim,T", [(640, 1), (577, 3), (3, 17)])
def test_post_add_rmsnorm(cl_rt, dim, T):
    c = gemma_config(8, dim=dim)
    ops, ref = fused_ops(cl_rt, c, 8), reference(c, 8)
    rng = np.random.default_rng(dim + T)
    x, delta = (rng.standard_normal((T, dim)).astype(np.float32) * s for s in (3, 50))
    post, w = (rng.standard_normal(dim).astype(np.float32) for _ in range(2))
    x_buf, h_buf = rw_buffer(cl_rt, x), poisoned(cl_rt, 4 * T * dim)
    ops.post_add_rmsnorm(x_buf, rw_buffer(cl_rt, delta), cl_rt.to_device(post), cl_rt.to_device(w), T, h_buf)
    want_x, want_h = ref.add_rmsnorm(x, ref.rmsnorm(delta, post), w)
    np.testing.assert_allclose(cl_rt.read(x_buf, (T, dim)), want_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cl_rt.read(h_buf, (T, dim)), want_h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme,T", [("gemv", 1), ("gemv", 3), ("few", 5), ("tiled", 40)])
def test_geglu(rt, mm, scheme, T):
    import pyopencl as cl

    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    F, K = 328, 640
    rng = np.random.default_rng(T)
    parts, w = rand_int8(rng, 2 * F, K)
    dm = DeviceMatrix.from_q8(rt, *parts)
    x = rng.standard_normal((T, K))
    y = np.full(T * F + 64, np.nan, np.float32)
    yb = cl.Buffer(rt.ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=y)
    mm.swiglu(rt.to_device(x.astype(np.float32)), dm, T, yb, scheme=scheme, act="gelu_tanh")
    got = rt.read(yb, y.shape)
    assert np.isnan(got[T * F:]).all(), "write past the end of the output"
    gu = x_for(mm, dm, x, scheme).astype(np.float64) @ w.reshape(2 * F, K).T
    assert_close(got[:T * F].reshape(T, F), gelu_tanh(gu[:, :F]) * gu[:, F:])


STEPS = [(0, 0, 17, None), (1, 0, 17, None), (0, 17, 1, None), (0, 18, 30, None), (1, 17, 31, None),
         (0, 48, 1, None), (0, 49, 3, None), (1, 48, 1, None)]


@pytest.mark.parametrize("params", [None, GPU_LIKE, CPU_PARAMS, {**CPU_PARAMS, "att_serial": True},
                                    {"att_key_lanes": 4, "split_min_chunk": 8, "split_wgs": 64}],
                         ids=["default", "gpu-like", "cpu", "serial", "key-lanes"])
def test_windowed_attention(cl_rt, params):
    """Layer 0 through a window of 12 keys (its own RoPE base), layer 1 over all keys; prefill, decode
    and chunks that cross the window's edge, with Gemma's attention scale."""
    c = gemma_config(12, dim=256, n_heads=4, n_kv_heads=1, head_dim=64)
    _check_attention(cl_rt, c, 64, STEPS, params)


def test_windowed_attention_split_kv(cl_rt):
    """Split-KV slices wholly before the window's first key contribute nothing."""
    c = gemma_config(40, dim=256, n_heads=4, n_kv_heads=2, head_dim=64)
    steps = [(0, 0, 300, None), (0, 300, 1, 4), (0, 301, 3, 8), (0, 304, 1, None)]
    _check_attention(cl_rt, c, 400, steps, {"split_wgs": 24})
