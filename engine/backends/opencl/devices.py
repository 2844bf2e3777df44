"""OpenCL devices: discovery, selection and memory checks.

    sel = select("auto")          # an OpenCL GPU, else an OpenCL CPU, else NumPy
    sel.backend, sel.device, sel.notices

Device specs: `auto`, `numpy`, `opencl` (auto, but never NumPy), `gpu`, `cpu`, `opencl:P:D`
(platform P, device D, numbered as `perfx devices` shows them). A device is used only once it has
built a kernel (kernels/copy.cl); the result of that probe is kept for the life of the process.

PoCL CPU threads: PoCL reads its thread count once, when the process first lists the OpenCL
platforms. `set_cpu_threads(n)` sets it and must come before anything lists them (list_devices,
select, pyopencl.get_platforms); it raises PerfxError when called later.

perfx's files lie in its cache directory (engine.dirs). Each device's copy bandwidth: bandwidth.py.
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...dirs import cache_dir
from ...errors import PerfxError
from . import device_keys, drivers

if TYPE_CHECKING:
    import pyopencl as cl

    from .runtime import Runtime

MiB = 1 << 20
NO_PLATFORM = "no OpenCL platform found (install pocl-opencl-icd or your GPU's driver)"
NO_PYOPENCL = "pyopencl is not installed (pip install 'perfx-llm[opencl]' gets OpenCL and a CPU driver)"
AUTO_ORDER = ("gpu", "cpu")                                     # device types that auto tries, in order
THREAD_VARIABLES = ("POCL_MAX_PTHREAD_COUNT", "POCL_CPU_MAX_CU_COUNT",  # PoCL 3, PoCL 4 and later
                    "CL_CONFIG_CPU_TBB_NUM_WORKERS")                      # Intel's CPU runtime
_BUILD_NOISE = ("clbuildprogram failed", "build_program_failure", "build on <", "(options:")

_platforms_listed = False
_probe_results: dict[cl.Device, str | None] = {}   # device -> why it cannot build kernels (None: it can)
_runtimes: dict[cl.Device, Runtime] = {}          # device -> the Runtime its probe built


@dataclass(frozen=True)
class DeviceInfo:
    """What perfx needs to know about one OpenCL device."""

    platform_index: int
    platform_name: str
    platform_version: str
    device_index: int
    name: str
    vendor: str
    type: str                     # "gpu", "cpu" or "accelerator"
    global_mem: int               # bytes
    max_alloc: int                # bytes in one buffer at most
    compute_units: int
    max_work_group_size: int
    local_mem: int                # bytes per work-group
    has_images: bool
    image1d_buffer_max: int       # texels of an image1d_buffer_t at most (0 without images)
    has_fp16: bool                # cl_khr_fp16
    driver_version: str
    architecture: str = ""        # the tuning database's key: "sm_90", "gfx1030", "avx2" (device_keys.py)

    @property
    def id(self) -> str:
        return f"opencl:{self.platform_index}:{self.device_index}"

    @property
    def platform_label(self) -> str:
        """The platform's version without the OpenCL prefix and build notes: "PoCL 3.1+debian", "CUDA 12.4.89"."""
        if drivers.driver_of(self.platform_name) == "intel":
            return f"Intel OpenCL {self.driver_version.split('_')[0]}"
        text = re.sub(r"^OpenCL\s+\d+(\.\d+)*\s*", "", self.platform_version.strip())
        text = re.split(r"\s{2,}|,", text)[0].strip()
        return text or self.platform_name

    @property
    def label(self) -> str:
        """`opencl:P:D (device, platform)`, as notices and errors name a device."""
        return f"{self.id} ({self.name}, {self.platform_label})"

    @property
    def vendor_key(self) -> str:
        """The tuning database's vendor key: "nvidia", "amd", "intel", ... (device_keys.py)."""
        return device_keys.vendor_key(self.vendor, self.platform_name)

    @property
    def key(self) -> str:
        """Names the device across processes and restarts: platform, device and driver."""
        return f"{self.platform_name} | {self.name} | {self.driver_version}"


@dataclass
class Selection:
    """The backend that a device spec chose, and what the CLI should print about the choice."""

    backend: str                                  # "opencl" or "numpy"
    device: cl.Device | None = None               # for OpenCL
    info: DeviceInfo | None = None
    notices: list[str] = field(default_factory=list)   # printed dimly on stderr

    @property
    def description(self) -> str:
        return self.info.label if self.info else "numpy"

    def runtime(self) -> Runtime:
        """The Runtime (context, queue, kernels) that the probe built for the device."""
        if self.device is None:
            raise PerfxError("the NumPy backend has no OpenCL runtime")
        return runtime(self.device)


# ---- discovery ------------------------------------------------------------------------------------


def _opencl():
    """pyopencl, or None where it is not installed or its ICD loader does not load."""
    try:
        import pyopencl
    except (ImportError, OSError):
        return None
    return pyopencl


def setup_icd() -> None:
    """Points the ICD loader at the drivers perfx lists (drivers.py); before anything lists the
    platforms (enumerate_devices does it; code that calls pyopencl.get_platforms itself calls this first)."""
    drivers.setup_icd(cache_dir() / "opencl-vendors", intel=drivers.intel_library())


