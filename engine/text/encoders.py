"""What turns text into ids for `engine.text.tokenizer`: a byte-level BPE library and SentencePiece.

Byte-level BPE runs in the ``tokenizers`` library, or where it is not installed (Termux: no wheel)
in ``engine.text.bpe``, which offers the same API and gives the same ids; `library` is whichever
of the two is in use. SentencePiece vocabularies need the ``sentencepiece`` package. What is lost
where one is missing is said by `notices()` (shown by the CLI).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from perfx.engine.errors import PerfxError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

try:
    import tokenizers as library
except ImportError:  # no wheel for this platform (Termux): the pure-Python BPE, same ids
    from perfx.engine.text import bpe as library

try:
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
except ImportError:
    sentencepiece = spm_pb2 = None


def notices() -> list[str]:
    """What is lost where a compiled dependency is missing (the CLI shows it when a model loads)."""
    out = []
    if library.__name__ == "perfx.engine.text.bpe":
        out.append(library.notice())
    if sentencepiece is None:
        out.append("sentencepiece not installed: models with a SentencePiece vocabulary cannot be "
                   "loaded (pip install sentencepiece)")
    return out


def require_sentencepiece() -> None:
    if sentencepiece is None:
        raise PerfxError("this model has a SentencePiece vocabulary, which needs the sentencepiece "
                         "package: pip install sentencepiece")


class Encoder(Protocol):
    def encode(self, text: str, special: bool) -> list[int]: ...
    def save(self, directory: Path) -> None: ...


class HFEncoder:
    """A ``tokenizers.Tokenizer``; ``special=False`` uses a twin reading special tokens as text."""

    def __init__(self, tok: HFTokenizer) -> None:
        self.tok = tok
        self._plain: HFTokenizer | None = None

    def encode(self, text: str, special: bool) -> list[int]:
        if special:
            return self.tok.encode(text, add_special_tokens=False).ids
        if self._plain is None:
            self._plain = library.Tokenizer.from_str(self.tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain.encode(text, add_special_tokens=False).ids

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))


class SpmEncoder:
    """A SentencePiece model; with ``special=True`` control-token strings are cut out first."""

    def __init__(self, proto: spm_pb2.ModelProto) -> None:
        self.proto = proto
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except RuntimeError as e:
            raise PerfxError(f"cannot load the SentencePiece vocabulary: {e}") from e
        special = {p.piece: i for i, p in enumerate(proto.pieces)
                   if p.type in (spm_pb2.ModelProto.SentencePiece.CONTROL,
                                 spm_pb2.ModelProto.SentencePiece.UNKNOWN)}
        self._special_ids = special
        alternatives = sorted(special, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if special else None

    def encode(self, text: str, special: bool) -> list[int]:
        if not special or self._special_re is None:
            return self.sp.encode(text)
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            if m.start() > start:
                ids += self.sp.encode(text[start:m.start()])
            ids.append(self._special_ids[m.group()])
            start = m.end()
        if start < len(text):
            ids += self.sp.encode(text[start:])
        return ids

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.model").write_bytes(self.proto.SerializeToString())
