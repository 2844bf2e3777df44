"""Each kernel described once (engine/backends/opencl/specs.py): the declarations agree with the kernel
sources and the operators' defaults, and a configuration the device cannot hold is refused before launch."""
from __future__ import annotations

import re

import pytest

from perfx.engine.backends.opencl import specs
from perfx.engine.backends.opencl.sources import kernel_source
from perfx.engine.errors import PerfxError

SOURCES = sorted({f for s in specs.SPECS.values() for f in s.sources})
SMOLLM = dict(HEAD_DIM=64, N_KV_HEADS=3, GROUP=3, ATT_WG=128, VW=4, KV_HALF=False)
LLAMA8B = dict(HEAD_DIM=128, N_KV_HEADS=8, GROUP=4, ATT_WG=128, VW=4, KV_HALF=False)   # GQA group of 4


@pytest.mark.parametrize("name", sorted(specs.SPECS))
def test_every_declared_define_is_read_by_its_kernel(name):
    spec = specs.SPECS[name]
    for file in spec.sources:
        source = kernel_source(file.removesuffix(".cl"))       # with its headers
        for define in [p.define for p in spec.params if p.define] + list(spec.model_defines):
            assert re.search(rf"\b{define}\b", source), f"{define} is declared for {name} but {file} never reads it"
    for p in spec.params:
        assert not p.candidates or p.default in p.candidates, f"{p.key}: default {p.default} not among its candidates"


@pytest.mark.parametrize("source", SOURCES)
def test_no_kernel_source_repeats_a_declared_default(source):
    """A tunable's default lives in specs.py only: the .cl file (or a header it includes) refuses a build
    without it."""
    text = kernel_source(source.removesuffix(".cl"))
    for define in specs.source_defaults(source):
        if specs.source_defaults(source)[define] is False:   # a flag: absent means off
            continue
        assert not re.search(rf"#define\s+{define}\s+\S", text), f"{source} repeats the default of {define}"
        guard = rf"#(ifndef {define}|if .*!defined\({define}\).*)\n#error"
        assert re.search(guard, text), f"{source} builds without {define}"


def test_a_kernel_with_several_sources_declares_its_defaults_for_each():
    assert specs.GEMV.sources == ("gemv.cl", "gemv_int.cl")
    for source in specs.GEMV.sources:
        assert {"VEC", "KSPLIT", "WG_ROWS", "TPW"} <= set(specs.source_defaults(source))


def test_operator_defaults_come_from_the_specs():
    from perfx.engine.backends.opencl import fused, matmul

    assert fused.DEFAULT_PARAMS == specs.defaults("fused")
    assert matmul.DEFAULT_PARAMS == specs.defaults("matmul")
    assert set(specs.search_space("attention")) == {"att_wg", "att_vec", "att_key_lanes", "att_rows", "att_serial"}


def test_attention_local_memory_of_a_large_query_tile():
    """Prefill tiles at head_dim 128 with a GQA group of 4 (32 query rows) need about 34 KiB."""
    need = specs.ATTENTION.local_bytes({**LLAMA8B, "QT": 8})
    assert 32 * 1024 < need < 36 * 1024
    assert specs.ATTENTION.local_bytes({**SMOLLM, "QT": 8}) < 32 * 1024


def test_a_configuration_over_the_local_memory_limit_is_refused_by_name():
    specs.check_fits("attention", {**LLAMA8B, "QT": 8}, local_mem=64 * 1024, max_work_group=1024)
    with pytest.raises(PerfxError, match=r"attention \(attention.cl\).*local memory.*32768.*att_rows"):
        specs.check_fits("attention", {**LLAMA8B, "QT": 8}, local_mem=32 * 1024, max_work_group=1024)
    with pytest.raises(PerfxError, match=r"gemm_tiled.*work-groups of 256 work-items, more than the device's 128"):
        specs.check_fits("gemm_tiled", dict(BN=64, BT=64, RR=4, TR=4, X_LOCAL=0), local_mem=1 << 20,
                         max_work_group=128)
    with pytest.raises(PerfxError, match="ATT_WG is a multiple of VW"):
        specs.check_fits("attention", {**SMOLLM, "QT": 1, "ATT_WG": 70}, local_mem=1 << 20, max_work_group=1024)


class SmallDevice:
    """An OpenCL device that reports 32 KiB of local memory, as Adreno and Mali GPUs do."""

    local_mem_size = 32 * 1024

    def __init__(self, device):
        self._device = device

    def __getattr__(self, name):
        return getattr(self._device, name)


def test_fused_ops_refuse_a_device_without_the_local_memory_before_any_launch():
    cl = pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.fused import FusedOps
    from perfx.engine.backends.opencl.runtime import Runtime
    from tests.test_cl_fused import _pick_device, make_config

    device = _pick_device()
    if device is None:
        pytest.skip("no usable OpenCL CPU device")
    rt = Runtime(device)
    config = make_config(dim=4096, n_heads=32, n_kv_heads=8, head_dim=128)
    FusedOps(rt, config, 64, 1)                    # fits the real device
    rt.device = SmallDevice(device)
    with pytest.raises(PerfxError, match=r"attention.*QT=8.*more than the device's 32768"):
        FusedOps(rt, config, 64, 1)
    FusedOps(rt, config, 64, 1, {"att_rows": 16})   # a smaller query tile fits
    assert cl is not None


