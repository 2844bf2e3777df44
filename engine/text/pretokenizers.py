"""How llama.cpp splits text before byte-level BPE, for each ``tokenizer.ggml.pre`` value, and the
pre-tokenizer of the BPE library that does it."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from perfx.engine.text import encoders

if TYPE_CHECKING:
    from tokenizers import pre_tokenizers

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
class PreTokenizer:
    """How llama.cpp splits text before BPE for one family of ``tokenizer.ggml.pre`` values."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a vocab entry is not merged further
    add_bos: bool = False        # llama.cpp's default when tokenizer.ggml.add_bos_token is absent

def _family(names: str, *regexes: str, **flags: bool) -> dict[str, PreTokenizer]:
    pre = PreTokenizer(tuple(regexes), **flags)
    return {name: pre for name in names.split()}


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
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

def byte_level_pre_tokenizer(regexes: Iterable[str]) -> pre_tokenizers.PreTokenizer:
    """Each regex splits every piece left by the previous one, keeping matches and gaps."""
    library = encoders.library
    steps = [library.pre_tokenizers.Split(library.Regex(r), behavior="isolated") for r in regexes]
    steps.append(library.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return library.pre_tokenizers.Sequence(steps)
