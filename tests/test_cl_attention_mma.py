"""The tensor-core prefill attention (kernels/attention_mma.cl through FusedOps) against the NumPy reference.

Here (PoCL) it runs "emulated": the same kernel with the two PTX instructions (mma.sync, shfl.sync)
replaced by arithmetic on the same per-lane fragments, so the fragment layouts are checked. On an NVIDIA
device (PERFX_TEST_CL_PLATFORM=nvidia) every case runs through the PTX instructions too.

Each output is poisoned (NaN) with a guard region after it, the caches are poisoned before the first
step, and positions past the last written must stay poisoned. Two oracles: `oracle16` (float64 from the
kernel's fp16 operands: Q in log2 units, K, V), which leaves only P's rounding to fp16 and the order of
f32 sums, within 1e-3 of the output's largest magnitude; and the NumPy backend's f32 attention, within
fp16 operands' error (1e-2 of the largest magnitude).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from perfx.engine.backends.numpy_backend import apply_rope
from perfx.engine.backends.opencl.attention_mma import oracle16
from tests.test_cl_fused import check_cache, cl_rt, fused_ops, make_config, reference  # noqa: F401 (cl_rt: fixture)

GUARD = 64
SENTINEL = 1.0e30
RTOL16, RTOL32 = 1e-3, 1e-2


def _nvidia(rt) -> bool:
    return "nvidia" in rt.device.platform.name.lower()


@pytest.fixture(scope="module", params=["emulated", "ptx"])
def mode(cl_rt, request):
    if request.param == "ptx" and not _nvidia(cl_rt):
        pytest.skip("the PTX path needs an NVIDIA device (PERFX_TEST_CL_PLATFORM=nvidia)")
    return request.param


def _check(rt, config, ctx, steps, params, seed=0):
    """Run (layer, start_pos, T) steps through FusedOps.attention with attention_mma on, against both
    oracles; the steps of T >= att_mma_min_tokens must go through attend_mma. Then the caches: every
    written position against the reference's, every later one still poisoned."""
    ops = fused_ops(rt, config, ctx, params)
    assert ops.mma is not None, "the tensor-core attention failed its own probe"
    calls = []
    enqueue = ops.mma.enqueue
    ops.mma.enqueue = lambda *a, **kw: (calls.append(a[5]), enqueue(*a, **kw))
    ref = reference(config, ctx)
    rng = np.random.default_rng(seed)
    width, c = config.q_dim + 2 * config.kv_dim, config
    ends = {}
    for layer, start, T in steps:
        qkv = rng.standard_normal((T, width)).astype(np.float32)
        out = rt.to_device(np.concatenate([np.full(T * c.q_dim, np.nan, np.float32),
                                           np.full(GUARD, SENTINEL, np.float32)]))
        ops.attention(rt.to_device(qkv), T, layer, start, out)
        got = rt.read(out, (T * c.q_dim + GUARD,))
        assert (got[T * c.q_dim:] == SENTINEL).all(), "a write past the output"
        got = got[:T * c.q_dim].reshape(T, c.q_dim)
        want = ref.attention(qkv, layer, start)
        end = start + T
        cos, sin = ref.rope_local if c.window(layer) else (ref.cos, ref.sin)
        q = apply_rope(qkv[:, :c.q_dim].reshape(T, c.n_heads, c.head_dim), cos[start:end], sin[start:end], c.rope_dim)
        want16 = oracle16(q, ref.k_cache[layer, :end], ref.v_cache[layer, :end], start, c.window(layer), c.scale)
        where = f"layer {layer} start {start} T {T}"
        np.testing.assert_allclose(got, want16, rtol=0, atol=RTOL16 * np.abs(want16).max(), err_msg=where)
        np.testing.assert_allclose(got, want, rtol=0, atol=RTOL32 * np.abs(want).max(), err_msg=where)
        ends[layer] = max(ends.get(layer, 0), end)
    assert calls == [T for _, _, T in steps if T >= ops.mma.min_tokens]
    half = bool(ops.params["kv_half"])
    for end, k, v in check_cache(ops, ref, ends, half, v_atol=0):
        assert np.isnan(k[end:]).all() and np.isnan(v[end:]).all(), "a cache write past the last position"
    return ops


def _params(mode, warps, bk, kv_half, min_tokens=8):
    return {"attention_mma": mode, "att_mma_warps": warps, "att_mma_bk": bk, "att_mma_min_tokens": min_tokens,
            "kv_half": kv_half}


@pytest.mark.parametrize("kv_half", [False, True], ids=["f32-cache", "fp16-cache"])
def test_gqa3_head64(cl_rt, mode, kv_half):
    """9 query heads on 3 KV heads: 32-row tiles hold 10 tokens (2 rows empty); prefill at 0, then more
    tokens over the cache (start_pos > 0), short steps through attend between them, the other layer too."""
    steps = [(1, 0, 23), (0, 0, 5), (1, 23, 17), (1, 40, 1), (1, 41, 3), (0, 5, 30), (1, 44, 51)]
    _check(cl_rt, make_config(), 128, steps, _params(mode, 2, 16, kv_half))


@pytest.mark.parametrize("kv_half", [False, True], ids=["f32-cache", "fp16-cache"])
def test_mha_head128_partial_rotary(cl_rt, mode, kv_half):
    """No grouping, head_dim 128 rotated over 32 dims; one warp of 16 tokens per tile, blocks of 32 keys."""
    config = make_config(dim=512, n_heads=4, n_kv_heads=4, head_dim=128, rope_dim=32)
    steps = [(0, 0, 37), (0, 37, 20), (0, 57, 9)]
    _check(cl_rt, config, 80, steps, _params(mode, 1, 32, kv_half))


