"""The keys the tuning database finds a device by, from the most general to the most precise: its type
(cpu, gpu, accelerator), its vendor, its architecture and its name (kernels/tuning.toml, tuning.py).

    vendor_key(info)          "nvidia", "amd", "intel", "arm", "qualcomm", ... (else the vendor's own name)
    architecture(...)         NVIDIA: "sm_90" (compute capability); AMD GPUs: "gfx1030"; Intel, ARM and
                              Qualcomm GPUs: the family ("xe-hpg", "valhall", "adreno-7xx"); CPUs: the
                              ISA level of the host ("avx512", "avx2", "sse4", "neon", "generic")

The architecture is found when the device is discovered (devices.py) and kept in DeviceInfo; "" where
none is known, and then the database's architecture level is skipped.
"""
from __future__ import annotations

import re
from typing import Any

# vendor key -> words that name it in CL_DEVICE_VENDOR or the platform's name (PoCL gives a CPU's
# vendor as /proc/cpuinfo does: GenuineIntel, AuthenticAMD)
VENDORS: dict[str, tuple[str, ...]] = {
    "nvidia": ("nvidia",),
    "amd": ("advanced micro devices", "authenticamd", "amd"),
    "intel": ("intel", "genuineintel"),
    "arm": ("arm",),
    "qualcomm": ("qualcomm",),
    "apple": ("apple",),
    "imagination": ("imagination", "powervr"),
}

# GPU families by vendor: (pattern of the device name, family), the first that matches
FAMILIES: dict[str, tuple[tuple[str, str], ...]] = {
    "intel": ((r"\barc\b", "xe-hpg"), (r"data center gpu max", "xe-hpc"), (r"iris\(r\) xe|\bxe\b", "xe-lp"),
              (r"uhd graphics|iris", "gen9")),
    "arm": ((r"mali-g(31|51|52|71|72|76)\b", "bifrost"),
            (r"mali-g(57|68|77|78|310|510|610|710|615|715)\b", "valhall"),
            (r"mali-g(625|720|925)\b|immortalis", "5th-gen")),
    "qualcomm": ((r"adreno\D*([1-9])\d\d", "adreno-{0}xx"),),
}

# CPU ISA levels, most capable first: (level, NumPy's names of the features it needs, all of them)
ISA_LEVELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("avx512", ("AVX512F", "AVX512BW")),
    ("avx2", ("AVX2", "FMA3")),
    ("sse4", ("SSE42",)),
    ("neon", ("ASIMD",)),
    ("neon", ("NEON",)),
)


def vendor_key(vendor: str, platform_name: str = "") -> str:
    """The database's vendor key of a device's CL_DEVICE_VENDOR (or, where that says nothing, its platform)."""
    for text in (vendor, platform_name):
        words = text.lower()
        for key, names in VENDORS.items():
            if any(re.search(rf"\b{re.escape(name)}\b", words) for name in names):
                return key
    return re.sub(r"[^a-z0-9]+", "-", vendor.lower()).strip("-") or "unknown"


def gpu_family(vendor: str, name: str) -> str:
    """The family of a GPU by its name, for vendors whose OpenCL reports no architecture; "" where unknown."""
    if vendor == "amd":
        m = re.match(r"(gfx[0-9a-f]+)", name.strip().lower())     # ROCm names the device by its gfx target
        return m.group(1) if m else ""
    for pattern, family in FAMILIES.get(vendor, ()):
        m = re.search(pattern, name.lower())
        if m:
            return family.format(*m.groups())
    return ""


def cpu_isa(features: dict[str, bool] | None = None) -> str:
    """The ISA level of the host CPU (an OpenCL CPU device runs on the host), from NumPy's view of its features."""
    if features is None:
        features = _host_features()
    for level, needs in ISA_LEVELS:
        if all(features.get(f) for f in needs):
            return level
    return "generic"


def _host_features() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:                                            # NumPy 1
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return {}
    return dict(__cpu_features__)


def architecture(kind: str, vendor: str, name: str, device: Any = None) -> str:
    """The architecture key of a device: `kind` its type, `vendor` its vendor key, `name` its name,
    `device` its pyopencl handle where one is at hand (NVIDIA's compute capability is asked of it)."""
    if kind == "cpu":
        return cpu_isa()
    if vendor == "nvidia" and device is not None:
        try:
            return f"sm_{int(device.compute_capability_major_nv)}{int(device.compute_capability_minor_nv)}"
        except Exception:  # no cl_nv_device_attribute_query: pyopencl raises LogicError or AttributeError
            return ""
    return gpu_family(vendor, name)
