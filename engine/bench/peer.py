"""llama.cpp as `perfx bench --vs llama.cpp` peer through a llama-bench binary (`--llama-bench PATH`): a
GPU build (CUDA, Vulkan, ...) that llama-cpp-python's wheel lacks, on the very same GGUF file; and, for
`--synthetic SHAPE --vs llama.cpp`, that file written from the shape (random Q4_0 weights, a real
model's tokenizer) so that both engines load the same weights.

Each timed run of a test is one llama-bench process (`-r 1`, its own warm-up skipped: perfx's bench
makes the warm-up run), which loads the model, runs the test once and reports its time; runs alternate
with perfx's as with llama-cpp-python. Offload: all layers (-ngl 99) when perfx runs on a GPU, with
flash attention as --llama-fa says (llama-bench's -fa).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ..errors import PerfxError


def check_binary(path: str) -> str:
    """The llama-bench path, checked: an executable file."""
    p = Path(path).expanduser()
    if not p.is_file() or not os.access(p, os.X_OK):
        raise PerfxError(f"--llama-bench {path}: not an executable file; give the path of a built llama-bench")
    return str(p.resolve())


def synthetic_gguf(shape_name: str, seed: int, tokenizer_from: str | None = None) -> Path:
    """The GGUF file of a synthetic shape (engine.synthetic.write_gguf), written once into the cache:
    <perfx root>/synthetic/<shape>-seed<seed>.gguf, with the tokenizer of `tokenizer_from` (default:
    the default model's file)."""
    from ..dirs import cache_dir
    from ..synthetic import get_shape, write_gguf

    shape = get_shape(shape_name)
    path = cache_dir() / "synthetic" / f"{shape.name}-seed{seed}.gguf"
    if not path.exists():
        if tokenizer_from is None:
            from ..hub.registry import resolve

            tokenizer_from = str(resolve(None))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(shape, str(path), tokenizer_from, seed)
    return path


class LlamaBenchEngine:
    """One llama-bench binary on one GGUF file; `run(test)` returns the test's time in nanoseconds."""

    def __init__(self, spec: dict):
        from .results import EngineInfo

        self.binary, self.path = spec["llama_bench"], spec["path"]
        gpu = bool(spec.get("offload"))
        self.args = ["-m", self.path, "-t", str(spec["threads"]), "-ngl", "99" if gpu else "0",
                     "-fa", str(int(spec.get("llama_fa", 1))), "-r", "1", "-o", "json"]
        first = self._record(0, 1)                          # a tiny run: the build's name and the model load
        self.info = EngineInfo(
            engine="llama.cpp", version=f"llama-bench {first.get('build_commit', '?')}",
            backend=first.get("backends", "?"), device="gpu" if gpu else "cpu",
            device_name=first.get("gpu_info") or first.get("cpu_info", "?"), device_type="gpu" if gpu else "cpu",
            n_ctx=0, n_batch=int(first.get("n_batch", 2048)), n_ubatch=int(first.get("n_ubatch", 512)),
            n_gpu_layers=int(first.get("n_gpu_layers", 0)), kv_type=str(first.get("type_k", "f16")),
            kv_element_bytes=2, weight_bytes=0)

    def _record(self, n_prompt: int, n_gen: int) -> dict:
        test = ["-p", "0", "-n", "0", "-pg", f"{n_prompt},{n_gen}"] if n_prompt and n_gen else \
            ["-p", str(n_prompt), "-n", str(n_gen)]
        cmd = [self.binary, *self.args, *test]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        except OSError as e:
            raise PerfxError(f"cannot run {self.binary}: {e.strerror}") from None
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise PerfxError(f"llama-bench failed on {self.path} (status {done.returncode}): {tail}")
        try:
            records = json.loads(done.stdout)
            return records[0]
        except (ValueError, IndexError, KeyError):
            raise PerfxError(f"llama-bench printed no JSON record for -p {n_prompt} -n {n_gen}") from None

    def run(self, test) -> int:
        return int(self._record(test.n_prompt, test.n_gen)["avg_ns"])

    def device_bytes(self) -> int | None:
        return None

    def copy_bandwidth(self) -> float | None:
        return None
