"""The `perfx` command line: a thin layer over the engine."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.errors import PerfxError
from perfxcli.sampling import sampling_options

app = typer.Typer(
    name="perfx",
    help="Run LLaMA-family models on phones, desktops and servers: one OpenCL engine, with a NumPy reference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True, highlight=False)

ModelOpt = typer.Option(None, "-m", "--model", help="Registry name or model file (default: the registry's default).")
DeviceOpt = typer.Option("auto", "--device", help="auto | numpy | opencl | cpu | gpu | opencl:P:D (see `perfx devices`).")
ThreadsOpt = typer.Option(None, "-t", "--threads", help="CPU threads for an OpenCL CPU device (PoCL).")
CtxOpt = typer.Option(None, "--ctx", help="Context length in tokens (default: 2048, at most the model's).")


def command(fn):
    """Turns engine errors into a one-line message and Ctrl-C into a quiet exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PerfxError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, soft_wrap=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)

    return app.command()(wrapper)


def load(model: Optional[str], device: str, ctx: Optional[int], threads: Optional[int] = None):
    from engine.llm import load_model

    if threads is not None:
        if threads < 1:
            raise PerfxError(f"--threads must be at least 1 (got {threads})")
        from engine.backends.opencl.devices import set_cpu_threads

        set_cpu_threads(threads)
    with err.status("loading model…", spinner="dots") if sys.stderr.isatty() else _nullcontext():
        llm = load_model(model, device=device, ctx=ctx, progress=True)
    for notice in llm.notices:
        err.print(f"[dim]{notice}[/]")
    return llm


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@command
@sampling_options
def run(
    prompt: str = typer.Argument(..., help="The prompt; '-' reads it from standard input."),
    model: Optional[str] = ModelOpt,
    n: int = typer.Option(256, "-n", "--n-predict", help="Most tokens to generate."),
    sampling=None,  # --temp, --top-k, ... (perfxcli.sampling)
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is, without the chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    ctx: Optional[int] = CtxOpt,
):
    """Generate a reply to one prompt, streamed to standard output."""
    from engine.tokenizer import StreamDecoder

    if prompt == "-":
        prompt = sys.stdin.read()
    sampling = sampling.with_(max_tokens=n)
    llm = load(model, device, ctx, threads)
    tok = llm.tokenizer
    if raw:
        prompt_ids = tok.encode(prompt, special=False)  # with BOS where the model wants one
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt_ids = tok.encode(llm.chat_template.render(messages), special=True)

    ids: list[int] = []
    stream = StreamDecoder(tok)
    for token in llm.generate(prompt_ids, sampling):
        ids.append(token)
        if not as_json:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()
    if as_json:
        print(json.dumps({"prompt_ids": prompt_ids, "ids": ids, "text": tok.decode(ids),
                          "device": llm.device, "timings": llm.stats.to_dict()}))
    else:
        sys.stdout.write(stream.flush() + "\n")
        s = llm.stats
        err.print(f"[dim]prompt {s.prompt_tokens} tok, {s.prompt_tps:.1f} tok/s · "
                  f"reply {s.gen_tokens} tok, {s.gen_tps:.1f} tok/s · {llm.device}[/]", soft_wrap=True)


@command
def perplexity(
    file: Path = typer.Argument(..., help="A text file."),
    model: Optional[str] = ModelOpt,
    ctx: int = typer.Option(512, "--ctx", help="Window length in tokens."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Score at most this many windows."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
):
    """Perplexity of a model on a text file, as llama-perplexity measures it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from engine.perplexity import perplexity as measure

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PerfxError(f"cannot read {file} as UTF-8 text: {e}") from None
    llm = load(model, device, ctx, threads)
    columns = [TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[ppl]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True, disable=as_json) as progress:
        task = progress.add_task("ppl", total=None, ppl="")

        def on_chunk(done: int, total: int, ppl: float) -> None:
            progress.update(task, completed=done, total=total, ppl=f"PPL {ppl:.4f}")

        result = measure(llm, text, ctx=ctx, chunks=chunks, on_chunk=on_chunk)
    if as_json:
        print(json.dumps({"file": str(file), "ctx": ctx, "chunks": len(result.chunk_ppl), "device": llm.device,
                          **result.to_dict()}))
    else:
        print(f"PPL = {result.ppl:.4f} ± {result.ppl_error:.4f}  "
              f"({len(result.chunk_ppl)} chunks of {ctx}, {result.tokens_scored} tokens scored, {llm.device})")


@command
def download(
    name: Optional[str] = typer.Argument(None, help="Registry name (default: the default model)."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash a file already downloaded."),
):
    """Fetch a registry model into the model cache (a no-op when it is there)."""
    from engine import download as dl
    from engine.registry import load_registry, local_path

    registry = load_registry()
    entry = registry.get(name or registry.default)
    path = dl.ensure(entry, progress=True)
    if verify and not dl.verify(entry):
        raise PerfxError(f"{path} does not match its sha256; delete it and run `perfx download {entry.name}`")
    print(local_path(entry))


@command
def models():
    """List the registry's models and which are downloaded."""
    from engine.registry import load_registry, local_path

    registry = load_registry()
    table = Table(title="perfx models")
    for col in ("name", "arch", "params", "quant", "size", "license", "local"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for name, e in registry.models.items():
        path = local_path(e)
        here = "[green]yes[/]" if path.exists() and path.stat().st_size == e.size else "[dim]no[/]"
        label = f"{name} [dim](default)[/]" if name == registry.default else name
        table.add_row(label, e.architecture, e.params, e.quantization, f"{e.size / 1e6:.1f} MB", e.license, here)
    Console().print(table)


@command
def devices(
    measure: bool = typer.Option(True, "--measure/--no-measure", help="Measure copy bandwidth (once; cached)."),
):
    """List OpenCL platforms and devices, with their measured copy bandwidth."""
    from perfxcli.devices_cmd import devices_command

    devices_command(measure=measure)


# Commands in their own modules register themselves on `app`.
from perfxcli import bench, chat, convert, serve  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
