"""Byte-level BPE in pure Python, for where the `tokenizers` package (a Rust extension) is missing.

`engine.text.encoders` imports this module in place of `tokenizers` when that import fails (Termux,
where no wheel exists and building one needs a Rust toolchain). It offers the part of the
`tokenizers` API that `engine.text` uses (`Tokenizer`, `AddedToken`, `Regex`, `models.BPE`,
`pre_tokenizers.Split/ByteLevel/Sequence`, `decoders.ByteLevel`) and gives the same token ids:

* added tokens are cut out first, leftmost-longest, as the `tokenizers` added vocabulary does
  (special ones only when asked for);
* each pre-tokenizer regex splits every piece left by the previous one, keeping matches and gaps;
* each piece's UTF-8 bytes become GPT-2's printable characters, and BPE merges them lowest rank
  first, leftmost first among equal ranks (the `tokenizers` merge queue).

How the pre-tokenizer regexes run without `tokenizers` (the `regex` module, or `re` with Unicode
classes from `unicodedata`) is `engine.text.unicode_regex`'s subject.

Lost against `tokenizers`: speed only. On a desktop core, GPL-3 (7,639 tokens) encodes in ~50 ms
instead of ~25, and reading SmolLM2's 49,152-token vocabulary takes ~0.6 s. Models with a
SentencePiece vocabulary still need `sentencepiece`.
"""
from __future__ import annotations

import heapq
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from perfx.engine.errors import PerfxError
from perfx.engine.text import unicode_regex
from perfx.engine.text.byte_level import byte_level
from perfx.engine.text.unicode_regex import compile_pattern

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def notice() -> str:
    """What the CLI says when this module stands in for `tokenizers`."""
    how = ("the regex module" if unicode_regex.ENGINE == "regex" else
           f"Python's re with Unicode {unicodedata.unidata_version} classes; pip install regex for newer ones")
    return f"tokenizers not installed: byte-level BPE runs in pure Python ({how}); same token ids, slower encoding"


# --------------------------------------------------------------------------- the tokenizers API

@dataclass
class AddedToken:
    """A token matched in the text before BPE, as `tokenizers.AddedToken` (no strip options)."""

    content: str
    special: bool = False
    normalized: bool = False
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False

    def __post_init__(self) -> None:
        if self.single_word or self.lstrip or self.rstrip:
            raise PerfxError(f"added token {self.content!r}: single_word/lstrip/rstrip need the tokenizers package")


@dataclass(frozen=True)
class Regex:
    pattern: str


