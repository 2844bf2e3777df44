"""Hostile model files: each crafted to break one check, each refused in one line, never a traceback, an
out-of-bounds read or a silently wrong answer.

GGUF files are crafted from a tiny random-weight model (tests/gguf_craft.py rewrites any metadata value or
tensor-table entry); perfx and Hugging Face files by rewriting one value of a converted copy.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from perfx.engine.errors import PerfxError
from perfx.engine.llm import load_model
from tests.conftest import TinySpec, write_tiny_gguf
from tests.gguf_craft import ARRAY, F32, I32, STRING, U32, U64, Crafted, Raw

GGML_F32, GGML_Q4_0, GGML_Q4_1 = 0, 2, 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Crafted:
    path = tmp_path_factory.mktemp("hostile") / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(seed=5))
    return Crafted.read(path)


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory) -> Crafted:
    path = tmp_path_factory.mktemp("hostile") / "tiny-q4.gguf"
    write_tiny_gguf(path, TinySpec(qtype="Q4_0", seed=5))
    return Crafted.read(path)


def refused(path: Path, *patterns: str, device: str = "numpy") -> str:
    """Loading `path` fails with a PerfxError of one line that matches every pattern."""
    with pytest.raises(PerfxError) as e:
        load_model(path, device=device, ctx=64)
    message = str(e.value)
    assert "\n" not in message, message
    for p in patterns:
        assert re.search(p, message), f"{p!r} not in: {message}"
    return message


def crafted(base: Crafted, tmp_path: Path, **values) -> Path:
    """A copy of base with metadata keys set (a value, or (value, type) to change its type)."""
    f = base.copy()
    for key, value in values.items():
        key = key.replace("__", ".")
        f.set(key, *value) if isinstance(value, tuple) else f.set(key, value)
    return f.write(tmp_path / "crafted.gguf")


def test_the_tiny_model_itself_loads(tiny, tmp_path):
    llm = load_model(tiny.write(tmp_path / "m.gguf"), device="numpy", ctx=64)
    assert np.isfinite(llm.forward([1, 2, 3])).all()


# ---- metadata: types and ranges ---------------------------------------------------------------------

@pytest.mark.parametrize("key, value, patterns", [
    ("general.alignment", 0, ["general.alignment is 0"]),
    ("general.alignment", 24, ["general.alignment is 24, not a power of two"]),
    ("llama.attention.head_count", 0, [r"llama.attention.head_count is 0, outside 1\.\."]),
    ("llama.block_count", 0, [r"llama.block_count is 0, outside 1\.\."]),
    ("llama.attention.head_count_kv", 3, ["head_count_kv .*does not divide the 4"]),
    ("llama.rope.dimension_count", 32, ["rope.dimension_count is 32 for heads of 16"]),
    ("llama.rope.dimension_count", 0, [r"rope.dimension_count is 0, outside 2\.\."]),
    ("llama.context_length", (1 << 40, U64), ["context_length is 1099511627776, outside"]),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), ["layer_norm_rms_epsilon is nan, not a finite"]),
    ("llama.attention.layer_norm_rms_epsilon", 0.0, ["layer_norm_rms_epsilon is 0.0, not a finite number above 0"]),
    ("llama.attention.layer_norm_rms_epsilon", -1e-5, ["layer_norm_rms_epsilon is -9.99"]),
    ("llama.rope.freq_base", float("inf"), ["rope.freq_base is inf"]),
    ("tokenizer.ggml.eos_token_id", 99999, ["eos_token_id is 99999, outside the 263 tokens"]),
])
def test_metadata_value_out_of_range(tiny, tmp_path, key, value, patterns):
    refused(crafted(tiny, tmp_path, **{key.replace(".", "__"): value}), *patterns)


@pytest.mark.parametrize("key, value, vtype, pattern", [
    ("tokenizer.ggml.eos_token_id", "2", STRING, "eos_token_id is '2', not of type"),
    ("tokenizer.chat_template", 7, U32, "chat_template is 7, not of type str"),
    ("llama.embedding_length", "abc", STRING, "embedding_length is 'abc', not of type int"),
    ("llama.attention.head_count", 4.0, F32, "head_count is 4.0, not of type int"),
    ("general.alignment", "32", STRING, "general.alignment is '32'"),
    ("tokenizer.ggml.add_bos_token", 1, I32, "add_bos_token is 1, not of type bool"),
    ("general.architecture", 5, U32, "general.architecture is 5, not of type str"),
])
def test_metadata_value_of_the_wrong_type(tiny, tmp_path, key, value, vtype, pattern):
    refused(crafted(tiny, tmp_path, **{key.replace(".", "__"): (value, vtype)}), pattern)


def test_token_list_of_the_wrong_type(tiny, tmp_path):
    f = tiny.copy().set("tokenizer.ggml.token_type", [1, 2, 3])        # 3 types for 263 tokens
    refused(f.write(tmp_path / "m.gguf"), "token_type has 3 entries for 263 tokens")


def test_array_nested_thousands_deep(tiny, tmp_path):
    value = struct.pack("<IQI", U32, 1, 0)                             # [0]
    for _ in range(5000):
        value = struct.pack("<IQ", ARRAY, 1) + value                     # [[...]]
    f = tiny.copy().set("general.deep", Raw(value), ARRAY)
    refused(f.write(tmp_path / "m.gguf"), "nested more than 4 deep")


def test_counts_larger_than_the_file(tiny, tmp_path):
    f = tiny.copy()
    head = bytearray(f.header())
    struct.pack_into("<Q", head, 16, 1 << 60)                            # the metadata count
    f.raw_header = bytes(head)
    refused(f.write(tmp_path / "m.gguf"), "metadata of 1152921504606846976 keys, more than the rest of the file holds")


def test_duplicate_metadata_key(tiny, tmp_path):
    f = tiny.copy()
    f.metadata.append(["llama.block_count", U32, 1, None])
    refused(f.write(tmp_path / "m.gguf"), "llama.block_count' appears twice")


# ---- the tensor table ---------------------------------------------------------------------------------

def test_dims_whose_product_overflows(tiny, tmp_path):
    f = tiny.copy()
    f.tensor("blk.0.attn_q.weight")["dims"] = [1 << 32, 1 << 32]        # 2^64 elements: 0 in int64
    refused(f.write(tmp_path / "m.gguf"), r"blk.0.attn_q.weight of type F32 has impossible dimensions")


def test_too_many_dimensions(tiny, tmp_path):
    f = tiny.copy()
    f.tensor("output_norm.weight")["dims"] = [4, 4, 2, 2, 1]
    refused(f.write(tmp_path / "m.gguf"), "output_norm.weight has 5 dimensions")


def test_misaligned_tensor(tiny, tmp_path):
    f = tiny.copy()
    f.tensor("blk.1.attn_k.weight")["offset"] += 4
    refused(f.write(tmp_path / "m.gguf"), "blk.1.attn_k.weight starts at data offset .*, not a multiple of the "
                                          "alignment 32")


def test_overlapping_tensors(tiny, tmp_path):
    f = tiny.copy()
    names = [t["name"] for t in f.tensors]
    i = names.index("blk.0.attn_v.weight")
    f.tensors[i]["offset"] = f.tensors[i - 1]["offset"]                 # the same data as attn_k
    refused(f.write(tmp_path / "m.gguf"), "blk.0.attn_v.weight starts at data offset .*, inside "
                                          "blk.0.attn_k.weight")


def test_gap_in_the_tensor_table(tiny, tmp_path):
    f = tiny.copy()
    for t in f.tensors[3:]:
        t["offset"] += 64
    f.data += bytes(64)
    refused(f.write(tmp_path / "m.gguf"), "leaving 64 unused bytes after")


def test_retyped_tensor_runs_into_the_next(tiny_q4, tmp_path):
    f = tiny_q4.copy()
    t = f.tensor("blk.0.attn_q.weight")
    assert t["type"] == GGML_Q4_0
    t["type"] = GGML_Q4_1                                                # 20 bytes a block instead of 18
    refused(f.write(tmp_path / "m.gguf"), "blk.0.attn_k.weight starts at data offset .*, inside blk.0.attn_q.weight")


def test_tensor_data_past_the_end(tiny, tmp_path):
    f = tiny.copy()
    f.data = f.data[:-100]
    refused(f.write(tmp_path / "m.gguf"), "is truncated: tensor output_norm.weight ends past the end")


# ---- features the file asks for -------------------------------------------------------------------------

def with_tensor(base: Crafted, name: str, values: np.ndarray) -> Crafted:
    f = base.copy()
    end = max(t["offset"] + 4 * math.prod(t["dims"]) for t in f.tensors)   # F32 tiny model: 4 bytes each
    offset = -(-end // 32) * 32
    f.data = f.data[:end] + bytes(offset - end) + values.astype(np.float32).tobytes()
    f.tensors.append({"name": name, "dims": list(reversed(values.shape)), "type": GGML_F32, "offset": offset})
    return f


def test_rope_freqs_are_used_not_dropped(tiny, tmp_path):
    """Llama 3.1 / 3.2's frequency factors change the result; factors of 1 leave it as it was."""
    plain = load_model(tiny.write(tmp_path / "plain.gguf"), device="numpy", ctx=64).forward([5, 6, 7])
    ones = with_tensor(tiny, "rope_freqs.weight", np.ones(8)).write(tmp_path / "ones.gguf")
    eights = with_tensor(tiny, "rope_freqs.weight", np.full(8, 8.0)).write(tmp_path / "eights.gguf")
    np.testing.assert_allclose(load_model(ones, device="numpy", ctx=64).forward([5, 6, 7]), plain, rtol=1e-5)
    assert not np.allclose(load_model(eights, device="numpy", ctx=64).forward([5, 6, 7]), plain, rtol=1e-3)


