"""The tuning database (kernels/tuning.toml, engine/backends/opencl/tuning.py): keyed device type -> vendor
-> architecture -> device name, each level with defaults, only measured entries, the tuner's file last."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from perfx.engine.backends.opencl import device_keys, tuning
from perfx.engine.backends.opencl.devices import DeviceInfo
from perfx.engine.errors import PerfxError

GiB = 1 << 30


def fake_info(kind: str = "cpu", name: str = "pthread-skylake-avx512-AMD EPYC", **kw) -> DeviceInfo:
    fields = {
        "platform_index": 0, "platform_name": "Portable Computing Language",
        "platform_version": "OpenCL 3.0 PoCL 3.1+debian  Linux, Release", "device_index": 0, "name": name,
        "vendor": "AuthenticAMD", "type": kind, "global_mem": 8 * GiB, "max_alloc": 2 * GiB, "compute_units": 2,
        "max_work_group_size": 4096, "local_mem": 256 << 10, "has_images": True, "image1d_buffer_max": 1 << 27,
        "has_fp16": False, "driver_version": "3.1+debian", "architecture": "avx512",
    }
    return DeviceInfo(**{**fields, **kw})


POCL_CPU = fake_info()
POCL_CPU_AVX2 = fake_info(name="pthread-haswell-AMD EPYC", architecture="avx2")
INTEL_CPU = fake_info(name="Intel(R) Xeon(R) Platinum 8480+", vendor="Intel(R) Corporation",
                      platform_name="Intel(R) OpenCL", driver_version="2026.22.10.0.01_160000")
H200 = fake_info("gpu", "NVIDIA H200", vendor="NVIDIA Corporation", platform_name="NVIDIA CUDA",
                 driver_version="580.159.04", architecture="sm_90")
H100 = fake_info("gpu", "NVIDIA H100 80GB HBM3", vendor="NVIDIA Corporation", platform_name="NVIDIA CUDA",
                 driver_version="580.159.04", architecture="sm_90")
UNKNOWN_GPU = fake_info("gpu", "Acme G1", vendor="Acme", platform_name="Acme OpenCL", architecture="")
MALI = fake_info("gpu", "Mali-G78", vendor="ARM", platform_name="ARM Platform", architecture="valhall")
RADEON = fake_info("gpu", "gfx1030", vendor="Advanced Micro Devices, Inc.",
                   platform_name="AMD Accelerated Parallel Processing", architecture="gfx1030")

# What kernels/tuning.toml gave each device before it was keyed by vendor and architecture (its layout
# of 2026-12-03, commits e2e0453 and 3e1eb05: [<type>.default], [<type>.vendor."<substring>"],
# [<type>.device."<substring>"]), computed once from that file: tuning.params_for(info, section, {}).
CPU_FUSED = {"att_vec": 16, "att_wg": 64, "kv_half": True, "att_serial": True}
GPU_MATMUL = {"gemv_norm": False, "gemv_int_dot": False}
NVIDIA_MATMUL = {
    **GPU_MATMUL, "gemv_vec": 4, "gemv_ksplit": 64, "gemv_wg_rows": 2, "gemv_zero_inline": True, "use_image": True,
    "few_vec": 4, "few_tt": 4, "few_wg_rows": 16, "tiled_vec": 4, "tiled_bn": 64, "tiled_bt": 32, "tiled_rr": 4,
    "tiled_tr": 4, "tiled_kc": 1, "tiled_x_local": 0, "gemm_mma": "ptx", "mma_min_tokens": 2, "mma_bn": 128,
    "mma_bt": 128, "mma_wm": 32, "mma_wn": 64}
NVIDIA_FUSED = {"attention_mma": "ptx", "att_mma_min_tokens": 64}
# Measured on the H200 since (kernels/tuning.toml's records): the decode launches and attention slices.
NVIDIA_MATMUL = {**NVIDIA_MATMUL, "gemv_norm_in": True}
NVIDIA_FUSED = {**NVIDIA_FUSED, "att_key_lanes": 8, "split_min_chunk": 32, "split_wgs": 1024, "rms_wg": 1024,
                "split_combine": True}
BEFORE = {
    "PoCL CPU (AVX-512)": (POCL_CPU, {}, CPU_FUSED),
    "PoCL CPU (AVX2)": (POCL_CPU_AVX2, {}, CPU_FUSED),
    "Intel CPU runtime": (INTEL_CPU, {}, CPU_FUSED),
    "NVIDIA H200": (H200, NVIDIA_MATMUL, NVIDIA_FUSED),
    "NVIDIA H100": (H100, NVIDIA_MATMUL, NVIDIA_FUSED),
    "unknown GPU": (UNKNOWN_GPU, GPU_MATMUL, {}),
    "Mali": (MALI, GPU_MATMUL, {}),
    "Radeon": (RADEON, GPU_MATMUL, {}),
}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PERFX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("device", sorted(BEFORE))
def test_each_device_gets_the_parameters_it_got_before(device):
    from perfx.engine.backends.opencl import fused, matmul

    info, want_matmul, want_fused = BEFORE[device]
    assert tuning.params_for(info, "matmul", {}) == want_matmul
    assert tuning.params_for(info, "fused", {}) == want_fused
    assert tuning.params_for(info, "matmul", matmul.DEFAULT_PARAMS) == {**matmul.DEFAULT_PARAMS, **want_matmul}
    assert tuning.params_for(info, "fused", fused.DEFAULT_PARAMS) == {**fused.DEFAULT_PARAMS, **want_fused}


def test_the_shipped_entries_say_where_they_were_measured():
    """Every entry below a type's default names the device, date and commit of each of its parameters."""
    db = tuning.load_database()
    entries = 0
    for kind, tree in db.items():
        for name, sections in tuning._levels_of(kind, tree, "kernels/tuning.toml"):
            for section, entry in sections.items():
                params = set(entry) - set(tuning.PROVENANCE)
                if name != f"{kind}.default":
                    assert "reason" not in entry and entry["measured"], f"[{name}.{section}]"
                if "reason" in entry:
                    continue
                covered = set()
                for record in entry["measured"]:
                    assert record["device"] and record["date"].year >= 2026 and re.fullmatch(r"[0-9a-f]{7,40}",
                                                                                            record["commit"])
                    covered |= set(record.get("params", params))
                assert params <= covered, f"[{name}.{section}]: {params - covered} not measured"
                entries += 1
    assert entries >= 2


