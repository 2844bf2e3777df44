"""One generation path: the rules every sequence follows, in `perfx run`, `perfx chat` and the server.

A sequence is a prompt and the tokens generated after it. The model (one sequence on the
contiguous KV cache in engine.llm, or a batch of them on the paged pool in engine.serving.scheduler)
chooses the next token; `Sequence.push` then applies the stop rules, in this order:

    1. an end-of-turn token (EOS, <|im_end|>, ... : tokenizer.eot_ids) ends it: "stop"; the token is
       not part of the reply
    2. the token joins the reply and its text is decoded; a stop string in the text ends it: "stop"
       (the text before the stop string is the last sent; the stop string never is, as in OpenAI's API)
    3. max_tokens generated ends it: "length" (max_tokens 0 ends it before the first token: the prompt
       is read, nothing generated)
    4. a full context ends it: "length" (ctx positions hold the prompt and the reply but its last token,
       which needs no position: a sequence of ctx + 1 tokens cannot grow)

Finish reasons, the names OpenAI's API gives them where it has them:

    "stop"       end of turn or a stop string
    "length"     max_tokens reached, or the context is full
    "cancelled"  the caller stopped it: Ctrl-C, a closed stream, a client that went away
    "error"      a step failed (the server answers that request with an error, not a finish reason)

The text a sequence gives back is byte-exact: the concatenation of its pieces equals
tokenizer.decode(reply) when no stop string ends it, whatever path produced the tokens.

`Generation` is one sequence generated on its own (what `LLM.stream` returns): iterate it for its
pieces; `stats` gives its figures as a value, final once the iteration has ended.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

from .sampler import Sampler, Sampling
from .stops import StopMatcher
from .text.tokenizer import StreamDecoder, Tokenizer

Finish = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class Piece:
    """What one chosen token gives: the token (None for an end-of-turn token, which is not part of the
    reply) and the text it completes ("" while a character or a possible stop string is pending; at the
    end, with the held-back tail)."""

    token: int | None
    text: str


class Sequence:
    """A prompt, the tokens generated after it and the state that decides what they say and when they end."""

    def __init__(self, prompt: list[int], sampling: Sampling, tokenizer: Tokenizer, ctx: int,
                 stop: tuple[str, ...] | list[str] = ()):
        self.tokens = list(prompt)           # the prompt, then every generated token
        self.n_prompt = len(prompt)
        self.sampling = sampling
        self.ctx = ctx
        self.sampler = Sampler(sampling)
        self.eot = tokenizer.eot_ids
        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopMatcher(stop)
        self.finish: Finish | None = "length" if sampling.max_tokens == 0 else None

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def reply(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    def sample(self, logits: np.ndarray) -> int:
        """The next token from the logits [vocab] after the last token."""
        return self.sampler(logits, self.tokens)

    def push(self, token: int) -> Piece:
        """Applies the stop rules to the token chosen next; sets `finish` when they end the sequence."""
        assert self.finish is None, "the sequence has ended"
        if token in self.eot:
            return Piece(None, self._end("stop"))
        self.tokens.append(token)
        text, stopped = self.stops.push(self.decoder.push(token))
        if stopped:
            self.finish = "stop"
        elif self.generated >= self.sampling.max_tokens or len(self.tokens) > self.ctx:
            text += self._end("length")
        return Piece(token, text)

    def end(self, reason: Finish) -> None:
        """Ends the sequence from outside (cancelled, error); nothing more is said."""
        if self.finish is None:
            self.finish = reason

    def _end(self, reason: Finish) -> str:
        """Ends the sequence; the text held back by the decoder and the stop matcher."""
        self.finish = reason
        text, stopped = self.stops.push(self.decoder.flush())
        return text if stopped else text + self.stops.flush()


@dataclass(frozen=True)
class Stats:
    """Figures of one generation."""

    prompt_tokens: int = 0      # tokens actually prefilled (a prefix already in the cache is not counted)
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0          # from the first generated token to the last
    ttft_s: float = 0.0         # from the call to the first generated token
    finish: Finish | Literal[""] = ""    # "" while it runs

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


class Generation:
    """One sequence generated on its own: iterating it runs the model and yields Pieces.

        gen = llm.stream(ids, sampling)
        for piece in gen:
            print(piece.text, end="")
        gen.stats.finish            # "stop", "length", or "cancelled" once closed early (close(), Ctrl-C)

    `chosen` yields the tokens the model chooses, one per step: the first after the prompt (its
    prefill, `prompt_tokens` of them computed), each next one after the token last pushed.
    """

    def __init__(self, seq: Sequence, chosen: Iterator[int], prompt_tokens: int):
        self.seq = seq
        self._chosen = chosen
        self._prompt_tokens = prompt_tokens
        self._t0 = time.perf_counter()
        self._t_first: float | None = None     # when the first token was chosen (the prompt read)
        self._t_last = 0.0                     # when the last token was chosen
        self._pieces = self._run()

    @property
    def stats(self) -> Stats:
        """The figures so far; final once the iteration has ended."""
        prompt_s = self._t_first - self._t0 if self._t_first is not None else 0.0
        n = self.seq.generated
        return Stats(self._prompt_tokens, prompt_s, n, self._t_last - self._t_first if n else 0.0, prompt_s,
                     self.seq.finish or "")

    @property
    def tokens(self) -> list[int]:
        """The reply's tokens so far."""
        return self.seq.reply

    def __iter__(self) -> Iterator[Piece]:
        return self._pieces

    def close(self) -> None:
        """Stops the generation where it is (a no-op once it has ended)."""
        self._pieces.close()
        self.seq.end("cancelled")               # closed before it began: the generator's finally never ran

    def _run(self) -> Iterator[Piece]:
        seq = self.seq
        try:
            for token in self._chosen:
                self._t_last = time.perf_counter()
                if self._t_first is None:
                    self._t_first = self._t_last
                if seq.finish is not None:             # max_tokens 0: the prompt is read, nothing generated
                    return
                piece = seq.push(token)
                if piece.token is not None or piece.text:
                    yield piece
                if seq.finish is not None:
                    return
            seq.end("length")                          # the model gave no more tokens: the context is full
        except (GeneratorExit, KeyboardInterrupt):     # closed early, Ctrl-C
            seq.end("cancelled")
            raise
        except BaseException:
            seq.end("error")
            raise
