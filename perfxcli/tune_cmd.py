"""`perfx tune`: tunes the matrix-product kernels for this device (engine/backends/opencl/tuner.py)
and stores the result where every later run on the device reads it."""
from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from perfx.cli.main import ThreadsOpt, check_threads, command

err = Console(stderr=True, highlight=False)


def _us(seconds: float | None) -> str:
    return "fails" if seconds is None else f"{seconds * 1e6:,.0f} us"


@command
def tune(
    device: str = typer.Option("auto", "--device", help="The device to tune: auto | opencl | cpu | gpu | opencl:P:D."),
    kernels: str = typer.Option("gemv,few,tiled", "--kernels", help="Kernel groups to tune: gemv, few, tiled, reg."),
    budget: float = typer.Option(300.0, "--budget", min=1, help="Seconds to spend searching, at most."),
    model: Optional[str] = typer.Option(None, "-m", "--model", help="Time the products of this model "
                                        "(registry name or file; default: SmolLM2-135M's shapes)."),
    threads: Optional[int] = ThreadsOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the result without writing it."),
):
    """Tune the matrix-product kernels for a device: every candidate checked against NumPy, the fastest kept."""
    if threads is not None:
        check_threads(threads)
        from perfx.engine.backends.opencl.devices import set_cpu_threads

        set_cpu_threads(threads)
    from perfx.engine.backends.opencl.devices import select
    from perfx.engine.backends.opencl.tuner import SMOLLM2_SHAPES, Tuner, check_groups, model_shapes

    groups = [k.strip() for k in kernels.split(",") if k.strip()]
    check_groups(groups)
    shapes, label = SMOLLM2_SHAPES, "SmolLM2-135M"
    if model is not None:
        from perfx.engine.formats.loader import open_model
        from perfx.engine.hub.registry import resolve

        path, _ = resolve(model, progress=True)
        shapes, label = model_shapes(open_model(path).config), path.name
    selection = select("opencl" if device == "auto" else device)
    tuner = Tuner(selection, shapes)
    err.print(f"tuning {selection.info.id} {selection.info.name} on {label}'s products "
              f"({', '.join(f'{n}x{k}' for n, k in shapes)}), at most {budget:g} s")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("[dim]{task.fields[best]}[/]"))
    with Progress(*columns, console=err, transient=False) as progress:
        tasks: dict[str, int] = {}

        def step(group: str, done: int, total: int, best_s: float | None, best: dict) -> None:
            if group not in tasks:
                tasks[group] = progress.add_task(group, total=total, best="")
            progress.update(tasks[group], completed=done, best=f"best {_us(best_s)}")

        result = tuner.run(groups, budget, step, write=not dry_run)
    for g in result.groups:
        if not g.tried:
            print(f"{g.group:6} T={g.tokens:<4} not searched: the budget was spent (raise --budget)")
            continue
        gain = f"{g.speedup:.2f}x" if g.speedup else ("now runs" if g.after_s else "no candidate ran")
        print(f"{g.group:6} T={g.tokens:<4} {_us(g.before_s)} -> {_us(g.after_s)}  {gain}  "
              f"({g.worked} of {g.tried} candidates right)  {g.chosen}")
    if result.path is not None:
        print(f"written to {result.path}: later runs on this device use it")
    elif dry_run:
        print(f"not written (--dry-run): {result.params}")