class models:
    class BPE:
        """Byte-level BPE over a vocab (text -> id) and merges (pairs of texts, by rank)."""

        def __init__(self, vocab: Mapping[str, int], merges: Iterable[Sequence[str]],
                     ignore_merges: bool = False, **options: Any) -> None:
            unsupported = {k: v for k, v in options.items()
                           if v not in (None, False) and k not in ("fuse_unk", "dropout")}
            if unsupported or options.get("dropout"):
                raise PerfxError(f"BPE options {sorted(unsupported) or ['dropout']} need the tokenizers package")
            self.vocab = dict(vocab)
            self.ignore_merges = ignore_merges
            self.merges = [(str(a), str(b)) for a, b in merges]
            self.ranks: dict[tuple[int, int], tuple[int, int]] = {}
            for rank, (a, b) in enumerate(self.merges):
                missing = [t for t in (a, b, a + b) if t not in self.vocab]
                if missing:
                    raise PerfxError(f"merge {a!r} {b!r}: token {missing[0]!r} is not in the vocabulary")
                self.ranks[(self.vocab[a], self.vocab[b])] = (rank, self.vocab[a + b])
            self._cache: dict[str, list[int]] = {}

        def tokenize(self, word: str) -> list[int]:
            """Ids of one byte-level piece."""
            ids = self._cache.get(word)
            if ids is None:
                ids = self._merge(word)
                if len(self._cache) < 100_000:
                    self._cache[word] = ids
            return ids

        def _merge(self, word: str) -> list[int]:
            if self.ignore_merges and word in self.vocab:
                return [self.vocab[word]]
            symbols = [self.vocab[c] for c in word if c in self.vocab]
            n = len(symbols)
            nxt = list(range(1, n + 1))
            prv = list(range(-1, n - 1))
            alive = [True] * n
            ranks = self.ranks
            queue: list[tuple[int, int, int]] = []          # (rank, position, id of the merged token)
            for pos, pair in enumerate(pairwise(symbols)):
                if hit := ranks.get(pair):
                    queue.append((hit[0], pos, hit[1]))
            heapq.heapify(queue)
            while queue:
                _, pos, new = heapq.heappop(queue)
                if not alive[pos] or nxt[pos] >= n:
                    continue
                right = nxt[pos]
                if ranks.get((symbols[pos], symbols[right]), (0, -1))[1] != new:
                    continue                                # the pair changed since it was queued
                symbols[pos] = new
                alive[right] = False
                nxt[pos] = nxt[right]
                if nxt[pos] < n:
                    prv[nxt[pos]] = pos
                if prv[pos] >= 0 and (hit := ranks.get((symbols[prv[pos]], new))):
                    heapq.heappush(queue, (hit[0], prv[pos], hit[1]))
                if nxt[pos] < n and (hit := ranks.get((new, symbols[nxt[pos]]))):
                    heapq.heappush(queue, (hit[0], pos, hit[1]))
            return [s for s, a in zip(symbols, alive) if a]

        def to_dict(self) -> dict[str, Any]:
            return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                    "ignore_merges": self.ignore_merges,
                    "vocab": dict(sorted(self.vocab.items(), key=lambda item: item[1])),
                    "merges": [list(m) for m in self.merges]}


class pre_tokenizers:
    class Split:
        """Splits on a regex, keeping the matches and the text between them ("isolated")."""

        def __init__(self, pattern: Regex | str, behavior: str = "isolated", invert: bool = False) -> None:
            if behavior.lower() != "isolated" or invert:
                raise PerfxError(f"Split behavior {behavior!r} (invert={invert}) needs the tokenizers package")
            self.pattern = pattern
            source = pattern.pattern if isinstance(pattern, Regex) else re.escape(pattern)
            self._regex = compile_pattern(source)

        def split(self, piece: str) -> list[str]:
            out: list[str] = []
            prev = 0
            for m in self._regex.finditer(piece):
                start, end = m.span()
                if start > prev:
                    out.append(piece[prev:start])
                if end > start:
                    out.append(piece[start:end])
                prev = end
            if prev < len(piece):
                out.append(piece[prev:])
            return out

        def to_dict(self) -> dict[str, Any]:
            key = "Regex" if isinstance(self.pattern, Regex) else "String"
            source = self.pattern.pattern if isinstance(self.pattern, Regex) else self.pattern
            return {"type": "Split", "pattern": {key: source}, "behavior": "Isolated", "invert": False}

    class ByteLevel:
        """Maps bytes to GPT-2's printable characters; with `use_regex`, splits by GPT-2's regex first."""

        def __init__(self, add_prefix_space: bool = True, use_regex: bool = True, **_: Any) -> None:
            self.add_prefix_space = add_prefix_space
            self.use_regex = use_regex
            self._split = pre_tokenizers.Split(Regex(GPT2_REGEX)) if use_regex else None

        def split(self, piece: str) -> list[str]:
            if self.add_prefix_space and not piece.startswith(" "):
                piece = " " + piece
            return self._split.split(piece) if self._split else [piece]

        def to_dict(self) -> dict[str, Any]:
            return {"type": "ByteLevel", "add_prefix_space": self.add_prefix_space, "trim_offsets": True,
                    "use_regex": self.use_regex}

    class Sequence:
        def __init__(self, steps: Sequence[Any]) -> None:
            self.steps = list(steps)

        def split(self, piece: str) -> list[str]:
            pieces = [piece]
            for step in self.steps:
                pieces = [p for q in pieces for p in step.split(q)]
            return pieces

        def to_dict(self) -> dict[str, Any]:
            return {"type": "Sequence", "pretokenizers": [s.to_dict() for s in self.steps]}


