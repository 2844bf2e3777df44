"""A GGUF model cut to its first LAYERS layers (real weights, tokenizer and embedding kept), small enough
to travel where the whole file cannot; for checking a device's numerics against NumPy's on real weights.

    python3 scripts/truncate_gguf.py IN.gguf OUT.gguf LAYERS
"""
from __future__ import annotations

import os
import sys

import gguf


def main(src: str, dst: str, layers: int) -> None:
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst + ".tmp", arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = layers if name == f"{arch}.block_count" else f.contents()
        vtype = f.types[0]
        w.add_key_value(name, value, vtype, sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(dst + ".tmp", dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