def test_unimplemented_rope_scaling_is_refused(tiny, tmp_path):
    path = crafted(tiny, tmp_path, llama__rope__scaling__type=("yarn", STRING),
                   llama__rope__scaling__factor=(8.0, F32))
    refused(path, "RoPE scaling 'yarn'.* is not supported")


def test_neutral_rope_scaling_loads(tiny, tmp_path):
    path = crafted(tiny, tmp_path, llama__rope__scaling__type=("none", STRING),
                   llama__rope__scaling__factor=(1.0, F32))
    assert np.isfinite(load_model(path, device="numpy", ctx=64).forward([5, 6])).all()


@pytest.mark.parametrize("key, value, vtype", [
    ("llama.final_logit_softcapping", 30.0, F32),
    ("llama.expert_count", 8, U32),
    ("llama.some_future_key", 1, U32),
])
def test_unimplemented_keys_are_refused(tiny, tmp_path, key, value, vtype):
    path = crafted(tiny, tmp_path, **{key.replace(".", "__"): (value, vtype)})
    refused(path, re.escape(key) + "=.* is not supported")


def test_unknown_tensors_are_refused(tiny, tmp_path):
    f = with_tensor(tiny, "blk.0.attn_q_norm.weight", np.ones(16))
    f = with_tensor(f, "blk.7.attn_q.weight", np.ones(16))               # a layer past block_count
    refused(f.write(tmp_path / "m.gguf"), "tensor blk.0.attn_q_norm.weight, tensor blk.7.attn_q.weight are not")


