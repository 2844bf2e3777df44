"""What a bench run measures: llama-bench's tests, the models, and the combinations of model, device
and thread count that run them (`BenchConfig`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PerfxError
from .probes import default_threads

ENGINES = ("perfx", "llama.cpp")
LLAMA_CPP_VERSION = "0.3.36"
INSTALL_HINT = ("--vs llama.cpp needs llama-cpp-python: run scripts/install-llama-cpp.sh "
                f"(or pip install llama-cpp-python=={LLAMA_CPP_VERSION})")


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
    kind: str = "gguf"          # the file's kind (engine.formats.loader), or "synthetic"
    shape: str | None = None    # the synthetic shape


def _size_label(n_params: int) -> str:
    """135M, 6.7B, 70B: the size people give a model."""
    if n_params >= 1e9:
        return f"{n_params / 1e9:.0f}B" if n_params >= 10e9 else f"{n_params / 1e9:.1f}B"
    return f"{n_params / 1e6:.0f}M" if n_params >= 1e6 else f"{n_params / 1e3:.0f}K"


def describe_file(path: str | Path, name: str | None = None) -> ModelSpec:
    """A model file's ModelSpec (GGUF, perfx or a Hugging Face directory), from its header."""
    from ..formats.loader import open_model

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
    from ..synthetic import get_shape

    s = get_shape(name)
    c = s.config()
    embd = s.vocab_size * s.dim // 32 * 34
    per_token = s.nbytes - (0 if s.tied else embd)
    return ModelSpec(name=s.name, description=s.description, size=s.nbytes, n_params=s.n_params,
                     n_layers=c.n_layers, kv_dim=c.kv_dim, ctx_len=c.ctx_len, file_bytes_per_token=per_token,
                     kind="synthetic", shape=s.name)


def describe_model(name_or_path: str | None, progress: bool = False) -> ModelSpec:
    """A registry model (downloaded on first use) or a model file."""
    from ..hub.registry import resolve

    path, _ = resolve(name_or_path, progress=progress)
    return describe_file(path, name=name_or_path or Path(path).stem)


# ---- configuration --------------------------------------------------------------------------------


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
    llama_bench: str | None = None  # a llama-bench binary as the llama.cpp peer (bench/peer.py)
    llama_fa: int = 1             # its flash attention (-fa)
    profile: bool = False         # perfx's launch budget per token after the tests (profile.py)

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
        if self.profile and any(d.strip().lower() == "numpy" for d in self.devices):
            raise PerfxError("--profile times OpenCL kernel launches, which --device numpy has none of: "
                             "use --device cpu or gpu")
        longest = self.longest
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

    @property
    def profile_lengths(self) -> tuple[int, int]:
        """The profile's prefill and decode steps after it: the first prompt and generation lengths."""
        return (next((t.n_prompt for t in self.tests if t.n_prompt), 0),
                next((t.n_gen for t in self.tests if t.n_gen), 0))

    @property
    def longest(self) -> int:
        """The most tokens one run puts in the context: the longest test, or the profile's prefill and decode."""
        lengths = [t.n_tokens for t in self.tests]
        if self.profile:
            lengths.append(sum(self.profile_lengths))
        return max(lengths)

    def n_ctx(self, model: ModelSpec) -> int:
        return min(max(self.ctx, self.longest), model.ctx_len)

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
