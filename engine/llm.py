"""A loaded model: transformer + tokenizer + chat template, with prefill/decode generation.

    model = load_model("smollm2-135m-instruct")
    ids = model.tokenizer.encode(model.chat_template.render([{"role": "user", "content": "Hi"}]))
    tokens, stats = model.generate(ids, Sampling(temperature=0))      # the whole reply and its figures
    for piece in (gen := model.stream(ids)): ...                    # or streamed; gen.stats at the end

The stop rules, finish reasons and stats are engine.generation's, shared with the server.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .backends import open_backend
from .text.chat_template import ChatTemplate
from .errors import ModelFileError, PerfxError, reading_model
from .formats.loader import open_model
from .generation import Generation, Sequence, Stats
from .memory import PHONE_CTX, check_available, estimate, is_android, weight_bytes
from .model import Transformer, checked_ids, weights_from_tensors
from .sampler import Sampling
from .text.encoders import notices as tokenizer_notices
from .text.tokenizer import Tokenizer

DEFAULT_CTX = 2048


@dataclass
class LLM:
    path: Path
    transformer: Transformer
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    metadata: dict
    notices: list[str] = field(default_factory=list)  # what the device choice had to say
    cached: list[int] = field(default_factory=list)   # the tokens whose K and V sit in the cache

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

    def generate(self, prompt_ids, sampling: Sampling = Sampling(),
                 stop: tuple[str, ...] = ()) -> tuple[list[int], Stats]:
        """The reply's tokens and the generation's figures (stop rules: engine.generation)."""
        gen = self.stream(prompt_ids, sampling, stop)
        for _ in gen:
            pass
        return gen.tokens, gen.stats

    def stream(self, prompt_ids, sampling: Sampling = Sampling(), stop: tuple[str, ...] = ()) -> Generation:
        """The reply as it is generated: iterate it for Pieces (a token and its text). Tokens already in
        the cache (a shared prefix with the previous call, as in a chat) are not computed again."""
        prompt = checked_ids(list(prompt_ids), self.config.vocab_size).tolist()
        if not prompt:
            raise PerfxError("the prompt is empty")
        self._check_fits(len(prompt) + 1)
        reuse = min(common_prefix(self.cached, prompt), len(prompt) - 1)   # at least one token runs: its logits
        seq = Sequence(prompt, sampling, self.tokenizer, self.ctx, stop)
        return Generation(seq, self._chosen(seq, reuse), len(prompt) - reuse)

    def _chosen(self, seq: Sequence, reuse: int) -> Iterator[int]:
        """The tokens the model chooses for seq, one per step: the first after prefilling its prompt from
        position `reuse`, each next one after the token seq took last. Greedy runs on the device's argmax,
        one int read back per token, the next step already enqueued (Transformer.greedy feeds back the
        very tokens it chose, which greedy seq takes unless they end it)."""
        prompt, transformer = list(seq.tokens), self.transformer
        greedy = seq.sampling.greedy and seq.sampling.repeat_penalty == 1.0
        if greedy:
            steps = transformer.greedy(np.asarray(prompt[reuse:], np.int64), reuse, max(1, seq.sampling.max_tokens))

        def step(ids: list[int], pos: int) -> int:
            if greedy:
                return next(steps)
            return seq.sample(transformer.forward(np.asarray(ids, np.int64), pos, all_logits=False)[-1])

        self.cached = self.cached[:reuse]
        token = step(prompt[reuse:], reuse)
        self.cached = prompt
        while True:
            yield token
            if len(self.cached) >= self.ctx:
                return
            last = seq.tokens[-1]
            token = step([last], len(self.cached))
            self.cached.append(last)


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
               notices=[*tokenizer_notices(), *notices])


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

