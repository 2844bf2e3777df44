"""perfx bench: llama-bench's tests and tables, with memory, bandwidth, and llama.cpp side by side.

Tests are named as llama-bench names them: `ppP` is a prompt of P tokens from an empty cache, `tgN`
the decode of N tokens one at a time from an empty cache, `ppP+tgN` both (t/s counts all P + N
tokens). Tokens are random and drawn before the clock starts. llama.cpp decodes each generated step
from a random token and samples nothing, as llama-bench does; perfx generates greedily as `perfx chat`
at temperature 0 does: each step's input is the argmax of the step before, which never leaves the
device, and one int per token is read back while the next step is already enqueued. Each test runs once
to warm up, then `reps` times, timed; t/s is reported as mean ± sample standard deviation.

Every (model, device, threads) combination runs in fresh worker processes, one per engine: PoCL
fixes its thread count when OpenCL starts, and each engine's peak RSS must be its own. With llama.cpp
alongside (llama-cpp-python, on the same GGUF file and thread count) the engines take turns: warm-up
A, warm-up B, then A B A B ...

    config = BenchConfig(models=[describe_model("smollm2-135m-instruct")], tests=expand_tests([512], [128]))
    run = run_bench(config)
    print(format_markdown(run))
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .backends.numpy_backend import cpu_name
from . import DISTRIBUTION
from .errors import PerfxError

MiB, GiB = 1 << 20, 1 << 30
ENGINES = ("perfx", "llama.cpp")
FORMATS = ("md", "json", "jsonl", "csv")
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_N_BATCH, LLAMA_N_UBATCH = 2048, 512     # llama-bench's defaults
INSTALL_HINT = ("--vs llama.cpp needs llama-cpp-python: run scripts/install-llama-cpp.sh "
                f"(or pip install llama-cpp-python=={LLAMA_CPP_VERSION})")
REBUILD_HINT = "rebuild it with scripts/install-llama-cpp.sh --rebuild"
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ---- tests and their expansion --------------------------------------------------------------------


@dataclass(frozen=True)
class TestSpec:
    """One llama-bench test: a prompt of n_prompt tokens, then n_gen generated one at a time."""

    n_prompt: int
    n_gen: int

    @property
    def name(self) -> str:
        if self.n_gen == 0:
            return f"pp{self.n_prompt}"
        if self.n_prompt == 0:
            return f"tg{self.n_gen}"
        return f"pp{self.n_prompt}+tg{self.n_gen}"

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_gen


def parse_ints(text: str, option: str, minimum: int = 0) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; PerfxError naming `option` for anything else or a value below `minimum`."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise PerfxError(f"{option} takes comma-separated integers, got '{text}'") from None
        if value < minimum:
            raise PerfxError(f"{option} values must be at least {minimum}, got {value}")
        values.append(value)
    return values


def parse_list(text: str, option: str) -> list[str]:
    """'a,b' -> ['a', 'b'], without empty items."""
    items = [part.strip() for part in str(text).split(",") if part.strip()]
    if not items:
        raise PerfxError(f"{option} needs at least one value")
    return items


def parse_pg(text: str) -> tuple[int, int]:
    """-pg 'P,N' -> (P, N)."""
    values = parse_ints(text, "-pg", minimum=0)
    if len(values) != 2:
        raise PerfxError(f"-pg takes a prompt and a generation length as 'P,N' (e.g. 512,128), got '{text}'")
    return values[0], values[1]


def expand_tests(prompts: list[int], gens: list[int], pgs: list[tuple[int, int]] = ()) -> list[TestSpec]:
    """llama-bench's tests, in its order: ppP for each prompt length, tgN for each generation length,
    ppP+tgN for each pair; zeros are skipped (-p 0 runs no prompt test)."""
    tests = [TestSpec(p, 0) for p in prompts if p > 0] + [TestSpec(0, n) for n in gens if n > 0]
    tests += [TestSpec(p, n) for p, n in pgs if p > 0 or n > 0]
    if not tests:
        raise PerfxError("nothing to run: every -p, -n and -pg value is 0")
    return list(dict.fromkeys(tests))


# ---- models ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark, a model file or a synthetic shape, as the tables describe it."""

    name: str                   # as given on the command line
    description: str            # the model column: "llama 135M Q4_1"
    size: int                   # bytes of the weights as stored
    n_params: int
    n_layers: int
    kv_dim: int                 # K (or V) values per position per layer
    ctx_len: int                # the context the model was trained for
    file_bytes_per_token: int   # weight bytes read per decoded token by an engine using the file's formats
    path: str | None = None     # the model file
    kind: str = "gguf"          # the file's kind (engine.loader), or "synthetic"
    shape: str | None = None    # the synthetic shape


