"""engine/text/bpe.py, the pure-Python byte-level BPE, gives the same ids as the `tokenizers` library.

Each comparison runs on both regex engines: the `regex` module (skipped where not installed) and
Python's `re` with Unicode classes built from `unicodedata`.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")

from perfx.engine.errors import PerfxError
from perfx.engine.text import bpe, encoders, unicode_regex
from perfx.engine.text.byte_level import byte_to_char
from perfx.engine.text.chat_template import ChatTemplate
from perfx.engine.text.pretokenizers import PRE_TOKENIZERS
from perfx.engine.text.tokenizer import Tokenizer

GPL3 = Path("/usr/share/common-licenses/GPL-3")
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = [
    "Hello, world! It's 2024; we've got 1234567 reasons.",
    "naïve café — Ünïcödé, 東京タワー, 서울, Москва, العربية, हिन्दी 😀👍🏽",
    "  leading and trailing   \n\n\tTabs\t\tand\r\nCRLF lines  \n",
    "I'M SHOUTING, YOU'RE TOO. They'll've done it'd.",
    "x = f(a_b, c-d)/2 ** 3 >= [1, 2.5e-3] # comment\n    return {'k': \"v\"}\n",
    "digits 3.14159 and 1,000,000 and ١٢٣ and ⅧⅨ and ²³",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "\u00a0non-breaking\u2003em space\u3000ideographic\u200bzero-width\x1cfile-separator\x85next-line",
]
ENGINES = ["re", pytest.param("regex", marks=pytest.mark.skipif(unicode_regex._regex is None, reason="regex not installed"))]


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch) -> str:
    monkeypatch.setattr(unicode_regex, "ENGINE", request.param)
    return request.param


@pytest.fixture(scope="session")
def smollm2_fields(default_model_path) -> dict:
    from perfx.engine.formats.gguf_file import read_gguf

    return read_gguf(default_model_path).metadata


def pure(fields: dict) -> Tokenizer:
    """Tokenizer.from_gguf built on engine.text.bpe, as engine.text does without `tokenizers`."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(encoders, "library", bpe)
        return Tokenizer.from_gguf(fields)


@pytest.fixture(scope="session")
def fast(smollm2_fields) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_fields)


_slow: dict[str, Tokenizer] = {}


@pytest.fixture
def slow(smollm2_fields, engine) -> Tokenizer:
    """The pure-Python tokenizer of the default model, its regexes compiled for `engine`."""
    if engine not in _slow:
        _slow[engine] = pure(smollm2_fields)
    return _slow[engine]


# ---- the default model --------------------------------------------------------------------------------


@pytest.mark.model
def test_same_ids_on_the_chat_prompt(fast, slow) -> None:
    assert isinstance(slow._backend.tok, bpe.Tokenizer)
    prompt = ChatTemplate.from_tokenizer(fast).render([{"role": "user", "content": "What is the capital of France?"}])
    ids = fast.encode(prompt)
    assert ids[:3] == [1, 9690, 198] and len(ids) == 37
    assert slow.encode(prompt) == ids
    assert slow.encode(prompt, special=False) == fast.encode(prompt, special=False)


@pytest.mark.model
@pytest.mark.skipif(not GPL3.is_file(), reason="no /usr/share/common-licenses/GPL-3")
def test_same_ids_on_gpl3(fast, slow) -> None:
    text = GPL3.read_text(encoding="utf-8")
    ids = fast.encode(text)
    assert len(ids) == 7639
    assert slow.encode(text) == ids


@pytest.mark.model
def test_same_vocabulary_tables(fast, slow) -> None:
    assert slow.vocab_size == fast.vocab_size
    assert slow._texts == fast._texts and slow._pieces == fast._pieces
    assert slow._control == fast._control and slow.eot_ids == fast.eot_ids
    assert (slow.bos_id, slow.eos_id, slow.add_bos) == (fast.bos_id, fast.eos_id, fast.add_bos)


@pytest.mark.model
@pytest.mark.parametrize("text", SAMPLES)
def test_same_ids_on_samples(fast, slow, text: str) -> None:
    assert slow.encode(text) == fast.encode(text)
    assert slow.encode(text, special=False) == fast.encode(text, special=False)


