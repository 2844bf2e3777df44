"""The text of a kernel program: kernels/<name>.cl with its headers written in.

Each `#include "<file>"` line of a program, and of the headers it includes, is replaced by that file of
the kernels package (shared device code, kernels/*.h, each with its include guard), so that a program's
text is all of its source: the driver needs no include path, and the build caches (pyopencl's binaries,
PoCL's own, the manifest of builds.py) key on the text, so a change to a header builds anew.
"""
from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable

INCLUDE = '#include "'


def kernels_dir() -> Traversable:
    """The kernels package's folder."""
    return resources.files("perfx.kernels")


def kernel_source(name: str) -> str:
    """The text of kernels/<name>.cl with its headers, and theirs, written in."""
    return _expand(f"{name}.cl", ())


def _expand(file: str, within: tuple[str, ...]) -> str:
    if file in within:
        raise ValueError(f"kernels/{file} includes itself through {' -> '.join(within)}")
    lines = kernels_dir().joinpath(file).read_text(encoding="utf-8").splitlines(keepends=True)
    return "".join(_expand(line.split('"')[1], within + (file,)) if line.startswith(INCLUDE) else line
                   for line in lines)

