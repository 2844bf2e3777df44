"""perfx.engine.synthetic.write_gguf: a shape as a GGUF file of random Q4_0 layer matrices with another file's
tokenizer, which perfx (and llama.cpp) load like any model file."""
from __future__ import annotations

import numpy as np
import pytest

from perfx.engine.errors import PerfxError
from perfx.engine.synthetic import get_shape, write_gguf
from tests.conftest import TinySpec, write_tiny_gguf


def test_written_file_loads_with_the_shape_and_the_tokenizer(tmp_path):
    import gguf

    from perfx.engine import load_model

    source = tmp_path / "tok.gguf"
    write_tiny_gguf(source, TinySpec())
    shape = get_shape("tiny")
    path = tmp_path / "tiny-q4_0.gguf"
    vocab = write_gguf(shape, str(path), str(source), seed=3)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.1.ffn_down.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == vocab
    llm = load_model(str(path), device="numpy", ctx=64)
    c = llm.transformer.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == \
        (shape.n_layers, shape.dim, shape.n_heads, shape.n_kv_heads, shape.ffn_dim, vocab)
    logits = llm.transformer.forward(np.array(llm.tokenizer.encode("the cat", special=False)), 0)
    assert np.all(np.isfinite(logits)) and 0.01 < float(np.std(logits)) < 100
    again = tmp_path / "again.gguf"
    write_gguf(shape, str(again), str(source), seed=3)
    assert again.read_bytes() == path.read_bytes()                # the same seed, the same file


def test_a_source_without_tokenizer_is_refused(tmp_path):
    import gguf

    bare = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(str(bare), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PerfxError, match="no tokenizer"):
        write_gguf(get_shape("tiny"), str(tmp_path / "x.gguf"), str(bare))
    assert not (tmp_path / "x.gguf").exists()