# ---- pre-tokenizers ----------------------------------------------------------------------------------

ALL_REGEXES = sorted({r for pre in PRE_TOKENIZERS.values() for r in pre.regexes})


@pytest.mark.parametrize("pattern", ALL_REGEXES)
def test_every_pre_tokenizer_regex_splits_alike(pattern: str, engine) -> None:
    fast = tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated")
    slow = bpe.pre_tokenizers.Split(bpe.Regex(pattern))
    for text in SAMPLES:
        assert slow.split(text) == [piece for piece, _ in fast.pre_tokenize_str(text)], text


def test_unicode_classes_agree_with_oniguruma(engine) -> None:
    """Every character assigned in Python's unicodedata is classed as Oniguruma classes it."""
    text = "".join(chr(c) for c in range(0x30000)
                   if unicodedata.category(chr(c)) not in ("Cn", "Cs"))
    for pattern in (r"\p{L}", r"\p{N}", r"\p{M}", r"\p{P}", r"\p{S}", r"\p{Lu}", r"\s"):
        fast = tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="removed")
        kept = "".join(p for p, _ in fast.pre_tokenize_str(text))
        assert unicode_regex.compile_pattern(pattern).sub("", text) == kept, pattern


def test_whitespace_is_unicode_white_space(engine) -> None:
    pattern = unicode_regex.compile_pattern(r"\s+")
    assert pattern.fullmatch(" \t\n\x0b\x0c\r\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000")
    assert not any(pattern.match(c) for c in "\x1c\x1d\x1e\x1f\u200b\ufeff")


def test_line_anchors_as_oniguruma(engine) -> None:
    fast = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"\s+$"), behavior="isolated")
    text = "a  \nb  "
    assert bpe.pre_tokenizers.Split(bpe.Regex(r"\s+$")).split(text) == [p for p, _ in fast.pre_tokenize_str(text)]


def test_unknown_category_is_an_error() -> None:
    with pytest.raises(PerfxError, match="unknown Unicode category"):
        unicode_regex.translate(r"\p{Xx}", "re")


# ---- BPE merges ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_merge_order_matches_tokenizers(ignore_merges: bool) -> None:
    """Random merge lists over a small alphabet, where rank order and leftmost-first both matter."""
    rng = random.Random(7)
    letters = list("abcd")
    vocab = {c: i for i, c in enumerate(letters)}
    merges: list[tuple[str, str]] = []
    tokens = list(letters)
    while len(merges) < 40:
        a, b = rng.choice(tokens), rng.choice(tokens)
        if a + b in vocab or len(a + b) > 6:
            continue
        merges.append((a, b))
        vocab[a + b] = len(vocab)
        tokens.append(a + b)
    fast = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    slow = bpe.models.BPE(vocab, merges, ignore_merges=ignore_merges)
    for _ in range(500):
        word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 12)))
        assert slow.tokenize(word) == [t.id for t in fast.model.tokenize(word)], word


def test_inconsistent_merges_are_an_error() -> None:
    with pytest.raises(PerfxError, match="not in the vocabulary"):
        bpe.models.BPE({"a": 0, "b": 1}, [("a", "b")])


# ---- tokenizer.json ------------------------------------------------------------------------------------


@pytest.mark.model
def test_tokenizer_json_round_trips_both_ways(fast, slow, tmp_path: Path) -> None:
    text = SAMPLES[0] + SAMPLES[6]
    slow._backend.tok.save(str(tmp_path / "pure.json"))
    fast._backend.tok.save(str(tmp_path / "fast.json"))
    from_pure = tokenizers.Tokenizer.from_file(str(tmp_path / "pure.json"))
    from_fast = bpe.Tokenizer.from_file(str(tmp_path / "fast.json"))
    expected = fast.encode(text)
    assert from_pure.encode(text, add_special_tokens=False).ids == expected
    assert from_fast.encode(text, add_special_tokens=False).ids == expected
    assert from_fast.get_vocab_size() == from_pure.get_vocab_size()


