"""GGUF files taken apart and written back byte by byte, so that tests can give any metadata key any value
of any type, and any tensor any type or offset, including what no GGUF writer would produce.

    f = Crafted.read(path)
    f.set("llama.attention.head_count", 0)           # same type as before
    f.set("tokenizer.chat_template", 7, U32)           # another type
    f.tensor("blk.0.attn_q.weight")["offset"] += 4
    f.write(tmp_path / "bad.gguf")
"""
from __future__ import annotations

import copy
import struct
from dataclasses import dataclass, field
from pathlib import Path

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
           I64: "<q", F64: "<d"}


class Raw(bytes):
    """A value's bytes, written as they are whatever the type says (a type id that lies about its value,
    arrays nested deeper than Python recursion goes)."""


def value_bytes(vtype: int, value, sub: int | None = None) -> bytes:
    """A metadata value as GGUF stores it. An ARRAY's elements are of type `sub`; with `sub` ARRAY each
    element is a (sub, elements) pair."""
    if isinstance(value, Raw):
        return value
    if vtype == STRING:
        b = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return struct.pack("<Q", len(b)) + b
    if vtype == ARRAY:
        return struct.pack("<IQ", sub, len(value)) + b"".join(
            value_bytes(sub, v, sub) if sub != ARRAY else value_bytes(ARRAY, v[1], v[0]) for v in value)
    return struct.pack(FORMATS[vtype], value)


@dataclass
class Crafted:
    version: int
    metadata: list[list]              # [key, vtype, value, sub]
    tensors: list[dict]               # {"name", "dims" (fastest first), "type" (GGML id), "offset"}
    data: bytes                       # the data section
    pad_to: int = 32                  # where the data section starts: the header padded to this
    raw_header: bytes | None = field(default=None, repr=False)

    @classmethod
    def read(cls, path: Path) -> Crafted:
        from gguf import GGUFReader

        r = GGUFReader(str(path))
        metadata = []
        for f in r.fields.values():
            if f.name.startswith("GGUF."):
                continue
            vtype = int(f.types[0])
            sub = int(f.types[1]) if vtype == ARRAY else None
            value = f.contents()
            metadata.append([f.name, vtype, value, sub])
        tensors = [{"name": t.name, "dims": [int(d) for d in t.shape], "type": int(t.tensor_type),
                    "offset": int(t.data_offset - r.data_offset)} for t in r.tensors]
        data = Path(path).read_bytes()[r.data_offset:]
        align = next((m[2] for m in metadata if m[0] == "general.alignment"), 32)
        return cls(int(r.fields["GGUF.version"].contents()), metadata, tensors, data, align)

    def copy(self) -> Crafted:
        return copy.deepcopy(self)

    def get(self, key: str):
        return next(m[2] for m in self.metadata if m[0] == key)

    def set(self, key: str, value, vtype: int | None = None, sub: int | None = None) -> Crafted:
        """Set (or add) a key; without vtype the key keeps its type (a new key needs one)."""
        for m in self.metadata:
            if m[0] == key:
                m[1:] = [m[1] if vtype is None else vtype, value, m[3] if sub is None else sub]
                return self
        if vtype is None:      # a new key: the type its Python value suggests
            vtype = {bool: BOOL, float: F32, str: STRING}.get(type(value), U32 if 0 <= value < 1 << 32 else I64)
        self.metadata.append([key, vtype, value, sub])
        return self

    def drop(self, key: str) -> Crafted:
        self.metadata = [m for m in self.metadata if m[0] != key]
        return self

    def tensor(self, name: str) -> dict:
        return next(t for t in self.tensors if t["name"] == name)

    def header(self) -> bytes:
        out = [b"GGUF", struct.pack("<IQQ", self.version, len(self.tensors), len(self.metadata))]
        for key, vtype, value, sub in self.metadata:
            out += [value_bytes(STRING, key), struct.pack("<I", vtype), value_bytes(vtype, value, sub)]
        for t in self.tensors:
            out += [value_bytes(STRING, t["name"]), struct.pack("<I", len(t["dims"])),
                    struct.pack(f"<{len(t['dims'])}Q", *t["dims"]), struct.pack("<IQ", t["type"], t["offset"])]
        head = b"".join(out)
        return head + bytes(-len(head) % self.pad_to)

    def to_bytes(self) -> bytes:
        return (self.raw_header if self.raw_header is not None else self.header()) + self.data

    def write(self, path: Path) -> Path:
        path.write_bytes(self.to_bytes())
        return path