def test_supported_features_are_data(tiny, tmp_path, monkeypatch):
    """An architecture that declares a feature runs files that ask for it."""
    from perfx.engine.formats import features

    monkeypatch.setitem(features.SUPPORTED, "llama", features.LLAMA | {"tensor rope_freqs.weight"})
    f = with_tensor(tiny, "rope_freqs.weight", np.ones(8))
    load_model(f.write(tmp_path / "m.gguf"), device="numpy", ctx=64)


# ---- the first logits ----------------------------------------------------------------------------------

def with_values(base: Crafted, name: str, value: float) -> Crafted:
    f = base.copy()
    t = f.tensor(name)
    data = bytearray(f.data)
    n = math.prod(t["dims"])
    data[t["offset"]:t["offset"] + 4 * n] = np.full(n, value, np.float32).tobytes()
    f.data = bytes(data)
    return f


def test_nan_weights_are_found(tiny, tmp_path):
    f = with_values(tiny, "blk.1.ffn_norm.weight", float("nan"))
    refused(f.write(tmp_path / "m.gguf"), "first logits are not finite .*tensor blk.1.ffn_norm.weight holds NaN")


def test_overflowing_weights_are_found(tiny, tmp_path):
    f = with_values(tiny, "output_norm.weight", 3e38)
    refused(f.write(tmp_path / "m.gguf"), "first logits are not finite .*the weights overflow")


