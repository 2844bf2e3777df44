"""Each architecture perfx reads, as a random-weight GGUF in llama.cpp's layout (tests/ggufgen.py): NumPy
against OpenCL, and both against llama.cpp (llama-cpp-python) where it is installed."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import RopeScalingType

from perfx.engine import load_model
from perfx.engine.errors import PerfxError
from perfx.engine.formats.gguf_file import read_gguf
from tests.ggufgen import GGUFSpec, write_gguf

SPECS = {
    "llama": GGUFSpec("llama"),
    "llama3": GGUFSpec("llama", vocab="bpe", pre="llama-bpe", rope_freqs=True, rope_base=500000.0),
    "mistral-window": GGUFSpec("llama", sliding_window=8),
    "qwen2-tied": GGUFSpec("qwen2", vocab="bpe", pre="qwen2", tied=True, rope_base=1000000.0),
    "gemma3": GGUFSpec("gemma3", n_layers=6, n_heads=4, n_kv_heads=1, head_dim=32, tied=True,
                       sliding_window=8, rope_base=1000000.0),
    "gemma3-linear": GGUFSpec("gemma3", n_layers=6, n_heads=2, n_kv_heads=2, head_dim=32, sliding_window=8,
                              extra={"rope_scaling_type": RopeScalingType.LINEAR, "rope_scaling_factor": 8.0}),
    "phi3": GGUFSpec("phi3", n_kv_heads=4),
}
PROMPT = "the capital of france is paris, and what is the capital of"
POSITIONS = 64


def positions_ids(tokenizer, n: int = POSITIONS) -> list[int]:
    """The prompt's ids, continued by a fixed pseudo-random run of ordinary tokens to n positions."""
    ids = tokenizer.encode(PROMPT)
    rng = np.random.default_rng(1)
    ordinary = [i for i in range(tokenizer.vocab_size) if not tokenizer.is_control(i)]
    return (ids + [int(i) for i in rng.choice(ordinary, n)])[:n]


@pytest.fixture(scope="module", params=list(SPECS))
def arch_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / f"{request.param}.gguf"
    write_gguf(path, SPECS[request.param])
    return request.param, path


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def test_reads_as_its_architecture(arch_file):
    name, path = arch_file
    c = read_gguf(path).config
    spec = SPECS[name]
    assert c.arch == spec.arch and c.tied_embedding == spec.tied
    assert c.sliding_window == spec.sliding_window
    if spec.arch == "gemma3":
        assert (c.act, c.post_norms, c.qk_norm, c.head_dim) == ("gelu_tanh", True, True, 32)
        assert c.swa_layers == (True,) * 5 + (False,) and c.rope_base_swa == 10000.0
        assert c.rope_scale == spec.extra.get("rope_scaling_factor", 1.0)
    assert bool(c.rope_freq_factors) == spec.rope_freqs


def test_numpy_matches_opencl(arch_file):
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.devices import select

    try:
        device = select("opencl").info.id
    except PerfxError as e:
        pytest.skip(f"no usable OpenCL device: {e}")
    _, path = arch_file
    ref = load_model(path, device="numpy", ctx=128)
    ids = positions_ids(ref.tokenizer)
    want = ref.forward(ids)
    dev = load_model(path, device=device, ctx=128)
    got = dev.forward(ids)
    assert agreement(want, got) >= 0.99
    assert np.abs(want - got).max() < 2e-2 * np.abs(want).max()
    # decode token by token (the GEMV and single-query attention paths) agrees too
    dev.reset()
    steps = np.concatenate([dev.forward(ids[:40])[-1:]] + [dev.forward([t], 40 + i) for i, t in enumerate(ids[40:])])
    assert agreement(want[39:], steps) >= 0.99


def test_matches_llama_cpp(arch_file):
    llama_cpp = pytest.importorskip("llama_cpp")
    name, path = arch_file
    if SPECS[name].sliding_window and SPECS[name].arch == "llama":
        pytest.skip("llama.cpp does not apply a llama file's sliding window")
    ref = load_model(path, device="numpy", ctx=128)
    ids = positions_ids(ref.tokenizer)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                          n_threads=1)
    theirs = llm.tokenize(PROMPT.encode(), add_bos=ref.tokenizer.add_bos, special=True)
    assert ref.tokenizer.encode(PROMPT) == theirs
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)], np.float32)
    ours = ref.forward(ids)
    assert agreement(ours, logits) >= 0.99
    assert np.abs(ours - logits).max() < 5e-3 * np.abs(ours).max()     # measured: 1e-4 .. 6e-4


def test_gemma3_missing_tensor_is_named(tmp_path):
    from dataclasses import replace

    path = tmp_path / "g.gguf"
    write_gguf(path, replace(SPECS["gemma3"], skip=("blk.3.post_ffw_norm.weight",)))
    with pytest.raises(PerfxError, match=r"tensor blk\.3\.post_ffw_norm\.weight is missing") as e:
        load_model(path, device="numpy", ctx=64)
    assert "\n" not in str(e.value)


def test_unknown_architecture_is_named(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, GGUFSpec("llama"))
    data = bytearray(path.read_bytes())
    i = data.index(b"llama", data.index(b"general.architecture"))
    data[i:i + 5] = b"gpt2x"[:5]
    path.write_bytes(bytes(data))
    with pytest.raises(PerfxError, match="architecture 'gpt2x' is not supported") as e:
        read_gguf(path)
    assert "\n" not in str(e.value)


def test_convert_refuses_what_it_would_drop(tmp_path):
    """perfx's own format holds the plain LLaMA block: a gemma3 file is refused, not half-converted."""
    from perfx.engine.formats.convert import convert

    path = tmp_path / "g.gguf"
    write_gguf(path, SPECS["gemma3"])
    with pytest.raises(PerfxError, match="perfx convert does not carry gemma3's act, embed_scale, post_norms"):
        convert(path, tmp_path / "g.safetensors", scheme="int8")
    assert not (tmp_path / "g.safetensors").exists()
