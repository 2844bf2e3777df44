"""The GEMV's warp layout (gemv_prefetch, gemv_reduce, gemv_waves: kernels/gemv_tiles.h WALK128,
gemv_kernel.h, lane_xor.h) against a float64 NumPy oracle, and a decode with it against the shipped GPU
layout.

Here (PoCL) every option that runs on a CPU runs: pieces loaded PREFETCH at a time, the partial sums by
the tree, through local memory once, or by the butterfly exchange emulated through local memory ("xor":
shfl.sync's order without the instruction), and whole waves of work-groups looping over the rows. On an
NVIDIA device (PERFX_TEST_CL_PLATFORM=nvidia) the PTX reduction ("shfl") runs too; here its probe
fails and the layout falls back to "once". As in test_cl_matmul.py, every output is poisoned before the
run and followed by a guard region that must come back untouched; sizes are odd (rows not a multiple of
the work-group's, K with 64- and 32-element tails), x has a mean away from zero so that wrong int4 zero
terms show.
"""
from __future__ import annotations

import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

cl = pytest.importorskip("pyopencl")

from tests.test_cl_matmul import _qtensor, assert_close, oracle, rt, run, silu_mul  # noqa: E402, F401 (rt: fixture)
from tests.test_cl_norm_in import (count_launches, gemv_params, matrix, rmsnorm,  # noqa: E402, F401
                                   run_norm_in)

# Layouts that run on a CPU: the H200 candidate (a warp per row tile, 4 pieces in flight, local memory
# once), the emulated butterfly with an odd prefetch and one wave, x's group sums from xsum with two
# tiles per work-item and pieces of 8, and prefetch with the tree.
LAYOUTS = {
    "warp-once": {"gemv_vec": 4, "gemv_ksplit": 32, "gemv_wg_rows": 2, "gemv_prefetch": 4, "gemv_reduce": "once",
                  "gemv_zero_inline": True, "use_image": True},
    "xor-prefetch3-waves": {"gemv_vec": 4, "gemv_ksplit": 8, "gemv_wg_rows": 4, "gemv_prefetch": 3,
                            "gemv_reduce": "xor", "gemv_zero_inline": True, "gemv_waves": 1},
    "once-xsum-tpw2-vec8": {"gemv_vec": 8, "gemv_ksplit": 4, "gemv_wg_rows": 3, "gemv_tpw": 2, "gemv_prefetch": 2,
                            "gemv_reduce": "once", "gemv_zero_inline": False, "gemv_waves": 2},
    "tree-prefetch2-waves": {"gemv_vec": 4, "gemv_ksplit": 16, "gemv_wg_rows": 2, "gemv_prefetch": 2,
                             "gemv_reduce": "tree", "gemv_zero_inline": True, "gemv_waves": 1},
}
# The layout for NVIDIA: 4 warps per work-group, one row tile each, 4 pieces of 64 bytes in flight per
# work-item, shfl.sync.
WARP_PTX = {"gemv_vec": 4, "gemv_ksplit": 32, "gemv_wg_rows": 4, "gemv_prefetch": 4, "gemv_reduce": "shfl"}

CASES = [
    # fmt, N, K, G, T, op
    ("int4", 37, 608, 32, 1, "linear"),        # K = 4*128 + 64 + 32: both tails; N not a multiple of 4
    ("int4", 301, 1536, 32, 3, "linear"),      # 12 chunks: several prefetch rounds, the last one partial
    ("int4", 245, 448, 64, 1, "linear"),
    ("int4", 101, 1280, 128, 2, "linear"),
    ("int4", 2 * 36, 352, 32, 1, "swiglu"),
    ("int4", 2 * 140, 576, 64, 3, "swiglu"),
    ("int4", 2 * 20, 640, 128, 1, "geglu"),
    ("int4", 99, 608, 32, 2, "accumulate"),
    ("int8", 77, 608, 32, 1, "linear"),        # formats without prefetch: the plain walk, same reduction
    ("int8", 2 * 40, 352, 32, 2, "swiglu"),
    ("f16", 45, 576, 0, 1, "accumulate"),
]


def _expect(op: str, x: np.ndarray, w: np.ndarray, y0: np.ndarray | None) -> np.ndarray:
    want = oracle(x, w)
    if op in ("swiglu", "geglu"):
        gate, up = np.split(want, 2, axis=-1)
        return (silu_mul(want) if op == "swiglu"
                else 0.5 * gate * (1 + np.tanh(0.7978845608 * (gate + 0.044715 * gate ** 3))) * up)
    return want + (y0 if y0 is not None else 0)


