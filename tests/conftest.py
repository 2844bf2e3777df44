"""Shared fixtures: the default model (downloaded on first use) and tiny random-weight GGUF models."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from perfx.engine.text.byte_level import byte_to_char
from perfx.engine.synthetic import add_block_params

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def pytest_configure(config):
    """The OpenCL drivers perfx lists (Intel's CPU runtime from pip among them), for the tests that list
    the platforms through pyopencl themselves (PERFX_TEST_CL_PLATFORM picks one)."""
    from perfx.engine.backends.opencl.devices import setup_icd

    setup_icd()


def smollm2_gguf() -> Path:
    """The registry's default model file (SmolLM2-135M-Instruct Q4_1), downloaded if needed;
    $PERFX_TEST_GGUF names another copy. Skips the test when it cannot be had."""
    path = os.environ.get("PERFX_TEST_GGUF")
    if path:
        return Path(path)
    from perfx.engine.hub.registry import resolve

    try:
        found, _ = resolve(None, progress=False)
    except Exception as e:  # no network and no cached copy
        pytest.skip(f"default model unavailable: {e}")
    return found


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm(default_model_path):
    """The default model on the NumPy backend, shared by the tests that only read from it."""
    from perfx.engine import load_model

    return load_model(default_model_path, device="numpy", ctx=1024)


@dataclass
class TinySpec:
    n_layers: int = 2
    dim: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 96
    ctx_len: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    qtype: str = "F32"          # type of the layer matrices: F32, F16, Q8_0, Q4_0, Q4_1, ... any GGUF type perfx reads
    tied: bool = True
    seed: int = 0
    types: tuple[tuple[str, str], ...] = ()     # (matrix, type) overrides, e.g. ("attn_v", "Q6_K")


# Byte offsets of the fp16 factors in each block type (random_blocks scales them).
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208], "Q5_0": [0],
              "Q5_1": [0, 2], "Q5_K": [0, 2], "IQ4_NL": [0], "IQ4_XS": [0]}


def random_blocks(qtype: str, shape: tuple[int, int], rng: np.random.Generator, std: float) -> np.ndarray:
    """Random blocks of a GGUF block type, uint8 [rows, bytes per row], whose values have about `std`:
    random bytes, the fp16 factors (d, dmin) set to one common factor per tensor."""
    from perfx.engine.quant.gguf_blocks import BLOCK_SIZES, dequantize

    elems, nbytes = BLOCK_SIZES[qtype]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // elems, nbytes), dtype=np.uint8)

    def set_factor(f: float) -> None:
        for offset in F16_FIELDS[qtype]:
            blocks[:, offset:offset + 2] = np.full(len(blocks), f, np.float16).view(np.uint8).reshape(-1, 2)

    set_factor(1.0)
    set_factor(std / float(dequantize(blocks, qtype, shape).std()))
    return blocks.reshape(shape[0], -1)


def add_random_tensor(w, name: str, shape: tuple[int, ...], qtype: str, rng: np.random.Generator, scale: float,
                      offset: float = 0.0) -> np.ndarray:
    """A random tensor of `qtype` into a gguf.GGUFWriter; returns its values as stored, in float32."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    values = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
    if qtype in F16_FIELDS and qtype not in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        raw = random_blocks(qtype, shape, rng, scale)         # types gguf cannot quantize
    elif qtype == "F32":
        w.add_tensor(name, values)
        return values
    elif qtype == "F16":
        w.add_tensor(name, values.astype(np.float16))
        return values.astype(np.float16).astype(np.float32)
    else:
        raw = gguf.quants.quantize(values, kind)
    w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)
    return gguf.quants.dequantize(raw, kind).reshape(shape).astype(np.float32)


