"""Device discovery and selection, the bandwidth cache, the tuned-parameter database, memory checks.

Most tests run on stand-in devices (enumerate_devices and the build probe replaced), so they pass on
any machine; those that touch real OpenCL skip without it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from perfx.engine.backends.opencl import bandwidth as bw
from perfx.engine.backends.opencl import devices as dev
from perfx.engine.backends.opencl import drivers
from perfx.engine.errors import PerfxError

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def fake_info(p: int = 0, d: int = 0, kind: str = "cpu", name: str = "pthread-test", **kw) -> dev.DeviceInfo:
    fields = {
        "platform_index": p, "platform_name": "Portable Computing Language",
        "platform_version": "OpenCL 3.0 PoCL 3.1+debian  Linux, Release", "device_index": d, "name": name,
        "vendor": "AuthenticAMD", "type": kind, "global_mem": 8 * GiB, "max_alloc": 2 * GiB, "compute_units": 2,
        "max_work_group_size": 4096, "local_mem": 256 << 10, "has_images": True, "image1d_buffer_max": 1 << 27,
        "has_fp16": False, "driver_version": "3.1+debian",
    }
    return dev.DeviceInfo(**{**fields, **kw})


@pytest.fixture(autouse=True)
def fresh_probe_cache():
    dev.clear_caches()
    yield
    dev.clear_caches()


@pytest.fixture
def machine(monkeypatch):
    """A stand-in machine: a GPU that cannot build, two CPUs of which the first cannot build."""
    found = [
        (fake_info(0, 0, "gpu", "Fake GPU", vendor="NVIDIA Corporation", platform_name="NVIDIA CUDA",
                   platform_version="OpenCL 3.0 CUDA 12.8.90", architecture="sm_90"), "gpu0"),
        (fake_info(1, 0, "cpu", "pthread-AMD EPYC", platform_version="OpenCL 3.0 PoCL 3.0-rc2  Linux"), "cpu-broken"),
        (fake_info(2, 0, "cpu", "pthread-skylake-avx512-AMD EPYC"), "cpu-good"),
    ]
    failures = {"gpu0": "error: no sm_90 in this build", "cpu-broken": "error: unknown target CPU 'generic'"}
    calls: list[str] = []

    def build_probe(device):
        calls.append(device)
        return failures.get(device)

    monkeypatch.setattr(dev, "enumerate_devices", lambda: found)
    monkeypatch.setattr(dev, "_build_probe", build_probe)
    return found, failures, calls


def real_devices() -> list[dev.DeviceInfo]:
    infos = dev.list_devices()
    if not infos:
        pytest.skip("no OpenCL device on this machine")
    return infos


# ---- discovery and selection on this machine --------------------------------------------------------


def test_list_devices_on_this_machine():
    infos = real_devices()
    assert len({i.id for i in infos}) == len(infos)
    for info in infos:
        assert info.id == f"opencl:{info.platform_index}:{info.device_index}"
        assert info.type in ("gpu", "cpu", "accelerator")
        assert info.global_mem > 0 and 0 < info.max_alloc <= info.global_mem
        assert info.compute_units > 0 and info.max_work_group_size > 0
        assert info.has_images or info.image1d_buffer_max == 0
        assert info.platform_label and info.label.startswith(info.id)


def test_select_auto_on_this_machine():
    infos = real_devices()
    sel = dev.select("auto")
    if sel.backend == "numpy":
        assert sel.notices and all("cannot build kernels" in n for n in sel.notices)
        return
    assert sel.info in infos and dev.probe(sel.device) is None
    debian = [i for i in infos if "debian" in i.platform_version.lower()]
    intel = [i for i in infos if drivers.driver_of(i.platform_name) == "intel"]
    if debian and not intel and not any(i.type == "gpu" for i in infos):
        assert "debian" in sel.info.platform_version.lower()
    if intel and drivers.preference()[0][0] == "intel" and not any(i.type == "gpu" for i in infos):
        assert drivers.driver_of(sel.info.platform_name) == "intel"
    chosen = sel.notices.index(f"running on {sel.info.label}")
    for notice in sel.notices[:chosen]:       # devices tried before the chosen one
        assert "cannot build kernels" in notice and notice.endswith("trying the next device")
    for notice in sel.notices[chosen + 1:]:   # a faster driver to install
        assert notice.endswith(drivers.INTEL_EXTRA)
    assert sel.runtime() is sel.runtime()


def test_broken_pocl_is_refused_with_its_build_error():
    """pip's PoCL 3.0 cannot build kernels on some CPUs: selecting it gives a one-line error. Run where the
    ICD loader lists every driver (OCL_ICD_VENDORS set to the vendors directory, which perfx leaves as the
    user set it), in a fresh process since a process lists its platforms once."""
    code = (
        "from perfx.engine.backends.opencl import devices as dev\n"
        "from perfx.engine.errors import PerfxError\n"
        "broken = [i for i in dev.list_devices() if '3.0-rc' in i.platform_version]\n"
        "if not broken:\n"
        "    print('none')\n"
        "else:\n"
        "    try:\n"
        "        dev.select(broken[0].id)\n"
        "    except PerfxError as e:\n"
        "        print('refused', broken[0].id, '|', e)\n"
        "    else:\n"
        "        print('builds', broken[0].label)\n"
    )
    env = dict(os.environ, OCL_ICD_VENDORS="/etc/OpenCL/vendors")
    env.pop("OCL_ICD_FILENAMES", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr
    result = out.stdout.strip().splitlines()[-1]
    if result == "none":
        pytest.skip("pip's PoCL 3.0 is not installed here")
    if result.startswith("builds"):
        pytest.skip(f"{result[7:]} builds kernels on this CPU")
    device, message = result[len("refused "):].split(" | ", 1)
    assert device in message and "cannot build kernels" in message and "available:" in message


def test_select_numpy_touches_no_opencl(monkeypatch):
    monkeypatch.setattr(dev, "enumerate_devices", lambda: pytest.fail("numpy must not list devices"))
    sel = dev.select("numpy")
    assert sel.backend == "numpy" and sel.device is None and sel.notices == [] and sel.description == "numpy"


def test_select_out_of_range_lists_devices():
    with pytest.raises(PerfxError) as e:
        dev.select("opencl:99:0")
    message = str(e.value)
    assert "\n" not in message
    if dev.list_devices():
        assert "opencl:99:0" in message and "available:" in message and "numpy" in message
        assert all(i.id in message for i in dev.list_devices())
    else:
        assert "no OpenCL platform" in message


def test_unknown_spec():
    with pytest.raises(PerfxError, match="unknown device 'tpu'"):
        dev.select("tpu")


# ---- selection on stand-in machines ---------------------------------------------------------------


def _no_platform(monkeypatch, how: str) -> None:
    if how == "no pyopencl":
        monkeypatch.setattr(dev, "_opencl", lambda: None)
        return
    cl = pytest.importorskip("pyopencl")
    if how == "no platform":
        monkeypatch.setattr(cl, "get_platforms", list)
    else:
        def raise_not_found():
            raise RuntimeError("clGetPlatformIDs failed: PLATFORM_NOT_FOUND_KHR")
        monkeypatch.setattr(cl, "get_platforms", raise_not_found)


@pytest.mark.parametrize("how", ["no pyopencl", "no platform", "platform not found"])
def test_no_opencl_falls_back_to_numpy(monkeypatch, how):
    _no_platform(monkeypatch, how)
    assert dev.list_devices() == []
    sel = dev.select("auto")
    assert sel.backend == "numpy"
    if how == "no pyopencl":                  # the extra that brings it, not a system package
        assert sel.notices == ["pyopencl is not installed (pip install 'perfx-llm[opencl]' gets OpenCL and a CPU "
                               "driver): using NumPy, many times slower"]
    else:
        assert sel.notices == ["no OpenCL platform found (install pocl-opencl-icd or your GPU's driver): using NumPy"]
    for spec in ("opencl", "gpu", "cpu", "opencl:0:0"):
        with pytest.raises(PerfxError, match="pyopencl is not installed" if how == "no pyopencl"
                           else "no OpenCL platform found"):
            dev.select(spec)


def test_build_failure_falls_back_to_the_next_device(machine, monkeypatch):
    *_, calls = machine
    monkeypatch.setattr(drivers, "cpu_vendor", lambda: "ARM")
    sel = dev.select("auto")
    assert sel.backend == "opencl" and sel.device == "cpu-good" and sel.info.id == "opencl:2:0"
    assert sel.notices == [
        ("opencl:0:0 (Fake GPU, CUDA 12.8.90) cannot build kernels: error: no sm_90 in this build; "
         "trying the next device"),
        ("opencl:1:0 (pthread-AMD EPYC, PoCL 3.0-rc2) cannot build kernels: error: unknown target CPU 'generic'; "
         "trying the next device"),
        "running on opencl:2:0 (pthread-skylake-avx512-AMD EPYC, PoCL 3.1+debian)",
    ]
    assert dev.select("opencl").device == "cpu-good"
    assert dev.select("cpu").device == "cpu-good"
    assert calls == ["gpu0", "cpu-broken", "cpu-good"]          # probed once per process


def test_explicit_spec_that_cannot_build_raises(machine):
    with pytest.raises(PerfxError) as e:
        dev.select("gpu")
    assert "opencl:0:0 (Fake GPU, CUDA 12.8.90) cannot build kernels: error: no sm_90" in str(e.value)
    assert "available: opencl:0:0 (Fake GPU, gpu), opencl:1:0" in str(e.value) and "numpy" in str(e.value)
    with pytest.raises(PerfxError, match="unknown target CPU 'generic'"):
        dev.select("opencl:1:0")
    assert dev.select("OpenCL:2:0").device == "cpu-good"


def test_auto_with_only_an_accelerator_uses_numpy(monkeypatch):
    monkeypatch.setattr(dev, "enumerate_devices", lambda: [(fake_info(kind="accelerator", name="FPGA emu"), "fpga")])
    monkeypatch.setattr(dev, "_build_probe", lambda device: None)
    assert dev.select("auto").notices == ["no OpenCL GPU or CPU found: using NumPy"]
    with pytest.raises(PerfxError, match=r"no OpenCL GPU found; available: opencl:0:0 \(FPGA emu, accelerator\)"):
        dev.select("gpu")
    assert dev.select("opencl:0:0").device == "fpga"


def test_auto_with_no_device_that_builds_uses_numpy(machine):
    _, failures, _ = machine
    failures["cpu-good"] = "error: out of resources"
    sel = dev.select("auto")
    assert sel.backend == "numpy"
    assert sel.notices[-1] == ("opencl:2:0 (pthread-skylake-avx512-AMD EPYC, PoCL 3.1+debian) cannot build kernels: "
                               "error: out of resources; using NumPy")
    with pytest.raises(PerfxError, match="cannot build kernels"):
        dev.select("opencl")


def test_first_log_line_of_a_pyopencl_build_error():
    text = ("clBuildProgram failed: BUILD_PROGRAM_FAILURE - clBuildProgram failed: BUILD_PROGRAM_FAILURE\n\n"
            "Build on <pyopencl.Device 'pthread-AMD EPYC' on 'Portable Computing Language' at 0x5623>:\n\n"
            "warning: something harmless\nerror: unknown target CPU 'generic'\n"
            "Device pthread-AMD EPYC failed to build the program\n\n(options: -I /x/pyopencl/cl)")
    assert dev.first_log_line(text) == "error: unknown target CPU 'generic'"
    wrapped = "pthread-AMD EPYC: building kernel copy.cl failed: " + " | ".join(text.splitlines()[:6])
    assert dev.first_log_line(wrapped) == "error: unknown target CPU 'generic'"
    assert dev.first_log_line(" | ".join(text.splitlines()[:5])) == "warning: something harmless"
    assert dev.first_log_line("clCreateContext failed: DEVICE_NOT_AVAILABLE") == (
        "clCreateContext failed: DEVICE_NOT_AVAILABLE")


# ---- memory and threads -------------------------------------------------------------------------


def test_check_memory_message():
    info = fake_info(name="Tiny GPU", kind="gpu", global_mem=4 * GiB, max_alloc=1 * GiB)
    dev.check_memory(info, 3 * GiB, "the model", largest_bytes=GiB)
    with pytest.raises(PerfxError) as e:
        dev.check_memory(info, 6 * GiB, "llama-8b (Q4_1, ctx 2048)")
    assert str(e.value) == "opencl:0:0 (Tiny GPU) has 4,096 MiB of memory; llama-8b (Q4_1, ctx 2048) needs 6,144 MiB"
    with pytest.raises(PerfxError, match="at most 1,024 MiB in one buffer; the model needs a buffer of 1,500 MiB"):
        dev.check_memory(info, 2 * GiB, "the model", largest_bytes=1500 << 20)


def test_set_cpu_threads_before_and_after_initialisation(monkeypatch):
    for name in dev.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dev, "opencl_initialised", lambda: False)
    dev.set_cpu_threads(3)
    assert all(os.environ[name] == "3" for name in dev.THREAD_VARIABLES)
    monkeypatch.setattr(dev, "opencl_initialised", lambda: True)
    dev.set_cpu_threads(3)                                          # what PoCL already has: fine
    with pytest.raises(PerfxError, match="already initialised"):
        dev.set_cpu_threads(1)
    with pytest.raises(PerfxError, match="at least 1"):
        dev.set_cpu_threads(0)


def test_set_cpu_threads_reaches_pocl():
    code = ("from perfx.engine.backends.opencl import devices as d; d.set_cpu_threads(1); "
            "print([i.compute_units for i in d.list_devices() if 'Portable' in i.platform_name])")
    env = {k: v for k, v in os.environ.items() if k not in dev.THREAD_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    if not counts:
        pytest.skip("no PoCL platform here")
    assert set(counts) == {1}


# ---- bandwidth -----------------------------------------------------------------------------------


def test_bandwidth_is_measured_once_then_read_from_devices_json(monkeypatch, tmp_path):
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(bw, "measure_bandwidth", lambda device: calls.append(device) or 12.5e9)
    info = fake_info()
    assert bw.bandwidth(info, measure=False) is None
    assert bw.bandwidth(info) == 12.5e9 and bw.bandwidth(info) == 12.5e9
    assert calls == [info]
    data = json.loads((tmp_path / "devices.json").read_text())
    (entry,) = data.values()
    assert entry["copy_bandwidth"] == 12.5e9 and "measured_at" in entry
    assert bw.bandwidth(fake_info(compute_units=1), measure=False) is None     # another thread count
    assert bw.bandwidth(fake_info(driver_version="3.2"), measure=False) is None
    assert bw.bandwidth(info, measure=False) == 12.5e9


def test_bandwidth_measured_before_the_boot_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    values = iter([30e9, 20e9])
    monkeypatch.setattr(bw, "measure_bandwidth", lambda device: next(values))
    info = fake_info()
    assert bw.bandwidth(info) == 30e9
    monkeypatch.setattr(bw, "boot_time", lambda: 4e9)         # the machine booted after that figure
    assert bw.bandwidth(info, measure=False) is None
    assert bw.bandwidth(info) == 20e9                          # a lower figure after a reboot stands


def test_a_fresh_bandwidth_keeps_the_best_figure_since_boot(monkeypatch, tmp_path):
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    values = iter([20e9, 30e9, 25e9])
    monkeypatch.setattr(bw, "measure_bandwidth", lambda device: next(values))
    info = fake_info()
    assert bw.bandwidth(info) == 20e9
    assert bw.bandwidth(info, fresh=True) == 30e9             # measured under less load: it beats the cache
    assert bw.bandwidth(info, fresh=True) == 30e9             # 25 measured under load: the best one stays
    assert bw.bandwidth(info, measure=False) == 30e9


def test_bandwidth_survives_a_corrupt_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    (tmp_path / "devices.json").write_text("{not json")
    monkeypatch.setattr(bw, "measure_bandwidth", lambda device: 1e9)
    assert bw.bandwidth(fake_info()) == 1e9
    assert len(json.loads((tmp_path / "devices.json").read_text())) == 1


def test_measure_bandwidth_on_a_real_device(monkeypatch, tmp_path):
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    real_devices()
    try:
        sel = dev.select("opencl")
    except PerfxError as e:
        pytest.skip(str(e))
    value = bw.measure_bandwidth(sel.device, nbytes=4 << 20, runs=3)
    assert 1e8 < value < 1e14


# ---- perfx devices ----------------------------------------------------------------------------------


def test_devices_command_table(machine, monkeypatch, tmp_path, capsys):
    from perfx.cli.devices_cmd import devices_command

    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    monkeypatch.setattr(bw, "measure_bandwidth", lambda device: 44.9e9)
    devices_command()
    out = capsys.readouterr().out
    assert "opencl:0:0" in out and "opencl:2:0" in out and "numpy" in out
    assert "44.9" in out and "PoCL 3.0-rc2" in out and "CUDA 12.8.90" in out
    assert "opencl:1:0: cannot build kernels: error: unknown target CPU 'generic'" in out
    devices_command(measure=False)
    assert "44.9" in capsys.readouterr().out


def test_devices_show_their_keys_and_how_they_are_tuned(machine, monkeypatch, tmp_path, capsys):
    import datetime

    from perfx.cli.devices_cmd import devices_command, devices_json
    from perfx.engine.backends.opencl import tuning
    from rich.console import Console

    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    monkeypatch.setattr(bw, "measure_bandwidth", lambda device: 44.9e9)
    devices_command(measure=False)
    out = capsys.readouterr().out
    assert "nvidia / sm_90" in out and "gpu.nvidia.default" in out and "amd / —" in out
    assert "perfx tune 20" not in out and out.count("no perfx tune file") == 3
    cpu = dev.enumerate_devices()[2][0]
    tuning.write_override(cpu, "matmul", {"gemv_wg_rows": 4})
    devices_command(measure=False)
    assert f"perfx tune {datetime.date.today().isoformat()}" in capsys.readouterr().out
    rows = json.loads(devices_json(dev.enumerate_devices(), False, Console(stderr=True)))
    assert rows[0]["architecture"] == "sm_90" and rows[0]["tuned"] is False
    assert rows[0]["tuning"]["levels"] == ["gpu.default", "gpu.nvidia.default"]
    assert rows[2]["tuned"] is True and rows[2]["tuning"]["override_date"] == datetime.date.today().isoformat()
    assert rows[2]["tuning"]["override"] == str(tuning.override_path(cpu)) and rows[2]["tuning"]["vendor"] == "amd"


def test_setup_icd_keeps_the_loader_to_the_one_system_pocl(tmp_path, monkeypatch):
    for name in ("OCL_ICD_VENDORS", "OCL_ICD_FILENAMES"):
        monkeypatch.delenv(name, raising=False)
    system = tmp_path / "vendors"
    system.mkdir()
    (system / "pocl.icd").write_text("libpocl.so.2.10.0\n")
    drivers.setup_icd(tmp_path / "mine", system)
    assert os.environ["OCL_ICD_VENDORS"] == str(system / "pocl.icd")

    monkeypatch.delenv("OCL_ICD_VENDORS")
    (system / "nvidia.icd").write_text("libnvidia-opencl.so.1\n")   # a GPU's driver too: all of them
    drivers.setup_icd(tmp_path / "mine", system)
    assert "OCL_ICD_VENDORS" not in os.environ

    (system / "pocl.icd").unlink()                                  # one driver, not PoCL
    drivers.setup_icd(tmp_path / "mine", system)
    assert "OCL_ICD_VENDORS" not in os.environ

    monkeypatch.setenv("OCL_ICD_FILENAMES", "/opt/x/libOpenCL-vendor.so")   # the user's choice stands
    (system / "nvidia.icd").write_text("libpocl.so.2\n")
    drivers.setup_icd(tmp_path / "mine", system, intel=tmp_path / "libintelocl.so")
    assert "OCL_ICD_VENDORS" not in os.environ


def test_setup_icd_adds_intels_runtime_beside_the_systems_drivers(tmp_path, monkeypatch):
    for name in ("OCL_ICD_VENDORS", "OCL_ICD_FILENAMES"):
        monkeypatch.delenv(name, raising=False)
    system, mine = tmp_path / "vendors", tmp_path / "mine"
    system.mkdir()
    (system / "pocl.icd").write_text("libpocl.so.2.10.0\n")
    mine.mkdir()
    (mine / "old-driver.icd").write_text("/gone/libold.so\n")        # from an earlier set-up: removed
    (system / "nvidia.icd").write_text("libnvidia-opencl.so.1\n")
    intel = tmp_path / "lib" / "libintelocl.so"
    drivers.setup_icd(mine, system, intel=intel)
    assert os.environ["OCL_ICD_VENDORS"] == str(mine)
    assert {p.name: p.read_text().strip() for p in mine.glob("*.icd")} == {
        "pocl.icd": "libpocl.so.2.10.0", "nvidia.icd": "libnvidia-opencl.so.1", "perfx-intel-cpu.icd": str(intel)}



def test_intel_library_is_found_in_the_environment(tmp_path):
    assert drivers.intel_library(tmp_path) is None
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libintelocl.so").write_bytes(b"")
    assert drivers.intel_library(tmp_path) == tmp_path / "lib" / "libintelocl.so"


def test_auto_prefers_the_faster_cpu_driver_and_names_the_command_for_it(monkeypatch):
    pocl = (fake_info(0, 0, "cpu", "pthread-x"), "pocl")
    intel = (fake_info(1, 0, "cpu", "Intel Xeon", platform_name="Intel(R) OpenCL",
                       platform_version="OpenCL 3.1 LINUX", driver_version="2026.22.10.0.01_160000"), "intel")
    monkeypatch.setattr(dev, "_build_probe", lambda device: None)
    monkeypatch.setattr(drivers, "intel_x86_linux", lambda: True)
    monkeypatch.setattr(drivers, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(dev, "enumerate_devices", lambda: [pocl, intel])
    sel = dev.select("auto")
    assert sel.device == "intel" and sel.notices == ["running on opencl:1:0 (Intel Xeon, Intel OpenCL 2026.22.10.0.01)"]
    assert dev.select("cpu").device == "intel" and dev.select("opencl:0:0").device == "pocl"

    monkeypatch.setattr(dev, "enumerate_devices", lambda: [pocl])     # only PoCL: the command that gets Intel's
    sel = dev.select("auto")
    assert sel.device == "pocl" and sel.notices[-1].endswith("pip install 'perfx-llm[intel]'")
    assert "2.0x faster at prefill" in sel.notices[-1]

    monkeypatch.setattr(drivers, "cpu_vendor", lambda: "")            # ARM and others: PoCL, no hint
    assert dev.select("auto").notices == ["running on opencl:0:0 (pthread-x, PoCL 3.1+debian)"]
    monkeypatch.setattr(drivers, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(drivers, "intel_x86_linux", lambda: False)    # not where pip has Intel's runtime
    assert len(dev.select("auto").notices) == 1


def test_pip_pocl_names_the_faster_system_pocl():
    """On Debian/Ubuntu, running on the PoCL that pip installs names the one command for the system's."""
    from perfx.engine.backends.opencl import drivers

    pocl = "Portable Computing Language"
    hint = drivers.distro_pocl_hint(pocl, "OpenCL 3.0 PoCL 3.0-rc2  Linux, Release", debian=True)
    assert hint and "apt-get install pocl-opencl-icd" in hint
    assert drivers.distro_pocl_hint(pocl, "OpenCL 3.0 PoCL 3.1+debian  Linux", debian=True) is None
    assert drivers.distro_pocl_hint(pocl, "OpenCL 3.0 PoCL 3.0-rc2  Linux", debian=False) is None
    assert drivers.distro_pocl_hint("NVIDIA CUDA", "OpenCL 3.0 CUDA 13.0", debian=True) is None
