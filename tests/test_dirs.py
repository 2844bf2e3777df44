"""perfx's directories are resolved in one place, engine/dirs.py: under $PERFX_HOME when it is set,
else in the user's cache and data directories."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from perfx.engine import dirs

ROOT = Path(__file__).resolve().parents[1]
EVERY_DIR = [dirs.cache_dir, dirs.data_dir, dirs.models_dir, dirs.kernel_cache_dir, dirs.tuning_dir, dirs.history_path]


def test_every_directory_lies_under_perfx_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    assert [f() for f in EVERY_DIR] == [tmp_path, tmp_path, tmp_path / "models", tmp_path / "cl-cache",
                                        tmp_path / "tuning", tmp_path / "history"]


def test_perfx_home_with_a_tilde_is_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PERFX_HOME", "~/perfx-home")
    assert {f().relative_to(tmp_path).parts[0] for f in EVERY_DIR} == {"perfx-home"}


@pytest.mark.parametrize("value", [None, ""])
def test_without_perfx_home_the_user_directories(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("PERFX_HOME", raising=False)
    else:
        monkeypatch.setenv("PERFX_HOME", value)
    assert dirs.cache_dir().name == "perfx" and dirs.data_dir().name == "perfx"
    assert dirs.models_dir().parent == dirs.kernel_cache_dir().parent == dirs.tuning_dir().parent == dirs.cache_dir()
    assert dirs.history_path().parent == dirs.data_dir()


def test_the_directories_are_resolved_nowhere_else():
    """No other module reads $PERFX_HOME or asks platformdirs for a perfx directory."""
    pattern = re.compile(r"(environ|getenv).*(PERFX_HOME|HOME_ENV)|user_\w+_dir\(\s*\"perfx\"|\.cache/perfx")
    found = [f"{path.relative_to(ROOT)}:{n}"
             for folder in ("engine", "perfxcli", "kernels") for path in sorted((ROOT / folder).rglob("*.py"))
             if path != ROOT / "engine" / "dirs.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if pattern.search(line) and not line.lstrip().startswith("#")]
    assert found == []