def enumerate_devices() -> list[tuple[DeviceInfo, cl.Device]]:
    """Every OpenCL device with its pyopencl handle, in platform then device order."""
    global _platforms_listed
    cl = _opencl()
    if cl is None:
        return []
    if not _platforms_listed:
        setup_icd()
    _platforms_listed = True
    try:
        platforms = cl.get_platforms()
    except (cl.Error, RuntimeError, OSError):       # PLATFORM_NOT_FOUND_KHR: an ICD loader, no driver
        return []
    found = []
    for p_index, platform in enumerate(platforms):
        try:
            devices = platform.get_devices()
        except cl.Error:
            continue
        for d_index, device in enumerate(devices):
            found.append((_describe(cl, p_index, platform, d_index, device), device))
    return found


def _describe(cl: Any, p_index: int, platform: cl.Platform, d_index: int, device: cl.Device) -> DeviceInfo:
    def query(name: str, default):
        try:
            return getattr(device, name)
        except (cl.Error, AttributeError):
            return default

    kind = query("type", 0)
    kind = "gpu" if kind & cl.device_type.GPU else "cpu" if kind & cl.device_type.CPU else "accelerator"
    images = bool(query("image_support", False))
    name, vendor = query("name", "?").strip(), query("vendor", "").strip()
    return DeviceInfo(
        platform_index=p_index,
        platform_name=platform.name.strip(),
        platform_version=platform.version.strip(),
        device_index=d_index,
        name=name,
        vendor=vendor,
        type=kind,
        global_mem=int(query("global_mem_size", 0)),
        max_alloc=int(query("max_mem_alloc_size", 0)),
        compute_units=int(query("max_compute_units", 0)),
        max_work_group_size=int(query("max_work_group_size", 1)),
        local_mem=int(query("local_mem_size", 0)),
        has_images=images,
        image1d_buffer_max=int(query("image_max_buffer_size", 0)) if images else 0,
        has_fp16="cl_khr_fp16" in query("extensions", "").split(),
        driver_version=query("driver_version", "").strip(),
        architecture=device_keys.architecture(kind, device_keys.vendor_key(vendor, platform.name), name, device),
    )


def list_devices() -> list[DeviceInfo]:
    """Every OpenCL device on this machine; empty without pyopencl, an ICD loader or a platform."""
    return [info for info, _ in enumerate_devices()]


def describe(device: cl.Device | DeviceInfo) -> DeviceInfo:
    """The DeviceInfo of a pyopencl Device (a DeviceInfo is returned as it is)."""
    if isinstance(device, DeviceInfo):
        return device
    for info, handle in enumerate_devices():
        if handle == device:
            return info
    raise PerfxError(f"{device!r} is not among this machine's OpenCL devices")


# ---- the build probe ------------------------------------------------------------------------------


def probe(device: cl.Device) -> str | None:
    """None when `device` (a pyopencl Device) builds kernels, else why not: the build log's first
    line. Checked once per process."""
    if device not in _probe_results:
        _probe_results[device] = _build_probe(device)
    return _probe_results[device]


def _build_probe(device: cl.Device) -> str | None:
    """Builds kernels/copy.cl in a new Runtime for `device`, kept for runtime() when it succeeds."""
    cl = _opencl()
    from .runtime import Runtime

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cl.CompilerWarning)
            rt = Runtime(device)
            rt.program("copy")
    except PerfxError as e:
        return first_log_line(str(e))
    except cl.Error as e:
        return first_log_line(str(e))
    _runtimes[device] = rt
    return None


def first_log_line(text: str) -> str:
    """The line of an OpenCL build failure that says why: its first error, else its first message."""
    parts = [p.strip() for line in text.splitlines() for p in line.split(" | ")]
    parts = [p for p in parts if p and not any(noise in p.lower() for noise in _BUILD_NOISE)]
    for part in parts:
        if "error" in part.lower():
            return part
    return parts[0] if parts else text.strip().splitlines()[0] if text.strip() else "unknown error"


def runtime(device: cl.Device) -> Runtime:
    """The process's Runtime for `device`: the one its probe built."""
    reason = probe(device)
    if reason is not None:
        raise PerfxError(f"{describe(device).label} cannot build kernels: {reason}")
    if device not in _runtimes:                     # a probe result recorded without one
        from .runtime import Runtime

        _runtimes[device] = Runtime(device)
    return _runtimes[device]


def clear_caches() -> None:
    """Forget the probe results and their runtimes (tests)."""
    _probe_results.clear()
    _runtimes.clear()


# ---- selection ------------------------------------------------------------------------------------


def _available(found: list[tuple[DeviceInfo, cl.Device]]) -> str:
    names = [f"{info.id} ({info.name}, {info.type})" for info, _ in found] + ["numpy"]
    return f"available: {', '.join(names)} (see `perfx devices`)"


