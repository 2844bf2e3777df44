"""Text <-> token ids for GGUF and Hugging Face tokenizers, with streaming detokenization.

Two families are supported:

* byte-level BPE (GGUF ``tokenizer.ggml.model == "gpt2"`` or a ``tokenizer.json``), run by the
  ``tokenizers`` library (or, where it is not installed, by ``engine.text.bpe`` with the same ids) with
  the pre-tokenizer llama.cpp picks for ``tokenizer.ggml.pre``;
* SentencePiece (GGUF ``tokenizer.ggml.model == "llama"`` or a ``tokenizer.model``), run by the
  ``sentencepiece`` library.

Decoding follows llama.cpp: control tokens (BOS, EOS, ``<|im_end|>``...) render as empty strings
unless ``special=True`` is asked for, user-defined tokens render as their text, and for
SentencePiece vocabularies the space that encoding put in front of the text is dropped from the
first token. Decoding is byte-exact: ``decode`` joins the tokens' bytes and decodes them as UTF-8
once, so a character split over several tokens comes out whole.
"""
from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from perfx.engine.errors import PerfxError

NOTICES: list[str] = []  # what is lost where a compiled dependency is missing (shown by the CLI)

try:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
except ImportError:  # no wheel for this platform (Termux): the pure-Python BPE, same ids
    from perfx.engine.text import bpe
    from perfx.engine.text.bpe import AddedToken, Regex, decoders, models, pre_tokenizers
    from perfx.engine.text.bpe import Tokenizer as HFTokenizer

    NOTICES.append(bpe.notice())

try:
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
except ImportError:
    sentencepiece = spm_pb2 = None
    NOTICES.append("sentencepiece not installed: models with a SentencePiece vocabulary cannot be "
                   "loaded (pip install sentencepiece)")


def _require_sentencepiece() -> None:
    if sentencepiece is None:
        raise PerfxError("this model has a SentencePiece vocabulary, which needs the sentencepiece "
                         "package: pip install sentencepiece")


# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

END_OF_TURN_TEXTS = (
    "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>",
    "<|endoftext|>", "</s>", "<|end_of_text|>",
)