def _size_label(n_params: int) -> str:
    """135M, 6.7B, 70B: the size people give a model."""
    if n_params >= 1e9:
        return f"{n_params / 1e9:.0f}B" if n_params >= 10e9 else f"{n_params / 1e9:.1f}B"
    return f"{n_params / 1e6:.0f}M" if n_params >= 1e6 else f"{n_params / 1e3:.0f}K"


def describe_file(path: str | Path, name: str | None = None) -> ModelSpec:
    """A model file's ModelSpec (GGUF, perfx or a Hugging Face directory), from its header."""
    from .loader import open_model

    f = open_model(path)
    c = f.config
    tensors = list(f.tensors.values())
    size = sum(t.nbytes for t in tensors)
    n_params = sum(math.prod(t.shape) for t in tensors)
    try:
        import gguf

        quant = gguf.LlamaFileType(int(f.metadata["general.file_type"])).name.removeprefix("MOSTLY_")
    except (KeyError, TypeError, ValueError, ImportError):
        counts: dict[str, int] = {}
        for t in tensors:
            if len(t.shape) == 2:
                counts[t.qtype] = counts.get(t.qtype, 0) + t.nbytes
        quant = max(counts, key=counts.get) if counts else "?"
    label = str(f.metadata.get("general.size_label") or _size_label(n_params))
    embd = f.tensors["token_embd.weight"]
    per_token = size - (0 if c.tied_embedding else embd.nbytes)
    return ModelSpec(name=name or str(path), description=f"{c.arch} {label} {quant}", size=size, n_params=n_params,
                     n_layers=c.n_layers, kv_dim=c.kv_dim, ctx_len=c.ctx_len, file_bytes_per_token=per_token,
                     path=str(f.path), kind=f.kind)


def describe_synthetic(name: str) -> ModelSpec:
    """The ModelSpec of a synthetic shape (nothing is generated)."""
    from .synthetic import get_shape

    s = get_shape(name)
    c = s.config()
    embd = s.vocab_size * s.dim // 32 * 34
    per_token = s.nbytes - (0 if s.tied else embd)
    return ModelSpec(name=s.name, description=s.description, size=s.nbytes, n_params=s.n_params,
                     n_layers=c.n_layers, kv_dim=c.kv_dim, ctx_len=c.ctx_len, file_bytes_per_token=per_token,
                     kind="synthetic", shape=s.name)


def describe_model(name_or_path: str | None, progress: bool = False) -> ModelSpec:
    """A registry model (downloaded on first use) or a model file."""
    from .registry import resolve

    path, _ = resolve(name_or_path, progress=progress)
    return describe_file(path, name=name_or_path or Path(path).stem)


# ---- configuration --------------------------------------------------------------------------------


def default_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Combo:
    """One (model, device, threads) combination: the tests of one pair of worker processes."""

    model: ModelSpec
    device: str
    threads: int


