"""Tokenizer: exact ids on a real GGUF, round trips, special tokens, streaming, SentencePiece."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from perfx.engine.errors import PerfxError
from tests.conftest import smollm2_gguf
from perfx.engine.text.pretokenizers import PRE_TOKENIZERS
from perfx.engine.text.tokenizer import StreamDecoder, Tokenizer



CORPUS = """\
The quick brown fox jumps over the lazy dog. A tokenizer splits text into pieces.
Language models read tokens, not characters, and every token has an id in the vocabulary.
SentencePiece treats the input as a raw stream of characters, spaces included.
Byte fallback turns characters that are not in the vocabulary into their UTF-8 bytes.
Merges are applied greedily, the pair with the best score first, until none is left.
The cat sat on the mat; the dog sat on the log. Numbers like 12345 and 2024 appear too.
def tokenize(text):
    return [piece for piece in text.split()]
""".splitlines()

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "Crème brûlée, naïve café, Ångström, ß and Ø.",
    "日本語のテキストと中文文本。",
    "مرحبا بالعالم",
    "Emoji: 😀 👍🏽 🇫🇷 👨‍👩‍👧‍👦 🏳️‍🌈",
    "def f(x):\n\tif x:\n\t\treturn x  # tab-indented\n    return None\n",
    "   leading spaces, trailing spaces   ",
    "runs   of    spaces\n\n\n\nand\r\nnewlines\t\t\tand tabs",
    "",
]

SMOLLM2_PROMPT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
]


# --------------------------------------------------------------------------- fixtures

def gguf_fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smollm2_fields() -> dict:
    return gguf_fields(smollm2_gguf())


@pytest.fixture(scope="module")
def smollm2(smollm2_fields: dict) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_fields)


@pytest.fixture(scope="module")
def tiny_bpe_fields() -> dict:
    """GGUF metadata of a small byte-level BPE vocab trained on CORPUS."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS * 5, trainer)
    model = json.loads(hf.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in specials else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|endoftext|>"),
    }


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SentencePiece BPE model with byte fallback, trained on CORPUS."""
    prefix = tmp_path_factory.mktemp("spm") / "tiny"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(prefix), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    return prefix.with_suffix(".model")


def spm_gguf_fields(model_file: Path) -> dict:
    """The GGUF metadata llama.cpp's converter writes for a SentencePiece model."""
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
    }


@pytest.fixture(params=["smollm2", "tiny_bpe", "tiny_spm"])
def any_tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2")
    if request.param == "tiny_bpe":
        return Tokenizer.from_gguf(request.getfixturevalue("tiny_bpe_fields"))
    return Tokenizer.from_gguf(spm_gguf_fields(request.getfixturevalue("spm_model")))


# --------------------------------------------------------------------------- real model

def test_smollm2_chat_prompt_ids(smollm2: Tokenizer) -> None:
    from perfx.engine.text.chat_template import ChatTemplate

    prompt = ChatTemplate.from_tokenizer(smollm2).render(
        [{"role": "user", "content": "What is the capital of France?"}])
    assert smollm2.encode(prompt, special=True) == SMOLLM2_PROMPT_IDS


def test_smollm2_metadata(smollm2: Tokenizer) -> None:
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.add_bos) == (1, 2, False)
    assert (smollm2.bos_text, smollm2.eos_text) == ("<|im_start|>", "<|im_end|>")
    assert smollm2.eot_ids == {0, 2}  # <|im_end|> (EOS) and <|endoftext|>
    assert smollm2.chat_template and "<|im_start|>" in smollm2.chat_template
    assert smollm2.token_text(9690) == "system"


def test_smollm2_digits_are_split(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("year 2024")
    assert [smollm2.token_text(i) for i in ids] == ["year", "Ġ", "2", "0", "2", "4"]


def test_special_parsing(smollm2: Tokenizer) -> None:
    assert smollm2.encode("<|im_start|>", special=True) == [1]
    plain = smollm2.encode("<|im_start|>", special=False)
    assert len(plain) > 1 and 1 not in plain
    assert smollm2.decode(plain) == "<|im_start|>"
    assert smollm2.decode([1, 4093, 2]) == "user"
    assert smollm2.decode([1, 4093, 2], special=True) == "<|im_start|>user<|im_end|>"


def test_from_files_tokenizer_json(smollm2: Tokenizer, tmp_path: Path) -> None:
    reloaded = Tokenizer.from_files(smollm2.save(tmp_path))
    text = "<|im_start|>user\nCafé 日本 2024 😀<|im_end|>\n"
    assert reloaded.encode(text) == smollm2.encode(text)
    assert reloaded.encode(text, special=False) == smollm2.encode(text, special=False)
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.add_bos) == (1, 2, False)
    assert reloaded.eot_ids == smollm2.eot_ids
    assert reloaded.chat_template == smollm2.chat_template
    assert reloaded.decode(reloaded.encode(text)) == smollm2.decode(smollm2.encode(text))


# --------------------------------------------------------------------------- any vocab

@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(any_tokenizer: Tokenizer, text: str) -> None:
    ids = any_tokenizer.encode(text, special=False)
    assert any_tokenizer.decode(ids) == text


