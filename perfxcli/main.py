"""The `perfx` command line: a thin layer over the engine."""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from perfx.engine import DISTRIBUTION
from perfx.engine.errors import PerfxError
from perfx.cli.sampling import sampling_options

DEBUG_VARIABLE = "PERFX_DEBUG"
BUG_HINT = "please report this bug in perfx (run with --debug for the full trace)"


class App(typer.Typer):
    """The `perfx` command: every error is one line on standard error, never a Python traceback.

    Expected errors (PerfxError, bad options) say what to do; an unexpected exception names itself and
    asks for a report; the full trace only with `perfx --debug` or PERFX_DEBUG=1. Ctrl-C exits with
    status 130, SIGTERM with 143, both after `finally` blocks ran (temporary files removed).
    """

    def __call__(self, args: list[str] | None = None) -> None:
        if threading_main():
            signal.signal(signal.SIGTERM, _terminated)
        sys.stdin.reconfigure(errors="replace")      # invalid UTF-8 becomes U+FFFD, not an exception
        try:
            code = typer.main.get_command(self).main(args, prog_name="perfx", standalone_mode=False)
        except NoArgsIsHelpError as e:
            e.show()
            code = 0
        except ClickException as e:
            context = getattr(e, "ctx", None)
            usage = f" (see `{context.command_path} --help`)" if isinstance(e, UsageError) and context else ""
            error_line(e.format_message() + usage)
            code = e.exit_code
        except (typer.Abort, KeyboardInterrupt):
            code = 130
        except Exception as e:
            code = unexpected(e)
        sys.exit(code if isinstance(code, int) else 0)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _terminated(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def error_line(message: str) -> None:
    """`error: MESSAGE` on standard error, as one line."""
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)


def unexpected(e: BaseException) -> int:
    """Reports an exception perfx did not expect in one line (the trace with --debug); the exit status."""
    if isinstance(e, MemoryError):
        error_line("out of memory; use a smaller model, --ctx or batch, or close other programs")
    elif isinstance(e, OSError) and e.strerror:
        error_line(f"{e.strerror}{f': {e.filename}' if e.filename else ''} (run with --debug for the full trace)")
    else:
        text = " ".join(str(e).split())
        text = text if len(text) <= 200 else text[:200] + "…"
        error_line(f"internal error ({type(e).__name__}{': ' + text if text else ''}); {BUG_HINT}")
    if debugging():
        sys.stderr.write(traceback.format_exc())
    return 1


def valid_text(text: str) -> str:
    """`text` with what is not valid Unicode (undecodable bytes of argv or a terminal, lone surrogates)
    replaced by U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def check_threads(threads: int) -> None:
    """A thread count beyond the CPUs this process may run on is refused (PoCL aborts on a large one)."""
    from perfx.engine.bench.probes import default_threads

    if threads > default_threads():
        raise PerfxError(f"-t {threads} is more threads than the {default_threads()} CPUs this process may use; "
                         f"give at most {default_threads()}")


app = App(
    name="perfx",
    help="Run LLaMA-family models on phones, desktops and servers: one OpenCL engine, with a NumPy reference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False)


def _flags_without_metavar() -> None:
    """Flags (--raw, --json, -h) take no value, so their help shows none (typer would print <bool>)."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None:       # a typer without this hook shows its own help for flags
        return
    TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else shown(self, ctx)


_flags_without_metavar()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"perfx {version(DISTRIBUTION)}")
        except PackageNotFoundError:
            print("perfx (not installed: run from a source tree)")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="Print perfx's version and exit."),
          debug: bool = typer.Option(False, "--debug", help=f"Show the full Python trace of an unexpected error "
                                                            f"(also {DEBUG_VARIABLE}=1).")):
    """Run LLaMA-family models on phones, desktops and servers: one OpenCL engine, with a NumPy reference."""
    if debug:
        os.environ[DEBUG_VARIABLE] = "1"

ModelOpt = typer.Option(None, "-m", "--model", help="Registry name, model file or hf:ORG/REPO/FILE.gguf (default: the registry's default).")
DeviceOpt = typer.Option("auto", "--device", help="auto | numpy | opencl | cpu | gpu | opencl:P:D (see `perfx devices`).")
ThreadsOpt = typer.Option(None, "-t", "--threads", min=1, help="CPU threads for an OpenCL CPU device (PoCL).")
CtxOpt = typer.Option(None, "-c", "--ctx", min=1, help="Context length in tokens (default: 2048, at most the model's).")


