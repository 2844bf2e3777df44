"""Host memory: how much is available, and refusing a load that would not fit.

On a phone, running out of memory does not raise MemoryError: Android's low-memory killer ends the
process (Termux and all). So the need of a model is worked out before loading and compared with
the memory available now:

    need = estimate(config, weight_bytes(weights, dequantized=...), ctx)
    check_available(need.total, f"{name} at --ctx {ctx} ({need.describe()})")

Available memory is psutil's `virtual_memory().available` where psutil imports, else
`MemAvailable` from /proc/meminfo (the kernel's estimate of what can be allocated without
swapping: free memory plus reclaimable page cache). Where neither exists the check is skipped;
PERFX_SKIP_MEMORY_CHECK=1 skips it too (for a machine with swap that is meant to be used).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import PerfxError

MiB = 1 << 20
MEMINFO = Path("/proc/meminfo")
HEADROOM = 64 * MiB            # allocator slack, Python objects made while loading, the tokenizer
SKIP_VARIABLE = "PERFX_SKIP_MEMORY_CHECK"
PHONE_CTX = 512                # default context on Android: a 7B model's float32 KV cache is 1 MiB a token


def is_android() -> bool:
    """True on Android (Termux): Python built for it has sys.getandroidapilevel (3.13 also says
    sys.platform == "android"); ANDROID_ROOT is set in every app's environment."""
    return (sys.platform == "android" or hasattr(sys, "getandroidapilevel")
            or ("ANDROID_ROOT" in os.environ and "ANDROID_DATA" in os.environ))


def available_bytes(meminfo: Path = MEMINFO) -> int | None:
    """Bytes that can be allocated now without swapping, or None where that cannot be known."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # not installed, or no support for this platform (older psutil on Android)
        pass
    return meminfo_available(meminfo)


def meminfo_available(meminfo: Path = MEMINFO) -> int | None:
    """`MemAvailable` from /proc/meminfo in bytes; on kernels before 3.14, which lack it,
    MemFree + Buffers + Cached. None when the file cannot be read."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    if "MemAvailable" in fields:
        return fields["MemAvailable"]
    if "MemFree" in fields:
        return fields["MemFree"] + fields.get("Buffers", 0) + fields.get("Cached", 0)
    return None


def check_available(needed_bytes: int, what: str, available: int | None = None,
                    hint: str = "close apps or use a smaller --ctx") -> None:
    """Raise PerfxError when `needed_bytes` exceed the memory available now (`available`, or
    measured), with `hint` on what to do. Does nothing where the figure cannot be known or
    PERFX_SKIP_MEMORY_CHECK=1."""
    if os.environ.get(SKIP_VARIABLE, "") not in ("", "0"):
        return
    if available is None:
        available = available_bytes()
    if available is None or needed_bytes <= available:
        return
    raise PerfxError(f"not enough memory: {what} needs {_mib(needed_bytes)} MiB, {_mib(available)} MiB available "
                     f"({hint})")


def _mib(n: int) -> int:
    return -(-int(n) // MiB)       # rounded up: "needs 1 MiB" for a few bytes


# ---- what a model needs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a loaded model takes in host memory, by part."""

    weights: int
    kv_cache: int
    activations: int
    headroom: int = HEADROOM

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.headroom

    def describe(self) -> str:
        """The parts in MiB, e.g. "weights 514 + KV cache 23 + activations 43 + headroom 64 MiB"."""
        return (f"weights {_mib(self.weights)} + KV cache {_mib(self.kv_cache)} + activations "
                f"{_mib(self.activations)} + headroom {_mib(self.headroom)} MiB")


def weight_bytes(weights: Any, dequantized: bool) -> int:
    """Resident bytes of a model's weights (`engine.model.Weights`), the tied embedding once.

    dequantized=True: as float32 arrays (the NumPy backend: 4 bytes a value, whatever the file
    stores). False: as the OpenCL backend holds them, each stack in its exact device form
    (`engine.backends.opencl.weights`: Q5 and Q6 types widen to 8 bits; on a phone or a CPU these
    buffers are in the same RAM). The memory-mapped file itself is not counted: its pages
    are page cache, which the kernel reclaims before it kills anything, and `MemAvailable`
    already counts them as available.
    """
    layers = [t for l in weights.layers
              for t in (l.attn_norm, *l.wqkv, l.wo, l.ffn_norm, *l.w_gate_up, l.w_down, *(l.bqkv or ()))]
    unique = {id(t): t for t in (*layers, weights.tok_embd, weights.output_norm, weights.output)}
    if not dequantized:
        from .backends.opencl.weights import device_bytes

        stacks = [s for l in weights.layers for s in (l.wqkv, [l.wo], l.w_gate_up, [l.w_down])]
        rest = [t for t in unique.values()                # norms, biases, an untied embedding: as stored
                if len(t.shape) < 2 or t is weights.tok_embd and t is not weights.output]
        return (sum(device_bytes(s) for s in stacks) + device_bytes([weights.output])
                + sum(int(t.nbytes) for t in rest))
    total = 0
    for t in unique.values():
        n = 1
        for d in t.shape:
            n *= int(d)
        total += 4 * n
    return total


def estimate(config: ModelConfig, weights: int, ctx: int, *, batch_tokens: int | None = None,
             kv_value_bytes: int = 4, all_logits: bool = False) -> MemoryNeed:
    """What a model needs: resident weights + KV cache + activations (+ headroom).

    KV cache      = 2 (K and V) x n_layers x ctx x n_kv_heads x head_dim x kv_value_bytes
    activations   = 4 bytes x T x (3 dim + 2 q_dim + 2 kv_dim + 3 ffn_dim + vocab or 1 row of it)
                  + 4 bytes x 3 x n_heads x T x ctx    (attention scores, their exponent, temporaries)
    where T = batch_tokens, the prompt tokens of one pass: the whole prompt, up to ctx, for the
    NumPy backend (the default); 512 for the OpenCL backend. Logits are T rows with all_logits
    (perplexity), one row otherwise.
    """
    c = config
    T = min(ctx, batch_tokens or ctx)
    kv = 2 * c.n_layers * ctx * c.n_kv_heads * c.head_dim * kv_value_bytes
    rows = 4 * T * (3 * c.dim + 2 * c.q_dim + 2 * c.kv_dim + 3 * c.ffn_dim)
    logits = 4 * c.vocab_size * (T if all_logits else 1)
    scores = 4 * 3 * c.n_heads * T * ctx
    return MemoryNeed(weights=weights, kv_cache=kv, activations=rows + logits + scores)