# ---- token ids -----------------------------------------------------------------------------------------

def test_tokenizer_that_leaves_the_vocabulary(tiny, tmp_path):
    """tokenizer.ggml.model 'llama' on a byte-level vocabulary: SentencePiece's unknown id is one past it."""
    path = crafted(tiny, tmp_path, tokenizer__ggml__model="llama")
    refused(path, "its tokenizer gives token id 263 for ordinary text, outside the 263 tokens")


@pytest.mark.model
@pytest.mark.slow
def test_default_model_with_a_sentencepiece_tokenizer(default_model_path, tmp_path):
    """The reproduction of the report: the default model with tokenizer.ggml.model 'llama' emitted id
    49152, one past its embedding, and the OpenCL CPU kernel read past its buffer."""
    path = crafted(Crafted.read(default_model_path), tmp_path, tokenizer__ggml__model="llama")
    refused(path, "its tokenizer gives token id 49152 for ordinary text, outside the 49152 tokens")


@pytest.fixture(scope="module")
def cl_llm(tiny, tmp_path_factory):
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.devices import select

    try:
        select("opencl")
    except PerfxError as e:
        pytest.skip(f"no usable OpenCL device: {e}")
    return load_model(tiny.write(tmp_path_factory.mktemp("cl") / "m.gguf"), device="opencl", ctx=64)


@pytest.fixture(scope="module")
def np_llm(tiny, tmp_path_factory):
    return load_model(tiny.write(tmp_path_factory.mktemp("np") / "m.gguf"), device="numpy", ctx=64)


@pytest.mark.parametrize("backend", ["np_llm", "cl_llm"])
@pytest.mark.parametrize("bad", [263, 149152, -5, 1 << 70])
def test_token_ids_outside_the_vocabulary(request, backend, bad):
    from perfx.engine.sampler import Sampling

    llm = request.getfixturevalue(backend)
    for run in (lambda: llm.forward([1, bad, 2]),
                lambda: llm.generate([1, bad], Sampling(temperature=0, max_tokens=2)),
                lambda: llm.generate([bad], Sampling(temperature=0.7, max_tokens=2)),
                lambda: llm.transformer.forward(np.array([bad]), 0),
                lambda: llm.transformer.next_token(np.array([3, bad]), 0)):
        with pytest.raises(ValueError) as e:
            run()
        assert isinstance(e.value, PerfxError) and "\n" not in str(e.value)
        assert f"token id {bad} is outside the vocabulary of 263 tokens (0..262)" in str(e.value)
    llm.reset()
    assert np.isfinite(llm.forward([1, 262])).all()                       # the model still runs


# ---- perfx files and Hugging Face config.json ----------------------------------------------------------

