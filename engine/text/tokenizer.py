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

What runs the encoding is in `engine.text.encoders`, the pre-tokenizers in
`engine.text.pretokenizers`, the building from a GGUF vocabulary in `engine.text.gguf_vocab`.
"""
from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perfx.engine.errors import PerfxError
from perfx.engine.text import encoders, gguf_vocab
from perfx.engine.text.byte_level import token_bytes
from perfx.engine.text.pretokenizers import PRE_TOKENIZERS

if TYPE_CHECKING:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    from tokenizers import Tokenizer as HFTokenizer

END_OF_TURN_TEXTS = (
    "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>",
    "<|endoftext|>", "</s>", "<|end_of_text|>",
)

_SPACE_MARK = "\u2581"  # SentencePiece's "▁"
_SPM_UNKNOWN_SURFACE = " \u2047 ".encode()  # what SentencePiece renders for <unk>
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# --------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """Encodes text to token ids and decodes ids back, the way llama.cpp does for the vocab.

    Build one with :meth:`from_gguf` or :meth:`from_files`.
    """

    def __init__(self, backend: encoders.Encoder, *, texts: list[str], pieces: list[bytes],
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
        types = list(fields.get("tokenizer.ggml.token_type") or [gguf_vocab.NORMAL] * len(tokens))
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
            tok = gguf_vocab.bpe_tokenizer(tokens, types, list(fields.get("tokenizer.ggml.merges") or []), pre)
            add_bos = fields.get("tokenizer.ggml.add_bos_token", pre.add_bos)
            return cls._from_hf(tok, add_bos=add_bos, **common)

        if model == "llama":
            encoders.require_sentencepiece()
            proto = gguf_vocab.spm_proto(tokens, types, fields)
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
                tok = encoders.library.Tokenizer.from_file(str(directory / "tokenizer.json"))
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
            encoders.require_sentencepiece()
            proto = encoders.spm_pb2.ModelProto()
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
                pieces.append(token_bytes(text))
            elif m := _BYTE_PIECE.fullmatch(text):
                pieces.append(bytes([int(m.group(1), 16)]))
                byte_tokens.add(i)
            else:
                pieces.append(text.replace(_SPACE_MARK, " ").encode())
        strip = not byte_level and bool(decoder & {"Strip", "Metaspace"})
        return cls(encoders.HFEncoder(tok), texts=texts, pieces=pieces, control=control,
                   byte_tokens=frozenset(byte_tokens), strip_leading_space=strip, **kwargs)

    @classmethod
    def _from_spm(cls, proto: spm_pb2.ModelProto, n_tokens: int | None = None,
                  **kwargs: Any) -> Tokenizer:
        backend = encoders.SpmEncoder(proto)
        kind = encoders.spm_pb2.ModelProto.SentencePiece
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
