"""engine/memory.py: available memory, the refusal message, and what a model needs."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from perfx.engine import memory
from perfx.engine.config import ModelConfig
from perfx.engine.errors import PerfxError

MiB = 1 << 20

MEMINFO = """MemTotal:        7812344 kB
MemFree:          201432 kB
MemAvailable:    3145728 kB
Buffers:           10240 kB
Cached:          2097152 kB
SwapTotal:       4194300 kB
"""

OLD_MEMINFO = """MemTotal:        7812344 kB
MemFree:          201432 kB
Buffers:           10240 kB
Cached:          2097152 kB
"""


@pytest.fixture
def no_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)


@pytest.fixture(autouse=True)
def check_enabled(monkeypatch):
    monkeypatch.delenv(memory.SKIP_VARIABLE, raising=False)


def test_meminfo_available(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    assert memory.meminfo_available(path) == 3145728 * 1024


def test_meminfo_before_memavailable(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text(OLD_MEMINFO)
    assert memory.meminfo_available(path) == (201432 + 10240 + 2097152) * 1024


def test_meminfo_unreadable(tmp_path: Path) -> None:
    assert memory.meminfo_available(tmp_path / "missing") is None
    (tmp_path / "empty").write_text("")
    assert memory.meminfo_available(tmp_path / "empty") is None


def test_available_prefers_psutil(monkeypatch, tmp_path: Path) -> None:
    fake = types.SimpleNamespace(virtual_memory=lambda: types.SimpleNamespace(available=123 * MiB))
    monkeypatch.setitem(sys.modules, "psutil", fake)
    assert memory.available_bytes(tmp_path / "missing") == 123 * MiB


def test_available_without_psutil(no_psutil, tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    assert memory.available_bytes(path) == 3145728 * 1024


def test_available_when_psutil_fails(monkeypatch, tmp_path: Path) -> None:
    def broken():
        raise NotImplementedError("platform android is not supported")

    monkeypatch.setitem(sys.modules, "psutil", types.SimpleNamespace(virtual_memory=broken))
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    assert memory.available_bytes(path) == 3145728 * 1024


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="no /proc/meminfo")
def test_available_here(no_psutil) -> None:
    available = memory.available_bytes()
    assert available is not None and available > 0


def test_check_refuses_with_the_figures() -> None:
    with pytest.raises(PerfxError) as e:
        memory.check_available(3000 * MiB + 1, "SmolLM2-135M with --ctx 2048", available=2500 * MiB)
    assert str(e.value) == ("not enough memory: SmolLM2-135M with --ctx 2048 needs 3001 MiB, 2500 MiB available "
                            "(close apps or use a smaller --ctx)")


def test_check_passes_when_it_fits() -> None:
    memory.check_available(2500 * MiB, "model", available=2500 * MiB)


def test_check_measures_when_not_told(monkeypatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * MiB)
    with pytest.raises(PerfxError, match="needs 11 MiB, 10 MiB available"):
        memory.check_available(11 * MiB, "model")


def test_check_skipped_when_unknown(monkeypatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    memory.check_available(1 << 50, "model")


def test_check_skipped_by_variable(monkeypatch) -> None:
    monkeypatch.setenv(memory.SKIP_VARIABLE, "1")
    memory.check_available(1 << 50, "model", available=1)
    monkeypatch.setenv(memory.SKIP_VARIABLE, "0")
    with pytest.raises(PerfxError):
        memory.check_available(1 << 50, "model", available=1)


# ---- what a model needs -----------------------------------------------------------------------------

SMOLLM2 = ModelConfig(arch="llama", n_layers=30, dim=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                      vocab_size=49152, ctx_len=8192, norm_eps=1e-5, rope_base=100000.0, rope_dim=64,
                      tied_embedding=True)


def test_estimate_formula() -> None:
    c, ctx = SMOLLM2, 512
    need = memory.estimate(c, weights=100 * MiB, ctx=ctx)
    assert need.weights == 100 * MiB
    assert need.kv_cache == 2 * 30 * 512 * 3 * 64 * 4
    rows = 4 * 512 * (3 * 576 + 2 * 576 + 2 * 192 + 3 * 1536)
    assert need.activations == rows + 4 * 49152 + 4 * 3 * 9 * 512 * 512
    assert need.total == need.weights + need.kv_cache + need.activations + memory.HEADROOM
    assert need.describe() == "weights 100 + KV cache 23 + activations 43 + headroom 64 MiB"


def test_estimate_options() -> None:
    base = memory.estimate(SMOLLM2, weights=0, ctx=2048)
    passes = memory.estimate(SMOLLM2, weights=0, ctx=2048, batch_tokens=512, kv_value_bytes=2, all_logits=True)
    assert passes.kv_cache == base.kv_cache // 2
    assert passes.activations < base.activations
    assert memory.estimate(SMOLLM2, 0, 2048, all_logits=True).activations - base.activations == 4 * 49152 * 2047


def test_weight_bytes_and_the_numpy_backend(tiny_gguf) -> None:
    """The estimate covers what the NumPy backend really holds: float32 weights and the KV cache."""
    from perfx.engine.backends.numpy_backend import NumpyBackend
    from perfx.engine.formats.loader import open_model
    from perfx.engine.model import Transformer, weights_from_tensors

    path, _, _ = tiny_gguf
    model = open_model(path)
    weights = weights_from_tensors(model.tensors, model.config, path)
    dequantized = memory.weight_bytes(weights, dequantized=True)
    params = sum(int(np.prod(t.shape)) for t in model.tensors.values())   # the tied embedding once
    assert dequantized == 4 * params
    assert memory.weight_bytes(weights, dequantized=False) == weights.nbytes
    backend = NumpyBackend()
    Transformer(model.config, weights, backend, ctx=64)
    need = memory.estimate(model.config, dequantized, ctx=64)
    assert need.weights + need.kv_cache <= backend.device_bytes <= need.total


def test_is_android(monkeypatch) -> None:
    monkeypatch.delenv("ANDROID_ROOT", raising=False)
    monkeypatch.delenv("ANDROID_DATA", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    if hasattr(sys, "getandroidapilevel"):
        monkeypatch.delattr(sys, "getandroidapilevel")
    assert not memory.is_android()
    monkeypatch.setenv("ANDROID_ROOT", "/system")
    monkeypatch.setenv("ANDROID_DATA", "/data")
    assert memory.is_android()
    monkeypatch.delenv("ANDROID_ROOT")
    monkeypatch.setattr(sys, "platform", "android")
    assert memory.is_android()