DATABASE = """
[cpu.default.attention]
att_vec = 16
att_wg = 64
att_rows = 4
measured = {device = "a CPU", date = 2026-11-24, commit = "abcdef1"}

[cpu.default.gemv]
vec = 8
reason = "what a CPU builds"

[gpu.default.attention]
att_wg = 256
measured = {device = "a GPU", date = 2026-11-24, commit = "abcdef1"}

[cpu.amd.default.attention]
att_rows = 8
att_wg = 32
measured = {device = "an AMD CPU", date = 2026-11-25, commit = "abcdef2"}

[cpu.amd.avx512.default.attention]
att_rows = 16
measured = [{device = "an AVX-512 CPU", date = 2026-11-26, commit = "abcdef3"}]

[cpu.amd.avx512."PThread-Skylake-AVX512-AMD EPYC".attention]
kv_half = true
att_vec = 4
measured = [{device = "pthread-skylake-avx512-AMD EPYC", date = 2026-11-27, commit = "abcdef4", params = ["kv_half"]},
            {device = "pthread-skylake-avx512-AMD EPYC", date = 2026-11-28, commit = "abcdef5", params = ["att_vec"]}]

[cpu.amd.avx2.default.attention]
att_rows = 2
measured = {device = "an AVX2 CPU", date = 2026-11-26, commit = "abcdef3"}
"""


@pytest.fixture
def database(tmp_path) -> Path:
    path = tmp_path / "tuning.toml"
    path.write_text(DATABASE)
    return path