@dataclass
class BenchConfig:
    models: list[ModelSpec]
    tests: list[TestSpec]
    devices: list[str] = field(default_factory=lambda: ["auto"])
    threads: list[int] = field(default_factory=lambda: [default_threads()])
    reps: int = 5
    ctx: int = 2048               # each model is loaded with max(ctx, the longest test) tokens of context
    vs_llama_cpp: bool = False
    seed: int = 0
    cooldown: float = 0.0         # seconds of rest before each timed run (thermal throttling on phones)
    llama_bench: str | None = None  # a llama-bench binary as the llama.cpp peer (engine/bench_peer.py)
    llama_fa: int = 1             # its flash attention (-fa)

    def validate(self) -> None:
        if self.reps < 1:
            raise PerfxError(f"-r must be at least 1 (got {self.reps})")
        if self.ctx < 1:
            raise PerfxError(f"--ctx must be at least 1 (got {self.ctx})")
        if self.cooldown < 0:
            raise PerfxError(f"--cooldown must be at least 0 seconds (got {self.cooldown})")
        if not self.models or not self.tests or not self.devices or not self.threads:
            raise PerfxError("nothing to run: no model, test, device or thread count")
        for t in self.threads:
            if t < 1:
                raise PerfxError(f"-t values must be at least 1 (got {t})")
        longest = max(t.n_tokens for t in self.tests)
        for m in self.models:
            if longest > m.ctx_len:
                raise PerfxError(f"{m.name}: a test of {longest} tokens is longer than the model's context of "
                                 f"{m.ctx_len}")
        if self.vs_llama_cpp:
            for m in self.models:
                if m.kind != "gguf":
                    what = "a --synthetic model has no file" if m.shape else f"{m.name} is a {m.kind} model, not GGUF"
                    raise PerfxError(f"--vs llama.cpp needs GGUF models: {what} for llama.cpp")
            if self.llama_bench is None and not llama_cpp_available():
                raise PerfxError(INSTALL_HINT)

    def combos(self) -> list[Combo]:
        return [Combo(m, d, t) for m in self.models for d in self.devices for t in self.threads]

    def n_ctx(self, model: ModelSpec) -> int:
        return min(max(self.ctx, max(t.n_tokens for t in self.tests)), model.ctx_len)

    @property
    def engines(self) -> tuple[str, ...]:
        return ENGINES if self.vs_llama_cpp else ENGINES[:1]

    @property
    def n_steps(self) -> int:
        """Runs in all (warm-ups included), for progress."""
        return len(self.combos()) * len(self.tests) * (self.reps + 1) * len(self.engines)


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# ---- statistics -----------------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def stddev(values: list[float]) -> float:
    """Sample standard deviation (n - 1), 0 for fewer than two values: llama-bench's."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Samples:
    """The timed repetitions of one test: nanoseconds each, and the tokens each one processed."""

    n_tokens: int
    ns: list[int] = field(default_factory=list)

    @property
    def ts(self) -> list[float]:
        return [self.n_tokens * 1e9 / ns for ns in self.ns]

    @property
    def avg_ts(self) -> float:
        return mean(self.ts)

    @property
    def stddev_ts(self) -> float:
        return stddev(self.ts)

    @property
    def median_ts(self) -> float:
        return statistics.median(self.ts) if self.ns else 0.0

    @property
    def avg_ns(self) -> int:
        return round(mean(self.ns))

    @property
    def stddev_ns(self) -> int:
        return round(stddev(self.ns))


# ---- results --------------------------------------------------------------------------------------


@dataclass
class EngineInfo:
    """What a worker says about its engine once the model is loaded, then about memory and bandwidth."""

    engine: str                   # "perfx" or "llama.cpp"
    version: str                  # "perfx 0.1.0", "llama-cpp-python 0.3.36"
    backend: str                  # "OpenCL", "NumPy", "CPU", "GPU"
    device: str                   # "opencl:0:0", "numpy", "cpu"
    device_name: str
    device_type: str              # "cpu" or "gpu"
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_gpu_layers: int
    kv_type: str                  # "f32" or "f16"
    kv_element_bytes: int
    weight_bytes: int             # weight bytes read per decoded token
    notices: list[str] = field(default_factory=list)
    peak_rss: int | None = None
    device_bytes: int | None = None
    copy_bandwidth: float | None = None

    @property
    def label(self) -> str:
        """The backend column: "perfx OpenCL", "llama.cpp CPU"."""
        return f"{self.engine} {self.backend}"


@dataclass
class Result:
    """One row: a test of a model on one engine, device and thread count."""

    model: ModelSpec
    test: TestSpec
    threads: int
    info: EngineInfo
    samples: Samples
    test_time: str
    ratio: float | None = None    # perfx t/s over llama.cpp's, on perfx rows of a --vs run

    @property
    def engine(self) -> str:
        return self.info.engine

    @property
    def bytes_per_token(self) -> int | None:
        """Weights plus the KV cache read per generated token, on average over a tg test; None otherwise."""
        if self.test.n_prompt or not self.test.n_gen:
            return None
        positions = (self.test.n_gen + 1) / 2
        kv = 2 * self.model.n_layers * self.model.kv_dim * self.info.kv_element_bytes * positions
        return int(self.info.weight_bytes + kv)

    @property
    def bandwidth(self) -> float | None:
        """Bytes read per second while generating (tg tests)."""
        b = self.bytes_per_token
        return b * self.samples.avg_ts if b is not None and self.samples.ns else None

    @property
    def bandwidth_share(self) -> float | None:
        """The achieved bandwidth over the device's measured copy bandwidth."""
        if self.bandwidth is None or not self.info.copy_bandwidth:
            return None
        return self.bandwidth / self.info.copy_bandwidth


