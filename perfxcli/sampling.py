"""The sampling flags of `perfx run` and `perfx chat`, made from engine.sampler.OPTIONS.

    @command
    @sampling_options
    def run(prompt: str = ..., sampling: Sampling = None): ...

adds --temp, --top-k, --top-p, --min-p, --repeat-penalty and --seed to the command and hands it
one checked Sampling; a value outside its range is a one-line error that names the flag.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import typer

from perfx.engine.errors import PerfxError
from perfx.engine.sampler import OPTIONS, Sampling, SamplingError

FLAGS = [o for o in OPTIONS if o.flag]


def sampling_options(fn):
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if p.name != "sampling"]
    params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY,
                                 default=typer.Option(o.default, o.flag, help=o.help),
                                 annotation=Optional[o.type] if o.optional else o.type) for o in FLAGS]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        values = {o.name: kwargs.pop(o.name) for o in FLAGS}
        try:
            sampling = Sampling(**values)
        except SamplingError as e:
            raise PerfxError(f"{e.option.flag} {e.problem} (got {e.value})") from None
        return fn(*args, sampling=sampling, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)
    return wrapper