def _product(rt, mm, fmt, N, K, G, T, op):
    rng = np.random.default_rng(zlib.crc32(f"{fmt} {N} {K} {G} {T} {op}".encode()))
    dm, w = matrix(rt, fmt, N, K, G, rng)
    x = rng.standard_normal((T, K)) + 0.5
    cols = N // 2 if op in ("swiglu", "geglu") else N
    y0 = rng.standard_normal((T, N)).astype(np.float32) if op == "accumulate" else None
    got = run(rt, mm, dm, x, cols, op="linear" if op == "accumulate" else op, y0=y0, scheme="gemv")
    assert_close(got, _expect(op, x, w, y0))


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=list(LAYOUTS))
def mm_warp(rt, request):
    from perfx.engine.backends.opencl.matmul import Matmul

    return Matmul(rt, LAYOUTS[request.param])


@pytest.mark.parametrize("fmt,N,K,G,T,op", CASES)
def test_warp_layout_against_numpy(rt, mm_warp, fmt, N, K, G, T, op):
    _product(rt, mm_warp, fmt, N, K, G, T, op)


@pytest.mark.parametrize("qtype", ["Q4_K", "BF16"])
def test_warp_layout_other_weight_forms(rt, mm_warp, qtype):
    """int4 with float32 scales (K-quants) takes the prefetching walk; bf16 the plain one."""
    from perfx.engine.backends.opencl.matmul import DeviceMatrix

    from perfx.engine.formats.tensors import QTensor
    from tests.conftest import random_blocks

    rng = np.random.default_rng(5)
    t = (QTensor("t", qtype, (132, 512), random_blocks(qtype, (132, 512), rng, 1.0)) if qtype == "Q4_K"
         else _qtensor("t", qtype, rng.standard_normal((132, 512))))
    dm = DeviceMatrix.from_qtensors(rt, [t])
    x = rng.standard_normal((2, 512))
    assert_close(run(rt, mm_warp, dm, x, 132, scheme="gemv"), oracle(x, t.dequantize().astype(np.float64)))


@pytest.mark.parametrize("G,T,op,stage", [(32, 1, "linear", True), (64, 2, "swiglu", True),
                                          (128, 1, "linear", False), (32, 3, "swiglu", False)])
