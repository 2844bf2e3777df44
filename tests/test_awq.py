"""AWQ: calibration windows, the layer-by-layer calibration pass against the NumPy reference, the exact
output-error objective, scale folding, the scale and clipping searches, determinism, and a model with
activation outliers where AWQ must beat round-to-nearest."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from perfx.engine import load_model
from perfx.engine.quant.awq import (
    CALIB_SAMPLES,
    CALIB_SEQ_LEN,
    DEFAULT_CALIBRATION,
    LINEARS,
    InputStats,
    calibration,
    fold_scales,
    layer_forward,
    output_error,
    rmsnorm,
    search_clip,
    search_scale,
    tie_heads,
)
from perfx.engine.backends.numpy_backend import rope_tables
from perfx.engine.errors import PerfxError
from perfx.engine.formats.loader import open_model
from perfx.engine.formats.convert import convert
from perfx.engine.formats.perfx_format import read_safetensors
from perfx.engine.quant.quantize import fake_int4
from tests.conftest import TinySpec, write_tiny_gguf

TEXT = " ".join(f"then {i} thin hens in the inn, the tin hut, the hen then" for i in range(80))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("awq") / "m.gguf"
    write_tiny_gguf(path, TinySpec(dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256, ctx_len=128, seed=21))
    return path


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "c.txt"
    path.write_text(TEXT)
    return path


def layer_weights(model, i: int) -> dict[str, np.ndarray]:
    return {n: model.tensors[f"blk.{i}.{n}.weight"].dequantize() for n in ("attn_norm", "ffn_norm", *LINEARS)}


def test_default_calibration_text_is_large_enough(default_model_path):
    """perfx's own calibration text: at least 64 x 512 tokens of the default model's tokenizer."""
    m = open_model(default_model_path)
    cal = calibration(m.tokenizer, m.config)
    assert cal.windows.shape == (CALIB_SAMPLES, CALIB_SEQ_LEN)
    assert np.all(cal.windows[:, 0] == m.tokenizer.bos_id)
    text = DEFAULT_CALIBRATION.read_text()
    assert len(m.tokenizer.encode(text, special=False)) >= CALIB_SAMPLES * CALIB_SEQ_LEN
    gpl = Path("/usr/share/common-licenses/GPL-3")
    if gpl.exists():
        lines = {line.strip() for line in gpl.read_text().splitlines() if len(line.strip()) > 40}
        assert not any(line in text for line in lines)


def test_calibration_windows(tiny, calib_file, tmp_path):
    m = open_model(tiny)
    cal = calibration(m.tokenizer, m.config, calib_file, samples=3, seq_len=50)
    ids = m.tokenizer.encode(TEXT, special=False)
    assert cal.windows.shape == (3, 50)
    assert cal.windows[1, 1:].tolist() == ids[51:100] and cal.windows[1, 0] == m.tokenizer.bos_id
    assert calibration(m.tokenizer, m.config, calib_file).windows.shape[1] == m.config.ctx_len
    assert cal.describe()["tokens"] == 150 and len(cal.sha256) == 64
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(PerfxError, match="has 9 tokens; give at least 64"):
        calibration(m.tokenizer, m.config, tmp_path / "short.txt")


def test_layer_by_layer_pass_matches_the_reference_model(tiny):
    """The calibration pass is the NumPy reference: its last hidden states give the model's logits."""
    m = open_model(tiny)
    c = m.config
    ids = np.array([[5, 9, 200, 17, 3, 101, 44, 250], [7, 8, 12, 99, 3, 4, 5, 6]])
    cos, sin = rope_tables(c, ids.shape[1])
    x = m.tensors["token_embd.weight"].dequantize()[ids]
    for i in range(c.n_layers):
        x = layer_forward(x, layer_weights(m, i), c, cos, sin)
    h = rmsnorm(x, m.tensors["output_norm.weight"].dequantize(), c.norm_eps)
    logits = h @ m.tensors["token_embd.weight"].dequantize().T
    for b in range(2):
        ref = load_model(tiny, ctx=16).forward(ids[b].tolist())
        np.testing.assert_allclose(logits[b], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_gram_objective_is_the_output_error_over_all_tokens():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 64)).astype(np.float32) * rng.uniform(0.1, 5, 64).astype(np.float32)
    stats = InputStats(64)
    stats.add(x[:100])
    stats.add(x[100:])
    w = rng.standard_normal((48, 64)).astype(np.float32)
    wq = fake_int4(w, 32)
    direct = float(((x @ w.T - x @ wq.T).astype(np.float64) ** 2).sum())
    assert output_error([w], [wq], stats.gram) == pytest.approx(direct, rel=1e-4)
    np.testing.assert_allclose(stats.mean, np.abs(x).mean(0), rtol=1e-5)


