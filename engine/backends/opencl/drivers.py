"""The CPU OpenCL drivers: which are installed, which one `auto` prefers on this CPU, and the ICD set-up.

Two CPU drivers build perfx's kernels: PoCL (Debian's pocl-opencl-icd, or the copy pip installs with
pyopencl), portable to every CPU, and Intel's CPU runtime (pip install intel-opencl-rt), which runs on
x86-64 CPUs of either vendor and offers cl_khr_fp16 and cl_khr_integer_dot_product. Which one is
faster was measured per CPU vendor (docs/performance.md, "CPU OpenCL drivers") and is kept in
PREFERENCE: `auto` takes the CPU devices in that order, and names the one command that installs a
faster driver when it runs on a slower one.

pyopencl's ICD loader reads OCL_ICD_VENDORS (a directory of .icd files, or one file) when the
process first lists the platforms. setup_icd() points it, before that, at the drivers perfx should
see: the system's (/etc/OpenCL/vendors) plus Intel's runtime from this Python environment, written as
.icd files into <root>/opencl-vendors; where the system's one driver is PoCL and no Intel runtime is
installed, that one file alone (pyopencl's own PoCL, a second CPU platform of about 23 MiB resident,
stays out). The user's OCL_ICD_VENDORS or OCL_ICD_FILENAMES is left as it is.
"""
from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

INTEL_PLATFORM = "Intel(R) OpenCL"
INTEL_EXTRA = "pip install 'perfx-llm[intel]'"       # the one command that installs Intel's CPU runtime
SYSTEM_VENDORS = Path("/etc/OpenCL/vendors")


@dataclass(frozen=True)
class Speedup:
    """What the preferred driver gained over PoCL 3.1 in `perfx bench` (SmolLM2-135M Q4_1, 1 thread)."""

    pp512: float
    tg128: float
    machine: str


# CPU vendor (/proc/cpuinfo vendor_id) -> CPU drivers, fastest first, with what the first one gained.
PREFERENCE: dict[str, tuple[tuple[str, ...], Speedup | None]] = {
    "GenuineIntel": (("intel", "pocl"), Speedup(2.00, 1.01, "Intel Xeon Sapphire Rapids")),
    "AuthenticAMD": (("pocl", "intel"), None),   # AMD EPYC: PoCL 1.5x Intel's runtime at pp512, 2-3x at tg128
}
PORTABLE = (("pocl",), None)                     # ARM and every other CPU: PoCL


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"); "" where there is none (ARM, macOS)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def preference(vendor: str | None = None) -> tuple[tuple[str, ...], Speedup | None]:
    return PREFERENCE.get(cpu_vendor() if vendor is None else vendor, PORTABLE)


def driver_of(platform_name: str) -> str:
    """"intel", "pocl" or "other" for an OpenCL platform name."""
    if platform_name.startswith(INTEL_PLATFORM) or "Intel(R) CPU Runtime" in platform_name:
        return "intel"
    return "pocl" if platform_name == "Portable Computing Language" else "other"


def rank(platform_name: str, vendor: str | None = None) -> int:
    """The place of a CPU device's driver in this CPU's preference order (unknown drivers last)."""
    order = preference(vendor)[0]
    driver = driver_of(platform_name)
    return order.index(driver) if driver in order else len(order)


def intel_x86_linux() -> bool:
    """Where Intel's CPU runtime installs from pip: x86-64 Linux."""
    return sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


def faster_driver_hint(platform_name: str, installed: set[str], vendor: str | None = None) -> str | None:
    """The line that says a faster CPU driver than the one in use would install by one command, or None."""
    order, gain = preference(vendor)
    driver = driver_of(platform_name)
    if not intel_x86_linux() or order[0] != "intel" or driver == "intel" or "intel" in installed or not gain:
        return None
    return (f"Intel's CPU OpenCL runs perfx {gain.pp512:.1f}x faster at prefill than PoCL on "
            f"{gain.machine}: {INTEL_EXTRA}")


DISTRO_POCL = "sudo apt-get install pocl-opencl-icd"   # Debian and Ubuntu's PoCL, the faster build


def distro_pocl_hint(platform_name: str, platform_version: str,
                     debian: bool | None = None) -> str | None:
    """The line that says the distribution's PoCL would be faster than the PoCL pip installs with pyopencl
    (PoCL 3.0: about 4x slower prefill, docs/performance.md), or None. The distribution's build names
    itself in its version ("PoCL 3.1+debian"); only Debian and Ubuntu have the one command."""
    if debian is None:
        debian = Path("/etc/debian_version").exists()
    if driver_of(platform_name) != "pocl" or not debian or "+debian" in platform_version or "ubuntu" in \
            platform_version.lower():
        return None
    return f"this is the PoCL pip installs; the system's PoCL runs perfx about 4x faster at prefill: {DISTRO_POCL}"


# ---- the ICD loader's set-up ------------------------------------------------------------------------


def intel_library(prefix: Path = Path(sys.prefix)) -> Path | None:
    """libintelocl.so as pip installs it into this environment (intel-opencl-rt), or None."""
    path = prefix / "lib" / "libintelocl.so"
    return path if path.is_file() else None


def _write_vendors(directory: Path, icds: dict[str, str]) -> None:
    """Makes `directory` hold exactly `icds` (file name -> library), each file written by a rename."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in {p.name for p in directory.glob("*.icd")} - set(icds):
        (directory / stale).unlink(missing_ok=True)
    for name, text in icds.items():
        path = directory / name
        if path.is_file() and path.read_text(errors="replace").strip() == text:
            continue
        tmp = directory / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, path)


def setup_icd(vendors_dir: Path, system: Path = SYSTEM_VENDORS, intel: Path | None = None) -> None:
    """Sets OCL_ICD_VENDORS so that the ICD loader lists the drivers perfx should see. Call before the
    process first lists the OpenCL platforms.

    - The user's OCL_ICD_VENDORS or OCL_ICD_FILENAMES stands.
    - Intel's runtime installed (`intel`): a directory of .icd files
      (`vendors_dir`) with it and the system's drivers, PoCL among them as the fallback (pyopencl's
      wheels add their own PoCL to any directory, which does not build on every CPU). Each CPU platform
      listed costs resident memory (docs/performance.md): OCL_ICD_VENDORS=<one .icd file> keeps to one.
    - Otherwise, where the system's one driver is PoCL: that file alone (pyopencl's own PoCL, a second
      CPU platform of about 30 MiB resident, stays out)."""
    if "OCL_ICD_VENDORS" in os.environ or "OCL_ICD_FILENAMES" in os.environ:
        return
    try:
        icds = {p.name: p.read_text(errors="replace").strip() for p in sorted(system.glob("*.icd"))}
    except OSError:
        icds = {}
    if intel is not None and not any("libintelocl" in text for text in icds.values()):
        icds["perfx-intel-cpu.icd"] = str(intel)
        try:
            _write_vendors(vendors_dir, icds)
        except OSError:
            return
        os.environ["OCL_ICD_VENDORS"] = str(vendors_dir)
    elif len(icds) == 1 and "pocl" in next(iter(icds.values())).lower():
        os.environ["OCL_ICD_VENDORS"] = str(system / next(iter(icds)))