def test_each_level_over_the_one_before(database):
    defaults = {"att_vec": 4, "att_wg": 128, "att_rows": 32, "kv_half": False, "split_wgs": 0}
    assert tuning.params_for(POCL_CPU, "attention", defaults, database) == {
        "att_vec": 4,          # the device's entry over the type's default
        "att_wg": 32,          # the vendor's default over the type's
        "att_rows": 16,        # the architecture's default over the vendor's
        "kv_half": True,       # the device's, by its name in any case
        "split_wgs": 0,        # built-in default
    }
    assert [level.name for level in tuning.matching_levels(POCL_CPU, database)] == [
        "cpu.default", "cpu.amd.default", "cpu.amd.avx512.default", 'cpu.amd.avx512."PThread-Skylake-AVX512-AMD EPYC"']
    assert tuning.params_for(POCL_CPU_AVX2, "attention", defaults, database)["att_rows"] == 2   # another architecture
    other = fake_info(name="pthread-icelake-AMD EPYC")                     # same architecture, another name
    assert tuning.params_for(other, "attention", defaults, database) == {**defaults, "att_vec": 16, "att_wg": 32,
                                                                         "att_rows": 16}
    nameless = fake_info(architecture="")                                  # no architecture: nor its devices
    assert tuning.params_for(nameless, "attention", {}, database) == {"att_vec": 16, "att_wg": 32, "att_rows": 8}
    assert tuning.params_for(INTEL_CPU, "attention", {}, database) == {"att_vec": 16, "att_wg": 64, "att_rows": 4}
    assert tuning.params_for(H200, "attention", defaults, database) == {**defaults, "att_wg": 256}
    assert tuning.params_for(H200, "rmsnorm", {"rms_wg": 64}, database) == {"rms_wg": 64}
    assert tuning.params_for(POCL_CPU, "gemv", None, database) == {"vec": 8}       # no provenance keys

    tuning.write_override(POCL_CPU, "attention", {"att_wg": 16})               # the tuner's file: last
    assert tuning.params_for(POCL_CPU, "attention", defaults, database)["att_wg"] == 16
    assert tuning.params_for(fake_info(driver_version="4.0"), "attention", defaults, database)["att_wg"] == 32


@pytest.mark.parametrize("text, message", [
    ("[phone.default.gemv]\nvec = 4\nreason = 'x'\n", "not a device type"),
    ("[cpu.default]\nvec = 4\n", r"\[cpu.default.vec\] must be a table of parameters"),
    ("[cpu.amd]\nvec = 4\n", r"\[cpu.amd.vec\] must be a table"),
    ("[cpu.amd.default.gemv]\nvec = 4\n", r"\[cpu.amd.default.gemv\] does not say where vec was measured"),
    ("[cpu.default.gemv]\nvec = 4\n", r"\[cpu.default.gemv\] does not say where vec was measured"),
    ("[cpu.amd.default.gemv]\nvec = 4\nreason = 'fast'\n", "only a type's default may"),
    ("[cpu.amd.default.gemv]\nvec = 4\nmeasured = {device = 'x', date = 2026-11-24}\n", "each record needs"),
    ("[cpu.amd.default.gemv]\nvec = 4\nmeasured = {device = 'x', date = '2026-11-24', commit = 'a'}\n",
     "each record needs"),
    ("[cpu.amd.default.gemv]\nvec = 4\nwg = 2\nmeasured = {device = 'x', date = 2026-11-24, commit = 'a', "
     "params = ['vec']}\n", "does not say where wg was measured"),
    ("[cpu.amd.default.gemv]\nvec = 4\nmeasured = {device = 'x', date = 2026-11-24, commit = 'a', "
     "params = ['vec', 'wg']}\n", "measured names wg, which the entry does not set"),
    ("[cpu.amd.avx2.x.gemv]\nvec = [4]\nmeasured = {device = 'x', date = 2026-11-24, commit = 'a'}\n",
     r"\[cpu.amd.avx2.x.gemv\] must be a table of parameters"),
])
def test_a_bad_database_is_refused_by_its_place(tmp_path, text, message):
    path = tmp_path / "tuning.toml"
    path.write_text(text)
    with pytest.raises(PerfxError, match=message):
        tuning.params_for(POCL_CPU, "gemv", {}, path)


def test_vendor_params_read_a_vendors_default():
    from perfx.engine.backends.opencl import matmul

    params = tuning.vendor_params("gpu", "nvidia", "matmul", matmul.DEFAULT_PARAMS)
    assert params["gemv_ksplit"] == 64 and params["gemm_mma"] == "ptx" and "measured" not in params


# ---- the device's keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor, platform, key", [
    ("NVIDIA Corporation", "NVIDIA CUDA", "nvidia"),
    ("Advanced Micro Devices, Inc.", "AMD Accelerated Parallel Processing", "amd"),
    ("AuthenticAMD", "Portable Computing Language", "amd"),
    ("GenuineIntel", "Portable Computing Language", "intel"),
    ("Intel(R) Corporation", "Intel(R) OpenCL", "intel"),
    ("ARM", "ARM Platform", "arm"),
    ("QUALCOMM", "QUALCOMM Snapdragon(TM)", "qualcomm"),
    ("", "Apple", "apple"),
    ("Charm Labs", "Charm OpenCL", "charm-labs"),      # "arm" only as a word
])
def test_vendor_keys(vendor, platform, key):
    assert device_keys.vendor_key(vendor, platform) == key


