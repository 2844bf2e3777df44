"""Q, K and V projection biases (Qwen2): Hugging Face import with the RoPE row permutation applied to the
q and k biases, conversion, GGUF "qwen2" files, AWQ folding, the OpenCL bias launch, export, refusals.

The reference is an independent float64 forward with Hugging Face's semantics (rotate_half RoPE on the
checkpoint's own, unpermuted rows; biases added after the q/k/v products)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from perfx.engine import load_model
from perfx.engine.backends.numpy_backend import NumpyBackend, rope_tables
from perfx.engine.errors import PerfxError
from perfx.engine.formats.convert import convert
from perfx.engine.formats.export import export_hf
from perfx.engine.formats.hf import hf_name, unpermute_qk
from perfx.engine.formats.loader import open_model
from perfx.engine.formats.tensors import QTensor
from perfx.engine.model import Transformer, weights_from_tensors
from perfx.engine.quant.awq import LINEARS, fold_scales, layer_forward, tie_heads
from tests.conftest import CHATML, TinySpec, write_tiny_gguf
from tests.test_convert import perfx

N_LAYERS, DIM, N_HEADS, N_KV_HEADS, FFN, CTX = 2, 128, 4, 2, 256, 128
HEAD_DIM = DIM // N_HEADS
EPS, THETA = 1e-6, 10000.0
IDS = [5, 9, 200, 17, 3, 101, 44, 250, 7, 8, 12, 60, 61, 62, 230, 1, 99]   # 17 tokens
PROJ = ("q_proj", "k_proj", "v_proj")


def qwen2_tensors(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random Qwen2 weights under HF names, fp16, with nonzero q/k/v biases (large on k, as in Qwen2)."""
    rng = np.random.default_rng(seed)

    def normal(shape, scale=0.2, offset=0.0):
        return (rng.standard_normal(shape) * scale + offset).astype(np.float16)

    t = {"model.embed_tokens.weight": normal((vocab, DIM), 1.0), "model.norm.weight": normal((DIM,), 0.1, 1.0)}
    q_dim, kv_dim = N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": normal((DIM,), 0.1, 1.0),
            p + "post_attention_layernorm.weight": normal((DIM,), 0.1, 1.0),
            p + "self_attn.q_proj.weight": normal((q_dim, DIM)), p + "self_attn.q_proj.bias": normal((q_dim,), 1.0),
            p + "self_attn.k_proj.weight": normal((kv_dim, DIM)), p + "self_attn.k_proj.bias": normal((kv_dim,), 2.0),
            p + "self_attn.v_proj.weight": normal((kv_dim, DIM)), p + "self_attn.v_proj.bias": normal((kv_dim,), 0.5),
            p + "self_attn.o_proj.weight": normal((DIM, q_dim)),
            p + "mlp.gate_proj.weight": normal((FFN, DIM)), p + "mlp.up_proj.weight": normal((FFN, DIM)),
            p + "mlp.down_proj.weight": normal((DIM, FFN)),
        })
    return t


