"""`perfx convert`: the perfx file format, each quantization scheme, exact imports, the CLI and its refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from perfx.engine import Sampling, load_model
from perfx.engine.errors import PerfxError
from perfx.engine.formats.convert import convert
from perfx.engine.formats.export import export_hf
from perfx.engine.formats.loader import open_model
from perfx.engine.formats.perfx_format import FORMAT_VERSION, read_perfx, safetensors_header
from tests.conftest import TinySpec, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]
IDS = [5, 9, 200, 17, 3, 101, 44, 250, 7, 8, 12]
CALIB_TEXT = " ".join(f"the thin hen {i} in the inn, then the tin hut" for i in range(60))


def perfx(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "perfx.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd, check=False)


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "layers" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


@pytest.fixture(scope="module")
def q41(tmp_path_factory) -> Path:
    """A tiny GGUF as the default model is stored: Q4_1 linears, Q8_0 embedding."""
    path = tmp_path_factory.mktemp("q41") / "q41.gguf"
    write_tiny_gguf(path, TinySpec(qtype="Q4_1", seed=7))
    return path


@pytest.fixture(scope="module")
def f32_hf(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("f32")
    write_tiny_gguf(d / "m.gguf", TinySpec(dim=128, ffn_dim=256, tied=False, seed=11))
    export_hf(d / "m.gguf", d / "hf")
    return d / "m.gguf", d / "hf"


def dequantized(path: Path) -> dict[str, np.ndarray]:
    return {n: t.dequantize() for n, t in open_model(path).tensors.items()}


# ---- exact conversions ------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_0"])
def test_gguf_q4_converts_bit_identically(tmp_path, qtype):
    src = tmp_path / "m.gguf"
    write_tiny_gguf(src, TinySpec(qtype=qtype, tied=False, seed=3))
    result = convert(src, tmp_path / "m.safetensors")            # awq-int4 g128: every linear kept
    assert result.calibration is None
    before, after = dequantized(src), dequantized(tmp_path / "m.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert np.array_equal(before[name], after[name]), name
    t = open_model(tmp_path / "m.safetensors").tensors
    assert (t["blk.0.attn_q.weight"].qtype, t["blk.0.attn_q.weight"].group) == ("INT4", 32)
    assert t["token_embd.weight"].qtype == "INT8" and t["output.weight"].qtype == "INT4"
    assert all(r.error == 0 and r.note == "kept exactly" for r in result.reports if r.qtype != "F32")
    a = load_model(src).forward(IDS)
    b = load_model(tmp_path / "m.safetensors").forward(IDS)
    assert np.array_equal(a, b)


def test_rtn_int4_int8_fp16_values(f32_hf, tmp_path):
    _, hf = f32_hf
    source = dequantized(hf)
    for scheme in ("fp16", "int8", "rtn-int4"):
        convert(hf, tmp_path / f"{scheme}.safetensors", scheme=scheme, group=64)
    m = {s: open_model(tmp_path / f"{s}.safetensors").tensors for s in ("fp16", "int8", "rtn-int4")}
    w = source["blk.1.ffn_up.weight"]
    assert np.array_equal(m["fp16"]["blk.1.ffn_up.weight"].dequantize(), w.astype(np.float16).astype(np.float32))
    assert m["fp16"]["token_embd.weight"].qtype == "F16" and m["fp16"]["output_norm.weight"].qtype == "F32"

    q, scale, group = m["int8"]["blk.1.ffn_up.weight"].int8()
    assert group == 32 and q.dtype == np.int8 and np.abs(q).max() == 127
    step = np.repeat(scale, 32, axis=1)
    assert np.all(np.abs(q * step - w) <= step / 2 + 1e-7)
    np.testing.assert_allclose(scale, np.abs(w.reshape(len(w), -1, 32)).max(2) / 127, rtol=1e-3)

    t = m["rtn-int4"]["blk.1.ffn_up.weight"]
    q, scale, zero, group = t.int4()
    assert group == 64 and q.max() == 15 and q.min() == 0
    g = w.reshape(len(w), -1, 64)
    np.testing.assert_allclose(zero, g.min(2), rtol=1e-3)
    np.testing.assert_allclose(scale, (g.max(2) - g.min(2)) / 15, rtol=2e-3)
    step = np.repeat(scale, 64, axis=1)
    assert np.all(np.abs(t.dequantize() - w) <= step / 2 + 2e-3 * np.abs(w).max())


def test_group_falls_back_where_128_does_not_divide(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", TinySpec(dim=192, n_heads=6, n_kv_heads=2, ffn_dim=256, seed=2))
    result = convert(tmp_path / "m.gguf", tmp_path / "m.safetensors", scheme="rtn-int4", group=128)
    t = open_model(tmp_path / "m.safetensors").tensors
    assert t["blk.0.attn_q.weight"].group == 64 and t["blk.0.ffn_down.weight"].group == 128
    assert {r.qtype for r in result.reports if "ffn_gate" in r.name} == {"INT4 g64"}


def test_converted_file_runs_and_generates(f32_hf, tmp_path):
    _, hf = f32_hf
    convert(hf, tmp_path / "fp16.safetensors", scheme="fp16")
    llm = load_model(tmp_path / "fp16.safetensors", device="numpy", ctx=64)
    ref = load_model(f32_hf[0], device="numpy", ctx=64)
    np.testing.assert_allclose(llm.forward(IDS), ref.forward(IDS), atol=0.01 * np.abs(ref.forward(IDS)).max())
    out, _ = llm.generate([3, 4, 5], Sampling(temperature=0, max_tokens=4))
    assert 1 <= len(out) <= 4
    assert llm.chat_template.source == ref.chat_template.source


# ---- the file format --------------------------------------------------------------------------------


def test_format_metadata_tokenizer_and_memory_map(q41, tmp_path):
    out = tmp_path / "m.safetensors"
    convert(q41, out, scheme="rtn-int4")
    header, _ = safetensors_header(out)
    md = header["__metadata__"]
    assert md["format"] == "perfx" and md["format_version"] == str(FORMAT_VERSION)
    quant = json.loads(md["quantization"])
    assert quant["scheme"] == "rtn-int4" and quant["group_size"] == 128 and quant["source"]["kind"] == "gguf"
    assert md["tokenizer_file"] == "tokenizer.json" and "chat_template" in md
    assert {"blk.0.attn_q.weight.q", "blk.0.attn_q.weight.scale", "blk.0.attn_q.weight.zero",
            "token_embd.weight.q", "token_embd.weight.scale", "output_norm.weight"} <= set(header)
    p = read_perfx(out)
    assert isinstance(p.tensors["blk.1.ffn_down.weight"].raw.base, np.memmap)
    src = open_model(q41)
    text = "<|im_start|>user\nthe thin hen in the inn<|im_end|>\n<|im_start|>assistant\n"
    assert p.tokenizer.encode(text) == src.tokenizer.encode(text)
    assert p.tokenizer.encode(text, special=False) == src.tokenizer.encode(text, special=False)
    assert p.tokenizer.chat_template == src.tokenizer.chat_template
    assert (p.tokenizer.bos_id, p.tokenizer.eos_id, p.tokenizer.add_bos) == (
        src.tokenizer.bos_id, src.tokenizer.eos_id, src.tokenizer.add_bos)
    assert p.config == src.config


def rewrite_metadata(path: Path, **changes: str) -> None:
    tensors = load_file(str(path))
    header, _ = safetensors_header(path)
    save_file(tensors, str(path), metadata={**header["__metadata__"], **changes})


def test_other_format_version_is_refused(q41, tmp_path):
    out = tmp_path / "m.safetensors"
    convert(q41, out, scheme="rtn-int4")
    rewrite_metadata(out, format_version="2")
    with pytest.raises(PerfxError, match="perfx format version 2, this perfx reads version 1; convert the model"):
        open_model(out)


def test_plain_safetensors_and_truncated_files(q41, tmp_path):
    save_file({"x": np.zeros(4, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PerfxError, match="safetensors file but not a perfx model"):
        open_model(tmp_path / "plain.safetensors")
    out = tmp_path / "m.safetensors"
    convert(q41, out, scheme="int8")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(out.read_bytes()[:-1000])
    with pytest.raises(PerfxError, match="truncated"):
        open_model(cut)


# ---- refusals and interruptions ---------------------------------------------------------------------


def test_existing_output_is_refused_without_force(q41, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_text("precious")
    with pytest.raises(PerfxError, match="exists; pass --force"):
        convert(q41, out)
    assert out.read_text() == "precious"
    convert(q41, out, force=True)
    assert open_model(out).kind == "perfx"


def test_interrupted_conversion_leaves_nothing(f32_hf, calib, tmp_path):
    _, hf = f32_hf

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    for scheme in ("awq-int4", "rtn-int4"):
        with pytest.raises(KeyboardInterrupt):
            convert(hf, tmp_path / "m.safetensors", scheme=scheme, calib=calib if scheme == "awq-int4" else None,
                    on_layer=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing(q41, tmp_path, monkeypatch):
    import safetensors.numpy

    def save_then_interrupt(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(q41, tmp_path / "m.safetensors", scheme="int8")
    assert list(tmp_path.iterdir()) == []


def test_bad_options(q41, tmp_path):
    with pytest.raises(PerfxError, match="unknown quantization 'int3'; choose one of awq-int4, rtn-int4"):
        convert(q41, tmp_path / "m.safetensors", scheme="int3")
    with pytest.raises(PerfxError, match="--group-size must be one of 32, 64, 128"):
        convert(q41, tmp_path / "m.safetensors", group=96)
    with pytest.raises(PerfxError, match="does not exist; create it first"):
        convert(q41, tmp_path / "nowhere" / "m.safetensors")


# ---- the command line -------------------------------------------------------------------------------


def test_cli_convert_then_run(f32_hf, calib, tmp_path):
    _, hf = f32_hf
    out = tmp_path / "tiny-awq.safetensors"
    result = perfx("convert", str(hf), "-o", str(out), "--group-size", "32", "--calib", str(calib))
    assert result.returncode == 0, result.stderr
    assert "quantization error of 16 tensors, worst first" in result.stdout
    assert "blk.1.ffn_down.weight" in result.stdout and "attn_norm" not in result.stdout
    assert f"wrote {out}" in result.stdout and "awq-int4 g32" in result.stdout
    rows = [line for line in result.stdout.splitlines() if "INT4 g32" in line]
    errors = [float(line.split("│")[4].strip().rstrip("%")) for line in rows]
    assert len(rows) == 14 and errors == sorted(errors, reverse=True)
    run = perfx("run", "the thin", "-m", str(out), "--raw", "--temp", "0", "-n", "4", "--json", "--device", "numpy")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["timings"]["prompt_tokens"] > 0
    one_line_error(perfx("convert", str(hf), "-o", str(out)), "exists; pass --force")


def test_cli_export_then_convert(q41, tmp_path):
    result = perfx("export", "-m", str(q41), "--hf", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    one_line_error(perfx("export", "-m", str(q41), "--hf", str(tmp_path / "hf")), "exists; pass --force")
    result = perfx("convert", str(tmp_path / "hf"), "-o", str(tmp_path / "m.safetensors"), "--quant", "int8")
    assert result.returncode == 0, result.stderr


def test_cli_refusals(f32_hf, tmp_path):
    _, hf = f32_hf
    bad = tmp_path / "mamba"
    bad.mkdir()
    for f in hf.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["MambaForCausalLM"]}))
    one_line_error(perfx("convert", str(bad), "-o", str(tmp_path / "a.safetensors")),
                   "architecture MambaForCausalLM is not supported")
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "tokenizer.json").unlink()
    one_line_error(perfx("convert", str(bad), "-o", str(tmp_path / "a.safetensors")), "no tokenizer.json")
    one_line_error(perfx("convert", str(hf), "-o", str(tmp_path / "a.safetensors"), "--quant", "int3"),
                   "unknown quantization 'int3'")
    assert not (tmp_path / "a.safetensors").exists()


def test_cli_ctrl_c_leaves_no_file(f32_hf, calib, tmp_path):
    _, hf = f32_hf
    out = tmp_path / "m.safetensors"
    code = (
        "import perfx.engine.quant.awq as awq\n"
        "real = awq.quantize_layer\n"
        "def interrupt(i, *a, **k):\n"
        "    if i == 1: raise KeyboardInterrupt\n"
        "    return real(i, *a, **k)\n"
        "awq.quantize_layer = interrupt\n"
        "from perfx.cli.main import app\n"
        f"app(['convert', {str(hf)!r}, '-o', {str(out)!r}, '--calib', {str(calib)!r}, '--group-size', '32'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert result.returncode == 130, result.stderr
    assert "interrupted" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scheme", ["fp16", "int8", "awq-int4"])
def test_converted_file_on_opencl(q41, tmp_path, scheme):
    """The NumPy reference and an OpenCL device agree on a converted file (Q4_1 linears kept as INT4 g32)."""
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.devices import select

    try:
        device = select("opencl").info.id
    except PerfxError as e:
        pytest.skip(f"no usable OpenCL device: {e}")
    out = tmp_path / "m.safetensors"
    convert(q41, out, scheme=scheme)
    ids = np.random.default_rng(0).integers(0, 263, size=21).tolist()
    expected = load_model(out, device="numpy", ctx=64).forward(ids)
    got = load_model(out, device=device, ctx=64).forward(ids)
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max(), rtol=0)


def test_awq_g128_file_on_opencl(f32_hf, calib, tmp_path):
    """INT4 with groups of 128 (and the INT8 embedding) on an OpenCL device, against the NumPy reference."""
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.devices import select

    try:
        device = select("opencl").info.id
    except PerfxError as e:
        pytest.skip(f"no usable OpenCL device: {e}")
    out = tmp_path / "m.safetensors"
    convert(f32_hf[1], out, calib=calib)
    assert open_model(out).tensors["blk.0.ffn_down.weight"].group == 128
    ids = np.random.default_rng(1).integers(0, 263, size=21).tolist()
    expected = load_model(out, device="numpy", ctx=64).forward(ids)
    got = load_model(out, device=device, ctx=64).forward(ids)
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max(), rtol=0)
