#!/usr/bin/env python3
"""perfx against llama.cpp (llama-cpp-python) on the same GGUF file, alternating A B A B in one process.

    python scripts/compare_llamacpp.py [-m MODEL] [--device cpu] [-t 1,2] [-r 5] [-p 512] [-n 128]

Tests as llama-bench runs them: ppP is the prefill of P random tokens from an empty cache, tgN the
decode of N tokens one at a time from an empty cache. One warm-up each, then -r timed repetitions
alternating between the engines; the median is reported. Each thread count runs in its own process
(PoCL reads its thread count when OpenCL starts).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np


def worker(args) -> None:
    from llama_cpp import Llama

    from engine.llm import load_model

    perfx = load_model(args.model, device=args.device, ctx=args.p + args.n + 8)
    path = str(perfx.path)
    llama = Llama(path, n_ctx=args.p + args.n + 8, n_batch=args.p, n_threads=args.threads,
                  n_threads_batch=args.threads, verbose=False)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, perfx.config.vocab_size, size=args.p).tolist()

    def perfx_pp() -> float:
        perfx.reset()
        t = time.perf_counter()
        perfx.transformer.next_token(np.asarray(prompt), 0)
        return time.perf_counter() - t

    def perfx_tg() -> float:
        perfx.reset()
        token = prompt[0]
        t = time.perf_counter()
        for pos in range(args.n):
            token = perfx.transformer.next_token(np.asarray([token]), pos)
        return time.perf_counter() - t

    def llama_pp() -> float:
        llama.reset()
        t = time.perf_counter()
        llama.eval(prompt)
        return time.perf_counter() - t

    def llama_tg() -> float:
        llama.reset()
        token = prompt[0]
        t = time.perf_counter()
        for _ in range(args.n):
            llama.eval([token])
            token = int(np.argmax(llama.scores[llama.n_tokens - 1]))
        return time.perf_counter() - t

    tests = {f"pp{args.p}": (args.p, perfx_pp, llama_pp), f"tg{args.n}": (args.n, perfx_tg, llama_tg)}
    results = []
    for test, (tokens, a, b) in tests.items():
        a(), b()                                    # warm-up
        samples = {"perfx": [], "llama.cpp": []}
        for _ in range(args.r):
            samples["perfx"].append(tokens / a())
            samples["llama.cpp"].append(tokens / b())
        for engine, ts in samples.items():
            results.append({"engine": engine, "test": test, "threads": args.threads, "device": perfx.device
                            if engine == "perfx" else "llama.cpp CPU", "median_ts": statistics.median(ts),
                            "samples_ts": ts})
    print(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("-t", "--threads", default="1,2")
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.threads = int(args.threads)
        return worker(args)

    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        env = {**os.environ, "POCL_MAX_PTHREAD_COUNT": str(threads), "OMP_NUM_THREADS": str(threads),
               "OPENBLAS_NUM_THREADS": str(threads)}
        cmd = [sys.executable, __file__, "--worker", "-t", str(threads), "-r", str(args.r), "-p", str(args.p),
               "-n", str(args.n), "--device", args.device] + (["-m", args.model] if args.model else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "worker failed")
        rows += json.loads(out.stdout.strip().splitlines()[-1])

    print(f"| engine | device | threads | test | t/s (median of {args.r}) | perfx / llama.cpp |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for r in rows:
        peer = next(p for p in rows if p["engine"] == "llama.cpp" and p["test"] == r["test"]
                    and p["threads"] == r["threads"])
        ratio = f"{r['median_ts'] / peer['median_ts']:.2f}x" if r["engine"] == "perfx" else ""
        print(f"| {r['engine']} | {r['device']} | {r['threads']} | {r['test']} | {r['median_ts']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
