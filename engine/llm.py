"""A loaded model: transformer + tokenizer + chat template, with prefill/decode generation.

    model = load_model("smollm2-135m-instruct")
    ids = model.tokenizer.encode(model.chat_template.render([{"role": "user", "content": "Hi"}]))
    for token in model.generate(ids, Sampling(temperature=0)): ...
"""
from __future__ import annotations

import functools

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .backends import open_backend
from .chat import ChatTemplate
from .errors import ModelFileError, PerfxError, reading_model
from .formats.loader import open_model
from .memory import PHONE_CTX, check_available, estimate, is_android, weight_bytes
from .model import Transformer, checked_ids, weights_from_tensors
from .sampler import Sampler, Sampling
from .tokenizer import NOTICES as TOKENIZER_NOTICES
from .tokenizer import Tokenizer

DEFAULT_CTX = 2048


@dataclass
class Stats:
    """Timings of the last generate() call."""

    prompt_tokens: int = 0      # tokens actually prefilled (the cached prefix is not counted)
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0          # from the first generated token to the last
    ttft_s: float = 0.0         # from the call to the first generated token
    finish: str = ""            # "stop" (end of turn), "length" (max_tokens) or "context" (cache full)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        return (self.gen_tokens - 1) / self.gen_s if self.gen_s > 0 and self.gen_tokens > 1 else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "prompt_s": self.prompt_s, "prompt_tps": self.prompt_tps,
            "gen_tokens": self.gen_tokens, "gen_s": self.gen_s, "gen_tps": self.gen_tps,
            "ttft_s": self.ttft_s, "finish": self.finish,
        }


@dataclass
class LLM:
    path: Path
    transformer: Transformer
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    metadata: dict
    notices: list[str] = field(default_factory=list)  # what the device choice had to say
    cached: list[int] = field(default_factory=list)   # the tokens whose K and V sit in the cache
    stats: Stats = field(default_factory=Stats)

    @property
    def config(self):
        return self.transformer.config

    @property
    def ctx(self) -> int:
        return self.transformer.ctx

    @property
    def device(self) -> str:
        return self.transformer.backend.description

    def reset(self) -> None:
        self.cached = []

    def forward(self, ids, start_pos: int = 0) -> np.ndarray:
        """Teacher-forced logits [len(ids), vocab], continuing the cache at start_pos."""
        ids = checked_ids(ids, self.config.vocab_size)
        if start_pos < 0 or start_pos > len(self.cached):
            raise PerfxError(f"start_pos {start_pos} is past the {len(self.cached)} cached tokens")
        self._check_fits(start_pos + len(ids))
        logits = self.transformer.forward(ids, start_pos)
        self.cached = self.cached[:start_pos] + ids.tolist()
        return logits

    @functools.cached_property
    def most_prompt_chars(self) -> int:
        """A cheap bound: no token stands for more characters than the UTF-8 bytes of the longest vocab
        entry, so a text of more characters than the context times that cannot fit and is refused before
        it is tokenized (tokenizing megabytes costs gigabytes)."""
        tok = self.tokenizer
        return self.ctx * max(len(tok.token_text(i).encode()) for i in range(tok.vocab_size))

    def check_text_fits(self, text: str) -> None:
        """Refuses, before tokenizing it, a text that cannot fit the context whatever its tokens."""
        if len(text) > self.most_prompt_chars:
            raise PerfxError(f"the prompt is {len(text)} characters, far more than the context of {self.ctx} "
                             "tokens holds; shorten it or raise --ctx")

    def _check_fits(self, n: int) -> None:
        if n > self.ctx:
            raise PerfxError(
                f"the prompt is {n} tokens, longer than the context of {self.ctx}; shorten it or raise --ctx"
            )

    def generate(self, prompt_ids, sampling: Sampling = Sampling()) -> Iterator[int]:
        """Yields generated tokens one by one. Tokens already in the cache (a shared prefix with the
        previous call, as in a chat) are not computed again."""
        prompt = checked_ids(list(prompt_ids), self.config.vocab_size).tolist()
        if not prompt:
            raise PerfxError("the prompt is empty")
        self._check_fits(len(prompt) + 1)
        self.stats = stats = Stats()
        sampler = Sampler(sampling)
        t0 = time.perf_counter()

        reuse = common_prefix(self.cached, prompt)
        reuse = min(reuse, len(prompt) - 1)          # at least one token must run to give logits
        history = list(prompt)
        greedy = sampling.greedy and sampling.repeat_penalty == 1.0

        # Greedy: argmax on the device, one int read back per token, the next step already enqueued
        # (Transformer.greedy feeds back the very tokens this loop passes to next_token).
        steps = self.transformer.greedy(np.asarray(prompt[reuse:], np.int64), reuse,
                                        max(1, sampling.max_tokens)) if greedy else None

        def next_token(ids: list[int], pos: int) -> int:
            if steps is not None:
                return next(steps)
            ids = np.asarray(ids, dtype=np.int64)
            return sampler(self.transformer.forward(ids, pos, all_logits=False)[-1], history)

        self.cached = self.cached[:reuse]
        token = next_token(prompt[reuse:], reuse)
        self.cached = prompt[:]
        t_first = time.perf_counter()
        stats.prompt_tokens, stats.prompt_s, stats.ttft_s = len(prompt) - reuse, t_first - t0, t_first - t0
        if sampling.max_tokens == 0:                 # -n 0: the prompt is read, nothing generated
            stats.finish = "length"
            return
        stop = self.tokenizer.eot_ids
        while True:
            if token in stop:
                stats.finish = "stop"
                break
            stats.gen_tokens += 1
            stats.gen_s = time.perf_counter() - t_first
            history.append(token)
            yield token
            if stats.gen_tokens >= sampling.max_tokens:
                stats.finish = "length"
                break
            if len(self.cached) >= self.ctx:
                stats.finish = "context"
                break
            token = next_token([token], len(self.cached))
            self.cached.append(history[-1])
        stats.gen_s = time.perf_counter() - t_first if stats.gen_tokens else 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def load_model(name_or_path: str | Path | None = None, device: str = "numpy", ctx: int | None = None,
               progress: bool = False, kernels: Callable[[str, int, int], None] | None = None) -> LLM:
    """Load a registry model (downloaded on first use) or a model file, on `device`. With `kernels`
    (a progress callback: what, done, total), an OpenCL backend builds the kernels the model runs
    now rather than at their first use (Backend.prepare)."""
    from .hub.registry import resolve

    path, _ = resolve(None if name_or_path is None else str(name_or_path), progress=progress)
    model = open_model(path)
    config = model.config
    ctx = min(ctx or (PHONE_CTX if is_android() else DEFAULT_CTX), config.ctx_len)
    if ctx < 1:
        raise PerfxError(f"context must be at least 1 token (got {ctx})")
    tokenizer = model.tokenizer
    if tokenizer.vocab_size != config.vocab_size:
        raise PerfxError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model {config.vocab_size}")
    check_tokenizer(tokenizer, config.vocab_size, path)
    backend, notices = open_backend(device)
    with reading_model(path):
        weights = weights_from_tensors(model.tensors, config, path)
    numpy = backend.name == "numpy"
    need = estimate(config, weight_bytes(weights, dequantized=numpy), ctx,
                    batch_tokens=backend.capabilities.max_tokens)
    check_available(need.total, f"{config.name or path.name} at --ctx {ctx} ({need.describe()})")
    transformer = Transformer(config, weights, backend, ctx)
    if kernels is not None:
        backend.prepare(transformer, kernels)
    check_first_logits(transformer, weights, tokenizer, path)
    return LLM(path, transformer, tokenizer, ChatTemplate.from_tokenizer(tokenizer), model.metadata,
               notices=[*TOKENIZER_NOTICES, *notices])