@dataclass(frozen=True)
class Build:
    version: str
    commit: str
    cpu: str


@dataclass
class BenchRun:
    config: BenchConfig
    build: Build
    results: list[Result] = field(default_factory=list)
    interrupted: bool = False
    error: str | None = None      # why the run stopped early, after some results
    load: float = 0.0             # the 1-minute load average when the run started: other processes' work

    @property
    def n_tests(self) -> int:
        return len(self.config.combos()) * len(self.config.tests) * len(self.config.engines)


def build_info() -> Build:
    """perfx's version, and the git commit of this checkout ('-dirty' with local changes)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version(DISTRIBUTION)
    except PackageNotFoundError:
        v = "unknown"
    root = Path(__file__).resolve().parents[1]
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


# ---- the worker processes -------------------------------------------------------------------------


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


def bench_tokens(seed: int, vocab: int, n: int) -> np.ndarray:
    """The random tokens of every test: the same for both engines."""
    return np.random.default_rng(seed).integers(0, vocab, size=max(n, 1), dtype=np.int64)


class PerfxEngine:
    """perfx on one device: a GGUF model or a synthetic shape."""

    def __init__(self, spec: dict):
        from .backends import open_backend
        from .llm import load_model
        from .model import Transformer

        if spec.get("shape"):
            from .synthetic import get_shape, synthetic_weights

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


def worker_main(argv: list[str]) -> int:
    """A worker process: loads one engine from the JSON spec in argv[0], then answers one JSON request per
    line of stdin with one JSON line ({"op": "run", "test": i} | "memory" | "bandwidth" | "quit")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent handles Ctrl-C and ends its workers
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)                                     # what native libraries print goes to stderr

    def send(message: dict) -> None:
        out.write(json.dumps(message) + "\n")

    try:
        spec = json.loads(argv[0])
        tests = [TestSpec(*t) for t in spec["tests"]]
        if spec["engine"] == "perfx":
            engine = PerfxEngine(spec)
        elif spec.get("llama_bench"):
            from .bench_peer import LlamaBenchEngine

            engine = LlamaBenchEngine(spec)
        else:
            engine = LlamaCppEngine(spec)
        send({"ready": asdict(engine.info)})
        for line in sys.stdin:
            request = json.loads(line)
            op = request.get("op")
            if op == "run":
                send({"ns": engine.run(tests[request["test"]])})
            elif op == "memory":
                send({"peak_rss": peak_rss(), "device_bytes": engine.device_bytes()})
            elif op == "bandwidth":
                send({"copy_bandwidth": engine.copy_bandwidth()})
            else:
                break
    except PerfxError as e:
        send({"error": str(e)})
        return 1
    except Exception as e:  # anything else: the message for the user, the traceback in the worker's log
        traceback.print_exc()
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


