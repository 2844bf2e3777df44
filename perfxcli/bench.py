"""`perfx bench`: llama-bench's tests and table, with memory, bandwidth and llama.cpp side by side."""
from __future__ import annotations

import sys
from typing import List, Optional

import typer

from perfx.engine.errors import PerfxError
from perfx.cli.main import check_threads, command, err

VS_CHOICES = ("llama.cpp",)


@command
def bench(
    model: Optional[str] = typer.Option(
        None, "-m", "--model", help="Registry names or model files, comma-separated (default: the default model)."),
    synthetic: Optional[str] = typer.Option(
        None, "--synthetic", help="Shapes to run with random int4 weights instead of a file, comma-separated: "
                                  "llama-7b, llama-3-8b, smollm2-135m, tiny."),
    n_prompt: str = typer.Option(
        "512", "-p", "--n-prompt", help="Prompt lengths (ppP tests), comma-separated; 0: none."),
    n_gen: str = typer.Option(
        "128", "-n", "--n-gen", help="Generation lengths (tgN tests), comma-separated; 0: none."),
    pg: Optional[List[str]] = typer.Option(
        None, "-pg", help="A prompt then a generation, 'P,N' (a ppP+tgN test); may be repeated."),
    reps: int = typer.Option(5, "-r", "--repetitions", help="Timed runs of each test, after one warm-up."),
    threads: Optional[str] = typer.Option(
        None, "-t", "--threads", help="CPU threads, comma-separated (default: every CPU of this process)."),
    device: str = typer.Option(
        "auto", "--device", help="Devices, comma-separated: auto | numpy | opencl | cpu | gpu | opencl:P:D."),
    output: str = typer.Option("md", "-o", "--output", help="md | json | jsonl | csv (to standard output)."),
    vs: Optional[str] = typer.Option(
        None, "--vs", help="Also run the tests through llama.cpp (llama-cpp-python), alternating: --vs llama.cpp."),
    llama_bench: Optional[str] = typer.Option(
        None, "--llama-bench", help="With --vs llama.cpp: a llama-bench binary (a GPU build, say) as the peer."),
    llama_fa: int = typer.Option(1, "--llama-fa", min=0, max=1, help="The llama-bench peer's flash attention (-fa)."),
    ctx: int = typer.Option(2048, "--ctx", help="Context each model is loaded with (raised to the longest test)."),
    cooldown: float = typer.Option(0.0, "--cooldown", min=0.0, max=3600.0,
                                   help="Seconds to rest before each timed run (phones: thermal throttling)."),
    profile: bool = typer.Option(
        False, "--profile", help="Then perfx's launch budget per token, per kernel, from OpenCL profiling events: "
                                 "a prefill of the first -p and decode of the first -n after it."),
):
    """Measure prompt and generation speed as llama-bench does, with memory and bandwidth."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from perfx.engine.bench import formats, runner, spec
    from perfx.engine.bench.probes import default_threads

    output = output.strip().lower()
    if output not in formats.FORMATS:
        raise PerfxError(f"unknown output format '{output}' (choose from: {', '.join(formats.FORMATS)})")
    if vs is not None and vs.strip().lower() not in VS_CHOICES:
        raise PerfxError(f"--vs takes {', '.join(VS_CHOICES)}, got '{vs}'")
    tests = spec.expand_tests(spec.parse_ints(n_prompt, "-p"), spec.parse_ints(n_gen, "-n"),
                              [spec.parse_pg(x) for x in pg or []])
    config = spec.BenchConfig(
        models=[],
        tests=tests,
        devices=spec.parse_list(device, "--device"),
        threads=spec.parse_ints(threads, "-t", minimum=1) if threads is not None else [default_threads()],
        reps=reps,
        ctx=ctx,
        vs_llama_cpp=vs is not None,
        cooldown=cooldown,
        llama_bench=llama_bench,
        llama_fa=llama_fa,
        profile=profile,
    )
    if llama_bench is not None:
        from perfx.engine.bench.peer import check_binary

        if vs is None:
            raise PerfxError("--llama-bench is the peer of --vs llama.cpp: add --vs llama.cpp")
        config.llama_bench = check_binary(llama_bench)
    elif vs is not None and not spec.llama_cpp_available():
        raise PerfxError(spec.INSTALL_HINT)
    if synthetic is not None:
        names = spec.parse_list(synthetic, "--synthetic")
        if vs is not None:           # llama.cpp loads files: the shape as a GGUF of random Q4_0 weights
            from perfx.engine.bench.peer import synthetic_gguf

            config.models += [spec.describe_file(synthetic_gguf(name, config.seed)) for name in names]
        else:
            config.models += [spec.describe_synthetic(name) for name in names]
    if model is not None or synthetic is None:
        names = spec.parse_list(model, "-m") if model is not None else [None]
        config.models += [spec.describe_model(name, progress=True) for name in names]
    config.validate()
    for t in config.threads:
        check_threads(t)
    check_memory(config)

    quiet = output != "md" or not err.is_terminal
    columns = [SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True, disable=quiet) as bar:
        task = bar.add_task("perfx bench", total=config.n_steps)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        run = runner.run_bench(config, progress=progress)
    if not quiet:
        for notice in dict.fromkeys(n for r in run.results for n in r.info.notices):
            err.print(f"[dim]{notice}[/]", soft_wrap=True)
    if run.results or not run.interrupted:
        formats.write(run, output, sys.stdout)
    if run.error:
        raise PerfxError(f"{run.error} ({len(run.results)} of {run.n_tests} tests finished)")
    if run.interrupted:
        err.print(f"interrupted: {len(run.results)} of {run.n_tests} tests finished")
        raise typer.Exit(130)


def check_memory(config) -> None:
    """Refuse a synthetic shape that cannot fit in the memory available now, before building it (a model
    file is checked as it loads): on NumPy its weights are float32, elsewhere int4 as generated."""
    from perfx.engine.memory import check_available, estimate
    from perfx.engine.synthetic import get_shape

    for model in config.models:
        if model.shape is None:
            continue
        shape, ctx = get_shape(model.shape), config.n_ctx(model)
        for device in config.devices:
            numpy = device.strip().lower() == "numpy"
            need = estimate(shape.config(), 4 * shape.n_params if numpy else shape.nbytes, ctx,
                            batch_tokens=None if numpy else 512)
            check_available(need.total, f"--synthetic {model.name} on --device {device} at --ctx {ctx} "
                                        f"({need.describe()})",
                            hint="close apps, or use a smaller --ctx or another --device")