def test_warp_layout_normalises_its_input(rt, G, T, op, stage):
    """gemv_norm_in's prologue (norm_in.h) in every CPU layout: x * w / rms staged in local memory or
    scaled per load; int4 zero terms inline."""
    from perfx.engine.backends.opencl.matmul import Matmul

    N, K = (2 * 148, 576) if op == "swiglu" else (301, 608 if G == 32 else 1280)
    rng = np.random.default_rng(G + T)
    dm, w = matrix(rt, "int4", N, K, G, rng)
    x = rng.standard_normal((T, K)) * rng.uniform(0.5, 8, (T, 1)) + 0.5
    norm_w = rng.uniform(0.5, 1.5, K)
    want = rmsnorm(x, norm_w) @ w.T
    for params in LAYOUTS.values():
        mm = Matmul(rt, {**params, "gemv_norm_in": True, "gemv_norm_stage": stage})
        got = run_norm_in(rt, mm, dm, x, norm_w, N // 2 if op == "swiglu" else N, op)
        assert_close(got, silu_mul(want) if op == "swiglu" else want)


def test_shfl_falls_back_where_ptx_is_not_built(rt, capsys):
    """Where the compiler does not take the inline PTX (PoCL), gemv_reduce "shfl" fails its probe at
    load, says so in one line, and the partial sums meet in local memory once."""
    from perfx.engine.backends.opencl.matmul import Matmul

    if "nvidia" in rt.device.platform.name.lower():
        pytest.skip("NVIDIA devices take the PTX")
    mm = Matmul(rt, WARP_PTX)
    assert mm.params["gemv_reduce"] == "once"
    assert "shfl.sync reduction is not used" in capsys.readouterr().err
    _product(rt, mm, "int4", 301, 1536, 32, 1, "linear")


def test_layout_checks(rt):
    from perfx.engine.backends.opencl import specs
    from perfx.engine.backends.opencl.matmul import Matmul
    from perfx.engine.errors import PerfxError

    with pytest.raises(PerfxError, match="gemv_reduce must be one of"):
        Matmul(rt, {"gemv_reduce": "warp"})
    with pytest.raises(PerfxError, match="fills whole warps"):
        specs.check_rules("gemv", {"VEC": 4, "KSPLIT": 16, "WG_ROWS": 1, "TPW": 1, "PREFETCH": 4,
                                   **specs.GEMV_REDUCE["shfl"]})


def test_off_by_default_everywhere():
    """No device's entry in kernels/tuning.toml asks for the warp layout: the GEMV every device runs is
    the one it ran before."""
    import re
    from importlib import resources

    from perfx.engine.backends.opencl.matmul import DEFAULT_PARAMS

    off = {"gemv_prefetch": 1, "gemv_reduce": "tree", "gemv_waves": 0}
    assert {k: DEFAULT_PARAMS[k] for k in off} == off
    text = resources.files("perfx.kernels").joinpath("tuning.toml").read_text()
    assert not re.search(r"^\s*(gemv_prefetch|gemv_reduce|gemv_waves)\s*=", text, re.M)


@pytest.mark.skipif(not (shutil.which("clang-15") and shutil.which("ptxas")), reason="needs clang-15 and ptxas")
def test_shfl_ptx_assembles_for_sm_90():
    """The inline PTX of the shfl reduction is valid PTX for sm_90 (scripts/ptxas_gemv_warp.sh: clang-15,
    llc, ptxas), 5 exchanges for each of the 4 rows of a tile."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "ptxas_gemv_warp.sh"
    done = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Function properties for gemv" in done.stdout, done.stdout + done.stderr
    assert "shfl.sync: 20 " in done.stdout


# ---- on NVIDIA: the PTX reduction ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mm_ptx(rt):
    from tests.conftest import nvidia_matmul

    mm = nvidia_matmul(rt, **WARP_PTX)
    assert mm.params["gemv_reduce"] == "shfl", "the shfl.sync reduction failed its probe on an NVIDIA device"
    return mm


@pytest.mark.parametrize("fmt,N,K,G,T,op", CASES + [("int4", 12288, 4096, 32, 1, "linear"),
                                                   ("int4", 2 * 11008, 4096, 32, 1, "swiglu")])
def test_warp_layout_ptx(rt, mm_ptx, fmt, N, K, G, T, op):
    _product(rt, mm_ptx, fmt, N, K, G, T, op)


def test_warp_layout_ptx_normalises_its_input(rt, mm_ptx):
    from perfx.engine.backends.opencl.matmul import Matmul

    rng = np.random.default_rng(3)
    dm, w = matrix(rt, "int4", 2 * 148, 4096, 32, rng)
    x, norm_w = rng.standard_normal((1, 4096)) + 0.5, rng.uniform(0.5, 1.5, 4096)
    mm = Matmul(rt, {**mm_ptx.params, "gemv_norm_in": True})
    assert_close(run_norm_in(rt, mm, dm, x, norm_w, 148, "swiglu"), silu_mul(rmsnorm(x, norm_w) @ w.T))


# ---- a decode with the warp layout forced on the CPU device, against the shipped GPU layout ---------------

# NVIDIA's shipped GEMV layout (kernels/tuning.toml), with its norms in the GEMVs' prologues.
SHIPPED_GPU = {"gemv_vec": 4, "gemv_ksplit": 64, "gemv_wg_rows": 2, "gemv_zero_inline": True, "use_image": True,
               "gemv_norm": False, "gemv_int_dot": False, "gemv_norm_in": True}


@pytest.mark.parametrize("layout,spec", [("warp-once", dict(qtype="Q4_0", tied=True)),
                                         ("xor-prefetch3-waves", dict(qtype="Q4_1", tied=False, n_layers=3)),
                                         ("once-xsum-tpw2-vec8", dict(qtype="Q4_0", tied=True, dim=256, ffn_dim=512))])
def test_decode_with_the_warp_layout(tmp_path, gemv_params, layout, spec):
    """The same logits (1e-4 of their largest) and greedy tokens as the shipped GPU layout, with the
    same launches per step (besides xsum, where a layout takes the int4 zero terms from x's group sums)."""
    from perfx.engine import load_model
    from tests.conftest import TinySpec, write_tiny_gguf

    tiny = TinySpec(ctx_len=128, seed=23, **spec)
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, tiny)
    ids = np.random.default_rng(4).integers(0, 200, 23)
    runs = []
    for params in (SHIPPED_GPU, {**SHIPPED_GPU, **LAYOUTS[layout]}):
        gemv_params(params)
        t = load_model(path, device="opencl", ctx=128).transformer
        assert t.backend.matmul.params["gemv_reduce"] == params.get("gemv_reduce", "tree")
        prompt = t.forward(ids, 0, all_logits=False)
        steps = [t.forward(np.array([tok]), len(ids) + i) for i, tok in enumerate([5, 77, 140])]
        with pytest.MonkeyPatch.context() as mp:
            launches = count_launches(mp)
            greedy = list(t.greedy(np.array([9]), len(ids) + 3, 12))
        runs.append((prompt, steps, greedy, [n for n in launches if n != "xsum"]))
    (p0, s0, g0, n0), (p1, s1, g1, n1) = runs
    np.testing.assert_allclose(p1, p0, atol=1e-4 * np.abs(p0).max(), rtol=0)
    for a, b in zip(s0, s1):
        np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max(), rtol=0)
    assert g1 == g0 and n1 == n0
