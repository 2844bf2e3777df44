"""Where perfx keeps its files: under $PERFX_HOME when it is set, else in the user's cache and data
directories (platformdirs: ~/.cache/perfx and ~/.local/share/perfx on Linux).

    <cache>/models/           downloaded models (registry.local_path)
    <cache>/cl-cache/         compiled OpenCL programs
    <cache>/tuning/           tuned kernel parameters, a file per device
    <cache>/devices.json      measured device figures; <cache>/opencl-vendors/, the drivers' ICD files
    <cache>/synthetic/        synthetic models for `perfx bench`
    <data>/history            the chat's input history

With $PERFX_HOME set, <cache> and <data> are both that directory.
"""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs

HOME_ENV = "PERFX_HOME"


def _home() -> Path | None:
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else None


def cache_dir() -> Path:
    """perfx's cache root: $PERFX_HOME, else the user cache directory."""
    return _home() or Path(platformdirs.user_cache_dir("perfx"))


def data_dir() -> Path:
    """Where perfx keeps the user's own data: $PERFX_HOME, else the user data directory."""
    return _home() or Path(platformdirs.user_data_dir("perfx"))


def models_dir() -> Path:
    """Where downloaded models live."""
    return cache_dir() / "models"


def kernel_cache_dir() -> Path:
    """Where compiled OpenCL programs are kept."""
    return cache_dir() / "cl-cache"


def tuning_dir() -> Path:
    """Where tuned kernel parameters are kept, a file per device."""
    return cache_dir() / "tuning"


def history_path() -> Path:
    """The chat's input history."""
    return data_dir() / "history"