class Worker:
    """An engine in its own process (python -m perfx.engine.bench SPEC), driven over its stdin and stdout.
    The process starts at once; wait_ready() waits for its model to load."""

    info: EngineInfo

    def __init__(self, engine: str, spec: dict, threads: int):
        from .backends.opencl.devices import THREAD_VARIABLES

        env = dict(os.environ)
        env.update({name: str(threads) for name in THREAD_VARIABLES + THREAD_ENV})
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        self.engine = engine
        self.log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        self.proc = subprocess.Popen(self.command({**spec, "engine": engine}), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                     text=True, encoding="utf-8")

    def command(self, spec: dict) -> list[str]:
        return [sys.executable, "-m", "perfx.engine.bench", json.dumps(spec)]

    def wait_ready(self) -> EngineInfo:
        self.info = EngineInfo(**self._receive()["ready"])
        return self.info

    def request(self, op: str, **args) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass                                      # _receive says why the worker is gone
        return self._receive()

    def _receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise PerfxError(exit_message(self.engine, self.proc.wait(), self._last_log_line()))
        message = json.loads(line)
        if "error" in message:
            raise PerfxError(message["error"])
        return message

    def _last_log_line(self) -> str:
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().splitlines() if line.strip()]
        return lines[-1] if lines else "no message"

    def close(self, kill: bool = False) -> None:
        """Ends the worker: asks it to quit (kills it with `kill`, or if it does not quit)."""
        if kill and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def exit_message(engine: str, rc: int, last_line: str) -> str:
    """Why a worker that stopped answering is gone: its exit status, or the signal that killed it and
    what that means (a crash of llama.cpp's native code is fixed by building it again)."""
    if rc >= 0:
        return f"the {engine} worker exited with status {rc}: {last_line}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    if -rc in (9, 15):                                 # SIGKILL, SIGTERM
        return (f"the {engine} worker was killed by {name} (out of memory, or ended by another process): "
                f"{last_line}")
    what = "llama.cpp" if engine == "llama.cpp" else f"the {engine} worker"
    advice = f"; {REBUILD_HINT}" if engine == "llama.cpp" else ""
    return f"{what} crashed with {name} ({last_line}){advice}"


# ---- running --------------------------------------------------------------------------------------


Progress = Callable[[str, int, int], None]          # (what runs now, runs done, runs in all)


def run_bench(config: BenchConfig, progress: Progress | None = None, build: Build | None = None) -> BenchRun:
    """Runs every test of every combination. On Ctrl-C, returns the tests finished so far; on an
    error after some tests finished (a device that fails), returns them with the error."""
    config.validate()
    run = BenchRun(config, build or build_info(), load=load_average())
    state = {"done": 0, "total": config.n_steps}
    try:
        for combo in config.combos():
            _run_combo(config, combo, run, progress or (lambda *a: None), state)
    except KeyboardInterrupt:
        run.interrupted = True
    except PerfxError as e:
        if not run.results:
            raise
        run.error = str(e)
    return run