def write_tiny_gguf(path: Path, spec: TinySpec = TinySpec()) -> dict[str, np.ndarray]:
    """A llama-architecture GGUF with random weights and a byte-level BPE tokenizer
    (256 bytes, a few merges, ChatML control tokens). Returns the float32 weights as stored."""
    import gguf

    rng = np.random.default_rng(spec.seed)
    tokens = list(byte_to_char())
    merges = ["Ġ t", "h e", "Ġt he", "i n"]
    tokens += [a + b for a, b in (m.split(" ") for m in merges)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += specials
    types = [1] * (len(tokens) - len(specials)) + [3] * len(specials)
    vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    add_block_params(w, n_layers=spec.n_layers, ctx_len=spec.ctx_len, dim=spec.dim, ffn_dim=spec.ffn_dim,
                     n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, norm_eps=spec.norm_eps,
                     rope_base=spec.rope_base, rope_dim=spec.dim // spec.n_heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    head_dim = spec.dim // spec.n_heads
    stored: dict[str, np.ndarray] = {}

    def add(name: str, shape: tuple[int, ...], qtype: str, scale: float = 0.2, offset: float = 0.0) -> None:
        qtype = dict(spec.types).get(name.split(".")[-2], qtype) if name.startswith("blk.") else qtype
        stored[name] = add_random_tensor(w, name, shape, qtype, rng, scale, offset)

    add("token_embd.weight", (vocab, spec.dim), "Q8_0" if spec.qtype != "F32" else "F32", scale=1.0)
    for i in range(spec.n_layers):
        add(f"blk.{i}.attn_norm.weight", (spec.dim,), "F32", 0.1, 1.0)
        add(f"blk.{i}.attn_q.weight", (spec.n_heads * head_dim, spec.dim), spec.qtype)
        add(f"blk.{i}.attn_k.weight", (spec.n_kv_heads * head_dim, spec.dim), spec.qtype)
        add(f"blk.{i}.attn_v.weight", (spec.n_kv_heads * head_dim, spec.dim), spec.qtype)
        add(f"blk.{i}.attn_output.weight", (spec.dim, spec.n_heads * head_dim), spec.qtype)
        add(f"blk.{i}.ffn_norm.weight", (spec.dim,), "F32", 0.1, 1.0)
        add(f"blk.{i}.ffn_gate.weight", (spec.ffn_dim, spec.dim), spec.qtype)
        add(f"blk.{i}.ffn_up.weight", (spec.ffn_dim, spec.dim), spec.qtype)
        add(f"blk.{i}.ffn_down.weight", (spec.dim, spec.ffn_dim), spec.qtype)
    add("output_norm.weight", (spec.dim,), "F32", 0.1, 1.0)
    if not spec.tied:
        add("output.weight", (vocab, spec.dim), spec.qtype if spec.qtype != "F32" else "F32")

    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> tuple[Path, TinySpec, dict[str, np.ndarray]]:
    spec = TinySpec()
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    weights = write_tiny_gguf(path, spec)
    return path, spec, weights


@pytest.fixture
def exact_kv(monkeypatch):
    """OpenCL models loaded in this test keep their KV cache in f32 (CPU devices default to fp16, whose
    rounding is larger than the tolerances of tests that compare whole random models with NumPy)."""
    from perfx.engine.backends.opencl import tuning

    params_for = tuning.params_for

    def f32_kv(info, kernel, *args, **kwargs):
        params = params_for(info, kernel, *args, **kwargs)
        return {**params, "kv_half": False} if kernel == "fused" else params

    monkeypatch.setattr(tuning, "params_for", f32_kv)


def held_by_xq(h: np.ndarray, stored_q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Checks an int16 copy of h [T, K] as kernels/xq.h writes it (stored_q [T, K] in its order, scale
    [T, K/32]) against engine's quantize_xq: the scales to 1e-6, each value within 1 of it (a device's
    relaxed division may round a value at a half the other way). Returns the values the GEMV takes from
    it (f64 [T, K]): q * scale over the whole 128-element chunks, h itself in the tail."""
    from perfx.engine.backends.opencl.packing import quantize_xq, xq_positions

    T, K = h.shape
    q = stored_q.reshape(T, K)[:, xq_positions(K)].astype(np.int64)
    want_q, want_scale = quantize_xq(h)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    assert np.abs(q - want_q).max() <= 1 and np.mean(q != want_q) < 1e-2
    held = np.asarray(h, np.float64).copy()
    whole = K // 128 * 128
    held[:, :whole] = (q.reshape(T, -1, 32) * scale[..., None].astype(np.float64)).reshape(T, K)[:, :whole]
    return held


def nvidia_matmul(rt, **overrides):
    """A Matmul with NVIDIA's tuned parameters (and overrides) on rt, for the PTX kernels' tests; skips
    the test where rt is not an NVIDIA device."""
    from perfx.engine.backends.opencl.matmul import DEFAULT_PARAMS, Matmul
    from perfx.engine.backends.opencl.tuning import vendor_params

    if "nvidia" not in rt.device.platform.name.lower():
        pytest.skip("the PTX path needs an NVIDIA device (PERFX_TEST_CL_PLATFORM=nvidia)")
    return Matmul(rt, {**vendor_params("gpu", "nvidia", "matmul", DEFAULT_PARAMS), **overrides})
