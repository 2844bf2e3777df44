"""`perfx convert`: any model perfx reads (GGUF, Hugging Face directory, AutoAWQ checkpoint, perfx file)
into a perfx file, quantized by one of four schemes.

    scheme      linears                    embedding / output   norms
    awq-int4    INT4, AWQ-scaled + clipped  INT8                 F32 (absorbing AWQ's scales)
    rtn-int4    INT4, round to nearest      INT8                 F32
    int8        INT8                        INT8                 F32
    fp16        F16                         F16                  F32

Q, K and V biases (Qwen2) stay F32 under every scheme (AWQ folds its o-group scale into V's).

A source tensor already in the target form is kept exactly instead of requantized: Q4_0, Q4_1 and
INT4 (AutoAWQ imports included) under the int4 schemes (an int4 embedding or output too), Q8_0 and
INT8 for int8 targets, F16 under fp16.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PerfxError
from ..model import weights_from_tensors
from ..quant.quantize import fp16, fp32, int4, int4_group, int8, relative_error
from .loader import ModelFile, open_model
from .perfx_format import check_output, write_perfx
from .tensors import INT4_GROUPS, QTensor, int4_tensor, int8_tensor

SCHEMES = ("awq-int4", "rtn-int4", "int8", "fp16")
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
INT4_SOURCES = ("INT4", "Q4_0", "Q4_1")
INT8_SOURCES = ("INT8", "Q8_0")


@dataclass
class TensorReport:
    name: str
    qtype: str                  # as stored: "INT4 g128", "INT8", "F16", "F32"
    error: float                # relative RMS error of the weights the model computes with
    output_error: float | None  # relative RMS error of its outputs on the calibration text (AWQ)
    note: str                   # "kept exactly", "alpha 0.45, 12% of groups clipped", ...


@dataclass
class ConvertResult:
    path: Path
    size: int
    scheme: str
    group: int
    source_kind: str
    reports: list[TensorReport]       # worst first: by output error where calibrated, else weight error
    seconds: float
    calibration: dict | None


def target_qtype(name: str, scheme: str) -> str:
    """What a tensor becomes under a scheme: "F32", "F16", "INT8" or "INT4"."""
    if name.endswith(("norm.weight", ".bias")):
        return "F32"
    if scheme == "fp16":
        return "F16"
    if name in ("token_embd.weight", "output.weight") or scheme == "int8":
        return "INT8"
    return "INT4"


def kept(t: QTensor, target: str, scheme: str) -> QTensor | None:
    """The tensor in its target form without requantizing, when its source form allows it (an int4
    embedding or output stays int4 under the int4 schemes rather than being requantized to int8)."""
    if t.qtype in INT4_SOURCES and (target == "INT4" or (target == "INT8" and scheme.endswith("int4"))):
        q, scale, zero, group = t.int4()
        return int4_tensor(t.name, q, scale, zero, group)
    if target == "INT8" and t.qtype in INT8_SOURCES:
        q, scale, _ = t.int8()
        return int8_tensor(t.name, q, scale)
    if target == "F16" and t.qtype == "F16":
        return QTensor(t.name, "F16", t.shape, np.asarray(t.raw).view(np.float16).reshape(t.shape))
    return None


def describe(t: QTensor) -> str:
    return f"INT4 g{t.group}" if t.qtype == "INT4" else t.qtype


def requantize(name: str, w: np.ndarray, target: str, group: int) -> QTensor:
    if target == "F32":
        return fp32(name, w)
    if target == "F16":
        return fp16(name, w)
    if target == "INT8":
        return int8(name, w)
    return int4(name, w, int4_group(w.shape[1], group, name))


def tensor_order(model: ModelFile) -> list[str]:
    names = ["token_embd.weight"]
    for i in range(model.config.n_layers):
        biases = [f"blk.{i}.{n}.bias" for n in LINEARS[:3] if f"blk.{i}.{n}.bias" in model.tensors]
        names += [f"blk.{i}.attn_norm.weight", *(f"blk.{i}.{n}.weight" for n in LINEARS[:4]), *biases,
                  f"blk.{i}.ffn_norm.weight", *(f"blk.{i}.{n}.weight" for n in LINEARS[4:])]
    names.append("output_norm.weight")
    if not model.config.tied_embedding and "output.weight" in model.tensors:
        names.append("output.weight")
    return names


def check_writable(folder: Path, what: str) -> None:
    """Refuse a folder this process cannot create files in, before minutes of work are spent on them."""
    try:
        with tempfile.TemporaryFile(prefix=".perfx-write-check-", dir=folder):
            pass
    except OSError as e:
        raise PerfxError(f"cannot write {what} into {folder} ({e.strerror or e}); choose a folder you can write to") \
            from None


def write_error(path: Path, e: OSError) -> PerfxError:
    """An OSError met while writing `path` (a full disk, say), as one line."""
    return PerfxError(f"cannot write {path}: {e.strerror or e} (nothing was left behind)")


def convert(source: str | Path, output: str | Path, scheme: str = "awq-int4", group: int = 128,
            calib: str | Path | None = None, force: bool = False,
            on_layer: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Convert `source` into the perfx file `output`; `on_layer(done, total)` follows the progress."""
    start = time.perf_counter()
    if scheme not in SCHEMES:
        raise PerfxError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if group not in INT4_GROUPS:
        raise PerfxError(f"--group-size must be one of {', '.join(map(str, INT4_GROUPS))} (got {group})")
    if calib is not None and scheme != "awq-int4":
        raise PerfxError(f"--calib is for --quant awq-int4 only (got --quant {scheme})")
    output = Path(output)
    check_output(output, force)
    check_writable(output.parent, output.name)
    model = open_model(source)
    config, tok = model.config, model.tokenizer
    weights_from_tensors(model.tensors, config, model.path)
    config.check_plain("perfx convert")
    if tok.vocab_size != config.vocab_size:
        raise PerfxError(f"{model.path}: the tokenizer has {tok.vocab_size} tokens but the model {config.vocab_size}; "
                         "perfx needs them equal")

    names = tensor_order(model)
    targets = {n: target_qtype(n, scheme) for n in names}
    out: dict[str, QTensor] = {}
    reports: dict[str, TensorReport] = {}
    for n in names:
        t = kept(model.tensors[n], targets[n], scheme)
        if t is not None:
            out[n] = t
            reports[n] = TensorReport(n, describe(t), 0.0, None, "kept exactly")

    cache: dict[str, np.ndarray] = {}

    def float_weight(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = model.tensors[name].dequantize().astype(np.float32)
        return cache[name]

    def quantize_plain(n: str) -> None:
        if n in out:
            return
        w = float_weight(n)
        t = requantize(n, w, targets[n], group)
        out[n] = t
        reports[n] = TensorReport(n, describe(t), relative_error(w, t.dequantize()), None,
                                  "round to nearest" if targets[n] in ("INT4", "INT8") else "")

    n_layers = config.n_layers
    calib_info = None
    for n in ("token_embd.weight", "output.weight", "output_norm.weight"):
        if n in names:
            quantize_plain(n)
    if scheme == "awq-int4" and any(f"blk.{i}.{n}.weight" not in out for i in range(n_layers) for n in LINEARS):
        from ..quant.awq import awq_quantize, calibration

        cal = calibration(tok, config, None if calib is None else Path(calib))
        calib_info = cal.describe()

        def layer_done(i: int, total: int, result) -> None:
            for name, t in result.tensors.items():
                if name in out:
                    continue
                out[name] = t
                if name in result.errors:
                    err, out_err = result.errors[name]
                    reports[name] = TensorReport(name, describe(t), err, out_err, result.notes.get(name, ""))
                else:
                    reports[name] = TensorReport(name, "F32", 0.0, None, "absorbs AWQ scales")
            for name in [k for k in cache if k.startswith(f"blk.{i}.")]:
                del cache[name]
            if on_layer is not None:
                on_layer(i + 1, total)

        biased = any(n.endswith(".bias") for n in names)
        awq_quantize(config, float_weight, cal, group, set(out), layer_done, biased=biased)
    else:
        for i in range(n_layers):
            for n in names:
                if n.startswith(f"blk.{i}."):
                    quantize_plain(n)
            cache.clear()
            if on_layer is not None:
                on_layer(i + 1, n_layers)
    for n in names:
        if n not in out:
            quantize_plain(n)

    quantization = {"scheme": scheme, "embedding": targets["token_embd.weight"],
                    "source": {"kind": model.kind, "name": config.name, "file": Path(model.path).name}}
    if scheme.endswith("int4"):
        quantization["group_size"] = group
    if calib_info is not None:
        quantization["calibration"] = calib_info
    tensors = {n: out[n] for n in names}
    try:
        write_perfx(output, config, tensors, tok, quantization, force=force)
    except OSError as e:
        raise write_error(output, e) from e
    ordered = sorted(reports.values(), key=lambda r: -(r.error if r.output_error is None else r.output_error))
    return ConvertResult(output, output.stat().st_size, scheme, group, model.kind, ordered,
                         time.perf_counter() - start, calib_info)