@pytest.fixture(scope="module")
def perfx_file(tmp_path_factory) -> Path:
    from perfx.engine.formats.convert import convert

    d = tmp_path_factory.mktemp("perfx")
    write_tiny_gguf(d / "m.gguf", TinySpec(seed=5))
    convert(d / "m.gguf", d / "m.safetensors", scheme="fp16")
    return d / "m.safetensors"


def rewrite_safetensors(src: Path, dst: Path, edit) -> Path:
    """A copy of a safetensors file whose header (a dict) is edited in place by edit(header)."""
    blob = src.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])
    return dst


def rewrite_perfx(src: Path, dst: Path, key: str, edit) -> Path:
    """A copy of a perfx file with metadata `key` (a JSON string) replaced by edit(its value)."""
    def change(header):
        header["__metadata__"][key] = json.dumps(edit(json.loads(header["__metadata__"][key])))

    return rewrite_safetensors(src, dst, change)


@pytest.mark.parametrize("field, value, pattern", [
    ("n_heads", 0, r"n_heads is 0, outside 1\.\."),
    ("dim", "abc", "dim is 'abc', not an integer"),
    ("norm_eps", None, "norm_eps is None, not a finite number"),
    ("rope_dim", 0, r"rope_dim is 0, outside 2\.\."),
])
def test_perfx_config_values(perfx_file, tmp_path, field, value, pattern):
    path = rewrite_perfx(perfx_file, tmp_path / "m.safetensors", "config", lambda c: {**c, field: value})
    refused(path, pattern)


def test_perfx_tensor_index(perfx_file, tmp_path):
    def extra(index):
        return {**index, "rope_freqs.weight": {"qtype": "F32", "shape": [8]}}

    refused(rewrite_perfx(perfx_file, tmp_path / "a.safetensors", "tensors", extra),
            "tensor rope_freqs.weight is not supported")
    bad_shape = rewrite_perfx(perfx_file, tmp_path / "b.safetensors", "tensors",
                              lambda i: {**i, "output_norm.weight": {"qtype": "F32", "shape": "64"}})
    refused(bad_shape, "output_norm.weight has shape '64'")


def test_safetensors_layout(perfx_file, tmp_path):
    def overlap(header):
        spans = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
        (_, end), name = spans[1]
        header[name]["data_offsets"] = [spans[0][0][0], spans[0][0][0] + end - spans[1][0][0]]

    refused(rewrite_safetensors(perfx_file, tmp_path / "m.safetensors", overlap), "overlaps|unused bytes")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from perfx.engine.formats.export import export_hf

    d = tmp_path_factory.mktemp("hf")
    write_tiny_gguf(d / "m.gguf", TinySpec(seed=5))
    export_hf(d / "m.gguf", d / "ckpt")
    return d / "ckpt"


def test_hf_config_nested_deep(hf_dir, tmp_path):
    d = shutil.copytree(hf_dir, tmp_path / "ckpt")
    cfg = (d / "config.json").read_text()
    (d / "config.json").write_text(cfg.rstrip()[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}")
    refused(d, "is corrupt .*RecursionError")


@pytest.mark.parametrize("changes, pattern", [
    ({"hidden_size": "abc"}, "hidden_size is 'abc', not an integer"),
    ({"num_attention_heads": 0}, r"num_attention_heads is 0, outside 1\.\."),
    ({"rope_scaling": "linear"}, "rope_scaling 'linear' .*is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling 'yarn' is not supported"),
    ({"architectures": "LlamaForCausalLM"}, "'architectures' is 'LlamaForCausalLM', not a list"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps is '1e-5', not a finite number"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping 30.0 .*is not supported"),
    ({"quantization_config": "awq"}, "quantization_config is 'awq', not an object"),
])
def test_hf_config_values(hf_dir, tmp_path, changes, pattern):
    d = shutil.copytree(hf_dir, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    refused(d, pattern)