def test_stream_decoder_holds_partial_characters(any_tokenizer: Tokenizer) -> None:
    text = "Emoji 😀👍🏽 and family 👨‍👩‍👧‍👦 flag 🏳️‍🌈, CJK 日本語."
    ids = any_tokenizer.encode(text)
    stream = StreamDecoder(any_tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == any_tokenizer.decode(ids) == text
    assert "" in pieces[:-1]  # some character really did span several tokens


def test_stream_decoder_matches_decode_on_broken_bytes(any_tokenizer: Tokenizer) -> None:
    ids = any_tokenizer.encode("😀")[:-1]  # an incomplete character
    stream = StreamDecoder(any_tokenizer)
    streamed = "".join(stream.push(i) for i in ids) + stream.flush()
    assert streamed == any_tokenizer.decode(ids)


def test_out_of_range_id(any_tokenizer: Tokenizer) -> None:
    with pytest.raises(PerfxError, match="outside the vocabulary"):
        any_tokenizer.decode([any_tokenizer.vocab_size])


# --------------------------------------------------------------------------- BPE pre-tokenizers

@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_round_trips(tiny_bpe_fields: dict, pre: str) -> None:
    tok = Tokenizer.from_gguf({**tiny_bpe_fields, "tokenizer.ggml.pre": pre})
    text = "It's 12345 tokens — naïve 日本語 😀!\n\n  def f():\treturn 'ok'  "
    assert tok.decode(tok.encode(text)) == text


def test_missing_pre_means_gpt2(tiny_bpe_fields: dict) -> None:
    fields = {k: v for k, v in tiny_bpe_fields.items() if k != "tokenizer.ggml.pre"}
    text = "The cat sat on the mat 12345."
    expected = Tokenizer.from_gguf(tiny_bpe_fields).encode(text)
    assert Tokenizer.from_gguf(fields).encode(text) == expected


def test_unknown_pre_tokenizer(tiny_bpe_fields: dict) -> None:
    with pytest.raises(PerfxError, match="no-such-pre"):
        Tokenizer.from_gguf({**tiny_bpe_fields, "tokenizer.ggml.pre": "no-such-pre"})


def test_unknown_tokenizer_model(tiny_bpe_fields: dict) -> None:
    with pytest.raises(PerfxError, match="rwkv"):
        Tokenizer.from_gguf({**tiny_bpe_fields, "tokenizer.ggml.model": "rwkv"})


def test_tiny_bpe_special_tokens(tiny_bpe_fields: dict) -> None:
    tok = Tokenizer.from_gguf(tiny_bpe_fields)
    im_start = tiny_bpe_fields["tokenizer.ggml.tokens"].index("<|im_start|>")
    im_end = tiny_bpe_fields["tokenizer.ggml.tokens"].index("<|im_end|>")
    assert tok.encode("<|im_start|>the cat")[0] == im_start
    assert im_start not in tok.encode("<|im_start|>the cat", special=False)
    assert im_end in tok.eot_ids and tok.eos_id in tok.eot_ids


# --------------------------------------------------------------------------- SentencePiece

SPM_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Merges are applied greedily, until none is left.",
    "Unseen words: zebra, quixotic, Ölçü, 東京, 🦊!",
    "  two  spaces\nand a newline\tand a tab",
    "Numbers 12345 and </s> written as text",
]


@pytest.mark.parametrize("sentence", SPM_SENTENCES)
def test_spm_gguf_matches_sentencepiece(spm_model: Path, sentence: str) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    tok = Tokenizer.from_gguf(spm_gguf_fields(spm_model))
    assert tok.encode(sentence, special=False) == [1] + sp.encode(sentence)
    assert tok.encode(sentence, special=False, add_bos=False) == sp.encode(sentence)
    assert tok.decode(tok.encode(sentence, special=False)) == sentence


def test_spm_gguf_special_tokens(spm_model: Path) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    tok = Tokenizer.from_gguf(spm_gguf_fields(spm_model))
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    assert (tok.bos_text, tok.eos_text) == ("<s>", "</s>")
    assert tok.eot_ids == {2}
    assert tok.encode("<s>The dog</s>") == [1] + sp.encode("The dog") + [2]
    assert tok.encode("The dog</s>") == [1] + sp.encode("The dog") + [2]
    assert tok.decode(tok.encode("The dog</s>")) == "The dog"


def test_spm_from_files(spm_model: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(spm_model.read_bytes())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    tok = Tokenizer.from_files(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    assert tok.chat_template is None
    for sentence in SPM_SENTENCES:
        assert tok.encode(sentence, special=False) == [1] + sp.encode(sentence)
        ids = tok.encode(sentence, special=False)
        assert tok.decode(ids) == sp.decode(sp.encode(sentence)) == sentence


def test_spm_tokenizer_config(spm_model: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(spm_model.read_bytes())
    config = {"add_bos_token": False, "bos_token": {"content": "<s>"}, "eos_token": "</s>",
              "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_files(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.chat_template == config["chat_template"]
    assert tok.encode("The dog")[:1] != [1]


def test_from_files_tokenizer_json_offline(tiny_bpe_fields: dict, tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(tiny_bpe_fields)
    reloaded = Tokenizer.from_files(tok.save(tmp_path))
    for text in ROUND_TRIP_TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert reloaded.encode(text) == tok.encode(text)
        assert reloaded.decode(reloaded.encode(text)) == tok.decode(tok.encode(text))


def test_from_files_without_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(PerfxError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_files(tmp_path)