class NvidiaDevice:
    compute_capability_major_nv = 9
    compute_capability_minor_nv = 0


class Unanswered:
    @property
    def compute_capability_major_nv(self):
        raise AttributeError("no cl_nv_device_attribute_query")


def test_architecture_keys():
    assert device_keys.architecture("gpu", "nvidia", "NVIDIA H200", NvidiaDevice()) == "sm_90"
    assert device_keys.architecture("gpu", "nvidia", "NVIDIA H200", Unanswered()) == ""
    assert device_keys.architecture("gpu", "amd", "gfx90a:sramecc+:xnack-") == "gfx90a"
    assert device_keys.architecture("gpu", "arm", "Mali-G78 r0p1") == "valhall"
    assert device_keys.architecture("gpu", "arm", "Mali-G76") == "bifrost"
    assert device_keys.architecture("gpu", "qualcomm", "QUALCOMM Adreno(TM) 740") == "adreno-7xx"
    assert device_keys.architecture("gpu", "intel", "Intel(R) Arc(TM) A770 Graphics") == "xe-hpg"
    assert device_keys.architecture("gpu", "acme", "Acme G1") == ""
    assert device_keys.architecture("cpu", "amd", "pthread-haswell") in ("avx512", "avx2", "sse4", "neon", "generic")
    assert device_keys.cpu_isa({"AVX512F": True, "AVX512BW": True, "AVX2": True, "FMA3": True}) == "avx512"
    assert device_keys.cpu_isa({"AVX512F": True, "AVX2": True, "FMA3": True}) == "avx2"
    assert device_keys.cpu_isa({"ASIMD": True}) == "neon"
    assert device_keys.cpu_isa({}) == "generic"


# ---- the tuner's file -----------------------------------------------------------------------------------


def test_write_override_is_atomic_and_merges(monkeypatch):
    info = POCL_CPU
    path = tuning.write_override(info, "attention", {"att_vec": 16, "att_wg": 64})
    assert path == tuning.override_path(info) and path.parent.name == "tuning"
    assert path.name == "portable-computing-language_pthread-skylake-avx512-amd-epyc_3.1+debian.toml"
    tuning.write_override(info, "gemv", {"vec": 16, "use_image": True, "scale": 0.5, "mode": 'a "b"'})
    tuning.write_override(info, "attention", {"att_vec": 8})     # replaces this kernel's entry only
    assert tuning.load_override(info) == {
        "attention": {"att_vec": 8},
        "gemv": {"vec": 16, "use_image": True, "scale": 0.5, "mode": 'a "b"'},
    }
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        tuning.write_override(info, "rmsnorm", {"rms_wg": 128})
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]       # no temporary file left


def test_bad_override_file_names_the_file():
    info = fake_info()
    path = tuning.override_path(info)
    path.parent.mkdir(parents=True)
    path.write_text("[attention\natt_vec = 16\n")
    with pytest.raises(PerfxError, match=re.escape(f"{path} is not valid TOML")):
        tuning.params_for(info, "attention", {})
    path.write_text("att_vec = 16\n")
    with pytest.raises(PerfxError, match=re.escape(str(path))):
        tuning.params_for(info, "attention", {})
    path.write_text("[attention]\natt_vec = [16, 8]\n")
    with pytest.raises(PerfxError, match=re.escape(str(path))):
        tuning.params_for(info, "attention", {})
    with pytest.raises(PerfxError, match="must be numbers, booleans or strings"):
        tuning.write_override(info, "attention", {"att_vec": [1, 2]})




def test_the_devices_of_this_machine_have_their_keys():
    """On real devices: a CPU's ISA level, an NVIDIA GPU's compute capability (the H200: sm_90)."""
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.devices import list_devices

    found = list_devices()
    if not found:
        pytest.skip("no OpenCL device here")
    for info in found:
        if info.type == "cpu":
            assert info.architecture in {level for level, _ in device_keys.ISA_LEVELS} | {"generic"}, info
        if info.vendor_key == "nvidia":
            assert re.fullmatch(r"sm_\d+", info.architecture), info
            assert tuning.params_for(info, "matmul", {}) == NVIDIA_MATMUL
            assert tuning.params_for(info, "fused", {}) == NVIDIA_FUSED