_SPACE_MARK = "\u2581"  # SentencePiece's "▁"
_SPM_UNKNOWN_SURFACE = " \u2047 ".encode()  # what SentencePiece renders for <unk>
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# --------------------------------------------------------------------------- pre-tokenizers

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM_LETTERS = (
    "\\s?["
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    "\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
    "]+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp splits text before BPE for one family of ``tokenizer.ggml.pre`` values."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a vocab entry is not merged further
    add_bos: bool = False        # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


def _family(names: str, *regexes: str, **flags: bool) -> dict[str, _PreTokenizer]:
    pre = _PreTokenizer(tuple(regexes), **flags)
    return {name: pre for name in names.split()}


PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    **_family("default gpt-2 phi-2 jina-es jina-de jina-v1-en jina-v2-es jina-v2-de jina-v2-code "
              "roberta-bpe gigachat a.x-4.0 mellum mpt olmo jais exaone4 trillion granite-docling",
              _GPT2),
    **_family("starcoder refact command-r smollm codeshell exaone minerva-7b", r"\p{N}", _GPT2),
    **_family("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
              _LLAMA3, ignore_merges=True, add_bos=True),
    **_family("dbrx smaug-bpe", _LLAMA3),
    **_family("qwen2 deepseek-r1-qwen kormo megrez stablelm2 hunyuan grok-2", _QWEN2),
    **_family("deepseek-llm", r"[\r\n]", _DEEPSEEK_LLM_LETTERS,
              "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$", _CJK,
              r"\p{N}+"),
    **_family("deepseek-coder", r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    **_family("deepseek-v3", r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
              r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
              r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    **_family("falcon", r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"[0-9][0-9][0-9]"),
    **_family("poro-chat bloom gpt3-finnish", r" ?[^(\s|.,!?…。，、।۔،)]+"),
    **_family("viking", r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"),
    **_family("gpt-4o llama4", _GPT4O),
    **_family("tekken", _TEKKEN, ignore_merges=True, add_bos=True),
}


def _byte_level_pre_tokenizer(regexes: Iterable[str]) -> pre_tokenizers.PreTokenizer:
    """Each regex splits every piece left by the previous one, keeping matches and gaps."""
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _gpt2_byte_of_char() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_OF_CHAR = _gpt2_byte_of_char()


def _byte_level_bytes(token: str) -> bytes:
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    except KeyError:
        return token.encode()


# --------------------------------------------------------------------------- backends

class _Backend(Protocol):
    def encode(self, text: str, special: bool) -> list[int]: ...
    def save(self, directory: Path) -> None: ...


class _HFBackend:
    """A ``tokenizers.Tokenizer``; ``special=False`` uses a twin reading special tokens as text."""

    def __init__(self, tok: HFTokenizer) -> None:
        self.tok = tok
        self._plain: HFTokenizer | None = None

    def encode(self, text: str, special: bool) -> list[int]:
        if special:
            return self.tok.encode(text, add_special_tokens=False).ids
        if self._plain is None:
            self._plain = HFTokenizer.from_str(self.tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain.encode(text, add_special_tokens=False).ids

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))


class _SpmBackend:
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


# --------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """Encodes text to token ids and decodes ids back, the way llama.cpp does for the vocab.

    Build one with :meth:`from_gguf` or :meth:`from_files`.
    """

    def __init__(self, backend: _Backend, *, texts: list[str], pieces: list[bytes],
                 control: frozenset[int], byte_tokens: frozenset[int], strip_leading_space: bool,
                 bos_id: int | None, eos_id: int | None, add_bos: bool,
                 extra_eot_ids: Iterable[int] = (), chat_template: str | None = None) -> None:
        self._backend = backend
        self._texts = texts                # vocab entry of each id, e.g. "Ġthe", "▁the", "<s>"
        self._pieces = pieces              # bytes each id renders as
        self._control = control            # ids that render as "" unless special=True
        self._byte_tokens = byte_tokens    # SentencePiece <0xNN> ids
        self._strip_leading_space = strip_leading_space
        self.vocab_size = len(texts)
        self.bos_id = self._checked(bos_id)
        self.eos_id = self._checked(eos_id)
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template
        eot = {i for i in extra_eot_ids if self._checked(i) is not None}
        if self.eos_id is not None:
            eot.add(self.eos_id)
        eot.update(i for i in control if texts[i] in END_OF_TURN_TEXTS)
        self.eot_ids: frozenset[int] = frozenset(eot)

    def _checked(self, token_id: int | None) -> int | None:
        if token_id is None or not 0 <= int(token_id) < len(self._texts):
            return None
        return int(token_id)

    # ------------------------------------------------------------------ properties

    @property
    def bos_text(self) -> str:
        """The BOS token's text (e.g. ``"<s>"``), or ``""`` when the vocab has none."""
        return "" if self.bos_id is None else self._texts[self.bos_id]

    @property
    def eos_text(self) -> str:
        """The EOS token's text (e.g. ``"</s>"``), or ``""`` when the vocab has none."""
        return "" if self.eos_id is None else self._texts[self.eos_id]

    def token_text(self, token_id: int) -> str:
        """The vocab entry of a token as stored (``"Ġthe"``, ``"▁the"``, ``"<|im_end|>"``)."""
        self._require(token_id)
        return self._texts[token_id]

    def is_control(self, token_id: int) -> bool:
        """True for control tokens (BOS, EOS, chat markers), which decode to ``""`` by default."""
        return token_id in self._control

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, special: bool = True, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``.

        ``special=True`` reads control-token strings written in the text (``"<|im_start|>"``) as
        those tokens; ``special=False`` treats them as plain text. BOS is put in front when
        ``add_bos`` (default: the vocab's own setting) asks for it and the text does not already
        start with it.
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode takes a str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:                   # lone surrogates (undecodable bytes): U+FFFD, as the CLI
            text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
        ids = self._backend.encode(text, special)
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of ``ids``; control tokens render as ``""`` unless ``special`` is True."""
        out = bytearray()
        at_start = True
        for token_id in ids:
            piece, at_start = self._piece(token_id, special, at_start)
            out += piece
        return out.decode("utf-8", errors="replace")

    def _piece(self, token_id: int, special: bool, at_start: bool) -> tuple[bytes, bool]:
        """Bytes of one token, and whether the text is still before its first ordinary token."""
        self._require(token_id)
        if token_id in self._control:
            return (self._texts[token_id].encode() if special else b""), at_start
        piece = self._pieces[token_id]
        if (at_start and self._strip_leading_space and piece[:1] == b" "
                and token_id not in self._byte_tokens):
            piece = piece[1:]
        return piece, False

    def _require(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise PerfxError(f"token id {token_id} is outside the vocabulary "
                             f"(0..{self.vocab_size - 1})")

    # ------------------------------------------------------------------ saving

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` or ``tokenizer.model`` plus ``tokenizer_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(directory)
        config: dict[str, Any] = {"add_bos_token": self.add_bos,
                                  "bos_token": self.bos_text or None,
                                  "eos_token": self.eos_text or None}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        text = json.dumps(config, indent=2, ensure_ascii=False)
        (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")
        return directory

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (key -> python value, as ``GGUFReader`` field contents)."""
        model = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not tokens:
            raise PerfxError("the model file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        types = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        eot = [fields[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
               if fields.get(k) is not None]
        common = {"bos_id": fields.get("tokenizer.ggml.bos_token_id"),
                  "eos_id": fields.get("tokenizer.ggml.eos_token_id"),
                  "extra_eot_ids": eot,
                  "chat_template": fields.get("tokenizer.chat_template")}

        if model == "gpt2":
            pre_name = fields.get("tokenizer.ggml.pre") or "default"
            pre = PRE_TOKENIZERS.get(pre_name)
            if pre is None:
                raise PerfxError(f"unsupported BPE pre-tokenizer {pre_name!r} "
                                 f"(tokenizer.ggml.pre); known: {', '.join(sorted(PRE_TOKENIZERS))}")
            tok = _gguf_bpe(tokens, types, list(fields.get("tokenizer.ggml.merges") or []), pre)
            add_bos = fields.get("tokenizer.ggml.add_bos_token", pre.add_bos)
            return cls._from_hf(tok, add_bos=add_bos, **common)

        if model == "llama":
            _require_sentencepiece()
            proto = _gguf_spm_proto(tokens, types, fields)
            add_bos = fields.get("tokenizer.ggml.add_bos_token", True)
            return cls._from_spm(proto, n_tokens=len(tokens), add_bos=add_bos, **common)

        raise PerfxError(f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                         "supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)")

    @classmethod
    def from_files(cls, directory: str | Path) -> Tokenizer:
        """Build from a Hugging Face model folder: ``tokenizer.json`` or ``tokenizer.model``,
        with ``tokenizer_config.json`` (and ``chat_template.jinja``) when present."""
        directory = Path(directory)
        config = _read_json(directory / "tokenizer_config.json")
        template = _config_chat_template(config)
        jinja_file = directory / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        if (directory / "tokenizer.json").is_file():
            try:
                tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as e:
                raise PerfxError(f"cannot read {directory / 'tokenizer.json'}: {e}") from e
            bos_id = _config_token_id(config, "bos_token", tok.token_to_id)
            eos_id = _config_token_id(config, "eos_token", tok.token_to_id)
            add_bos = config.get("add_bos_token")
            if add_bos is None:
                add_bos = bos_id is not None and tok.encode("a").ids[:1] == [bos_id]
            return cls._from_hf(tok, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                                chat_template=template)

        if (directory / "tokenizer.model").is_file():
            _require_sentencepiece()
            proto = spm_pb2.ModelProto()
            try:
                proto.ParseFromString((directory / "tokenizer.model").read_bytes())
            except Exception as e:
                raise PerfxError(f"cannot read {directory / 'tokenizer.model'}: {e}") from e
            index = {p.piece: i for i, p in enumerate(proto.pieces)}
            spec = proto.trainer_spec
            bos_id = _config_token_id(config, "bos_token", index.get)
            eos_id = _config_token_id(config, "eos_token", index.get)
            if "bos_token" not in config:
                bos_id = spec.bos_id if spec.bos_id >= 0 else None
            if "eos_token" not in config:
                eos_id = spec.eos_id if spec.eos_id >= 0 else None
            add_bos = config.get("add_bos_token", True)
            return cls._from_spm(proto, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                                 chat_template=template)

        raise PerfxError(f"no tokenizer.json or tokenizer.model in {directory}")

    @classmethod
    def _from_hf(cls, tok: HFTokenizer, **kwargs: Any) -> Tokenizer:
        n = tok.get_vocab_size(with_added_tokens=True)
        added = tok.get_added_tokens_decoder()
        n = max(n, max(added, default=-1) + 1)
        texts = [tok.id_to_token(i) or "" for i in range(n)]
        control = frozenset(i for i, t in added.items() if t.special)
        decoder = _decoder_types(_decoder_spec(tok))
        byte_level = "ByteLevel" in decoder
        pieces: list[bytes] = []
        byte_tokens = set()
        for i, text in enumerate(texts):
            if i in added:
                pieces.append(added[i].content.encode())
            elif byte_level:
                pieces.append(_byte_level_bytes(text))
            elif m := _BYTE_PIECE.fullmatch(text):
                pieces.append(bytes([int(m.group(1), 16)]))
                byte_tokens.add(i)
            else:
                pieces.append(text.replace(_SPACE_MARK, " ").encode())
        strip = not byte_level and bool(decoder & {"Strip", "Metaspace"})
        return cls(_HFBackend(tok), texts=texts, pieces=pieces, control=control,
                   byte_tokens=frozenset(byte_tokens), strip_leading_space=strip, **kwargs)

    @classmethod
    def _from_spm(cls, proto: spm_pb2.ModelProto, n_tokens: int | None = None,
                  **kwargs: Any) -> Tokenizer:
        backend = _SpmBackend(proto)
        kind = spm_pb2.ModelProto.SentencePiece
        texts: list[str] = []
        pieces: list[bytes] = []
        control: set[int] = set()
        byte_tokens: set[int] = set()
        for i, p in enumerate(proto.pieces[:n_tokens]):
            texts.append(p.piece)
            if p.type == kind.CONTROL:
                control.add(i)
                pieces.append(b"")
            elif p.type == kind.UNKNOWN:
                pieces.append(_SPM_UNKNOWN_SURFACE)
            elif p.type == kind.BYTE and (m := _BYTE_PIECE.fullmatch(p.piece)):
                byte_tokens.add(i)
                pieces.append(bytes([int(m.group(1), 16)]))
            else:
                pieces.append(p.piece.replace(_SPACE_MARK, " ").encode())
        norm = proto.normalizer_spec
        strip = norm.add_dummy_prefix or norm.remove_extra_whitespaces
        return cls(backend, texts=texts, pieces=pieces, control=frozenset(control),
                   byte_tokens=frozenset(byte_tokens), strip_leading_space=strip, **kwargs)


# --------------------------------------------------------------------------- GGUF builders

def _gguf_bpe(tokens: list[str], types: list[int], merges: list[str],
              pre: _PreTokenizer) -> HFTokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from a GGUF vocab and merge list."""
    vocab = {text: i for i, text in reversed(list(enumerate(tokens)))}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
    except Exception as e:
        raise PerfxError(f"the model file's BPE vocabulary is inconsistent: {e}") from e
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre.regexes)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED])
    return tok


def _gguf_spm_proto(tokens: list[str], types: list[int],
                    fields: Mapping[str, Any]) -> spm_pb2.ModelProto:
    """A SentencePiece BPE model whose scores are merge priorities, as llama.cpp reads them."""
    kind = spm_pb2.ModelProto.SentencePiece
    scores = list(fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    proto = spm_pb2.ModelProto()
    unk_id = None
    for i, (text, score, ttype) in enumerate(zip(tokens, scores, types)):
        if ttype == UNKNOWN and unk_id is None:
            unk_id = i
        elif ttype == UNKNOWN:
            ttype = CONTROL
        elif ttype not in (NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE):
            ttype = NORMAL
        proto.pieces.add(piece=text, score=float(score), type=ttype)
    if unk_id is None:
        unk_id = len(proto.pieces)
        names = set(tokens)
        name = next(n for n in ("<unk>", "<unk_>", "<unk__>", "[UNK]") if n not in names)
        proto.pieces.add(piece=name, score=0.0, type=kind.UNKNOWN)

    spec = proto.trainer_spec
    spec.model_type = spm_pb2.TrainerSpec.BPE
    spec.vocab_size = len(proto.pieces)
    spec.byte_fallback = BYTE in types
    spec.unk_id = unk_id
    spec.unk_piece = proto.pieces[unk_id].piece
    for field, key in (("bos", "tokenizer.ggml.bos_token_id"),
                       ("eos", "tokenizer.ggml.eos_token_id"),
                       ("pad", "tokenizer.ggml.padding_token_id")):
        token_id = fields.get(key)
        if token_id is not None and 0 <= token_id < len(tokens) and token_id != unk_id:
            setattr(spec, f"{field}_id", int(token_id))
            setattr(spec, f"{field}_piece", tokens[token_id])
        else:
            setattr(spec, f"{field}_id", -1)

    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto


# --------------------------------------------------------------------------- file helpers

def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PerfxError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _config_token_id(config: Mapping[str, Any], key: str, lookup: Any) -> int | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return lookup(value) if isinstance(value, str) else None


def _config_chat_template(config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _decoder_spec(tok: HFTokenizer) -> Mapping[str, Any] | None:
    """The tokenizer's decoder as tokenizer.json writes it: from the decoder alone where it can say
    (serialising the whole tokenizer copies its vocabulary and merges)."""
    state = tok.decoder.__getstate__() if tok.decoder is not None else None
    if state:
        return json.loads(state)
    return json.loads(tok.to_str()).get("decoder")


def _decoder_types(spec: Mapping[str, Any] | None) -> set[str]:
    """Decoder type names in a tokenizer.json decoder spec, Sequences flattened."""
    if not spec:
        return set()
    if spec.get("type") == "Sequence":
        return set().union(*(_decoder_types(d) for d in spec.get("decoders", [])))
    if spec.get("type") == "Metaspace" and spec.get("prepend_scheme") == "never":
        return set()
    return {spec.get("type", "")}


# --------------------------------------------------------------------------- streaming

class StreamDecoder:
    """Turns generated ids into text as they arrive, never splitting a UTF-8 character.

    ``push`` returns the text completed by one more token (possibly ``""`` while a multi-byte
    character is still incomplete); ``flush`` returns whatever is left. Their concatenation
    equals ``tokenizer.decode(ids, special)`` for the same ids.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True

    def push(self, token_id: int) -> str:
        piece, self._at_start = self._tokenizer._piece(token_id, self._special, self._at_start)
        return self._utf8.decode(piece)

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