def test_declared_traffic_of_a_decode_step():
    """SmolLM2-135M's QKV GEMV (960 x 576, int4, groups of 32): the weights, x and y once; 2 N K FLOPs."""
    nbytes, flops = specs.GEMV.cost(T=1, N=960, K=576)
    assert nbytes == 960 * 576 // 2 + 960 * 18 * 4 + 4 * (576 + 960) and flops == 2 * 960 * 576
    assert specs.GEMM_TILED.cost(T=256, N=960, K=576, bits=8)[0] == 960 * 576 + 960 * 18 * 2 + 4 * 256 * 1536
    nbytes, flops = specs.ATTENTION.cost(T=1, S=1000, n_heads=9, n_kv_heads=3, head_dim=64, kv_bytes=2)
    assert nbytes == 2 * 1000 * 3 * 64 * 2 + 8 * 9 * 64 and flops == 4 * 1000 * 9 * 64
    with pytest.raises(PerfxError, match="rmsnorm declares no traffic"):
        specs.RMSNORM.cost(T=1)


def _cpu_runtime():
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.runtime import Runtime
    from tests.test_cl_fused import _pick_device

    device = _pick_device()
    if device is None:
        pytest.skip("no usable OpenCL CPU device")
    return Runtime(device), device


class TinyLocalDevice(SmallDevice):
    """A device with 1 KiB of local memory per work-group."""

    local_mem_size = 1024


def test_gemv_over_the_local_memory_limit_is_refused_before_it_is_built(monkeypatch):
    """K split across 16 work-items in work-groups of 8 rows: 2 KiB of partial sums, over a 1 KiB device."""
    import numpy as np

    from perfx.engine.backends.opencl.matmul import DeviceMatrix, Matmul
    from perfx.engine.quant.quantize import quantize_int4

    rt, device = _cpu_runtime()
    w = DeviceMatrix.from_int4(rt, *quantize_int4(np.ones((64, 128), np.float32), 32), 32)
    x, y = rt.to_device(np.ones((1, 128), np.float32)), rt.empty(4 * 64)
    mm = Matmul(rt, {"gemv_ksplit": 16, "gemv_wg_rows": 8, "gemv_int_dot": False})
    mm.linear(x, w, 1, y)                                 # fits the real device
    rt.device = TinyLocalDevice(device)
    builds = []
    monkeypatch.setattr(rt, "program", lambda *a, **k: builds.append(a) or pytest.fail("built"))
    mm = Matmul(rt, {"gemv_ksplit": 16, "gemv_wg_rows": 8, "gemv_int_dot": False})
    with pytest.raises(PerfxError, match=r"gemv \(gemv.cl, gemv_int.cl\) with .*KSPLIT=16.*needs 2048 bytes of "
                                         r"local memory per work-group, more than the device's 1024; lower gemv_ksplit"):
        mm.linear(x, w, 1, y)
    assert builds == []


@pytest.mark.parametrize("params, message", [
    ({"att_vec": 12}, "VW is 4, 8 or 16 and divides HEAD_DIM"),
    ({"att_wg": 72}, "ATT_WG is a multiple of VW and of HEAD_DIM / VW"),
    ({"rms_wg": 48}, r"rmsnorm \(rmsnorm.cl\) with RMS_WG=48: RMS_WG is a power of two"),
    ({"argmax_wg": 96}, "ARGMAX_WG is a power of two"),
])
def test_fused_ops_take_their_rules_from_the_specs(params, message):
    from perfx.engine.backends.opencl.fused import FusedOps
    from tests.test_cl_fused import make_config

    rt, _ = _cpu_runtime()
    with pytest.raises(PerfxError, match=message):
        FusedOps(rt, make_config(dim=256, n_heads=4, n_kv_heads=2, head_dim=64), 16, 1, params)


def test_gemm_mma_tiles_are_checked_by_the_spec():
    specs.check_fits("gemm_mma", dict(BN=128, BT=128, WM=32, WN=64), local_mem=48 * 1024, max_work_group=1024)
    assert specs.GEMM_MMA.local_bytes(dict(BN=128, BT=128, WM=32, WN=64)) == 2 * 256 * 72
    with pytest.raises(PerfxError, match=r"gemm_mma .*needs 36864 bytes of local memory .* 32768; lower mma_bn"):
        specs.check_fits("gemm_mma", dict(BN=128, BT=128, WM=32, WN=64), local_mem=32 * 1024, max_work_group=1024)
    with pytest.raises(PerfxError, match="BN % WM, BT % WN, WM % 16 and WN % 8 are 0"):
        specs.check_rules("gemm_mma", dict(BN=128, BT=128, WM=24, WN=64))