def load_average() -> float:
    """The 1-minute load average (0 where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _run_combo(config: BenchConfig, combo: Combo, run: BenchRun, progress: Progress, state: dict) -> None:
    model = combo.model
    where = f"{Path(model.name).name} · {combo.device} · {combo.threads} thread{'s' * (combo.threads != 1)}"
    spec = {"path": model.path, "shape": model.shape, "device": combo.device, "threads": combo.threads,
            "ctx": config.n_ctx(model), "seed": config.seed, "max_tokens": max(t.n_tokens for t in config.tests),
            "tests": [[t.n_prompt, t.n_gen] for t in config.tests],
            "llama_bench": config.llama_bench, "llama_fa": config.llama_fa}
    workers: list[Worker] = []
    try:
        progress(f"{where} · loading perfx", state["done"], state["total"])
        workers.append(Worker("perfx", spec, combo.threads))
        host = workers[0].wait_ready()
        if config.vs_llama_cpp:
            progress(f"{where} · loading llama.cpp", state["done"], state["total"])
            workers.append(Worker("llama.cpp", {**spec, "offload": host.device_type == "gpu"}, combo.threads))
            workers[1].wait_ready().weight_bytes = model.file_bytes_per_token
        for index, test in enumerate(config.tests):
            samples = [Samples(test.n_tokens) for _ in workers]
            for rep in range(config.reps + 1):
                for w, s in zip(workers, samples):
                    step = "warm-up" if rep == 0 else f"run {rep}/{config.reps}"
                    last = f" · {s.ts[-1]:.1f} t/s" if s.ns else ""
                    if rep and config.cooldown:
                        progress(f"{where} · cooling down {config.cooldown:g} s", state["done"], state["total"])
                        time.sleep(config.cooldown)
                    progress(f"{where} · {w.engine} {test.name} {step}{last}", state["done"], state["total"])
                    ns = w.request("run", test=index)["ns"]
                    if rep:
                        s.ns.append(ns)
                    state["done"] += 1
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            rows = [Result(model, test, combo.threads, w.info, s, stamp) for w, s in zip(workers, samples)]
            if len(rows) == 2 and rows[1].samples.avg_ts > 0:
                rows[0].ratio = rows[0].samples.avg_ts / rows[1].samples.avg_ts
            for w in workers:
                _update_memory(w)
            run.results += rows
        progress(f"{where} · memory and bandwidth", state["done"], state["total"])
        for w in workers:
            _update_memory(w)
            w.info.copy_bandwidth = w.request("bandwidth")["copy_bandwidth"]
        for w in workers[1:]:
            if w.info.device_type == "cpu" and host.device_type == "cpu":
                w.info.copy_bandwidth = host.copy_bandwidth
    except BaseException:
        for w in workers:
            w.close(kill=True)
        raise
    for w in workers:
        w.close()


def _update_memory(worker: Worker) -> None:
    m = worker.request("memory")
    worker.info.peak_rss, worker.info.device_bytes = m["peak_rss"], m["device_bytes"]


# ---- output ---------------------------------------------------------------------------------------


RECORD_FIELDS = (
    "build_commit", "perfx_version", "engine", "engine_version", "cpu_info", "gpu_info", "backends", "device",
    "device_name", "model_filename", "model_type", "model_size", "model_n_params", "synthetic", "n_batch",
    "n_ubatch", "n_threads", "type_k", "type_v", "n_gpu_layers", "n_ctx", "n_prompt", "n_gen", "n_depth", "test",
    "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "median_ts", "peak_rss_bytes", "device_bytes",
    "bytes_per_token", "bandwidth_bytes_per_s", "copy_bandwidth_bytes_per_s", "bandwidth_share", "vs_llama_cpp",
    "samples_ns", "samples_ts",
)


def record(r: Result, build: Build) -> dict:
    """One result as llama-bench's JSON record (its fields where they apply), plus perfx's fields."""
    s, i = r.samples, r.info
    return {
        "build_commit": build.commit,
        "perfx_version": build.version,
        "engine": r.engine,
        "engine_version": i.version,
        "cpu_info": build.cpu,
        "gpu_info": i.device_name if i.device_type == "gpu" else "",
        "backends": i.backend,
        "device": i.device,
        "device_name": i.device_name,
        "model_filename": r.model.path or "",
        "model_type": r.model.description,
        "model_size": r.model.size,
        "model_n_params": r.model.n_params,
        "synthetic": r.model.shape,
        "n_batch": i.n_batch,
        "n_ubatch": i.n_ubatch,
        "n_threads": r.threads,
        "type_k": i.kv_type,
        "type_v": i.kv_type,
        "n_gpu_layers": i.n_gpu_layers,
        "n_ctx": i.n_ctx,
        "n_prompt": r.test.n_prompt,
        "n_gen": r.test.n_gen,
        "n_depth": 0,
        "test": r.test.name,
        "test_time": r.test_time,
        "avg_ns": s.avg_ns,
        "stddev_ns": s.stddev_ns,
        "avg_ts": s.avg_ts,
        "stddev_ts": s.stddev_ts,
        "median_ts": s.median_ts,
        "peak_rss_bytes": i.peak_rss,
        "device_bytes": i.device_bytes,
        "bytes_per_token": r.bytes_per_token,
        "bandwidth_bytes_per_s": r.bandwidth,
        "copy_bandwidth_bytes_per_s": i.copy_bandwidth,
        "bandwidth_share": r.bandwidth_share,
        "vs_llama_cpp": r.ratio,
        "samples_ns": list(s.ns),
        "samples_ts": s.ts,
    }


def format_json(run: BenchRun) -> str:
    return json.dumps([record(r, run.build) for r in run.results], indent=2) + "\n"


def format_jsonl(run: BenchRun) -> str:
    return "".join(json.dumps(record(r, run.build)) + "\n" for r in run.results)


def format_csv(run: BenchRun) -> str:
    """llama-bench's CSV: a header, then one row per result; the samples joined by ';'."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RECORD_FIELDS, lineterminator="\n")
    writer.writeheader()
    for rec in (record(r, run.build) for r in run.results):
        rec = {k: ";".join(str(x) for x in v) if isinstance(v, list) else ("" if v is None else v)
               for k, v in rec.items()}
        writer.writerow(rec)
    return out.getvalue()


