"""perfx installs as the distribution perfx-llm, its import packages under the `perfx` namespace, each mapped
onto its folder (perfx.cli -> perfxcli/, perfx.engine -> engine/, perfx.kernels -> kernels/)."""
from __future__ import annotations

import sys
from importlib import metadata, resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"perfx.cli": "perfxcli", "perfx.engine": "engine", "perfx.kernels": "kernels"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_package_folder_is_listed():
    """A folder with an __init__.py that the package list lacks would be missing from a plain install."""
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for name, folder in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == listed
    assert pyproject()["tool"]["setuptools"]["package-dir"] == FOLDERS


def test_installed_under_our_names():
    import perfx.cli.main
    import perfx.engine

    assert pyproject()["project"]["name"] == "perfx-llm"
    assert metadata.version("perfx-llm") == pyproject()["project"]["version"]
    assert Path(perfx.engine.__file__).parent == ROOT / "engine"
    assert perfx.cli.main.app is not None
    assert resources.files("perfx.kernels").joinpath("gemv.cl").is_file()


def test_extras_name_our_distribution():
    """An extra that names `perfx[...]` would install the unrelated PyPI project of that name."""
    for extra, requirements in pyproject()["project"]["optional-dependencies"].items():
        for r in requirements:
            assert not r.replace(" ", "").startswith("perfx["), (extra, r)