def select(spec: str = "auto") -> Selection:
    """The backend and device for a device spec: auto | numpy | opencl | cpu | gpu | opencl:P:D."""
    spec = spec.strip().lower()
    if spec == "numpy":
        return Selection("numpy")
    found = enumerate_devices()
    if not found and _opencl() is None:
        if spec == "auto":
            return Selection("numpy", notices=[f"{NO_PYOPENCL}: using NumPy, many times slower"])
        raise PerfxError(f"{NO_PYOPENCL}; --device numpy runs the NumPy reference backend")
    vendor = drivers.cpu_vendor()
    found = sorted(found, key=lambda c: drivers.rank(c[0].platform_name, vendor) if c[0].type == "cpu" else -1)
    if spec in ("auto", "opencl"):
        candidates = [c for kind in AUTO_ORDER for c in found if c[0].type == kind]
        wanted = "GPU or CPU"
    elif spec in ("gpu", "cpu"):
        candidates = [c for c in found if c[0].type == spec]
        wanted = spec.upper()
    elif re.fullmatch(r"opencl:\d+:\d+", spec):
        p, d = (int(x) for x in spec.split(":")[1:])
        candidates = [c for c in found if (c[0].platform_index, c[0].device_index) == (p, d)]
        wanted = f"device {spec}"
    else:
        raise PerfxError(
            f"unknown device '{spec}' (choose from: auto, numpy, opencl, gpu, cpu, opencl:P:D; "
            "`perfx devices` lists them)"
        )
    if not candidates:
        missing = NO_PLATFORM if not found else f"no OpenCL {wanted} found"
        if spec == "auto":
            return Selection("numpy", notices=[f"{missing}: using NumPy"])
        if not found:
            raise PerfxError(f"{NO_PLATFORM}; --device numpy runs the NumPy reference backend")
        raise PerfxError(f"{missing}; {_available(found)}")

    notices: list[str] = []
    failures: list[str] = []
    for info, device in candidates:
        reason = probe(device)
        if reason is None:
            return Selection("opencl", device, info, notices + driver_notices(info, found, vendor))
        failures.append(f"{info.label} cannot build kernels: {reason}")
        notices.append(f"{failures[-1]}; trying the next device")
    if spec == "auto":
        return Selection("numpy", notices=notices[:-1] + [f"{failures[-1]}; using NumPy"])
    raise PerfxError(f"{'; '.join(failures)}; {_available(found)}")


def driver_notices(info: DeviceInfo, found: list[tuple[DeviceInfo, cl.Device]], vendor: str) -> list[str]:
    """Which OpenCL perfx runs on, and on a CPU the command that installs a faster driver where there is one."""
    notes = [f"running on {info.label}"]
    if info.type == "cpu":
        installed = {drivers.driver_of(other.platform_name) for other, _ in found}
        hint = (drivers.faster_driver_hint(info.platform_name, installed, vendor)
                or drivers.distro_pocl_hint(info.platform_name, info.platform_version))
        notes += [hint] if hint else []
    return notes


# ---- memory ---------------------------------------------------------------------------------------


def _mib(nbytes: int) -> str:
    return f"{nbytes / MiB:,.0f}"


def check_memory(device: cl.Device | DeviceInfo, needed_bytes: int, what: str,
                 largest_bytes: int | None = None) -> None:
    """PerfxError when `what` (needing `needed_bytes` in all, `largest_bytes` in its largest buffer)
    does not fit on `device` (a pyopencl Device or a DeviceInfo)."""
    info = describe(device)
    if needed_bytes > info.global_mem:
        raise PerfxError(
            f"{info.id} ({info.name}) has {_mib(info.global_mem)} MiB of memory; {what} needs {_mib(needed_bytes)} MiB"
        )
    if largest_bytes is not None and largest_bytes > info.max_alloc:
        raise PerfxError(
            f"{info.id} ({info.name}) allocates at most {_mib(info.max_alloc)} MiB in one buffer; "
            f"{what} needs a buffer of {_mib(largest_bytes)} MiB"
        )


# ---- PoCL threads ---------------------------------------------------------------------------------


def opencl_initialised() -> bool:
    """Whether this process has listed the OpenCL platforms (so PoCL has fixed its thread count)."""
    if _platforms_listed:
        return True
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libpocl" in line for line in maps)
    except OSError:
        return False


def set_cpu_threads(n: int) -> None:
    """Run PoCL CPU devices on `n` threads (sets POCL_MAX_PTHREAD_COUNT and its PoCL 4 name).
    Must come before the process first lists the OpenCL platforms."""
    if int(n) < 1:
        raise PerfxError(f"the thread count must be at least 1 (got {n})")
    value = str(int(n))
    current = os.environ.get(THREAD_VARIABLES[0])
    if opencl_initialised():
        if current == value:
            return
        raise PerfxError(
            f"cannot set {value} CPU threads: OpenCL was already initialised in this process, with "
            f"{current or 'all'} threads; set them before listing or selecting devices "
            f"(or run with POCL_MAX_PTHREAD_COUNT={value})"
        )
    for name in THREAD_VARIABLES:
        os.environ[name] = value


# ---- files ----------------------------------------------------------------------------------------



def atomic_write_text(path: Path, text: str) -> None:
    """Writes `path` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
