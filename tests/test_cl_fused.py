"""The fused OpenCL operators (add_rmsnorm, attention, embed, argmax) against the NumPy reference.

Runs on a PoCL / CPU OpenCL device (PERFX_TEST_CL_PLATFORM: a substring of the platform or device
to use instead) and skips when there is none. Every output buffer is filled with NaN before a run,
and so are the KV cache and the split-KV scratch when they are created, so a value that a kernel
should have written but did not, or read before it was written, shows up.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

cl = pytest.importorskip("pyopencl")

from perfx.engine.backends.numpy_backend import NumpyBackend, rope_tables
from perfx.engine.backends.opencl.fused import DEFAULT_PARAMS, EmbeddingTable, FusedOps
from perfx.engine.backends.opencl.matmul import XPrep
from perfx.engine.backends.opencl.runtime import Runtime
from perfx.engine.config import ModelConfig
from tests.conftest import held_by_xq

CPU_PARAMS = {"att_vec": 16, "att_wg": 64}                 # kernels/tuning.toml's CPU entry
GPU_LIKE = {k: DEFAULT_PARAMS[k] for k in CPU_PARAMS}   # the non-CPU defaults, run on the CPU too


def _usable(device) -> bool:
    try:
        ctx = cl.Context([device])
        cl.Program(ctx, "__kernel void k(__global float *x) { x[0] = 1.0f; }").build()
        return True
    except cl.Error:
        return False


def _pick_device():
    want = os.environ.get("PERFX_TEST_CL_PLATFORM", "").lower()
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        return None
    for p in platforms:
        try:
            devices = p.get_devices()
        except cl.Error:
            devices = []
        for d in devices:
            text = f"{p.name} {p.version} {d.name}".lower()
            wanted = want in text if want else ("portable computing language" in text
                                                or d.type & cl.device_type.CPU)
            if wanted and _usable(d):
                return d
    return None


@pytest.fixture(scope="session")
def cl_rt() -> Runtime:
    device = _pick_device()
    if device is None:
        want = os.environ.get("PERFX_TEST_CL_PLATFORM")
        pytest.skip(f"no usable OpenCL device matching {want!r}" if want else "no usable OpenCL CPU device")
    return Runtime(device)


def make_config(dim: int = 576, n_heads: int = 9, n_kv_heads: int = 3, head_dim: int = 64,
                rope_dim: int | None = None, vocab: int = 1000) -> ModelConfig:
    return ModelConfig(arch="llama", n_layers=2, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       head_dim=head_dim, ffn_dim=1536, vocab_size=vocab, ctx_len=4096, norm_eps=1e-5,
                       rope_base=10000.0, rope_dim=rope_dim or head_dim, tied_embedding=True)


def rw_buffer(rt: Runtime, array: np.ndarray) -> cl.Buffer:
    return cl.Buffer(rt.ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR,
                     hostbuf=np.ascontiguousarray(array))


def poison(rt: Runtime, buf: cl.Buffer) -> cl.Buffer:
    """All bytes 0xFF: NaN as f32 and f16, -1 as int32."""
    cl.enqueue_fill_buffer(rt.queue, buf, np.uint8(0xFF), 0, buf.size)
    return buf


def poisoned(rt: Runtime, nbytes: int) -> cl.Buffer:
    return poison(rt, rt.empty(nbytes))


def fused_ops(rt: Runtime, config: ModelConfig, ctx: int, params: dict | None = None) -> FusedOps:
    ops = FusedOps(rt, config, ctx, config.n_layers, params)
    for buf in (ops.k_cache, ops.v_cache, ops.part_o, ops.part_ml, ops.argmax_val, ops.argmax_idx):
        poison(rt, buf)
    return ops


def reference(config: ModelConfig, ctx: int) -> NumpyBackend:
    ref = NumpyBackend()
    ref.config, ref.ctx = config, ctx
    shape = (config.n_layers, ctx, config.n_kv_heads, config.head_dim)
    ref.k_cache = np.zeros(shape, np.float32)
    ref.v_cache = np.zeros(shape, np.float32)
    ref.cos, ref.sin = rope_tables(config, ctx)
    ref.rope_local = rope_tables(config, ctx, local=True) if config.rope_base_swa else (ref.cos, ref.sin)
    return ref


# --- add_rmsnorm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [576, 577, 3])
@pytest.mark.parametrize("T", [1, 3, 17, 300])
def test_add_rmsnorm(cl_rt, dim, T):
    config = make_config(dim=dim)
    ops = fused_ops(cl_rt, config, ctx=8)
    ref = reference(config, 8)
    rng = np.random.default_rng(dim * 1000 + T)
    x = rng.standard_normal((T, dim)).astype(np.float32) * 3
    delta = rng.standard_normal((T, dim)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)

    x_buf, h_buf = rw_buffer(cl_rt, x), poisoned(cl_rt, 4 * T * dim)
    ops.add_rmsnorm(x_buf, cl_rt.to_device(delta), cl_rt.to_device(w), T, h_buf)
    want_x, want_h = ref.add_rmsnorm(x, delta, w)
    np.testing.assert_allclose(cl_rt.read(x_buf, (T, dim)), want_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cl_rt.read(h_buf, (T, dim)), want_h, rtol=1e-5, atol=1e-5)

    poison(cl_rt, h_buf)
    ops.add_rmsnorm(x_buf, None, cl_rt.to_device(w), T, h_buf)
    np.testing.assert_allclose(cl_rt.read(x_buf, (T, dim)), want_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cl_rt.read(h_buf, (T, dim)), ref.rmsnorm(want_x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group,T", [(32, 1), (128, 3), (64, 17)])
def test_norms_write_group_sums_as_xsum_does(cl_rt, group, T):
    """With group_sums, the norms also write the group sums of h, bit for bit what gemv.cl's xsum
    computes from h (so an int4 GEMV may take either), and h itself is unchanged."""
    dim = 1536 if group == 128 else 576
    config = make_config(dim=dim)
    ops = fused_ops(cl_rt, config, ctx=8)
    rng = np.random.default_rng(group + T)
    x = rng.standard_normal((T, dim)).astype(np.float32) * 3
    delta = rng.standard_normal((T, dim)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    plain = poisoned(cl_rt, 4 * T * dim)
    ops.add_rmsnorm(rw_buffer(cl_rt, x), cl_rt.to_device(delta), cl_rt.to_device(w), T, plain)

    ops.group_sums(group)
    h, xs = poisoned(cl_rt, 4 * T * dim), poisoned(cl_rt, 4 * T * dim // group)
    ops.add_rmsnorm(rw_buffer(cl_rt, x), cl_rt.to_device(delta), cl_rt.to_device(w), T, h, XPrep(xs))
    np.testing.assert_array_equal(cl_rt.read(h, (T, dim)), cl_rt.read(plain, (T, dim)))

    xsum = cl.Kernel(cl_rt.program("gemv", FORMAT=4, G=group), "xsum")
    want = poisoned(cl_rt, 4 * T * dim // group)
    xsum(cl_rt.queue, (T * dim // group,), None, h, want)
    np.testing.assert_array_equal(cl_rt.read(xs, (T, dim // group)), cl_rt.read(want, (T, dim // group)))
    np.testing.assert_allclose(cl_rt.read(xs, (T, dim // group)),
                               cl_rt.read(h, (T, dim)).reshape(T, -1, group).sum(-1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group,T,dim", [(32, 1, 576), (128, 3, 1536), (64, 2, 704), (32, 2, 608)])
def test_norms_write_int16_h_as_quantize_does(cl_rt, group, T, dim):
    """With group_sums(int16=True) the norms also write h in int16 blocks (kernels/xq.h), as
    packing.quantize_xq makes them of h, in the int-dot GEMV's order, and the group sums that go with
    them: of the values the blocks hold over whole 128-element chunks, of h in the tail."""
    config = make_config(dim=dim)
    ops = fused_ops(cl_rt, config, ctx=8)
    ops.group_sums(group, int16=True)
    rng = np.random.default_rng(dim + T)
    x = rng.standard_normal((T, dim)).astype(np.float32) * 3
    w = rng.standard_normal(dim).astype(np.float32)
    h, xs, xq, xd = (poisoned(cl_rt, n) for n in (4 * T * dim, 4 * T * dim // group, 2 * T * dim, 4 * T * dim // 32))
    ops.rmsnorm(rw_buffer(cl_rt, x), cl_rt.to_device(w), T, h, XPrep(xs, xq, xd))
    got_h = cl_rt.read(h, (T, dim))
    np.testing.assert_allclose(got_h, reference(config, 8).rmsnorm(x, w), rtol=1e-5, atol=1e-5)
    held = held_by_xq(got_h, cl_rt.read(xq, (T, dim), np.int16), cl_rt.read(xd, (T, dim // 32)))
    np.testing.assert_allclose(cl_rt.read(xs, (T, dim // group)), held.reshape(T, -1, group).sum(-1),
                               rtol=1e-5, atol=1e-4)


def test_rmsnorm_other_work_group_size(cl_rt):
    config = make_config(dim=577)
    ops = fused_ops(cl_rt, config, ctx=8, params={"rms_wg": 16})
    x = np.random.default_rng(1).standard_normal((5, 577)).astype(np.float32)
    w = np.linspace(-1, 2, 577, dtype=np.float32)
    h = poisoned(cl_rt, 4 * x.size)
    ops.rmsnorm(rw_buffer(cl_rt, x), cl_rt.to_device(w), 5, h)
    want = reference(config, 8).rmsnorm(x, w)
    np.testing.assert_allclose(cl_rt.read(h, x.shape), want, rtol=1e-5, atol=1e-5)


# --- embed ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 17])
def test_embed_q8(cl_rt, T):
    vocab, dim = 300, 576
    config = make_config(dim=dim, vocab=vocab)
    ops = fused_ops(cl_rt, config, ctx=8)
    rng = np.random.default_rng(T)
    q = rng.integers(-128, 128, (vocab, dim), dtype=np.int8)
    scale = rng.uniform(1e-3, 1e-1, (vocab, dim // 32)).astype(np.float16).astype(np.float32)
    table = np.repeat(scale, 32, axis=1) * q.astype(np.float32)
    ids = rng.integers(0, vocab, T).astype(np.int32)
    ids[0] = vocab - 1
    ids[-1] = 0
    x = poisoned(cl_rt, 4 * T * dim)
    ops.embed(EmbeddingTable.from_q8(cl_rt, q, scale), cl_rt.to_device(ids), T, x)
    np.testing.assert_array_equal(cl_rt.read(x, (T, dim)), NumpyBackend().embed(table, ids))


@pytest.mark.parametrize("vocab,dim,T", [(301, 576, 17), (50, 608, 3), (9, 96, 1)])
def test_embed_from_row_tiles(cl_rt, vocab, dim, T):
    """A tied embedding read from the output matrix's int8 row tiles (chunks of 128, 64 and 32, a
    vocabulary that is not a multiple of the tile height)."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    ops = fused_ops(cl_rt, make_config(dim=dim, vocab=vocab), ctx=8)
    rng = np.random.default_rng(vocab)
    q = rng.integers(-128, 128, (vocab, dim), dtype=np.int8)
    scale = rng.uniform(1e-3, 1e-1, (vocab, dim // 32)).astype(np.float16).astype(np.float32)
    table = np.repeat(scale, 32, axis=1) * q.astype(np.float32)
    ids = rng.integers(0, vocab, T).astype(np.int32)
    ids[0] = vocab - 1
    x = poisoned(cl_rt, 4 * T * dim)
    ops.embed(EmbeddingTable.from_tiles(DeviceMatrix.from_q8(cl_rt, q, scale)), cl_rt.to_device(ids), T, x)
    np.testing.assert_array_equal(cl_rt.read(x, (T, dim)), NumpyBackend().embed(table, ids))


def test_embed_f32_odd_dim(cl_rt):
    vocab, dim, T = 50, 577, 6
    ops = fused_ops(cl_rt, make_config(dim=dim, vocab=vocab), ctx=8)
    table = np.random.default_rng(7).standard_normal((vocab, dim)).astype(np.float32)
    ids = np.array([3, 49, 0, 3, 17, 48], np.int32)
    x = poisoned(cl_rt, 4 * T * dim)
    ops.embed(EmbeddingTable.from_f32(cl_rt, table), cl_rt.to_device(ids), T, x)
    np.testing.assert_array_equal(cl_rt.read(x, (T, dim)), NumpyBackend().embed(table, ids))


# --- argmax --------------------------------------------------------------------------------------


def _argmax_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    cases = [rng.standard_normal(49152).astype(np.float32)]
    ties = rng.standard_normal(1001).astype(np.float32)
    ties[[17, 400, 999]] = 5.0                                 # first of equal maxima wins
    cases.append(ties)
    cases.append(-rng.uniform(1, 100, 4097).astype(np.float32))  # all negative, odd length
    tail = rng.standard_normal(1003).astype(np.float32)
    tail[1002] = 9.0                                           # the maximum in the scalar tail
    cases.append(tail)
    head = -np.ones(777, np.float32)
    head[0] = 0.0
    cases.append(head)
    cases.append(np.full(5, -2.5, np.float32))                 # all equal: index 0
    cases.append(np.array([-3.0, -1.0, -2.0], np.float32))
    wide = rng.standard_normal(49152).astype(np.float32)
    wide[[20000, 3, 40000]] = 7.0                              # ties across work-groups
    cases.append(wide)
    return cases


@pytest.mark.parametrize("params", [None, {"argmax_wg": 16, "argmax_groups": 5}])
def test_argmax(cl_rt, params):
    ops = fused_ops(cl_rt, make_config(), ctx=8, params=params)
    for logits in _argmax_cases():
        out = poisoned(cl_rt, 4)
        ops.argmax(cl_rt.to_device(logits), logits.size, out)
        assert int(cl_rt.read(out, (1,), np.int32)[0]) == int(np.argmax(logits)), logits.size


# --- attention -----------------------------------------------------------------------------------


Step = tuple[int, int, int, int | None]   # layer, start_pos, T, n_splits (None: automatic)


def _check_attention(rt: Runtime, config: ModelConfig, ctx: int, steps: list[Step],
                     params: dict | None = None, seed: int = 0) -> FusedOps:
    """Run (layer, start_pos, T, n_splits) steps on the kernels and on the reference, comparing each
    output and, at the end, both layers' KV caches."""
    ops = fused_ops(rt, config, ctx, params)
    ref = reference(config, ctx)
    half = bool(ops.params["kv_half"])
    atol = 5e-3 if half else 2e-5
    rng = np.random.default_rng(seed)
    width = config.q_dim + 2 * config.kv_dim
    ends = {}
    for layer, start, T, n_splits in steps:
        qkv = rng.standard_normal((T, width)).astype(np.float32)
        out = poisoned(rt, 4 * T * config.q_dim)
        ops.attention(rt.to_device(qkv), T, layer, start, out, n_splits=n_splits)
        want = ref.attention(qkv, layer, start)
        got = rt.read(out, (T, config.q_dim))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol,
                                   err_msg=f"layer {layer} start {start} T {T} splits {n_splits}")
        ends[layer] = max(ends.get(layer, 0), start + T)
    check_cache(ops, ref, ends, half, v_atol=1e-7 if half else 0)
    return ops


def check_cache(ops, ref, ends: dict[int, int], half: bool, v_atol: float) -> list:
    """Each layer's K and V cache up to its end (layer -> end) against the reference's (rounded to fp16 where
    the cache is half); returns the (k, v) read back, for checks past the end."""
    read = []
    for layer, end in ends.items():
        k, v = ops.read_kv(layer)
        want_k, want_v = ref.k_cache[layer, :end], ref.v_cache[layer, :end]
        if half:
            want_k, want_v = (a.astype(np.float16).astype(np.float32) for a in (want_k, want_v))
        np.testing.assert_allclose(k[:end], want_k, rtol=2e-3 if half else 1e-6, atol=1e-6)
        np.testing.assert_allclose(v[:end], want_v, rtol=0, atol=v_atol)
        read.append((end, k, v))
    return read


KEY_LANES = {"att_key_lanes": 8, "split_min_chunk": 16}    # decode scored by 8 work-items per key
PARAMS = [None, GPU_LIKE, KEY_LANES]
PARAM_IDS = ["default", "gpu-like", "key-lanes"]


@pytest.mark.parametrize("kv_half", [False, True])
@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_attention_prefill_then_decode(cl_rt, params, kv_half):
    """T = 17, 3, 1, 300 and 1 continuing one cache; the other layer interleaved and left alone."""
    steps = [(1, 0, 17, None), (0, 0, 5, None), (1, 17, 3, None), (1, 20, 1, None),
             (1, 21, 300, None), (0, 5, 2, None), (1, 321, 1, None)]
    _check_attention(cl_rt, make_config(), 400, steps, {**(params or {}), "kv_half": kv_half})


@pytest.mark.parametrize("kv_half", [False, True])
@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_attention_split_kv(cl_rt, params, kv_half):
    """Long contexts through the split-KV path: forced, chosen automatically, with the new tokens
    straddling a slice boundary, and with slices that hold no visible key for some rows."""
    params = {**(params or {}), "kv_half": kv_half, "split_wgs": 24}
    steps = [(0, 0, 126, None), (0, 126, 5, 2),            # slice boundary at 128 inside 126..130
             (0, 131, 300, None), (0, 431, 300, None), (0, 731, 300, None),
             (0, 1031, 1, None),                             # automatic split
             (0, 1032, 1, 1), (0, 1033, 1, 7), (0, 1034, 3, 5), (0, 1037, 8, 16), (0, 1045, 1, 32)]
    ops = _check_attention(cl_rt, make_config(), 1100, steps, params, seed=1)
    assert ops.splits_for(1, 1032) > 1
    assert ops.splits_for(300, 1032) == 1
    assert ops.splits_for(1, ops.params["split_min_chunk"] - 1) == 1


@pytest.mark.parametrize("kv_half", [False, True])
@pytest.mark.parametrize("params", [CPU_PARAMS, {"att_vec": 4}], ids=["cpu", "vec4"])
def test_attention_serial_decode(cl_rt, params, kv_half):
    """att_serial: each decode step by attend_one (one work-item per KV head, keys in blocks of 16),
    at positions on both sides of the block boundaries, after a prefill and between other steps."""
    params = {**params, "kv_half": kv_half, "att_serial": True}
    steps = [(0, 0, 1, None), (0, 1, 1, None), (1, 0, 15, None), (1, 15, 1, None), (1, 16, 1, None),
             (1, 17, 1, None), (1, 18, 13, None), (1, 31, 1, None), (1, 32, 1, None), (1, 33, 1, None),
             (1, 34, 100, None), (1, 134, 1, None), (0, 2, 1, None)]
    _check_attention(cl_rt, make_config(), 200, steps, params)


def test_attention_serial_other_shapes(cl_rt):
    """attend_one with no grouping and head_dim 128 with partial rotary, and with 2 query heads per KV head."""
    config = make_config(dim=512, n_heads=4, n_kv_heads=4, head_dim=128, rope_dim=32)
    steps = [(0, 0, 33, None), (0, 33, 1, None), (0, 34, 1, None), (0, 35, 1, None)]
    _check_attention(cl_rt, config, 64, steps, {"att_vec": 16, "att_serial": True})
    config = make_config(dim=256, n_heads=4, n_kv_heads=2, head_dim=64)
    steps = [(1, 0, 1, None), (1, 1, 16, None), (1, 17, 1, None)]
    _check_attention(cl_rt, config, 32, steps, {"att_vec": 8, "att_serial": True, "kv_half": True})


def test_attention_other_shapes(cl_rt):
    """Multi-head (no grouping), head_dim 128 with partial rotary, and 2 query heads per KV head."""
    config = make_config(dim=512, n_heads=4, n_kv_heads=4, head_dim=128, rope_dim=32)
    steps = [(0, 0, 33, None), (0, 33, 1, None), (0, 34, 5, 3), (0, 39, 1, 2)]
    _check_attention(cl_rt, config, 64, steps, {"att_vec": 8, "att_rows": 8})
    config = make_config(dim=256, n_heads=4, n_kv_heads=2, head_dim=64)
    steps = [(1, 0, 7, None), (1, 7, 2, None), (1, 9, 1, 2)]
    _check_attention(cl_rt, config, 32, steps, {"att_vec": 4, "att_wg": 16, "kv_half": True})


@pytest.mark.parametrize("lanes, wg, vec", [(2, 32, 4), (4, 64, 8), (16, 128, 4)])
def test_attention_key_lanes_shapes(cl_rt, lanes, wg, vec):
    """Decode scored by several work-items per key: head_dim 128 (more vectors than lanes) and 64,
    grouped queries, slices shorter than a block and passes that end inside the block."""
    config = make_config(dim=512, n_heads=4, n_kv_heads=4, head_dim=128, rope_dim=32)
    steps = [(0, 0, 45, None), (0, 45, 1, None), (0, 46, 1, 3), (0, 47, 1, 5), (0, 48, 1, None)]
    _check_attention(cl_rt, config, 64, steps, {"att_vec": vec, "att_wg": wg, "att_key_lanes": lanes,
                                                "split_min_chunk": 8, "split_wgs": 64})
    config = make_config(dim=256, n_heads=6, n_kv_heads=2, head_dim=64)
    steps = [(1, 0, 7, None), (1, 7, 1, None), (1, 8, 1, 2), (1, 9, 1, 4), (1, 10, 1, None)]
    _check_attention(cl_rt, config, 32, steps, {"att_vec": vec, "att_wg": wg, "att_key_lanes": lanes,
                                                "kv_half": True})


def test_attention_rejects_positions_past_the_context(cl_rt):
    from perfx.engine.errors import PerfxError

    ops = fused_ops(cl_rt, make_config(), ctx=16)
    out = cl_rt.empty(4 * 576)
    qkv = cl_rt.to_device(np.zeros((1, 960), np.float32))
    with pytest.raises(PerfxError):
        ops.attention(qkv, 1, 0, 16, out)
    with pytest.raises(PerfxError):
        ops.attention(qkv, 1, 2, 0, out)


@pytest.mark.parametrize("kv_half", [False, True])
@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_attention_split_kv_merged_by_the_last_slice(cl_rt, params, kv_half):
    """split_combine: the split-KV steps of test_attention_split_kv with no combine launch, the last
    work-group of each (query tile, KV head) merging the slices; its counters end at zero each time."""
    params = {**(params or {}), "kv_half": kv_half, "split_wgs": 24, "split_combine": True}
    steps = [(0, 0, 126, None), (0, 126, 5, 2), (0, 131, 300, None), (0, 431, 300, None),
             (0, 731, 300, None), (0, 1031, 1, None), (0, 1032, 1, 1), (0, 1033, 1, 7), (0, 1034, 3, 5),
             (0, 1037, 8, 16), (0, 1045, 1, 32), (1, 0, 700, None), (1, 700, 2, 3)]
    ops = _check_attention(cl_rt, make_config(), 1100, steps, params, seed=2)
    assert not cl_rt.read(ops.split_done, ops.params["split_max_t"] * ops.config.n_kv_heads, np.int32).any()
