"""perfx bench: llama-bench's tests and tables, with memory, bandwidth, and llama.cpp side by side.

Tests are named as llama-bench names them: `ppP` is a prompt of P tokens from an empty cache, `tgN`
the decode of N tokens one at a time from an empty cache, `ppP+tgN` both (t/s counts all P + N
tokens). Tokens are random and drawn before the clock starts. llama.cpp decodes each generated step
from a random token and samples nothing, as llama-bench does; perfx generates greedily as `perfx chat`
at temperature 0 does: each step's input is the argmax of the step before, which never leaves the
device, and one int per token is read back while the next step is already enqueued. Each test runs once
to warm up, then `reps` times, timed; t/s is reported as mean ± sample standard deviation.

Every (model, device, threads) combination runs in fresh worker processes, one per engine: PoCL
fixes its thread count when OpenCL starts, and each engine's peak RSS must be its own. With llama.cpp
alongside (llama-cpp-python, on the same GGUF file and thread count) the engines take turns: warm-up
A, warm-up B, then A B A B ...

One module per job, in the order a run uses them:

    spec.py      the tests (ppP, tgN, ppP+tgN), the models, BenchConfig and its combinations
    probes.py    the system: CPUs, load, peak RSS, the build measured
    engines.py   perfx and llama-cpp-python, each timing one test (peer.py: a llama-bench binary)
    worker.py    each engine in its own process, driven over JSON lines
    runner.py    run_bench: every combination's tests, the engines taking turns
    results.py   samples, engine info, one Result per row
    formats.py   json, jsonl, csv (llama-bench's records); markdown.py: the table and its footer
    profile.py   --profile: the launch budget per token, per kernel, from the backend's profiling

    from perfx.engine.bench import formats, runner, spec

    config = spec.BenchConfig(models=[spec.describe_model("smollm2-135m-instruct")],
                              tests=spec.expand_tests([512], [128]))
    print(formats.format_run(runner.run_bench(config), "md"))
"""
