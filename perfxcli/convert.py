"""`perfx convert` and `perfx export`: models into perfx's own format, and back out as Hugging Face checkpoints."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from perfx.cli.main import ModelOpt, command, err


def _source(name: str) -> Path:
    """A path as given (file or directory), else a registry name (downloaded on first use)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    from perfx.engine.hub.registry import resolve

    return resolve(name, progress=True)[0]


@command
def convert(
    source: str = typer.Argument(..., help="A GGUF or perfx file, a Hugging Face or AutoAWQ directory, or a registry name."),
    output: Path = typer.Option(..., "-o", "--output", help="The perfx file to write (.safetensors)."),
    quant: str = typer.Option("awq-int4", "--quant", help="awq-int4 | rtn-int4 | int8 | fp16."),
    group_size: int = typer.Option(128, "--group-size", help="int4 group size: 32, 64 or 128."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text for AWQ (default: perfx's own)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output if it exists."),
):
    """Convert a model into a perfx file, quantized (AWQ int4 by default)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from perfx.engine.formats.convert import convert as run_convert

    src = _source(source)
    columns = [TextColumn(f"{quant}"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("layers", total=None)

        def on_layer(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = run_convert(src, output, scheme=quant, group=group_size, calib=calib, force=force,
                             on_layer=on_layer)

    rows = [r for r in result.reports if r.qtype != "F32"]
    table = Table(title=f"quantization error of {len(rows)} tensors, worst first "
                        "(by output error on the calibration text where measured)")
    for col in ("tensor", "stored as", "weight error", "output error", "note"):
        table.add_column(col, justify="right" if "error" in col else "left", no_wrap=col != "note")
    for r in rows:
        out_err = "" if r.output_error is None else f"{r.output_error:.2%}"
        table.add_row(r.name, r.qtype, f"{r.error:.2%}", out_err, r.note)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    kept = sum(r.note == "kept exactly" for r in rows)
    notes = [f"{kept} of {len(rows)} tensors kept exactly"] if kept else []
    if result.calibration:
        c = result.calibration
        notes.append(f"calibrated on {c['samples']} x {c['seq_len']} tokens of {c['file']}")
    group = f" g{result.group}" if result.scheme.endswith("int4") else ""
    print(f"wrote {result.path} ({result.size / 1e6:.1f} MB, {result.scheme}{group}"
          f"{''.join('; ' + n for n in notes)}) in {result.seconds:.1f} s")


@command
def export(
    model: Optional[str] = ModelOpt,
    hf: Path = typer.Option(..., "--hf", help="The Hugging Face checkpoint directory to write."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | fp16."),
    force: bool = typer.Option(False, "--force", help="Replace the directory if it holds a checkpoint."),
):
    """Write a model (GGUF, perfx, HF or AutoAWQ) as a Hugging Face checkpoint: LlamaForCausalLM, safetensors,
    tokenizer, chat template."""
    from perfx.engine.formats.export import export_hf
    from perfx.engine.hub.registry import resolve

    path = _source(model) if model is not None else resolve(None, progress=True)[0]
    out = export_hf(path, hf, dtype=dtype, force=force)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB, {dtype})")