def test_gpt2_style_tokenizer_json(tmp_path: Path) -> None:
    """A tokenizer.json with GPT-2's own ByteLevel pre-tokenizer (regex and prefix space) and a
    BOS-adding post-processor."""
    alphabet = [byte_to_char()[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in (("Ġ", "t"), ("h", "e"), ("Ġt", "he")):
        vocab[a + b] = len(vocab)
    vocab["<s>"] = len(vocab)
    fast = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e"), ("Ġt", "he")]))
    fast.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=True)
    fast.decoder = tokenizers.decoders.ByteLevel()
    fast.add_special_tokens(["<s>"])
    fast.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    slow = bpe.Tokenizer.from_str(fast.to_str())
    for text in ("the theme", "the<s>the  x", SAMPLES[1]):
        for special in (True, False):
            assert slow.encode(text, special).ids == fast.encode(text, add_special_tokens=special).ids, text


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(normalizer={"type": "NFC"}), "normalizer 'NFC'"),
    (lambda d: d["model"].update(type="WordPiece"), "model 'WordPiece'"),
    (lambda d: d["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda d: d.update(pre_tokenizer={"type": "Metaspace"}), "pre-tokenizer 'Metaspace'"),
    (lambda d: d.update(decoder={"type": "Metaspace"}), "decoder 'Metaspace'"),
])
def test_unsupported_tokenizer_json(change, message: str) -> None:
    data = json.loads(bpe.Tokenizer(bpe.models.BPE({"a": 0}, [])).to_str())
    change(data)
    with pytest.raises(PerfxError, match=message):
        bpe.Tokenizer.from_str(json.dumps(data))


# ---- the import fallback -------------------------------------------------------------------------------

BLOCKED = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
"""


def run_blocked(code: str, *blocked: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED.format(blocked=blocked) + code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.model
def test_without_tokenizers_the_model_still_loads(default_model_path) -> None:
    code = f"""
from perfx.engine.text.encoders import library, notices
from perfx.engine import load_model
llm = load_model({str(default_model_path)!r}, device="numpy", ctx=64)
prompt = llm.chat_template.render([{{"role": "user", "content": "What is the capital of France?"}}])
print(library.__name__)
print(notices())
print(llm.tokenizer.encode(prompt))
"""
    result = run_blocked(code, "tokenizers")
    assert result.returncode == 0, result.stderr
    module, notices, ids = result.stdout.strip().splitlines()
    assert module == "perfx.engine.text.bpe"
    assert "tokenizers not installed" in notices and "same token ids" in notices
    assert json.loads(ids)[:3] == [1, 9690, 198] and len(json.loads(ids)) == 37


def test_without_sentencepiece_only_its_models_fail() -> None:
    code = """
from perfx.engine.errors import PerfxError
from perfx.engine.text.encoders import notices
from perfx.engine.text.tokenizer import Tokenizer
print(notices())
try:
    Tokenizer.from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a"]})
except PerfxError as e:
    print(e)
"""
    result = run_blocked(code, "sentencepiece", "tokenizers")
    assert result.returncode == 0, result.stderr
    notices, error = result.stdout.strip().splitlines()
    assert "sentencepiece not installed" in notices and "tokenizers not installed" in notices
    assert error == ("this model has a SentencePiece vocabulary, which needs the sentencepiece package: "
                     "pip install sentencepiece")


@pytest.mark.model
def test_without_tokenizers_a_saved_tokenizer_json_still_loads(fast, tmp_path: Path) -> None:
    """perfx model files carry the tokenizer as the tokenizer.json that Tokenizer.save writes."""
    fast.save(tmp_path)
    text = SAMPLES[6] + SAMPLES[1]
    code = f"""
from perfx.engine.text.tokenizer import Tokenizer
tok = Tokenizer.from_files({str(tmp_path)!r})
print(type(tok._backend.tok).__module__, tok.encode({text!r}), tok.bos_id, tok.add_bos, sorted(tok.eot_ids))
"""
    result = run_blocked(code, "tokenizers")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ", 1)[0] == "perfx.engine.text.bpe"
    assert result.stdout.split(" ", 1)[1].strip() == f"{fast.encode(text)} {fast.bos_id} {fast.add_bos} {sorted(fast.eot_ids)}"