PROBE_TEXT = "Hello, world! The 3 quick brown foxes: é, ß, 中文, 😀\n\ttabs & <b>tags</b>"


def check_tokenizer(tokenizer: Tokenizer, vocab_size: int, path) -> None:
    """The tokenizer's ids for ordinary text lie in the vocabulary: a tokenizer that does not match the
    model (e.g. a SentencePiece reading of a byte-level BPE vocabulary) is a file error, found at load."""
    with reading_model(path):
        ids = tokenizer.encode(PROBE_TEXT, add_bos=True)
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ModelFileError(f"{path}: its tokenizer gives token id {bad[0]} for ordinary text, outside the "
                             f"{vocab_size} tokens of the model; the tokenizer does not match the model, "
                             "the file is corrupt")


def check_first_logits(transformer: Transformer, weights, tokenizer: Tokenizer, path) -> None:
    """One token through the model: its logits must be finite, or the file is refused naming the likely cause."""
    probe = tokenizer.bos_id if tokenizer.bos_id is not None else 0
    with np.errstate(all="ignore"):          # overflow is what this looks for: no warnings on the way
        logits = transformer.forward(np.array([probe]), 0, all_logits=False)
    if np.isfinite(logits).all():
        return
    cause = next((f"tensor {t.name} holds NaN or infinite values" for t in weights.tensors()
                  if not np.isfinite(t.dequantize()).all()),
                 "the weights overflow: a tensor's values or scales are far out of range (corrupt or mistyped)")
    raise ModelFileError(f"{path}: the model's first logits are not finite (NaN or inf); likely cause: {cause}; "
                         "the file is corrupt")