def _size(n: int) -> str:
    return f"{n / MiB:.2f} MiB" if n < GiB else f"{n / GiB:.2f} GiB"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def _memory(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB" if n >= 10 * MiB else f"{n / MiB:.1f} MiB"


def _columns(run: BenchRun) -> list[tuple[str, int, Callable[[Result], str]]]:
    """(header, minimum width (negative: left-aligned), cell) of each markdown column."""
    cols: list[tuple[str, int, Callable[[Result], str]]] = [
        ("model", -30, lambda r: r.model.description),
        ("size", 10, lambda r: _size(r.model.size)),
        ("params", 10, lambda r: _params(r.model.n_params)),
        ("backend", -10, lambda r: r.info.label),
    ]
    if len({r.info.device for r in run.results if r.engine == "perfx"}) > 1:
        cols.append(("dev", -12, lambda r: r.info.device))
    cols += [
        ("threads", 7, lambda r: str(r.threads)),
        ("test", 15, lambda r: r.test.name),
        ("t/s", 20, lambda r: f"{r.samples.avg_ts:.2f} ± {r.samples.stddev_ts:.2f}"),
    ]
    if run.config.vs_llama_cpp:
        cols.append(("vs llama.cpp", 12, lambda r: f"{r.ratio:.2f}x" if r.ratio is not None else ""))
    cols += [
        ("peak RSS", 9, lambda r: _memory(r.info.peak_rss)),
        ("dev mem", 9, lambda r: _memory(r.info.device_bytes)),
        ("GB/s", 6, lambda r: "—" if r.bandwidth is None else f"{r.bandwidth / 1e9:.1f}"),
        ("of copy BW", 10, _share),
    ]
    return cols


def _share(r: Result) -> str:
    """The share of the copy bandwidth; over 100% marked *, which the footer explains."""
    if r.bandwidth_share is None:
        return "—"
    return f"{100 * r.bandwidth_share:.0f}%" + ("*" if r.bandwidth_share > 1 else "")


# Memory bandwidth on the datasheet (bytes/s), by a substring of the OpenCL device name; shown beside
# the measured copy bandwidth. Add a device here when its datasheet figure is known.
DATASHEET_PEAKS = {
    "H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H200": 4.8e12,
    "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100-PCIE-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12,
    "L40S": 864e9, "L4": 300e9, "RTX 4090": 1.008e12, "RTX 3090": 936e9, "Adreno (TM) 750": 77e9,
}


def datasheet_peak(device_name: str) -> float | None:
    """The datasheet memory bandwidth of a device, where DATASHEET_PEAKS knows it."""
    matches = [(len(k), v) for k, v in DATASHEET_PEAKS.items() if k.lower() in device_name.lower()]
    return max(matches)[1] if matches else None


def format_markdown(run: BenchRun) -> str:
    """llama-bench's table (model, size, params, backend, threads, test, t/s), perfx's columns after it,
    and a footer: build, devices, what the columns mean."""
    cols = _columns(run)
    cells = [[cell(r) for _, _, cell in cols] for r in run.results]
    widths = [max([abs(w), len(h)] + [len(row[i]) for row in cells]) for i, (h, w, _) in enumerate(cols)]

    def line(values: list[str]) -> str:
        parts = [v.ljust(width) if w < 0 else v.rjust(width) for v, width, (_, w, _) in zip(values, widths, cols)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(" " + ("-" * width if w < 0 else "-" * (width - 1) + ":") + " "
                          for width, (_, w, _) in zip(widths, cols)) + "|"
    lines = [line([h for h, _, _ in cols]), rule] + [line(row) for row in cells]
    return "\n".join(lines + [""] + footer(run)) + "\n"


def footer(run: BenchRun) -> list[str]:
    c, b = run.config, run.build
    lines = [f"build: {b.commit} (perfx {b.version})"]
    devices: dict[str, list[Result]] = {}
    for r in run.results:
        if r.engine == "perfx":
            devices.setdefault(r.info.device, []).append(r)
    for device, rows in devices.items():
        i = rows[0].info
        copies = {r.threads: r.info.copy_bandwidth for r in rows if r.info.copy_bandwidth}
        measured = ", ".join(f"{bw / 1e9:.1f} GB/s ({t} thread{'s' * (t != 1)})" for t, bw in copies.items())
        peak = datasheet_peak(i.device_name)
        lines.append(f"device {device}: {i.device_name} ({i.device_type}), KV cache {i.kv_type}"
                     + (f"; measured copy bandwidth {measured}" if measured else "")
                     + (f"; datasheet peak {peak / 1e9:.0f} GB/s" if peak else ""))
    llama = next((r.info for r in run.results if r.engine == "llama.cpp"), None)
    if llama is not None:
        lines.append(f"llama.cpp: {llama.version}, {llama.backend} backend, KV cache {llama.kv_type}, "
                     "same GGUF file and threads, runs alternating with perfx")
    for m in {m.shape: m for m in c.models if m.shape}.values():
        lines.append(synthetic_footprint(m.shape, c.n_ctx(m), [r for r in run.results if r.model is m]))
    ctxs = "/".join(str(n) for n in sorted({r.info.n_ctx for r in run.results if r.engine == "perfx"}))
    lines.append(f"t/s: mean ± stddev of {c.reps} run{'s' * (c.reps != 1)} after one warm-up; "
                 f"context {ctxs or c.ctx} tokens; "
                 "peak RSS: each engine's process; dev mem: device buffers (weights, KV cache, activations); "
                 "GB/s (tg tests): weights + KV cache read per token x t/s; of copy BW: share of the device's "
                 "measured copy bandwidth")
    if any(r.bandwidth_share and r.bandwidth_share > 1 for r in run.results):
        lines.append("* over 100% of the copy bandwidth: part of what a token reads came from the CPU's caches "
                     "(a small model or a short context), which the copy test's 64 MiB buffers do not reach; "
                     "the copy is measured with each run and the best figure since boot kept")
    cpus = os.cpu_count() or 1
    if run.load > max(1.0, cpus / 4):
        lines.append(f"warning: load average {run.load:.1f} on {cpus} CPUs when the run started: other processes "
                     "competed for the CPU, so the numbers are noisy")
    if run.interrupted or run.error:
        lines.append(f"{'interrupted' if run.interrupted else 'stopped by an error'}: "
                     f"{len(run.results)} of {run.n_tests} tests finished")
    return lines


def synthetic_footprint(shape_name: str, ctx: int, rows: list[Result] = ()) -> str:
    """What a synthetic shape needs: int4 weights plus an f16 KV cache at ctx, and what perfx allocated."""
    from .synthetic import get_shape

    s = get_shape(shape_name)
    kv = s.kv_bytes(ctx, 2)
    text = (f"{s.name} (synthetic, {_params(s.n_params)} params): int4 g{s.group} weights {_size(s.nbytes)} "
            f"+ KV cache at {ctx} tokens {_size(kv)} (f16) = {_size(s.nbytes + kv)}")
    measured: dict[str, int] = {}
    for r in rows:
        if r.engine == "perfx" and r.info.device_bytes:
            measured[r.info.device] = max(measured.get(r.info.device, 0), r.info.device_bytes)
    if measured:
        text += "; perfx allocated " + ", ".join(f"{_size(n)} on {d}" for d, n in measured.items())
    return text


def format_run(run: BenchRun, fmt: str) -> str:
    formats = {"md": format_markdown, "json": format_json, "jsonl": format_jsonl, "csv": format_csv}
    if fmt not in formats:
        raise PerfxError(f"unknown output format '{fmt}' (choose from: {', '.join(FORMATS)})")
    return formats[fmt](run)


def write(run: BenchRun, fmt: str, out: TextIO = sys.stdout) -> None:
    out.write(format_run(run, fmt))
    out.flush()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
