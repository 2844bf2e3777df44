"""The backend contract (engine/backends/__init__.py): capabilities are declared, never probed."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from perfx.engine.backends import Backend, Capabilities, Ready, open_backend
from perfx.engine.backends.numpy_backend import NumpyBackend

ROOT = Path(__file__).resolve().parents[1]


def test_numpy_backend_declares_its_capabilities():
    backend, notices = open_backend("numpy")
    assert isinstance(backend, NumpyBackend) and isinstance(backend, Backend) and notices == []
    assert backend.capabilities == Capabilities(max_tokens=None, device_argmax=False, paged_kv=True, kv_bytes=4)
    report = backend.report()
    assert (report.backend, report.device, report.kind) == ("NumPy", "numpy", "cpu") and report.name


def test_a_backend_missing_an_operator_cannot_be_made():
    Incomplete = type("Incomplete", (Backend,), {k: v for k, v in vars(NumpyBackend).items() if k != "attention"})
    with pytest.raises(TypeError, match="attention"):
        Incomplete()


def test_host_argmax_is_the_default_for_a_backend_without_a_device_one():
    class Logits(NumpyBackend):
        def logits(self, h, output, all_logits):
            return np.array([[0.0, 3.0, 1.0]])

    chosen = Logits().argmax_async(None, None)
    assert isinstance(chosen, Ready) and chosen.result() == 1 and Logits().argmax_last(None, None) == 1


def test_nothing_outside_a_backend_probes_it():
    probe = re.compile(r"(hasattr|getattr)\([^)]*backend|backend\.(rt|fused|matmul|k_cache|v_cache|max_tokens|"
                       r"n_blocks|block_size|out_of|T)\b")
    found = [f"{p.relative_to(ROOT)}:{i}" for folder in ("engine", "perfxcli") for p in (ROOT / folder).rglob("*.py")
             if "backends" not in p.parts for i, line in enumerate(p.read_text().splitlines(), 1)
             if probe.search(line)]
    assert found == []
