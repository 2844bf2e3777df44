"""The engines a bench worker runs: perfx on one device, and llama.cpp through llama-cpp-python, each
loading one model and timing one test at a time (the llama-bench binary peer is in peer.py)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from .. import DISTRIBUTION
from ..backends.numpy_backend import cpu_name
from ..errors import PerfxError
from .profile import PhaseProfile, profile_phase
from .results import EngineInfo
from .spec import INSTALL_HINT, TestSpec

LLAMA_N_BATCH, LLAMA_N_UBATCH = 2048, 512     # llama-bench's defaults


def bench_tokens(seed: int, vocab: int, n: int) -> np.ndarray:
    """The random tokens of every test: the same for both engines."""
    return np.random.default_rng(seed).integers(0, vocab, size=max(n, 1), dtype=np.int64)


class PerfxEngine:
    """perfx on one device: a GGUF model or a synthetic shape."""

    def __init__(self, spec: dict):
        from ..backends import open_backend
        from ..llm import load_model
        from ..model import Transformer

        if spec.get("shape"):
            from ..synthetic import get_shape, synthetic_weights

            shape = get_shape(spec["shape"])
            backend, notices = open_backend(spec["device"])
            self.transformer = Transformer(shape.config(), synthetic_weights(shape, spec["seed"]), backend,
                                           spec["ctx"])
        else:
            llm = load_model(spec["path"], device=spec["device"], ctx=spec["ctx"])
            self.transformer, notices = llm.transformer, llm.notices
        t = self.transformer
        self.backend = backend = t.backend
        d = backend.report()
        device, name, kind, label = d.device, d.name, d.kind, d.backend
        kv_bytes = backend.capabilities.kv_bytes
        batch = backend.capabilities.max_tokens or t.ctx
        from importlib.metadata import version

        self.info = EngineInfo(
            engine="perfx", version=f"perfx {version(DISTRIBUTION)}", backend=label, device=device, device_name=name,
            device_type=kind, n_ctx=t.ctx, n_batch=batch, n_ubatch=batch,
            n_gpu_layers=t.config.n_layers if kind == "gpu" else 0, kv_type="f16" if kv_bytes == 2 else "f32",
            kv_element_bytes=kv_bytes, weight_bytes=int(t.w.nbytes), notices=list(notices))
        self.tokens = bench_tokens(spec["seed"], t.config.vocab_size, spec["max_tokens"])

    def run(self, test: TestSpec) -> int:
        """Runs one test; its duration in nanoseconds."""
        t, tokens = self.transformer, self.tokens
        prompt, first = tokens[:test.n_prompt], tokens[test.n_prompt:test.n_prompt + 1]
        start = time.perf_counter_ns()
        if test.n_prompt:
            t.next_token(prompt, 0)
        if test.n_gen:       # greedy generation: n_gen steps, from one bench token, each fed its argmax
            for _ in t.greedy(first, test.n_prompt, test.n_gen):
                pass
        return time.perf_counter_ns() - start

    def profile(self, n_prompt: int, n_gen: int) -> list[PhaseProfile]:
        """The launch budget (profile.py) of a prefill of n_prompt tokens, then of n_gen decode steps
        after it, fed their argmax as in a tg test."""
        t, tokens = self.transformer, self.tokens
        prompt, first = tokens[:n_prompt], tokens[n_prompt:n_prompt + 1]
        phases = []
        if n_prompt:
            phases.append(profile_phase(self.backend, f"pp{n_prompt}", n_prompt, lambda: [t.next_token(prompt, 0)]))
        if n_gen:                        # one step per token, ending when the token is read back
            name = f"tg{n_gen}" + (f" after pp{n_prompt}" if n_prompt else "")
            phases.append(profile_phase(self.backend, name, n_gen, lambda: t.greedy(first, n_prompt, n_gen)))
        return phases

    def device_bytes(self) -> int | None:
        return self.backend.device_bytes

    def copy_bandwidth(self) -> float | None:
        return self.backend.copy_bandwidth()


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python's low-level API, timed as llama-bench times it."""

    def __init__(self, spec: dict):
        try:
            import llama_cpp as lc
        except ImportError:
            raise PerfxError(INSTALL_HINT) from None
        self.lc = lc
        offload = bool(spec.get("offload")) and bool(lc.llama_supports_gpu_offload())
        threads = spec["threads"]
        try:
            self.llama = lc.Llama(spec["path"], n_ctx=spec["ctx"], n_batch=LLAMA_N_BATCH, n_ubatch=LLAMA_N_UBATCH,
                                  n_threads=threads, n_threads_batch=threads, n_gpu_layers=-1 if offload else 0,
                                  verbose=False)
        except (ValueError, RuntimeError) as e:
            raise PerfxError(f"llama.cpp cannot load {spec['path']}: {e}") from None
        self.ctx = self.llama.ctx
        self.memory = lc.llama_get_memory(self.ctx)
        self.n_batch = LLAMA_N_BATCH
        vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.llama.model))
        self.tokens = bench_tokens(spec["seed"], vocab, spec["max_tokens"])
        self.info = EngineInfo(
            engine="llama.cpp", version=f"llama-cpp-python {getattr(lc, '__version__', '?')}",
            backend="GPU" if offload else "CPU", device="gpu" if offload else "cpu",
            device_name="GPU offload" if offload else cpu_name(), device_type="gpu" if offload else "cpu",
            n_ctx=int(lc.llama_n_ctx(self.ctx)), n_batch=LLAMA_N_BATCH, n_ubatch=LLAMA_N_UBATCH,
            n_gpu_layers=-1 if offload else 0, kv_type="f16", kv_element_bytes=2, weight_bytes=0)

    def run(self, test: TestSpec) -> int:
        lc, ctx = self.lc, self.ctx
        tokens = [int(x) for x in self.tokens[:test.n_tokens]]
        batches = [(lc.llama_token * n)(*tokens[i:i + n])
                   for i in range(0, test.n_prompt, self.n_batch)
                   for n in [min(self.n_batch, test.n_prompt - i)]]
        gen = [(lc.llama_token * 1)(t) for t in tokens[test.n_prompt:]]
        lc.llama_memory_clear(self.memory, False)
        start = time.perf_counter_ns()
        for batch in batches:
            self._decode(batch, len(batch))
        if batches:
            lc.llama_synchronize(ctx)
        for token in gen:
            self._decode(token, 1)
            lc.llama_synchronize(ctx)
        return time.perf_counter_ns() - start

    def _decode(self, tokens: Any, n: int) -> None:
        rc = self.lc.llama_decode(self.ctx, self.lc.llama_batch_get_one(tokens, n))
        if rc != 0:
            raise PerfxError(f"llama_decode failed with {rc}")

    def device_bytes(self) -> int | None:
        return None

    def copy_bandwidth(self) -> float | None:
        return None
