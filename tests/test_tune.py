"""The tuner (`perfx tune`): candidates checked and timed, the winner written where later runs read it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pyopencl")

ROOT = Path(__file__).resolve().parents[1]


def opencl_selection():
    from perfx.engine.backends.opencl import devices
    from perfx.engine.errors import PerfxError

    try:
        return devices.select("opencl")
    except PerfxError as e:
        pytest.skip(f"no usable OpenCL device: {e}")


def test_tuner_writes_an_override_that_params_for_reads(tmp_path, monkeypatch):
    from perfx.engine.backends.opencl import matmul, tuner, tuning

    sel = opencl_selection()
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    # a small search: two GEMV work-group shapes, against a current setting that cannot run (so that
    # one of the two must win, whatever the timings)
    monkeypatch.setattr(tuner, "search_space", lambda kernel: {"gemv_wg_rows": (2, 4)})
    monkeypatch.setitem(matmul.DEFAULT_PARAMS, "gemv_wg_rows", 0)
    steps = []
    result = tuner.Tuner(sel, shapes=((64, 96),)).run(["gemv"], budget_s=600, on_step=lambda *a: steps.append(a))
    [g] = result.groups
    assert g.before_s is None and g.after_s is not None and g.tried == 2 and len(steps) == 2
    override = tuning.load_override(sel.info)
    assert override["matmul"]["gemv_wg_rows"] in (2, 4)
    assert tuning.params_for(sel.info, "matmul", matmul.DEFAULT_PARAMS)["gemv_wg_rows"] == \
        override["matmul"]["gemv_wg_rows"]
    text = result.path.read_text()
    assert "# measured " in text and sel.info.name in text and "perfx " in text
    assert tuning.is_tuned(sel.info)


def test_a_wrong_candidate_is_never_chosen(tmp_path, monkeypatch):
    from perfx.engine.backends.opencl import tuner

    sel = opencl_selection()
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    monkeypatch.setattr(tuner, "search_space", lambda kernel: {"gemv_wg_rows": (2, 4)})
    t = tuner.Tuner(sel, shapes=((64, 96),))
    real = t.time

    def wrong_when_four(params, scheme, T):     # a candidate whose results are wrong: as if it were refused
        return None if params["gemv_wg_rows"] == 4 else real(params, scheme, T)

    monkeypatch.setattr(t, "time", wrong_when_four)
    result = t.run(["gemv"], budget_s=600, write=False)
    assert result.groups[0].chosen["gemv_wg_rows"] != 4 and result.path is None


def test_each_group_gets_a_share_of_the_budget(monkeypatch):
    """A budget that the first group's candidates could spend alone still reaches every group: each has
    an equal share of the time left when it starts."""
    from types import SimpleNamespace

    from perfx.engine.backends.opencl import tuner

    sel = opencl_selection()
    spaces = {"gemv": {"gemv_wg_rows": (1, 2, 4, 8)}, "gemm_few": {"few_tt": (2, 4, 8)},
              "gemm_tiled": {"tiled_bn": (16, 32, 64)}}
    monkeypatch.setattr(tuner, "search_space", lambda kernel: spaces[kernel])
    t = tuner.Tuner(sel, shapes=((64, 96),))
    now = [0.0]

    def timed(params, scheme, T):                 # every timing takes 10 s of a fake clock
        now[0] += 10
        return 1.0

    monkeypatch.setattr(t, "time", timed)
    monkeypatch.setattr(tuner, "time", SimpleNamespace(monotonic=lambda: now[0]))
    result = t.run(["gemv", "few", "tiled"], budget_s=60, write=False)
    assert [g.tried for g in result.groups] == [2, 1, 1]


def test_perfx_tune_is_read_by_the_next_run(tmp_path, monkeypatch, tiny_gguf):
    """`perfx tune --device cpu --budget 30 -m tiny.gguf` on an empty PERFX_HOME (a search of two GEMV
    work-group shapes against a current setting that cannot run, so that one of them must win) writes the
    device's file; the next `perfx run`, a new process, resolves its parameters with the file's values
    and says so."""
    from typer.testing import CliRunner

    from perfx.cli.main import app
    from perfx.engine.backends.opencl import matmul, tuner, tuning

    from perfx.engine.dirs import kernel_cache_dir

    sel = opencl_selection()
    path, *_ = tiny_gguf
    shared = kernel_cache_dir()                   # the compiled kernels of earlier runs: not what this tests
    shared.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cl-cache").symlink_to(shared, target_is_directory=True)
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    monkeypatch.setattr(tuner, "search_space", lambda kernel: {"gemv_wg_rows": (2, 4)})
    monkeypatch.setitem(matmul.DEFAULT_PARAMS, "gemv_wg_rows", 0)
    result = CliRunner().invoke(app, ["tune", "--device", "cpu", "--budget", "30", "--kernels", "gemv",
                                      "-m", str(path)])
    assert result.exit_code == 0, result.output
    assert "written to" in result.output and "128x64" in result.output       # the tiny model's shapes
    written = tuning.load_override(sel.info)["matmul"]
    assert set(written) == {"gemv_wg_rows"} and written["gemv_wg_rows"] in (2, 4)
    assert not list((tmp_path / "tuning").glob(".*.tmp"))                   # written through a rename

    env = {**os.environ, "PERFX_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "perfx.cli", "run", "the thin", "-m", str(path), "--device", "cpu",
                          "--raw", "--temp", "0", "-n", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    said = "".join(run.stderr.split())           # the notice as printed, wrapped to the terminal's width
    assert "tunedbyperfxtuneon" in said
    assert f"gemv_wg_rows={written['gemv_wg_rows']}({tuning.override_path(sel.info)})" in said


@pytest.mark.slow
def test_perfx_tune_for_a_new_user_is_read_by_the_next_run(tmp_path):
    """`perfx tune --device cpu --budget ...` on a fresh PERFX_HOME: it writes the override, `perfx devices`
    then shows the device tuned, and the backend of the next run is built with the tuned values."""
    opencl_selection()
    env = {**os.environ, "PERFX_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "perfx.cli", "tune", "--device", "cpu", "--budget", "20",
                          "--kernels", "gemv"], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr
    assert "written to" in run.stdout and "gemv" in run.stdout
    check = ("from perfx.engine.backends import open_backend; from perfx.engine.backends.opencl import tuning; "
             "b, _ = open_backend('cpu'); from perfx.engine.backends.opencl.devices import select; "
             "o = tuning.load_override(select('cpu').info)['matmul']; "
             "print(all(b.params['matmul'][k] == v for k, v in o.items()), sorted(o))")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.startswith("True ['gemv_ksplit', 'gemv_vec', 'gemv_wg_rows']"), out.stderr
    devices = subprocess.run([sys.executable, "-m", "perfx.cli", "devices", "--json", "--no-measure"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert '"tuned": true' in devices.stdout
