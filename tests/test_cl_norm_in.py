"""The GEMV with its input's RMSNorm in the prologue (kernels/norm_in.h, gemv_norm_in) against a float64
NumPy oracle, and a decode with it on against one without.

As in test_cl_matmul.py, every output is poisoned before the run and followed by a guard region that
must come back untouched; sizes are odd (rows not a multiple of the work-group's, K with every tail
chunk), x has a mean away from zero so that wrong int4 zero terms show.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

cl = pytest.importorskip("pyopencl")

from tests.test_cl_matmul import (GPU_LIKE, GUARD, SENTINEL, assert_close, f16, rand_int4, rand_int8,  # noqa: E402
                                  rt, silu_mul)

EPS = 1e-5
NVIDIA_LIKE = {"gemv_vec": 4, "gemv_ksplit": 64, "gemv_wg_rows": 2, "gemv_zero_inline": True, "use_image": True}


def matrix(rt, fmt: str, N: int, K: int, G: int, rng):
    """(DeviceMatrix, its float64 weights [N, K])."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    if fmt == "int4":
        parts, w = rand_int4(rng, N, K, G)
        return DeviceMatrix.from_int4(rt, *parts, G), w
    if fmt == "int8":
        parts, w = rand_int8(rng, N, K)
        return DeviceMatrix.from_q8(rt, *parts), w.reshape(N, K)
    w = f16(rng.standard_normal((N, K)))
    return DeviceMatrix.from_f16(rt, w), w.astype(np.float64)


def rmsnorm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def run_norm_in(rt, mm, dm, x: np.ndarray, norm_w: np.ndarray, cols: int, op: str,
                y0: np.ndarray | None = None) -> np.ndarray:
    """The product of rmsnorm(x) * norm_w, normalised by the GEMV itself, into a poisoned output with a
    guard region; x must come back as it went in."""
    from perfx.engine.backends.opencl.matmul import NormIn

    T = x.shape[0]
    y = np.full(T * cols + GUARD, SENTINEL, np.float32)
    y[:T * cols] = np.nan if y0 is None else y0.reshape(-1)
    xb = rt.to_device(x.astype(np.float32))
    yb = cl.Buffer(rt.ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=y)
    norm = NormIn(rt.to_device(norm_w.astype(np.float32)), EPS)
    if op == "swiglu":
        mm.swiglu(xb, dm, T, yb, scheme="gemv", norm_in=norm)
    else:
        mm.linear(xb, dm, T, yb, accumulate=y0 is not None, scheme="gemv", norm_in=norm)
    got = rt.read(yb, y.shape)
    assert np.all(got[T * cols:] == SENTINEL), "write past the end of the output"
    np.testing.assert_array_equal(rt.read(xb, x.shape), x.astype(np.float32))
    return got[:T * cols].reshape(T, cols)


CASES = [
    # fmt, N, K, G, T, op, params
    ("int4", 577, 608, 32, 1, "linear", {}),                     # CPU layout (the int-dot GEMV set aside)
    ("int4", 512, 256, 32, 1, "linear", {}),                     # two chunks, 8 rows of work-items
    ("int4", 1024, 256, 32, 2, "swiglu", {"gemv_wg_rows": 4}),
    ("int4", 577, 608, 32, 3, "linear", NVIDIA_LIKE),            # K split 64, image asked for: plain x
    ("int4", 1032, 1536, 64, 1, "swiglu", NVIDIA_LIKE),
    ("int4", 1001, 1536, 128, 2, "linear", {**GPU_LIKE, "gemv_tpw": 3}),
    ("int4", 584, 576, 32, 1, "swiglu", {**GPU_LIKE, "gemv_zero_inline": False}),   # inline zeros forced
    ("int4", 577, 608, 32, 1, "linear", {"gemv_vec": 4, "gemv_ksplit": 16, "gemv_wg_rows": 3}),  # 48 items
    ("int4", 577, 608, 32, 2, "linear", {**NVIDIA_LIKE, "gemv_norm_stage": False}),  # x * w per load
    ("int4", 584, 576, 64, 1, "swiglu", {"gemv_norm_stage": False}),
    ("int8", 577, 608, 32, 1, "linear", {}),
    ("int8", 263, 256, 32, 1, "linear", {"gemv_norm_stage": False}),
    ("int8", 577, 608, 32, 2, "linear", NVIDIA_LIKE),
    ("f16", 577, 608, 0, 1, "linear", {"gemv_norm_stage": False}),
    ("f16", 584, 608, 0, 3, "swiglu", GPU_LIKE),
]


