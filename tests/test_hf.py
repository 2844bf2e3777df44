"""Hugging Face checkpoints: the Q/K permutation, export and re-import with equal logits, shards, BF16,
AutoAWQ's GEMM layout, and the checkpoints perfx refuses."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from perfx.engine.backends.numpy_backend import NumpyBackend, apply_rope, rope_tables
from perfx.engine.errors import PerfxError
from perfx.engine.formats.export import export_hf
from perfx.engine.formats.hf import AWQ_ORDER, permute_qk, unpack_awq, unpermute_qk
from perfx.engine.formats.loader import open_model
from perfx.engine.model import Transformer, weights_from_tensors
from tests.conftest import TinySpec, write_tiny_gguf

IDS = [5, 9, 200, 17, 3, 101, 44, 250, 7, 8, 12]


def logits(path: Path, ids: list[int] = IDS) -> np.ndarray:
    """Teacher-forced logits of any model perfx opens (directories included), on the NumPy reference."""
    m = open_model(path)
    t = Transformer(m.config, weights_from_tensors(m.tensors, m.config, path), NumpyBackend(), 64)
    return t.forward(np.array(ids), 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, TinySpec]:
    spec = TinySpec(dim=128, ffn_dim=256, tied=False, seed=3)
    path = tmp_path_factory.mktemp("hf") / "tiny.gguf"
    write_tiny_gguf(path, spec)
    return path, spec


@pytest.fixture(scope="module")
def tiny_hf(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf-out") / "ckpt"
    export_hf(tiny[0], out)
    return out


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(directory: Path, **changes) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


# ---- the permutation --------------------------------------------------------------------------------


def test_permute_round_trip():
    w = np.random.default_rng(0).standard_normal((6 * 16, 40)).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(w, 6), 6), w)
    assert np.array_equal(permute_qk(unpermute_qk(w, 6), 6), w)
    assert not np.array_equal(permute_qk(w, 6), w)
    # head 0 of 16 dims: HF rows (0..7 first halves, 8..15 second halves) interleave as 0, 8, 1, 9, ...
    assert [int(r) for r in permute_qk(np.arange(96.0)[:, None], 6)[:8, 0]] == [0, 8, 1, 9, 2, 10, 3, 11]


def test_permutation_turns_rotate_half_into_adjacent_pairs():
    """HF's RoPE (pairs i, i + d/2) on q equals perfx's (pairs 2i, 2i+1) on the permuted q, permuted."""
    n_head, d, T = 3, 16, 7
    rng = np.random.default_rng(1)
    q = rng.standard_normal((T, n_head * d)).astype(np.float32)
    base = 10000.0
    inv = base ** (-np.arange(0, d, 2) / d)
    ang = np.outer(np.arange(T), inv)                                  # [T, d/2]
    cos, sin = np.concatenate([np.cos(ang)] * 2, 1), np.concatenate([np.sin(ang)] * 2, 1)
    qh = q.reshape(T, n_head, d)
    rotate_half = np.concatenate([-qh[..., d // 2:], qh[..., :d // 2]], -1)
    hf = (qh * cos[:, None] + rotate_half * sin[:, None]).reshape(T, -1)

    class C:
        rope_base, rope_dim = base, d
        rope_base_swa, rope_scale, rope_freq_factors = 0.0, 1.0, ()

    c_, s_ = rope_tables(C, T)
    perfx = apply_rope(permute_qk(q.T, n_head).T.reshape(T, n_head, d), c_, s_, d).reshape(T, -1)
    np.testing.assert_allclose(perfx, permute_qk(hf.T, n_head).T, rtol=1e-5, atol=1e-5)


# ---- export and import ------------------------------------------------------------------------------


def test_export_then_import_gives_the_same_logits(tiny, tiny_hf):
    assert np.array_equal(logits(tiny_hf), logits(tiny[0]))


def test_export_writes_a_llama_checkpoint(tiny, tiny_hf):
    path, spec = tiny
    cfg = json.loads((tiny_hf / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (128, 2, 2)
    assert cfg["rms_norm_eps"] == 1e-5
    tensors = load_file(str(tiny_hf / "model.safetensors"))
    assert tensors["lm_head.weight"].dtype == np.float32
    g = open_model(path)
    q = g.tensors["blk.1.attn_q.weight"].dequantize()
    assert np.array_equal(tensors["model.layers.1.self_attn.q_proj.weight"], unpermute_qk(q, spec.n_heads))
    tok_cfg = json.loads((tiny_hf / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == g.tokenizer.chat_template
    h = open_model(tiny_hf)
    text = "<|im_start|>user\nthe thin hen<|im_end|>\n"
    assert h.tokenizer.encode(text) == g.tokenizer.encode(text)
    assert h.tokenizer.eot_ids == g.tokenizer.eot_ids


def test_tied_model_and_fp16_export(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", TinySpec(tied=True, seed=4))
    export_hf(tmp_path / "t.gguf", tmp_path / "fp32")
    export_hf(tmp_path / "t.gguf", tmp_path / "fp16", dtype="fp16")
    assert "lm_head.weight" not in load_file(str(tmp_path / "fp32" / "model.safetensors"))
    assert open_model(tmp_path / "fp32").config.tied_embedding
    assert np.array_equal(logits(tmp_path / "fp32"), logits(tmp_path / "t.gguf"))
    full = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    half = load_file(str(tmp_path / "fp16" / "model.safetensors"))
    assert all(half[n].dtype == np.float16 and np.array_equal(half[n], full[n].astype(np.float16)) for n in full)
    ref = logits(tmp_path / "t.gguf")
    np.testing.assert_allclose(logits(tmp_path / "fp16"), ref, atol=0.01 * np.abs(ref).max())


def test_export_refuses_an_existing_directory_unless_forced(tiny, tiny_hf, tmp_path):
    out = copy_checkpoint(tiny_hf, tmp_path / "ckpt")
    with pytest.raises(PerfxError, match="exists; pass --force"):
        export_hf(tiny[0], out)
    (out / "stale.txt").write_text("x")
    export_hf(tiny[0], out, force=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(PerfxError, match="holds no Hugging Face checkpoint"):
        export_hf(tiny[0], other, force=True)
    assert (other / "mine.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sharded_checkpoint_with_index(tiny_hf, tmp_path):
    out = copy_checkpoint(tiny_hf, tmp_path / "sharded")
    tensors = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    assert np.array_equal(logits(out), logits(tiny_hf))
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(PerfxError, match="shard model-00002-of-00002.safetensors .* is missing"):
        open_model(out)


def test_bf16_weights(tiny_hf, tmp_path):
    out = copy_checkpoint(tiny_hf, tmp_path / "bf16")
    tensors = load_file(str(out / "model.safetensors"))
    bits = {n: (a.view(np.uint32) >> 16).astype(np.uint16) for n, a in tensors.items()}   # truncated to bf16
    header = {n: {"dtype": "BF16", "shape": list(a.shape)} for n, a in bits.items()}
    offset, blobs = 0, []
    for n, a in bits.items():
        header[n]["data_offsets"] = [offset, offset + a.nbytes]
        offset += a.nbytes
        blobs.append(a.tobytes())
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    (out / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    m = open_model(out)
    q = m.tensors["blk.0.attn_q.weight"]
    assert q.qtype == "BF16"
    expected = (bits["model.layers.0.self_attn.q_proj.weight"].astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(q.dequantize(), permute_qk(expected, 4))


# ---- AutoAWQ ----------------------------------------------------------------------------------------


def awq_pack(values: np.ndarray) -> np.ndarray:
    """AutoAWQ's WQLinear_GEMM packing: int [rows, cols] in 0..15 -> int32 [rows, cols/8]."""
    rows, cols = values.shape
    packed = np.zeros((rows, cols // 8), np.uint32)
    for col in range(cols // 8):
        for i in range(8):
            packed[:, col] |= values[:, col * 8 + AWQ_ORDER[i]].astype(np.uint32) << np.uint32(i * 4)
    return packed.view(np.int32)


def write_awq_checkpoint(plain: Path, out: Path, group: int, seed: int = 0) -> dict[str, tuple]:
    """An AutoAWQ GEMM checkpoint of `plain`'s architecture with random q, z, s for every linear.
    Returns HF module -> (q [out, in], z [out, in/g], s fp16 [out, in/g]) in HF row order."""
    rng = np.random.default_rng(seed)
    shutil.copytree(plain, out)
    tensors = load_file(str(out / "model.safetensors"))
    made = {}
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        module = name.removesuffix(".weight")
        rows, cols = tensors.pop(name).shape
        q = rng.integers(0, 16, (rows, cols))
        z = rng.integers(0, 16, (rows, cols // group))
        s = (rng.uniform(0.002, 0.02, (rows, cols // group))).astype(np.float16)
        tensors[module + ".qweight"] = awq_pack(q.T)
        tensors[module + ".qzeros"] = awq_pack(z.T)
        tensors[module + ".scales"] = np.ascontiguousarray(s.T)
        made[module] = (q, z, s)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    edit_config(out, quantization_config={"quant_method": "awq", "bits": 4, "group_size": group,
                                          "zero_point": True, "version": "gemm"})
    return made


def test_unpack_awq_reverses_the_packing():
    values = np.random.default_rng(2).integers(0, 16, (5, 64))
    assert np.array_equal(unpack_awq(awq_pack(values)), values)
    word = awq_pack(np.arange(8)[None, :]).view(np.uint32)[0, 0]
    assert f"{word:08x}" == "75316420"     # nibble i holds channel AWQ_ORDER[i]


@pytest.mark.parametrize("group", [32, 64, 128])
def test_autoawq_checkpoint_imports_to_its_weights(tiny_hf, tmp_path, group):
    made = write_awq_checkpoint(tiny_hf, tmp_path / "awq", group)
    m = open_model(tmp_path / "awq")
    assert m.kind == "awq"
    c = m.config
    for module, (q, z, s) in made.items():
        name = "blk." + module.split(".")[2] + "." + {
            "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[module.split(".")[-1]] + ".weight"
        heads = c.n_heads if "attn_q" in name else c.n_kv_heads if "attn_k" in name else 0
        def order(a: np.ndarray, heads: int = heads) -> np.ndarray:
            return permute_qk(a, heads) if heads else a

        t = m.tensors[name]
        assert t.qtype == "INT4" and t.group == group
        tq, ts, tz, _ = t.int4()
        zero16 = (-z * s.astype(np.float32)).astype(np.float16)
        assert np.array_equal(tq, order(q)) and np.array_equal(ts, order(s.astype(np.float32)))
        assert np.array_equal(tz, order(zero16.astype(np.float32)))
        w = t.dequantize()
        # bit-exact with AWQ's scaled-zero form q*s - fp16(z*s), within one fp16 rounding of (q - z)*s
        scaled_zero = np.repeat(s.astype(np.float32), group, 1) * q + np.repeat(zero16.astype(np.float32), group, 1)
        assert np.array_equal(w, order(scaled_zero.astype(np.float32)))
        exact = (q - np.repeat(z, group, 1)) * np.repeat(s.astype(np.float64), group, 1)
        bound = np.repeat(z * s.astype(np.float64), group, 1) * 2.0 ** -11
        assert np.all(np.abs(w - order(exact)) <= order(bound))


def test_int4_weights_survive_autoawq_layout_exactly(tiny_hf, tmp_path):
    """Weights held as perfx INT4 with integer zero points, written in AutoAWQ's layout, read back bit-exact."""
    made = write_awq_checkpoint(tiny_hf, tmp_path / "awq", 32, seed=5)
    m = open_model(tmp_path / "awq")
    plain = open_model(tiny_hf)
    tensors = load_file(str(tiny_hf / "model.safetensors"))
    for module, (q, z, s) in made.items():
        w = (q * np.repeat(s.astype(np.float32), 32, 1)
             + np.repeat((-z * s.astype(np.float32)).astype(np.float16).astype(np.float32), 32, 1))
        tensors[module + ".weight"] = w.astype(np.float32)
    save_file(tensors, str(tmp_path / "awq-dequant.safetensors"))
    ref = copy_checkpoint(tiny_hf, tmp_path / "ref")
    shutil.copy(tmp_path / "awq-dequant.safetensors", ref / "model.safetensors")
    r = open_model(ref)
    for name, t in m.tensors.items():
        assert np.array_equal(t.dequantize(), r.tensors[name].dequantize()), name
    assert np.array_equal(logits(tmp_path / "awq"), logits(ref))
    assert plain.config == m.config


def test_autoawq_wrong_qweight_shape(tiny_hf, tmp_path):
    write_awq_checkpoint(tiny_hf, tmp_path / "awq", 32)
    path = tmp_path / "awq" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.1.mlp.up_proj.qweight"] = tensors["model.layers.1.mlp.up_proj.qweight"][:, :-1].copy()
    save_file(tensors, str(path))
    with pytest.raises(PerfxError, match=r"model.layers.1.mlp.up_proj.qweight has shape \[128, 31\], expected "
                                         r"\[128, 32\] \(AutoAWQ GEMM layout, group 32\)"):
        open_model(tmp_path / "awq")


def test_autoawq_gemv_is_refused(tiny_hf, tmp_path):
    write_awq_checkpoint(tiny_hf, tmp_path / "awq", 32)
    edit_config(tmp_path / "awq", quantization_config={"quant_method": "awq", "bits": 4, "group_size": 32,
                                                        "version": "gemv"})
    with pytest.raises(PerfxError, match="'gemv' .* not supported"):
        open_model(tmp_path / "awq")


# ---- refusals ---------------------------------------------------------------------------------------


def test_unsupported_architecture_is_named(tiny_hf, tmp_path):
    out = copy_checkpoint(tiny_hf, tmp_path / "m")
    edit_config(out, architectures=["MambaForCausalLM"])
    with pytest.raises(PerfxError, match="architecture MambaForCausalLM is not supported .*LlamaForCausalLM"):
        open_model(out)
    edit_config(out, architectures=["Qwen2ForCausalLM"])     # Qwen2 without its q/k/v biases
    with pytest.raises(PerfxError, match="q_proj.bias is missing; the checkpoint is incomplete"):
        open_model(out)
    edit_config(out, architectures=["LlamaForCausalLM"], attention_bias=True)
    with pytest.raises(PerfxError, match="attention_bias .*o_proj.* is not supported"):
        open_model(out)
    edit_config(out, attention_bias=False, mlp_bias=True)
    with pytest.raises(PerfxError, match="mlp_bias .*gate/up/down_proj.* is not supported"):
        open_model(out)


def test_bias_tensor_is_refused(tiny_hf, tmp_path):
    out = copy_checkpoint(tiny_hf, tmp_path / "m")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(128, np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(PerfxError, match="q_proj.bias is a bias"):
        open_model(out)


def test_missing_tokenizer(tiny_hf, tmp_path):
    out = copy_checkpoint(tiny_hf, tmp_path / "m")
    (out / "tokenizer.json").unlink()
    with pytest.raises(PerfxError, match="no tokenizer.json or tokenizer.model; copy the model's tokenizer"):
        open_model(out)


def test_wrong_shape_names_the_tensor(tiny_hf, tmp_path):
    out = copy_checkpoint(tiny_hf, tmp_path / "m")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"] = np.zeros((128, 255), np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(PerfxError, match=r"model.layers.1.mlp.down_proj.weight has shape \[128, 255\], "
                                         r"expected \[128, 256\] from config.json"):
        open_model(out)


def test_missing_tensor_and_pytorch_weights(tiny_hf, tmp_path):
    out = copy_checkpoint(tiny_hf, tmp_path / "m")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.0.mlp.gate_proj.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(PerfxError, match="model.layers.0.mlp.gate_proj.weight is missing"):
        open_model(out)
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(PerfxError, match="PyTorch .bin weights"):
        open_model(out)


def test_rope_scaling_is_refused(tiny_hf, tmp_path):
    out = copy_checkpoint(tiny_hf, tmp_path / "m")
    edit_config(out, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(PerfxError, match="rope_scaling 'llama3' is not supported"):
        open_model(out)
