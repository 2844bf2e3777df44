"""The tuner: candidates checked and timed, the winner written where later runs read it."""
from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

import pytest

pytest.importorskip("pyopencl")

ROOT = Path(__file__).resolve().parents[1]


def load_tuner():
    spec = importlib.util.spec_from_file_location("tune", ROOT / "scripts" / "tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tuner_writes_an_override_that_params_for_reads(tmp_path, monkeypatch):
    from engine.backends.opencl import devices, matmul, tuning
    from engine.errors import PerfxError

    try:
        devices.select("opencl")
    except PerfxError as e:
        pytest.skip(f"no usable OpenCL device: {e}")
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    tune = load_tuner()
    # a small search: two GEMV work-group shapes, against a current setting that cannot run (so that
    # one of the two must win, whatever the timings)
    monkeypatch.setattr(tune, "GROUPS", {"gemv": ("gemv", 1, {"gemv_wg_rows": [2, 4]})})
    monkeypatch.setitem(matmul.DEFAULT_PARAMS, "gemv_wg_rows", 0)
    tune.tune(Namespace(device="opencl", threads=None, shapes="64x96", group_size=32, only="gemv", dry_run=False))
    sel = devices.select("opencl")
    override = tuning.load_override(sel.info)
    assert override["matmul"]["gemv_wg_rows"] in (2, 4)
    params = tuning.params_for(sel.info, "matmul", matmul.DEFAULT_PARAMS)
    assert params["gemv_wg_rows"] == override["matmul"]["gemv_wg_rows"]