@pytest.mark.parametrize("fmt,N,K,G,T,op,params", CASES)
def test_gemv_normalises_its_input(rt, fmt, N, K, G, T, op, params):
    from perfx.engine.backends.opencl.matmul import Matmul

    rng = np.random.default_rng(zlib.crc32(f"{fmt} {N} {K} {G} {T} {op} {sorted(params.items())}".encode()))
    dm, w = matrix(rt, fmt, N, K, G, rng)
    x = rng.standard_normal((T, K)) * rng.uniform(0.5, 8, (T, 1)) + 0.5   # rows of different scales
    norm_w = rng.uniform(0.5, 1.5, K)
    mm = Matmul(rt, {**params, "gemv_norm_in": True})
    want = rmsnorm(x, norm_w) @ w.T
    if op == "swiglu":
        assert_close(run_norm_in(rt, mm, dm, x, norm_w, N // 2, op), silu_mul(want))
    else:
        assert_close(run_norm_in(rt, mm, dm, x, norm_w, N, op), want)


@pytest.mark.parametrize("K,params", [(608, NVIDIA_LIKE), (256, NVIDIA_LIKE), (256, {**GPU_LIKE, "gemv_tpw": 2}),
                                      (608, {}), (256, {})])
def test_normalised_product_accumulates(rt, K, params):
    from perfx.engine.backends.opencl.matmul import Matmul

    rng = np.random.default_rng(K)
    dm, w = matrix(rt, "int4", 577, K, 32, rng)
    x, norm_w = rng.standard_normal((2, K)) + 0.5, rng.uniform(0.5, 1.5, K)
    y0 = rng.standard_normal((2, 577)).astype(np.float32)
    got = run_norm_in(rt, Matmul(rt, params), dm, x, norm_w, 577, "linear", y0)
    assert_close(got, y0 + rmsnorm(x, norm_w) @ w.T)


def test_prologue_only_in_the_gemv(rt):
    from perfx.engine.backends.opencl.matmul import Matmul, NormIn
    from perfx.engine.errors import PerfxError

    rng = np.random.default_rng(1)
    dm, _ = matrix(rt, "int4", 64, 128, 32, rng)
    mm = Matmul(rt)
    x, y = rt.empty(4 * 4 * 128), rt.empty(4 * 4 * 64)
    with pytest.raises(PerfxError, match="prologue only"):
        mm.linear(x, dm, 4, y, scheme="few", norm_in=NormIn(rt.to_device(np.ones(128, np.float32)), EPS))


# ---- a decode step with the norms in the GEMVs, against one without --------------------------------

# The GPU layout of the GEMV (narrow pieces, K split, inline int4 zero terms, no norm epilogue), forced
# on the CPU device, with and without the norms in the prologue.
GPU_DECODE = {"gemv_vec": 4, "gemv_ksplit": 16, "gemv_wg_rows": 2, "gemv_zero_inline": True,
              "gemv_norm": False, "gemv_int_dot": False}


@pytest.fixture
def gemv_params(monkeypatch):
    """set(params): OpenCL models loaded after it take these matmul and fused parameters over the
    device's."""
    from perfx.engine.backends.opencl import matmul, tuning

    params_for, forced = tuning.params_for, {}

    def with_forced(info, kernel, *args, **kwargs):
        params = params_for(info, kernel, *args, **kwargs)
        mine = {k: v for k, v in forced.items() if (k in matmul.DEFAULT_PARAMS) == (kernel == "matmul")}
        return {**params, **mine}

    monkeypatch.setattr(tuning, "params_for", with_forced)
    return lambda params: (forced.clear(), forced.update(params))


def count_launches(monkeypatch) -> list[str]:
    """The names of the kernels launched from now on (through either way pyopencl enqueues)."""
    names: list[str] = []
    enqueue, call = cl.enqueue_nd_range_kernel, cl.Kernel.__call__

    def recording(queue, kernel, *rest, **kw):
        names.append(kernel.function_name)
        return enqueue(queue, kernel, *rest, **kw)

    def calling(kernel, queue, *rest, **kw):
        names.append(kernel.function_name)
        return call(kernel, queue, *rest, **kw)

    monkeypatch.setattr(cl, "enqueue_nd_range_kernel", recording)
    monkeypatch.setattr(cl.Kernel, "__call__", calling)
    return names


@pytest.mark.parametrize("spec,params", [(dict(qtype="Q4_0", tied=True), GPU_DECODE),
                                         (dict(qtype="Q4_1", tied=False, n_layers=3), GPU_DECODE),
                                         (dict(qtype="Q4_0", tied=True, dim=256, ffn_dim=512), {})])
def test_decode_with_norms_in_the_gemvs(tmp_path, gemv_params, spec, params):
    """Same logits (to float rounding) and the same greedy tokens with gemv_norm_in as without; in the
    GPU layout each decode step makes 2 launches per layer and the first norm's fewer. ({}: the CPU's
    own layout, whose norms are already in the GEMVs' epilogues and whose GEMVs take x in int16 blocks
    without gemv_norm_in: the tolerance of the model tests against NumPy.)"""
    from perfx.engine import load_model
    from tests.conftest import TinySpec, write_tiny_gguf

    tiny = TinySpec(ctx_len=128, seed=17, **spec)
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, tiny)
    ids = np.random.default_rng(2).integers(0, 200, 23)
    runs = {}
    for norm_in in (False, True):
        gemv_params({**params, "gemv_norm_in": norm_in})
        t = load_model(path, device="opencl", ctx=128).transformer
        assert t.backend.matmul.params["gemv_norm_in"] is norm_in
        prompt = t.forward(ids, 0, all_logits=False)
        steps = [t.forward(np.array([tok]), len(ids) + i) for i, tok in enumerate([5, 77, 140])]
        with pytest.MonkeyPatch.context() as mp:
            launches = count_launches(mp)
            greedy = list(t.greedy(np.array([9]), len(ids) + 3, 12))
        runs[norm_in] = prompt, steps, greedy, len(launches)
    (p0, s0, g0, n0), (p1, s1, g1, n1) = runs[False], runs[True]
    scale = np.abs(p0).max()
    np.testing.assert_allclose(p1, p0, atol=1e-4 * scale, rtol=0)        # the prompt: the same path
    for a, b in zip(s0, s1):
        np.testing.assert_allclose(b, a, atol=(1e-4 if params else 2e-3) * np.abs(a).max(), rtol=0)
    assert g1 == g0
    if params:
        assert n0 - n1 == 12 * (2 * tiny.n_layers + 1)


def test_serving_steps_with_norms_in_the_gemvs(tmp_path, gemv_params, exact_kv):
    """Serving's steps (the GEMV over several tokens, paged attention) with gemv_norm_in agree with
    NumPy; the logits rows read the normalised stream through the norm kernel."""
    from perfx.engine import load_model
    from tests.conftest import write_tiny_gguf
    from tests.test_paged import SPEC, run_paged, token_ids

    path = tmp_path / "gqa.gguf"
    write_tiny_gguf(path, SPEC)
    gemv_params({**GPU_DECODE, "gemv_norm_in": True})
    ref, dev = load_model(path, device="numpy", ctx=256), load_model(path, device="opencl", ctx=256)
    ids = token_ids(ref.config.vocab_size)
    for (_, want), (_, got) in zip(run_paged(ref, ids), run_paged(dev, ids)):
        np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_decode_with_split_attention_merged_in_attend(tmp_path, gemv_params):
    """Past the split-KV threshold, split_combine gives the logits of the combine launch it replaces
    (the same arithmetic) and one launch fewer per layer and step."""
    from perfx.engine import load_model
    from tests.conftest import TinySpec, write_tiny_gguf

    tiny = TinySpec(qtype="Q4_0", ctx_len=512, seed=19, n_layers=3)
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, tiny)
    ids = np.random.default_rng(3).integers(0, 200, 300)
    runs = {}
    for merged in (False, True):
        gemv_params({**GPU_DECODE, "gemv_norm_in": True, "att_serial": False, "split_wgs": 16, "kv_half": False,
                     "split_combine": merged})
        t = load_model(path, device="opencl", ctx=512).transformer
        t.forward(ids, 0, all_logits=False)
        assert t.backend.fused.splits_for(1, 301) > 1
        with pytest.MonkeyPatch.context() as mp:
            launches = count_launches(mp)
            steps = [t.forward(np.array([tok]), 300 + i) for i, tok in enumerate([5, 77, 140])]
        runs[merged] = steps, launches
    (s0, l0), (s1, l1) = runs[False], runs[True]
    for a, b in zip(s0, s1):
        np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max(), rtol=0)
    assert l0.count("combine") == 3 * tiny.n_layers and "combine" not in l1
    assert len(l0) - len(l1) == 3 * tiny.n_layers
