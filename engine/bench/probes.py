"""What bench asks of the system: the CPUs it may use, the load, its process's peak memory, and the
build being measured."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import DISTRIBUTION
from ..backends.numpy_backend import cpu_name


def default_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average (0 where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def peak_rss() -> int | None:
    """This process's peak resident set size in bytes."""
    try:
        import resource
    except ImportError:
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass(frozen=True)
class Build:
    version: str
    commit: str
    cpu: str


def build_info() -> Build:
    """perfx's version, and the git commit of this checkout ('-dirty' with local changes)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version(DISTRIBUTION)
    except PackageNotFoundError:
        v = "unknown"
    root = Path(__file__).resolve().parents[2]
    commit = "unknown"
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], check=False,
                                    capture_output=True, text=True, timeout=10).stdout.strip() or commit
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   check=False, capture_output=True, text=True, timeout=10).stdout.strip()
            commit += "-dirty" if dirty and commit != "unknown" else ""
        except (OSError, subprocess.SubprocessError):
            pass
    return Build(v, commit, cpu_name())