def test_folded_scales_leave_the_layer_unchanged(tiny):
    m = open_model(tiny)
    c = m.config
    w = layer_weights(m, 1)
    rng = np.random.default_rng(2)
    tie = tie_heads(c)
    scales = {"qkv": rng.uniform(0.3, 3, c.dim), "o": tie(rng.uniform(0.3, 3, c.q_dim)),
              "gate_up": rng.uniform(0.3, 3, c.dim), "down": rng.uniform(0.3, 3, c.ffn_dim)}
    folded = fold_scales(w, scales, c)
    assert not np.allclose(folded.weights["attn_v"], w["attn_v"])
    x = rng.standard_normal((2, 9, c.dim)).astype(np.float32)
    cos, sin = rope_tables(c, 9)
    np.testing.assert_allclose(layer_forward(x, folded.weights, c, cos, sin), layer_forward(x, w, c, cos, sin),
                               rtol=1e-4, atol=1e-4)
    for n in LINEARS:
        restored = folded.weights[n] / folded.row_scale[n][:, None] / folded.col_scale[n][None, :]
        np.testing.assert_allclose(restored, w[n], rtol=1e-5, atol=1e-7)


def outlier_case(seed: int = 3):
    """A linear whose input has a few channels 30x larger than the rest, as LLM activations do."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2000, 128)).astype(np.float32)
    x[:, [5, 40, 77, 100]] *= 30
    stats = InputStats(128)
    stats.add(x)
    w = rng.standard_normal((96, 128)).astype(np.float32)
    return x, stats, w


def test_scale_search_protects_salient_channels():
    x, stats, w = outlier_case()
    choice = search_scale([w], stats, 32)
    assert choice.alpha is not None and choice.alpha > 0
    assert choice.error <= 0.7 * choice.plain_error
    s = choice.scale
    assert s[[5, 40, 77, 100]].min() > np.delete(s, [5, 40, 77, 100]).max()
    assert np.isclose(s.max() * s.min(), 1.0, rtol=1e-5)
    wq = fake_int4(w * s, 32) / s
    direct = float(((x @ w.T - x @ wq.T).astype(np.float64) ** 2).sum())
    assert choice.error == pytest.approx(direct, rel=1e-3)


def test_scale_search_never_does_worse_than_rounding():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 64)).astype(np.float32)
    stats = InputStats(64)
    stats.add(x)
    choice = search_scale([rng.standard_normal((32, 64)).astype(np.float32)], stats, 32)
    assert choice.error <= choice.plain_error


def test_clip_search():
    x, stats, w = outlier_case(5)
    w[:, 3] *= 8                                                        # outlier weights: clipping pays
    clip = search_clip(w, stats.gram, 32)
    absmax = np.abs(w.reshape(96, 4, 32)).max(axis=2)
    ratios = 1 - clip / absmax
    grid = np.arange(10) / 20
    assert np.abs(ratios[..., None] - grid).min(axis=-1).max() < 1e-5
    assert (ratios > 0.01).any()
    clipped = float(((x @ w.T - x @ fake_int4(w, 32, clip).T).astype(np.float64) ** 2).sum())
    plain = float(((x @ w.T - x @ fake_int4(w, 32).T).astype(np.float64) ** 2).sum())
    assert clipped < plain


def test_awq_is_deterministic(tiny, calib_file, tmp_path):
    a = convert(tiny, tmp_path / "a.safetensors", group=32, calib=calib_file)
    b = convert(tiny, tmp_path / "b.safetensors", group=32, calib=calib_file)
    fa, fb = read_safetensors(tmp_path / "a.safetensors"), read_safetensors(tmp_path / "b.safetensors")
    assert fa.metadata == fb.metadata and fa.arrays.keys() == fb.arrays.keys()
    assert all(np.array_equal(fa.arrays[k], fb.arrays[k]) for k in fa.arrays)
    assert a.calibration["samples"] == 20 and a.calibration["seq_len"] == 128
    notes = {r.name: r.note for r in a.reports}
    assert "alpha" in notes["blk.0.ffn_up.weight"] or "no scaling" in notes["blk.0.ffn_up.weight"]
    assert "clipped" in notes["blk.0.ffn_down.weight"] and "clipped" not in notes["blk.0.attn_q.weight"]
    assert all(r.output_error is not None for r in a.reports if r.qtype.startswith("INT4"))
    key = [r.error if r.output_error is None else r.output_error for r in a.reports]
    assert key == sorted(key, reverse=True)
    assert b.reports[0].name == a.reports[0].name


def test_awq_beats_round_to_nearest_on_a_model_with_outliers(tmp_path, calib_file):
    """Norm weights with a few large channels give activation outliers; AWQ's logits must be closer."""
    import gguf

    src = tmp_path / "m.gguf"
    write_tiny_gguf(src, TinySpec(dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256, ctx_len=128, seed=9))
    reader = gguf.GGUFReader(src, "r+")
    for t in reader.tensors:
        if t.name.endswith("norm.weight") and t.name != "output_norm.weight":
            t.data[[3, 50, 90]] *= 25
    del reader
    for scheme in ("rtn-int4", "awq-int4"):
        convert(src, tmp_path / f"{scheme}.safetensors", scheme=scheme, group=32,
                calib=calib_file if scheme == "awq-int4" else None)
    ids = load_model(src).tokenizer.encode(TEXT[:400], special=False)[:100]
    ref = load_model(src, ctx=128).forward(ids)
    err = {s: float(np.sqrt(np.mean((load_model(tmp_path / f"{s}.safetensors", ctx=128).forward(ids) - ref) ** 2)))
           for s in ("rtn-int4", "awq-int4")}
    assert err["awq-int4"] < 0.8 * err["rtn-int4"], err
