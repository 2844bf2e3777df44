"""Tokenizers from a GGUF file's vocabulary: byte-level BPE (``tokenizer.ggml.model == "gpt2"``) as a
BPE-library tokenizer, SentencePiece (``"llama"``) as a SentencePiece model whose scores are merge
priorities, as llama.cpp reads them."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from perfx.engine.errors import PerfxError
from perfx.engine.text import encoders
from perfx.engine.text.pretokenizers import PreTokenizer, byte_level_pre_tokenizer

if TYPE_CHECKING:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    from tokenizers import Tokenizer as HFTokenizer

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def bpe_tokenizer(tokens: list[str], types: list[int], merges: list[str],
                  pre: PreTokenizer) -> HFTokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from a GGUF vocab and merge list."""
    library = encoders.library
    vocab = {text: i for i, text in reversed(list(enumerate(tokens)))}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:
        tok = library.Tokenizer(library.models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
    except Exception as e:
        raise PerfxError(f"the model file's BPE vocabulary is inconsistent: {e}") from e
    tok.pre_tokenizer = byte_level_pre_tokenizer(pre.regexes)
    tok.decoder = library.decoders.ByteLevel()
    tok.add_special_tokens([library.AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)])
    tok.add_tokens([library.AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED])
    return tok


def spm_proto(tokens: list[str], types: list[int],
              fields: Mapping[str, Any]) -> spm_pb2.ModelProto:
    """A SentencePiece BPE model whose scores are merge priorities, as llama.cpp reads them."""
    spm_pb2 = encoders.spm_pb2
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
