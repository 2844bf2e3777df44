"""perfx's engine: load a model, run it, sample from it."""
from .errors import PerfxError
from .sampler import Sampling

__all__ = ["DISTRIBUTION", "PerfxError", "Sampling", "load_model"]

DISTRIBUTION = "perfx-llm"     # the name perfx installs under (its version: importlib.metadata.version)


def load_model(name_or_path=None, device: str = "numpy", ctx: int | None = None, progress: bool = False):
    """Load a registry model (downloaded on first use) or a GGUF file; see `engine.llm.load_model`."""
    from .llm import load_model as _load

    return _load(name_or_path, device=device, ctx=ctx, progress=progress)
