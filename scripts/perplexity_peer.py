"""Perplexity of one GGUF file through perfx and through llama.cpp (llama-cpp-python), on the same token
ids and the same windows (engine.perplexity: llama-perplexity's method), so that the two figures differ
only by the engines' arithmetic.

    python scripts/perplexity_peer.py MODEL TEXT [--ctx 512] [--chunks 4] [--device cpu] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from perfx.engine import load_model
from perfx.engine.perplexity import perplexity


class LlamaCppModel:
    """llama.cpp behind the interface engine.perplexity reads: tokenizer, ctx, reset, forward."""

    def __init__(self, path: str, tokenizer, ctx: int, threads: int):
        from llama_cpp import Llama

        self.llama = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=threads,
                           verbose=False)
        self.tokenizer, self.ctx = tokenizer, ctx

    def reset(self) -> None:
        self.llama.reset()

    def forward(self, ids, start_pos: int) -> np.ndarray:
        self.llama.eval([int(i) for i in ids])
        return np.array(self.llama.scores[: len(ids)], dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    text = open(a.text, encoding="utf-8").read()
    if a.device != "numpy":
        from perfx.engine.backends.opencl.devices import set_cpu_threads

        set_cpu_threads(a.threads)
    llm = load_model(a.model, device=a.device, ctx=a.ctx)
    peer = LlamaCppModel(str(llm.path), llm.tokenizer, a.ctx, a.threads)
    for name, model in (("perfx", llm), ("llama.cpp", peer)):
        t = time.perf_counter()
        r = perplexity(model, text, a.ctx, a.chunks)
        print(f"{name:10s} PPL = {r.ppl:.4f} +/- {r.ppl_error:.4f} over {r.tokens_scored} tokens "
              f"({time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
