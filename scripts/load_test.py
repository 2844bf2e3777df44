#!/usr/bin/env python3
"""Bounded load test of `perfx serve`: streams at 1, 4 and 16 at once, on loopback only.

    python scripts/load_test.py --device cpu                 # starts `perfx serve` on a free loopback port
    python scripts/load_test.py --url http://127.0.0.1:8000  # or uses a running one

The server runs in its own process (the client's Python work does not compete with it for one GIL).

Each level sends the same fixed number of greedy streaming chat requests (prompt i is QUESTIONS[i % 16])
with `--concurrency` of them in flight. The first level runs one at a time, so its replies are each
prompt's sequential greedy result; every reply of every level must equal it (no cross-talk between
sequences). At the end the server's /metrics must show every KV block free and as many blocks given
back as handed out. Prints aggregate tokens/s per level; exits 1 on a mismatch, a leak, an error or
the time limit.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perfx.engine.serving.metrics import parse  # noqa: E402

QUESTIONS = [
    "Write a short story about a dragon.", "Explain how rain forms.", "Describe the city of Paris.",
    "Why is the sky blue?", "Write a poem about the sea.", "Explain photosynthesis to a child.",
    "What makes a good friend?", "Describe your ideal weekend.", "How do airplanes fly?",
    "Tell me about the history of Rome.", "Write a letter to a pen pal.", "Explain how a computer works.",
    "What are the benefits of exercise?", "Describe a forest in autumn.", "How do bees make honey?",
    "Write a recipe for pancakes.",
]


@dataclass
class Reply:
    index: int
    text: str
    tokens: int
    ttft_s: float


@dataclass
class Level:
    concurrency: int
    replies: list[Reply]
    wall_s: float
    mean_batch: float

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.replies)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def stream_chat(client: httpx.AsyncClient, model: str, index: int, max_tokens: int) -> Reply:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, parts, tokens = None, [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"request {index}: HTTP {response.status_code} {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"request {index}: {chunk['error']['message']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    parts.append(choice["delta"]["content"])
    return Reply(index, "".join(parts), tokens, ttft or 0.0)


async def metrics(client: httpx.AsyncClient) -> dict:
    response = await client.get("/metrics")
    response.raise_for_status()
    return parse(response.text)


async def run_level(client: httpx.AsyncClient, model: str, concurrency: int, n_requests: int,
                    max_tokens: int) -> Level:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Reply:
        async with gate:
            return await stream_chat(client, model, i, max_tokens)

    before = await metrics(client)
    t0 = time.perf_counter()
    replies = await asyncio.gather(*(one(i) for i in range(n_requests)))
    wall = time.perf_counter() - t0
    after = await metrics(client)
    steps = after[("perfx_steps_total", ())] - before[("perfx_steps_total", ())]
    seqs = after[("perfx_step_sequences_total", ())] - before[("perfx_step_sequences_total", ())]
    return Level(concurrency, list(replies), wall, seqs / steps if steps else 0.0)


async def load_test(url: str, api_key: str | None, levels: list[int], n_requests: int, max_tokens: int) -> int:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(levels) + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        models = (await client.get("/v1/models")).raise_for_status().json()
        model = models["data"][0]["id"]
        results = [await run_level(client, model, c, n_requests, max_tokens) for c in levels]
        final = await metrics(client)

    failures = []
    sequential = {r.index % len(QUESTIONS): r.text for r in results[0].replies}
    for level in results:
        for r in level.replies:
            expected = sequential.get(r.index % len(QUESTIONS))
            if expected is not None and r.text != expected:
                same = next((i for i, (x, y) in enumerate(zip(r.text, expected)) if x != y),
                            min(len(r.text), len(expected)))
                failures.append(f"concurrency {level.concurrency}, request {r.index}: differs from the sequential "
                                f"reply after {same} equal characters ...{expected[max(0, same - 40):same]!r}: "
                                f"{r.text[same:same + 30]!r} instead of {expected[same:same + 30]!r}")
    used = final[("perfx_kv_blocks", (("state", "used"),))]
    handed, returned = final[("perfx_kv_blocks_allocated_total", ())], final[("perfx_kv_blocks_freed_total", ())]
    if used or handed != returned:
        failures.append(f"KV blocks leaked: {used:g} in use, {handed:g} handed out, {returned:g} given back")

    print(f"model {model} · {n_requests} streaming requests per level · max_tokens {max_tokens} · greedy")
    print("| concurrent streams | requests | tokens | wall s | aggregate tok/s | mean batch | mean TTFT s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for level in results:
        ttft = sum(r.ttft_s for r in level.replies) / len(level.replies)
        print(f"| {level.concurrency} | {len(level.replies)} | {level.tokens} | {level.wall_s:.2f} | "
              f"{level.tokens_per_s:.1f} | {level.mean_batch:.2f} | {ttft:.2f} |")
    checked = sum(len(level.replies) for level in results)
    print(f"replies equal to their sequential greedy result: {checked - len(failures)}/{checked} · "
          f"KV blocks in use at the end: {used:g} ({handed:g} handed out, {returned:g} given back)")
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (loopback only); without it, one is started here")
    p.add_argument("--api-key", help="the server's --api-key")
    p.add_argument("-m", "--model", help="model to serve (default: the registry's default)")
    p.add_argument("--device", default="auto", help="device of the server started here")
    p.add_argument("-t", "--threads", type=int, help="CPU threads for an OpenCL CPU device")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated stream counts; the first must be 1")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=600, help="seconds for the whole test")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if levels[0] != 1:
        p.error("the first level must be 1: its replies are the sequential results the others are checked against")
    if args.requests < len(QUESTIONS):
        p.error(f"--requests must be at least {len(QUESTIONS)} so every prompt has its sequential result")

    server = None
    url = args.url
    if url is None:
        server, url = start_server(args)
    elif not loopback(url):
        p.error(f"{url} is not a loopback address; the load test only talks to this machine")
    try:
        return asyncio.run(asyncio.wait_for(
            load_test(url, args.api_key, levels, args.requests, args.max_tokens), args.time_limit))
    except asyncio.TimeoutError:
        print(f"FAIL the load test ran past --time-limit {args.time_limit:g} s", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def start_server(args) -> tuple[subprocess.Popen, str]:
    """`perfx serve` on a free loopback port, once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "perfx.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--device", args.device, "--ctx", str(args.ctx), "--max-batch", str(args.max_batch),
               "--max-queue", str(max(64, args.requests))]
    for flag, value in (("-m", args.model), ("-t", args.threads), ("--api-key", args.api_key)):
        if value is not None:
            command += [flag, str(value)]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.2)
    server.terminate()
    sys.exit(f"FAIL `perfx serve` did not come up on {url}")


if __name__ == "__main__":
    sys.exit(main())