class decoders:
    class ByteLevel:
        def to_dict(self) -> dict[str, Any]:
            return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


@dataclass
class Encoding:
    ids: list[int]


class Tokenizer:
    """A byte-level BPE tokenizer with the methods of `tokenizers.Tokenizer` that perfx calls."""

    def __init__(self, model: models.BPE) -> None:
        self.model = model
        self.pre_tokenizer: Any = None
        self.decoder: Any = None
        self.encode_special_tokens = False
        self._added: dict[int, AddedToken] = {}
        self._added_ids: dict[str, int] = {}
        self._template: tuple[list[int], list[int]] = ([], [])  # ids a post-processor puts around the text
        self._post_processor: Any = None
        self._texts: dict[int, str] | None = None
        self._splitter: re.Pattern[str] | None = None
        self._next_id = max(model.vocab.values(), default=-1) + 1

    # ------------------------------------------------------------------ added tokens

    def add_special_tokens(self, tokens: Iterable[AddedToken | str]) -> int:
        return self._add(tokens, special=True)

    def add_tokens(self, tokens: Iterable[AddedToken | str]) -> int:
        return self._add(tokens, special=False)

    def _add(self, tokens: Iterable[AddedToken | str], special: bool) -> int:
        added = 0
        for token in tokens:
            if isinstance(token, str):
                token = AddedToken(token, special=special)
            if special:
                token.special = True
            if not token.content or token.content in self._added_ids:
                continue
            token_id = self.model.vocab.get(token.content)
            if token_id is None:
                token_id = self._next_id
            self._register(token, token_id)
            added += 1
        return added

    def _register(self, token: AddedToken, token_id: int) -> None:
        self._added[token_id] = token
        self._added_ids[token.content] = token_id
        self._next_id = max(self._next_id, token_id + 1)
        self._splitter = None

    def _added_splitter(self) -> re.Pattern[str] | None:
        """Matches the added tokens leftmost-longest, as the `tokenizers` added vocabulary does."""
        if self._splitter is None and self._added_ids:
            alternatives = sorted(self._added_ids, key=len, reverse=True)
            self._splitter = re.compile("|".join(map(re.escape, alternatives)))
        return self._splitter

    def get_added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(self._added)

    # ------------------------------------------------------------------ vocabulary

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        n = len(self.model.vocab)
        if with_added_tokens:
            n += sum(1 for t in self._added_ids if t not in self.model.vocab)
        return n

    def token_to_id(self, token: str) -> int | None:
        found = self._added_ids.get(token)
        return found if found is not None else self.model.vocab.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._added:
            return self._added[token_id].content
        if self._texts is None:
            self._texts = {i: t for t, i in self.model.vocab.items()}
        return self._texts.get(token_id)

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        ids: list[int] = []
        start = 0
        splitter = self._added_splitter()
        if splitter is not None:
            for m in splitter.finditer(text):
                token_id = self._added_ids[m.group()]
                if self.encode_special_tokens and self._added[token_id].special:
                    continue
                if m.start() > start:
                    ids += self._encode_plain(text[start:m.start()])
                ids.append(token_id)
                start = m.end()
        if start < len(text):
            ids += self._encode_plain(text[start:])
        if add_special_tokens:
            ids = self._template[0] + ids + self._template[1]
        return Encoding(ids)

    def _encode_plain(self, text: str) -> list[int]:
        pieces = self.pre_tokenizer.split(text) if self.pre_tokenizer is not None else [text]
        ids: list[int] = []
        for piece in pieces:
            ids += self.model.tokenize(byte_level(piece))
        return ids

    # ------------------------------------------------------------------ tokenizer.json

    def to_str(self) -> str:
        added = [{"id": i, "content": t.content, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": t.normalized, "special": t.special} for i, t in sorted(self._added.items())]
        data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": None,
                "pre_tokenizer": self.pre_tokenizer.to_dict() if self.pre_tokenizer is not None else None,
                "post_processor": self._post_processor,
                "decoder": self.decoder.to_dict() if self.decoder is not None else None,
                "model": self.model.to_dict()}
        return json.dumps(data, ensure_ascii=False)

    def save(self, path: str) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")

    @classmethod
    def from_file(cls, path: str) -> Tokenizer:
        return cls.from_str(Path(path).read_text(encoding="utf-8"))

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        """Reads a tokenizer.json of the byte-level BPE kind; other kinds raise PerfxError."""
        data = json.loads(text)
        spec = data.get("model") or {}
        if spec.get("type") != "BPE":
            raise _unsupported(f"model {spec.get('type')!r}")
        if data.get("normalizer") is not None:
            raise _unsupported(f"normalizer {data['normalizer'].get('type')!r}")
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in spec.get("merges", [])]
        options = {k: spec.get(k) for k in ("unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                                             "byte_fallback", "dropout", "fuse_unk")}
        tok = cls(models.BPE(spec.get("vocab", {}), merges, ignore_merges=bool(spec.get("ignore_merges")),
                             **options))
        tok.pre_tokenizer = _pre_tokenizer_from_dict(data.get("pre_tokenizer"))
        decoder = data.get("decoder")
        if decoder is not None and decoder.get("type") != "ByteLevel":
            raise _unsupported(f"decoder {decoder.get('type')!r}")
        tok.decoder = decoders.ByteLevel() if decoder is not None else None
        for entry in sorted(data.get("added_tokens", []), key=lambda e: e["id"]):
            token = AddedToken(entry["content"], special=entry.get("special", False),
                               normalized=entry.get("normalized", False), single_word=entry.get("single_word", False),
                               lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False))
            tok._register(token, int(entry["id"]))
        tok._set_post_processor(data.get("post_processor"))
        return tok

    def _set_post_processor(self, spec: Mapping[str, Any] | None) -> None:
        self._post_processor = spec
        if spec is None:
            return
        steps = [spec] if spec.get("type") != "Sequence" else spec.get("processors", [])
        for step in steps:
            kind = step.get("type")
            if kind == "ByteLevel":
                continue
            if kind != "TemplateProcessing":
                raise _unsupported(f"post-processor {kind!r}")
            side = 0
            for item in step.get("single", []):
                if "SpecialToken" in item:
                    name = item["SpecialToken"]["id"]
                    self._template[side].extend(step.get("special_tokens", {}).get(name, {}).get("ids", []))
                else:
                    side = 1


def _unsupported(what: str) -> PerfxError:
    return PerfxError(f"this tokenizer.json uses {what}, which perfx's pure-Python tokenizer does not "
                      "support; pip install tokenizers")


def _pre_tokenizer_from_dict(spec: Mapping[str, Any] | None) -> Any:
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        return pre_tokenizers.Sequence([_pre_tokenizer_from_dict(s) for s in spec.get("pretokenizers", [])])
    if kind == "Split":
        pattern = spec.get("pattern", {})
        source: Regex | str = Regex(pattern["Regex"]) if "Regex" in pattern else pattern.get("String", "")
        return pre_tokenizers.Split(source, behavior=spec.get("behavior", "Isolated"),
                                    invert=spec.get("invert", False))
    if kind == "ByteLevel":
        return pre_tokenizers.ByteLevel(add_prefix_space=spec.get("add_prefix_space", True),
                                        use_regex=spec.get("use_regex", True))
    raise _unsupported(f"pre-tokenizer {kind!r}")