def test_gqa4(cl_rt, mode):
    """8 query heads on 2 KV heads: 8 tokens per 32-row tile; blocks of 48 keys."""
    config = make_config(dim=512, n_heads=8, n_kv_heads=2, head_dim=64)
    steps = [(0, 0, 29), (0, 29, 41), (1, 0, 11)]
    _check(cl_rt, config, 96, steps, _params(mode, 2, 48, False), seed=2)


@pytest.mark.parametrize("kv_half", [False, True], ids=["f32-cache", "fp16-cache"])
def test_sliding_window(cl_rt, mode, kv_half):
    """Layer 0 sees the last 13 positions (its own RoPE base), layer 1 all: the key loop starts inside a
    block and rows lose keys at both ends of it."""
    config = dataclasses.replace(make_config(), sliding_window=13, swa_layers=(True, False), rope_base_swa=1000.0)
    steps = [(0, 0, 40), (1, 0, 40), (0, 40, 21), (0, 61, 2), (0, 63, 33)]
    _check(cl_rt, config, 112, steps, _params(mode, 2, 16, kv_half), seed=3)


def test_shipped_tiles(cl_rt, mode):
    """The NVIDIA entry's tiles (4 warps, 64 keys per block) on head_dim 128 with no grouping: 64 tokens
    per tile, the second tile partial, then a pass over the cache."""
    from perfx.engine.backends.opencl.fused import DEFAULT_PARAMS
    from perfx.engine.backends.opencl.tuning import vendor_params

    nv = vendor_params("gpu", "nvidia", "fused", DEFAULT_PARAMS)
    assert nv["attention_mma"] == "ptx"
    config = make_config(dim=256, n_heads=2, n_kv_heads=2, head_dim=128)
    steps = [(0, 0, 70), (0, 70, 65)]
    params = _params(mode, nv["att_mma_warps"], nv["att_mma_bk"], False, nv["att_mma_min_tokens"])
    _check(cl_rt, config, 160, steps, params, seed=4)


@pytest.mark.parametrize("n_kv_heads", [32, 8], ids=["llama7b", "gqa4"])
def test_ptx_model_shapes(cl_rt, n_kv_heads):
    """On NVIDIA: 32 heads of 128 (LLaMA-7B's, and with 8 KV heads) through the PTX path at the shipped
    tiles: a 512-token prefill, then 77 tokens over its cache."""
    if not _nvidia(cl_rt):
        pytest.skip("the PTX path needs an NVIDIA device (PERFX_TEST_CL_PLATFORM=nvidia)")
    config = make_config(dim=4096, n_heads=32, n_kv_heads=n_kv_heads, head_dim=128)
    _check(cl_rt, config, 640, [(1, 0, 512), (1, 512, 77)], _params("ptx", 4, 64, False, 64), seed=5)


def test_ptx_falls_back_where_the_device_lacks_it(cl_rt, capsys):
    if _nvidia(cl_rt):
        pytest.skip("the device has the instructions")
    config = make_config()
    ops = fused_ops(cl_rt, config, 64, {"attention_mma": "ptx", "att_mma_min_tokens": 2})
    assert ops.mma is None
    assert "tensor-core attention is not used" in capsys.readouterr().err


class NvidiaSizedDevice:
    """The test device, reporting the 48 KB of local memory per work-group of NVIDIA's OpenCL."""

    local_mem_size = 48 * 1024

    def __init__(self, device):
        self._device = device

    def __getattr__(self, name):
        return getattr(self._device, name)


def test_a_tile_over_the_local_memory_is_refused_by_the_probe(cl_rt, capsys):
    """Blocks of 128 keys at head_dim 128 need 68 KB of local memory: the probe says so, attend stays."""
    from perfx.engine.backends.opencl.runtime import Runtime

    rt = Runtime(cl_rt.device)
    rt.device = NvidiaSizedDevice(cl_rt.device)
    config = make_config(dim=512, n_heads=4, n_kv_heads=4, head_dim=128)
    assert fused_ops(rt, config, 64, {"attention_mma": "emulated", "att_mma_bk": 64}).mma is not None
    capsys.readouterr()
    ops = fused_ops(rt, config, 64, {"attention_mma": "emulated", "att_mma_bk": 128})
    assert ops.mma is None
    assert "local memory" in capsys.readouterr().err


def test_a_model_prefills_through_it(tmp_path, monkeypatch):
    """A tiny model (head_dim 16, 2 query heads per KV head) whose device entry turns the tensor-core
    attention on (emulated) from 16 tokens: the prefill, a second pass over its cache and decode steps
    agree with the NumPy backend."""
    from perfx.engine import load_model
    from perfx.engine.backends.opencl import tuning
    from perfx.engine.backends.opencl.devices import select
    from perfx.engine.errors import PerfxError
    from tests.conftest import TinySpec, write_tiny_gguf

    try:
        device = select("opencl").info.id
    except PerfxError as e:
        pytest.skip(f"no usable OpenCL device: {e}")
    monkeypatch.setattr(tuning, "load_override",
                        lambda info: {"fused": {"attention_mma": "emulated", "att_mma_min_tokens": 16}})
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec(qtype="Q8_0", ctx_len=256, seed=3))
    ref = load_model(path, device="numpy", ctx=256)
    dev = load_model(path, device=device, ctx=256)
    assert dev.transformer.backend.fused.mma is not None
    rng = np.random.default_rng(0)
    pos = 0
    for n in (37, 20, 1, 1):
        ids = rng.integers(0, ref.config.vocab_size, size=n).tolist()
        expected, got = ref.forward(ids, pos), dev.forward(ids, pos)
        np.testing.assert_allclose(got, expected, atol=5e-3 * np.abs(expected).max(), rtol=0, err_msg=f"{n} at {pos}")
        pos += n