def qwen2_config(vocab: int, tokenizer_dir: Path) -> dict:
    tok = json.loads((tokenizer_dir / "config.json").read_text())
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": DIM,
        "intermediate_size": FFN, "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV_HEADS, "max_position_embeddings": CTX, "rms_norm_eps": EPS,
        "rope_theta": THETA, "vocab_size": vocab, "tie_word_embeddings": True, "hidden_act": "silu",
        "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": N_LAYERS,
        "torch_dtype": "float16", "bos_token_id": tok["bos_token_id"], "eos_token_id": tok["eos_token_id"],
    }


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny Qwen2ForCausalLM checkpoint directory (tokenizer from the tiny GGUF's) and its tensors."""
    base = tmp_path_factory.mktemp("qwen2")
    write_tiny_gguf(base / "tok.gguf", TinySpec(dim=DIM, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, ffn_dim=FFN))
    ckpt = base / "ckpt"
    export_hf(base / "tok.gguf", ckpt)
    vocab = open_model(base / "tok.gguf").config.vocab_size
    tensors = qwen2_tensors(vocab)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    (ckpt / "config.json").write_text(json.dumps(qwen2_config(vocab, ckpt)))
    return ckpt, tensors


@pytest.fixture(scope="module")
def converted(qwen2, tmp_path_factory) -> dict[str, Path]:
    """The checkpoint converted to perfx files, fp16 and rtn-int4."""
    out = tmp_path_factory.mktemp("qwen2-perfx")
    return {scheme: convert(qwen2[0], out / f"{scheme}.safetensors", scheme=scheme, group=32).path
            for scheme in ("fp16", "rtn-int4")}


# ---- the float64 reference --------------------------------------------------------------------------


def hf_reference(t: dict[str, np.ndarray], ids: list[int], biases: bool = True) -> np.ndarray:
    """Logits [T, vocab] of a Qwen2 checkpoint's tensors, computed as transformers' Qwen2ForCausalLM does."""
    w = {k: v.astype(np.float64) for k, v in t.items()}
    T, D, group = len(ids), HEAD_DIM, N_HEADS // N_KV_HEADS
    ang = np.outer(np.arange(T), THETA ** (-np.arange(0, D, 2) / D))
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1)[:, None], np.concatenate([np.sin(ang)] * 2, -1)[:, None]

    def rope(z):                                          # [T, heads, D], pairs (i, i + D/2)
        return z * cos + np.concatenate([-z[..., D // 2:], z[..., :D // 2]], -1) * sin

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * g

    x = w["model.embed_tokens.weight"][ids]
    causal = np.triu(np.ones((T, T), bool), 1)
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q, k, v = (h @ w[f"{p}self_attn.{n}.weight"].T + (w[f"{p}self_attn.{n}.bias"] if biases else 0)
                   for n in PROJ)
        q, k = rope(q.reshape(T, N_HEADS, D)), rope(k.reshape(T, N_KV_HEADS, D))
        k, v = np.repeat(k, group, 1), np.repeat(v.reshape(T, N_KV_HEADS, D), group, 1)    # repeat_kv
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
        s[:, causal] = -np.inf
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(T, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g, u = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T


def numpy_logits(path: Path, ids: list[int] = IDS) -> np.ndarray:
    m = open_model(path)
    return Transformer(m.config, weights_from_tensors(m.tensors, m.config, path), NumpyBackend(), CTX).forward(
        np.array(ids), 0)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---- import and conversion against the reference -----------------------------------------------------


def test_biases_matter_in_the_reference(qwen2):
    """Without them the logits move far more than any tolerance below: the checks see a wrong bias."""
    _, t = qwen2
    assert rel_error(hf_reference(t, IDS, biases=False), hf_reference(t, IDS)) > 0.2


def test_checkpoint_imports_with_permuted_biases(qwen2):
    ckpt, t = qwen2
    m = open_model(ckpt)
    assert m.config.arch == "qwen2" and m.config.tied_embedding
    w = weights_from_tensors(m.tensors, m.config, ckpt)
    assert all(layer.bqkv is not None for layer in w.layers)
    v = m.tensors["blk.1.attn_v.bias"].dequantize()
    assert np.array_equal(v, t["model.layers.1.self_attn.v_proj.bias"].astype(np.float32))   # not permuted
    assert rel_error(numpy_logits(ckpt), hf_reference(t, IDS)) < 1e-4


def with_file_weights(path: Path, original: dict[str, np.ndarray], biases: bool = False) -> dict[str, np.ndarray]:
    """The checkpoint's tensors with each weight (and with `biases`, each bias) replaced by the file's,
    dequantized, q/k rows put back in HF order; otherwise the biases stay the checkpoint's own."""
    out = dict(original)
    for name, t in open_model(path).tensors.items():
        if name.endswith(".weight") or biases:
            heads = {"attn_q": N_HEADS, "attn_k": N_KV_HEADS}.get(name.split(".")[-2])
            w = t.dequantize()
            out[hf_name(name) + "." + name.rpartition(".")[2]] = unpermute_qk(w, heads) if heads else w
    return out


@pytest.mark.parametrize("scheme", ["fp16", "rtn-int4"])
def test_converted_model_matches_the_reference(qwen2, converted, scheme):
    """The file's weights (fp16: exactly the checkpoint's; int4: as rounded) with the checkpoint's own
    biases, run with HF semantics, give the file's logits: the biases went in permuted right."""
    t = qwen2[1]
    path = converted[scheme]
    tensors = open_model(path).tensors
    for i in range(N_LAYERS):
        for n in ("q", "k", "v"):
            assert tensors[f"blk.{i}.attn_{n}.bias"].qtype == "F32"       # biases are not quantized
    reference = with_file_weights(path, t)
    if scheme == "fp16":
        assert all(np.array_equal(reference[n], t[n].astype(np.float32)) for n in t)
    assert rel_error(numpy_logits(path), hf_reference(reference, IDS)) < 1e-4


def test_cli_converts_a_qwen2_checkpoint(qwen2, tmp_path):
    out = tmp_path / "m.safetensors"
    result = perfx("convert", str(qwen2[0]), "-o", str(out), "--quant", "int8")
    assert result.returncode == 0, result.stderr
    assert rel_error(numpy_logits(out), hf_reference(with_file_weights(out, qwen2[1]), IDS)) < 1e-4


def test_awq_folds_its_scale_into_the_v_bias(qwen2):
    """AWQ's o-group scale divides the rows of v, so it must divide v's bias too."""
    ckpt, _ = qwen2
    m = open_model(ckpt)
    c = m.config
    w = {n: m.tensors[f"blk.0.{n}.weight"].dequantize() for n in ("attn_norm", "ffn_norm", *LINEARS)}
    w.update({f"{n}.bias": m.tensors[f"blk.0.{n}.bias"].dequantize() for n in LINEARS[:3]})
    rng = np.random.default_rng(4)
    scales = {"qkv": rng.uniform(0.3, 3, c.dim), "o": tie_heads(c)(rng.uniform(0.3, 3, c.q_dim)),
              "gate_up": rng.uniform(0.3, 3, c.dim), "down": rng.uniform(0.3, 3, c.ffn_dim)}
    folded = fold_scales(w, scales, c)
    assert not np.allclose(folded.weights["attn_v.bias"], w["attn_v.bias"])
    x = rng.standard_normal((2, 9, c.dim)).astype(np.float32)
    cos, sin = rope_tables(c, 9)
    np.testing.assert_allclose(layer_forward(x, folded.weights, c, cos, sin), layer_forward(x, w, c, cos, sin),
                               rtol=1e-4, atol=1e-4)


def test_awq_conversion_keeps_the_model(qwen2, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"then {i} thin hens in the inn, the tin hut, the hen then" for i in range(80)))
    result = convert(qwen2[0], tmp_path / "awq.safetensors", group=32, calib=calib)
    notes = {r.name: r.note for r in result.reports}
    assert notes["blk.0.attn_v.bias"] == "absorbs AWQ scales"
    assert open_model(result.path).tensors["blk.0.attn_v.bias"].qtype == "F32"
    file_tensors = with_file_weights(result.path, qwen2[1], biases=True)
    assert rel_error(numpy_logits(result.path), hf_reference(file_tensors, IDS)) < 1e-4


# ---- GGUF "qwen2" files ------------------------------------------------------------------------------


def write_qwen2_gguf(path: Path, t: dict[str, np.ndarray], source: Path, qtype: str) -> dict[str, np.ndarray]:
    """The checkpoint as llama.cpp's converter writes a qwen2 GGUF: q/k rows in HF order (NEOX RoPE),
    biases F32, matrices as `qtype`; returns the HF-named tensors as stored (dequantized)."""
    import gguf

    src = gguf.GGUFReader(source)
    tokens = [bytes(src.fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in
              src.fields["tokenizer.ggml.tokens"].data]
    merges = [bytes(src.fields["tokenizer.ggml.merges"].parts[i]).decode() for i in
              src.fields["tokenizer.ggml.merges"].data]
    types = [int(src.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in
             src.fields["tokenizer.ggml.token_type"].data]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_block_count(N_LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_freq_base(THETA)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    stored = {}
    for name, a in t.items():
        module, kind = name.rsplit(".", 1)
        if module in names:
            target = names[module]
        else:
            _, _, i, rest = module.split(".", 3)
            target = f"blk.{i}.{layer[rest]}"
        a = a.astype(np.float32)
        if a.ndim == 2 and target != "token_embd":
            kind_q = gguf.GGMLQuantizationType[qtype]
            raw = gguf.quants.quantize(a, kind_q)
            w.add_tensor(f"{target}.{kind}", raw, raw_shape=raw.shape, raw_dtype=kind_q)
            a = gguf.quants.dequantize(raw, kind_q).reshape(a.shape)
        else:
            w.add_tensor(f"{target}.{kind}", a)
        stored[name] = a
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_qwen2_gguf_loads_with_its_rope_order(qwen2, tmp_path, qtype):
    ckpt, t = qwen2
    base = ckpt.parent / "tok.gguf"
    stored = write_qwen2_gguf(tmp_path / "q.gguf", t, base, qtype)
    m = open_model(tmp_path / "q.gguf")
    assert m.config.arch == "qwen2" and m.tensors["blk.0.attn_q.weight"].qtype == qtype
    assert rel_error(numpy_logits(tmp_path / "q.gguf"), hf_reference(stored, IDS)) < 1e-4
    # converted to perfx's format, the rows stay in perfx's order: same logits
    out = convert(tmp_path / "q.gguf", tmp_path / "q.safetensors", scheme="int8").path
    assert rel_error(numpy_logits(out), hf_reference(with_file_weights(out, stored), IDS)) < 1e-4


# ---- OpenCL ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cl_selection():
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.devices import select

    try:
        return select("opencl")
    except PerfxError as e:
        pytest.skip(f"no usable OpenCL device: {e}")


@pytest.mark.parametrize("scheme", ["fp16", "rtn-int4"])
def test_opencl_matches_numpy(converted, cl_selection, scheme):
    """T = 17 (prefill), then 3 and 1 continuing the cache; the Q/K/V output is poisoned before each pass."""
    import pyopencl as cl

    path = converted[scheme]
    ref = load_model(path, device="numpy", ctx=CTX)
    dev = load_model(path, device=cl_selection.info.id, ctx=CTX)
    backend = dev.transformer.backend
    ids = np.random.default_rng(7).integers(0, ref.config.vocab_size, 21).tolist()
    for start, end in ((0, 17), (17, 20), (20, 21)):
        buf = backend.qkv.buf
        cl.enqueue_fill_buffer(backend.rt.queue, buf, np.float32(np.nan), 0, buf.size)
        want, got = ref.forward(ids[start:end], start), dev.forward(ids[start:end], start)
        assert got.shape == (end - start, ref.config.vocab_size) and np.all(np.isfinite(got))
        assert np.array_equal(got.argmax(-1), want.argmax(-1))
        np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("fmt", ["f16", "int4"])
@pytest.mark.parametrize("T,scheme", [(1, "gemv"), (3, "few"), (17, "few"), (17, "tiled")])
def test_matmul_adds_the_bias(cl_selection, fmt, T, scheme):
    """y = x @ W^T + b into a NaN-poisoned output with a guard region after it."""
    import pyopencl as cl

    from perfx.engine.backends.opencl.matmul import DeviceMatrix, Matmul
    from perfx.engine.quant.quantize import quantize_int4
    from perfx.engine.formats.tensors import dequantize_int4

    rt = cl_selection.runtime()
    N, K, sentinel, guard = 259, 256, 1.0e30, 64
    rng = np.random.default_rng(T)
    w = rng.standard_normal((N, K)).astype(np.float16).astype(np.float32)
    if fmt == "f16":
        dm = DeviceMatrix.from_f16(rt, w)
    else:
        q, scale, zero = quantize_int4(w, 32)
        dm = DeviceMatrix.from_int4(rt, q, scale, zero, 32)
        w = dequantize_int4(q, scale, zero, 32)
    b = rng.standard_normal(N).astype(np.float32)
    dm = dm.with_bias(rt, [QTensor("b0", "F32", (100,), b[:100]), QTensor("b1", "F32", (N - 100,), b[100:])])
    x = rng.standard_normal((T, K)).astype(np.float32)
    y = np.full(T * N + guard, sentinel, np.float32)
    y[:T * N] = np.nan
    yb = cl.Buffer(rt.ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=y)
    mm = Matmul(rt)
    mm.linear(rt.to_device(x), dm, T, yb, scheme=scheme)
    got = rt.read(yb, y.shape)
    assert np.all(got[T * N:] == sentinel), "write past the end of the output"
    if fmt == "int4" and scheme == "gemv" and mm.int_dot:      # the product takes x in int16 blocks
        from perfx.engine.backends.opencl.packing import xq_view

        x = xq_view(x)
    want = x.astype(np.float64) @ w.T.astype(np.float64) + b
    assert np.abs(got[:T * N].reshape(T, N) - want).max() <= 1e-4 * np.abs(want).max()


def test_bias_of_the_wrong_length_and_swiglu_with_a_bias_are_refused(cl_selection):
    from perfx.engine.backends.opencl.matmul import DeviceMatrix, Matmul

    rt = cl_selection.runtime()
    dm = DeviceMatrix.from_f16(rt, np.ones((8, 32), np.float32))
    with pytest.raises(PerfxError, match="a bias of 7 values for a matrix of 8 rows"):
        dm.with_bias(rt, [QTensor("b", "F32", (7,), np.ones(7, np.float32))])
    biased = dm.with_bias(rt, [QTensor("b", "F32", (8,), np.ones(8, np.float32))])
    assert biased.nbytes == dm.nbytes + 32 and dm.with_bias(rt, None) is dm
    with pytest.raises(PerfxError, match="swiglu takes no bias"):
        Matmul(rt).swiglu(rt.to_device(np.ones(32, np.float32)), biased, 1, rt.empty(4 * 4))


# ---- export ------------------------------------------------------------------------------------------


def test_export_writes_qwen2_with_the_biases_back_in_hf_order(qwen2, converted, tmp_path):
    t = qwen2[1]
    for scheme, path in converted.items():
        out = export_hf(path, tmp_path / scheme)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
        assert "attention_bias" not in cfg
        exported = load_file(str(out / "model.safetensors"))
        for i in range(N_LAYERS):
            for n in PROJ:
                name = f"model.layers.{i}.self_attn.{n}.bias"
                assert exported[name].dtype == np.float32
                assert np.array_equal(exported[name], t[name].astype(np.float32)), name
        assert not any(n.endswith(("o_proj.bias", "mlp.up_proj.bias")) for n in exported)
        if scheme == "fp16":
            assert np.array_equal(exported["model.layers.1.self_attn.k_proj.weight"],
                                  t["model.layers.1.self_attn.k_proj.weight"].astype(np.float32))
        assert np.array_equal(numpy_logits(out), numpy_logits(path))     # and it imports back


# ---- refusals ----------------------------------------------------------------------------------------


def edited_checkpoint(ckpt: Path, dst: Path, change) -> Path:
    import shutil

    shutil.copytree(ckpt, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_a_bias_of_the_wrong_shape_is_one_line(qwen2, tmp_path):
    ckpt, _ = qwen2

    def shorten(t):
        t["model.layers.1.self_attn.k_proj.bias"] = t["model.layers.1.self_attn.k_proj.bias"][:-1].copy()

    bad = edited_checkpoint(ckpt, tmp_path / "bad", shorten)
    with pytest.raises(PerfxError, match=r"k_proj.bias has shape \[63\], expected \[64\] from config.json"):
        open_model(bad)
    result = perfx("convert", str(bad), "-o", str(tmp_path / "m.safetensors"))
    lines = [line for line in result.stderr.splitlines() if line.strip() and "━" not in line]   # less the progress bar
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "k_proj.bias has shape [63], expected [64]" in lines[0]
    # GGUF-named tensors (any file kind) are checked by weights_from_tensors
    m = open_model(ckpt)
    tensors = dict(m.tensors)
    tensors["blk.0.attn_q.bias"] = QTensor("blk.0.attn_q.bias", "F32", (DIM + 1,), np.zeros(DIM + 1, np.float32))
    with pytest.raises(PerfxError, match=r"tensor blk.0.attn_q.bias has shape \[129\], expected \[128\]") as e:
        weights_from_tensors(tensors, m.config, "m")
    assert "\n" not in str(e.value)


def test_incomplete_biases_are_refused(qwen2, tmp_path):
    ckpt, _ = qwen2
    m = open_model(ckpt)
    tensors = dict(m.tensors)
    del tensors["blk.1.attn_k.bias"]
    with pytest.raises(PerfxError, match="blk.1.attn_k.bias is missing while blk.1.attn_q.bias is present"):
        weights_from_tensors(tensors, m.config, "m")
    tensors = {n: t for n, t in m.tensors.items() if not n.startswith("blk.1.attn") or not n.endswith(".bias")}
    with pytest.raises(PerfxError, match="layer 1 has no Q, K and V biases while other layers have them"):
        weights_from_tensors(tensors, m.config, "m")
    missing = edited_checkpoint(ckpt, tmp_path / "missing", lambda t: t.pop("model.layers.0.self_attn.v_proj.bias"))
    with pytest.raises(PerfxError, match="v_proj.bias is missing; the checkpoint is incomplete"):
        open_model(missing)


@pytest.mark.parametrize("name,shape", [("model.layers.0.self_attn.o_proj.bias", (DIM,)),
                                        ("model.layers.1.mlp.down_proj.bias", (DIM,))])
def test_other_biases_are_refused_by_name(qwen2, tmp_path, name, shape):
    ckpt, _ = qwen2
    bad = edited_checkpoint(ckpt, tmp_path / "bad", lambda t: t.update({name: np.ones(shape, np.float16)}))
    with pytest.raises(PerfxError, match=f"{name} is a bias, which perfx's model has only on q_proj, k_proj "
                                         "and v_proj of Qwen2ForCausalLM"):
        open_model(bad)
