"""GPT-2's byte-level alphabet: each byte value stands as a printable character in byte-level BPE
vocabularies ("Ġthe" is " the"), so that every piece of UTF-8 is a string of vocabulary characters."""
from __future__ import annotations

from functools import cache


@cache
def byte_to_char() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return tuple(chars)


@cache
def char_to_byte() -> dict[str, int]:
    """The inverse of `byte_to_char`."""
    return {c: b for b, c in enumerate(byte_to_char())}


def byte_level(text: str) -> str:
    """`text`'s UTF-8 bytes as GPT-2's printable characters."""
    table = byte_to_char()
    return "".join(table[b] for b in text.encode())


def token_bytes(token: str) -> bytes:
    """The bytes a byte-level vocabulary entry stands for; an entry outside the alphabet (an added
    token's text) as its own UTF-8."""
    table = char_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return token.encode()