def command(fn):
    """Turns engine errors into a one-line message, any other exception into one line asking for a
    report, and Ctrl-C into a quiet exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PerfxError as e:
            error_line(str(e))
            if debugging():
                sys.stderr.write(traceback.format_exc())
            raise typer.Exit(1)
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)
        except (typer.Exit, ClickException, BrokenPipeError):
            raise
        except Exception as e:
            raise typer.Exit(unexpected(e))

    return app.command()(wrapper)


def load(model: Optional[str], device: str, ctx: Optional[int], threads: Optional[int] = None):
    from perfx.engine.llm import load_model

    if threads is not None:
        check_threads(threads)
        from perfx.engine.backends.opencl.devices import set_cpu_threads

        set_cpu_threads(threads)
    with err.status("loading model…", spinner="dots") if sys.stderr.isatty() else nullcontext() as status:
        def kernels(what: str, done: int, total: int) -> None:
            if status is not None:         # a spinner on a terminal
                status.update(f"{what} {done}/{total}…")
            elif done == 0:
                err.print(f"[dim]{what}…[/]")

        llm = load_model(model, device=device, ctx=ctx, progress=True, kernels=kernels)
    for notice in llm.notices:
        err.print(f"[dim]{escape(notice)}[/]")
    return llm


@command
@sampling_options
def run(
    prompt: str = typer.Argument(..., help="The prompt; '-' reads it from standard input."),
    model: Optional[str] = ModelOpt,
    n: int = typer.Option(256, "-n", "--n-predict", min=0, help="Most tokens to generate (0: read the prompt only)."),
    sampling=None,  # --temp, --top-k, ... (perfxcli.sampling)
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is, without the chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print the reply as one JSON object (ids, text, timings)."),
    as_jsonl: bool = typer.Option(False, "--jsonl", help="Stream JSON lines: one a token, then the whole reply."),
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    ctx: Optional[int] = CtxOpt,
):
    """Generate a reply to one prompt, streamed to standard output."""
    prompt = sys.stdin.read() if prompt == "-" else valid_text(prompt)
    system = None if system is None else valid_text(system)
    sampling = sampling.with_(max_tokens=n)
    llm = load(model, device, ctx, threads)
    tok = llm.tokenizer
    llm.check_text_fits(prompt)
    if raw:
        prompt_ids = tok.encode(prompt, special=False)  # with BOS where the model wants one
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        rendered = llm.chat_template.render(messages)
        llm.check_text_fits(rendered)
        prompt_ids = tok.encode(rendered, special=True)

    gen = llm.stream(prompt_ids, sampling)
    text = []
    for piece in gen:
        text.append(piece.text)
        if as_jsonl and piece.token is not None:
            sys.stdout.write(json.dumps({"id": piece.token, "text": piece.text}) + "\n")
        elif not (as_json or as_jsonl):
            sys.stdout.write(piece.text)
        sys.stdout.flush()
    s = gen.stats
    if as_json or as_jsonl:
        print(json.dumps({"done": True, "prompt_ids": prompt_ids, "ids": gen.tokens, "text": "".join(text),
                          "device": llm.device, "timings": s.to_dict()}))
    else:
        sys.stdout.write("\n")
        rate = f", {s.gen_tps:.1f} tok/s" if s.gen_tokens > 1 else ""    # one token has no rate
        if n == 0:
            err.print("[dim]-n 0: the prompt was read, nothing generated[/]")
        err.print(f"[dim]prompt {s.prompt_tokens} tok, {s.prompt_tps:.1f} tok/s · "
                  f"reply {s.gen_tokens} tok{rate} · {llm.device}[/]", soft_wrap=True)


@command
def perplexity(
    file: Path = typer.Argument(..., help="A text file."),
    model: Optional[str] = ModelOpt,
    ctx: int = typer.Option(512, "-c", "--ctx", help="Window length in tokens."),
    chunks: Optional[int] = typer.Option(None, "--chunks", min=1, help="Score at most this many windows."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
):
    """Perplexity of a model on a text file, as llama-perplexity measures it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from perfx.engine.perplexity import perplexity as measure

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PerfxError(f"cannot read {file} as UTF-8 text: {e}") from None
    llm = load(model, device, ctx, threads)
    columns = [TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[ppl]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True, disable=as_json or not err.is_terminal) as progress:
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
    name: Optional[str] = typer.Argument(None, help="Registry name or hf:ORG/REPO/FILE.gguf (default: the default model)."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash a file already downloaded."),
):
    """Fetch a model into the model cache, resuming an unfinished download (a no-op when it is there)."""
    from perfx.engine.hub import download as dl
    from perfx.engine.hub.registry import load_registry

    registry = load_registry()
    entry = registry.get(name or registry.default)
    path = dl.ensure(entry, progress=True)
    if verify and not dl.verify(entry):
        raise PerfxError(f"{path} does not match its sha256; run `perfx rm {entry.name}` and download it again")
    print(path)


@command
def devices(
    measure: bool = typer.Option(True, "--measure/--no-measure", help="Measure copy bandwidth (once; cached)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
):
    """List OpenCL platforms and devices, with their measured copy bandwidth."""
    from perfx.cli.devices_cmd import devices_command

    devices_command(measure=measure, as_json=as_json)


# Commands in their own modules register themselves on `app`.
from perfx.cli import bench, chat, convert, models_cmd, serve, tune_cmd  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
