"""`perfx serve`: the OpenAI client against the server on a loopback port, greedy text equal to
LLM.generate, concurrent requests without cross-talk, KV blocks all given back, bad input answered
with OpenAI-style errors while everyone else is still served."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from perfx.engine import Sampling, load_model  # noqa: E402
from perfx.engine.serving.api import ServerConfig, create_app  # noqa: E402
from perfx.engine.serving.blocks import BlockAllocator  # noqa: E402
from perfx.engine.serving.metrics import parse  # noqa: E402
from perfx.engine.serving.scheduler import Delta, Request, Scheduler, SchedulerConfig  # noqa: E402
from perfx.engine.serving.server import BackgroundServer  # noqa: E402
from perfx.engine.stops import StopMatcher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
KEY = "test-key"
CTX = 512
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.",
             "What is 2+2?", "Who wrote Hamlet?", "Give me a word that rhymes with cat."]


# ---------------------------------------------------------------------- pieces without a model

def test_stop_matcher_holds_back_a_possible_stop():
    stops = StopMatcher(["END", "\n\n"])
    assert stops.push("Hello E") == ("Hello ", False)
    assert stops.push("N") == ("", False)
    assert stops.push("X more") == ("ENX more", False)
    assert stops.push(" then\n") == (" then", False)
    assert stops.push("\nlater") == ("", True)
    tail = StopMatcher(["STOP"])
    assert tail.push("ab ST") == ("ab ", False) and tail.flush() == "ST"


def test_block_allocator_grows_frees_and_counts():
    blocks = BlockAllocator(n_blocks=4, block_size=16)
    assert blocks.grow(1, 17) and blocks.owned[1] == [0, 1]
    assert blocks.grow(2, 16) and not blocks.grow(3, 33) and 3 not in blocks.owned
    assert blocks.grow(1, 32) and blocks.n_free == 1
    np.testing.assert_array_equal(blocks.table([2, 1]), [[2, -1], [0, 1]])
    assert blocks.release(1) == 2 and blocks.release(1) == 0
    assert blocks.grow(3, 48) and blocks.n_free == 0
    blocks.release(2), blocks.release(3)
    assert blocks.n_free == 4 and blocks.allocated_total == blocks.freed_total == 6


def test_serve_without_starlette_says_how_to_install():
    code = ("import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None\n"
            "from perfx.cli.main import app; app(['serve'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "pip install 'perfx-llm[serve]'" in lines[0]


# ---------------------------------------------------------------------- servers on the default model

def chat_ids(llm, question: str) -> list[int]:
    return llm.tokenizer.encode(llm.chat_template.render([{"role": "user", "content": question}]), special=True)


GREEDY: dict[tuple, str] = {}      # (model, prompt, length) -> LLM.generate's greedy text


def greedy(llm, ids: list[int], n: int) -> str:
    """LLM.generate's greedy text, computed once per model, prompt and length."""
    key = (id(llm), tuple(ids), n)
    if key not in GREEDY:
        llm.reset()
        GREEDY[key] = llm.tokenizer.decode(llm.generate(ids, Sampling(temperature=0, max_tokens=n))[0])
    return GREEDY[key]


@contextmanager
def running(llm, api_key: str | None = KEY, **config):
    scheduler = Scheduler(llm, SchedulerConfig(**config))
    with BackgroundServer(create_app(llm, scheduler, ServerConfig(MODEL, api_key))) as server:
        server.scheduler = scheduler
        yield server


def client(server, key: str | None = KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key or "none", max_retries=0, timeout=60)


def metrics(server) -> dict:
    response = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def blocks_in_use(server) -> float:
    return metrics(server)[("perfx_kv_blocks", (("state", "used"),))]


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def chat(c, question: str, n: int, stream: bool = False, **extra) -> str:
    messages = [{"role": "user", "content": question}]
    extra.setdefault("temperature", 0)
    if not stream:
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, **extra)
        return r.choices[0].message.content
    chunks = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, stream=True, **extra)
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


@pytest.fixture(scope="module")
def reference(default_model_path):
    return load_model(default_model_path, device="numpy", ctx=CTX)


@pytest.fixture(scope="module")
def server(default_model_path):
    llm = load_model(default_model_path, device="numpy", ctx=CTX)
    with running(llm, max_batch=8, max_queue=16) as server:
        yield server


@pytest.mark.model
@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_generate(server, reference, stream):
    n = 12
    assert chat(client(server), QUESTIONS[0], n, stream) == greedy(reference, chat_ids(reference, QUESTIONS[0]), n)


@pytest.mark.model
@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_generate(server, reference, stream):
    prompt, n = "The capital of France is", 10
    expected = greedy(reference, reference.tokenizer.encode(prompt, special=False), n)
    c = client(server)
    if stream:
        chunks = c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=n, stream=True)
        text = "".join(ch.choices[0].text for ch in chunks)
    else:
        r = c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=n)
        text = r.choices[0].text
        assert r.usage.completion_tokens == n and r.choices[0].finish_reason == "length"
    assert text == expected


@pytest.mark.model
def test_chat_equals_perfx_run(server):
    question, n = QUESTIONS[1], 12
    result = subprocess.run([sys.executable, "-m", "perfx.cli", "run", question, "--temp", "0", "-n", str(n),
                             "--device", "numpy", "--ctx", str(CTX), "--json"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert chat(client(server), question, n) == json.loads(result.stdout)["text"]


@pytest.mark.model
def test_concurrent_requests_equal_sequential(server, reference):
    n = 12
    expected = [greedy(reference, chat_ids(reference, q), n) for q in QUESTIONS]
    c = client(server)
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        got = list(pool.map(lambda i: chat(c, QUESTIONS[i], n, stream=i % 2 == 1), range(len(QUESTIONS))))
    assert got == expected
    m = metrics(server)
    assert m[("perfx_kv_blocks", (("state", "used"),))] == 0
    assert m[("perfx_kv_blocks_allocated_total", ())] == m[("perfx_kv_blocks_freed_total", ())] > 0
    assert m[("perfx_step_sequences_total", ())] > m[("perfx_steps_total", ())]     # batches of more than one


@pytest.mark.model
def test_usage_stop_strings_and_seed(server):
    c = client(server)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[1]}],
                                  temperature=0, max_tokens=20, stop=["Blue"])
    assert "Blue" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 34 and r.usage.total_tokens == 34 + r.usage.completion_tokens
    sampled = [chat(c, QUESTIONS[2], 8, temperature=0.9, seed=7) for _ in range(2)]
    assert sampled[0] == sampled[1]


def raw_post(server, path: str, body: bytes | dict, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, dict):
        return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)
    return httpx.post(server.url + path, content=body, headers={**headers, "content-type": "application/json"},
                      timeout=timeout)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param:
        assert error["param"] == param


@pytest.mark.model
def test_bad_input_gets_openai_errors(server, reference):
    messages = [{"role": "user", "content": "hi"}]
    assert_error(raw_post(server, "/v1/chat/completions", b'{"model": "x", "messages": ['), 400)
    assert_error(raw_post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": messages}), 404, "model")
    assert_error(raw_post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 10_000}),
                 400, "max_tokens")
    assert_error(raw_post(server, "/v1/completions", {"model": MODEL, "prompt": "word " * CTX}), 400, "prompt")
    assert_error(raw_post(server, "/v1/chat/completions", {"model": MODEL, "messages": []}), 400, "messages")
    assert_error(raw_post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "top_p": 0}), 400)
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="nope", messages=messages)
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=CTX)
    assert chat(client(server), QUESTIONS[0], 12) == greedy(reference, chat_ids(reference, QUESTIONS[0]), 12)


@pytest.mark.model
def test_api_key(server):
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    assert_error(httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(raw_post(server, "/v1/chat/completions", {"model": MODEL}, key="wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client(server).models.list()] == [MODEL]


@pytest.mark.model
def test_metrics_parse(server):
    m = metrics(server)
    names = {name for name, _ in m}
    for name in ("perfx_requests_total", "perfx_generation_tokens_total", "perfx_generation_tokens_per_second",
                 "perfx_batch_occupancy", "perfx_queue_length", "perfx_kv_blocks", "perfx_running_sequences"):
        assert name in names
    assert m[("perfx_requests_total", (("code", "200"), ("route", "/v1/chat/completions")))] >= 1
    assert 0 <= m[("perfx_batch_occupancy", ())] <= 1


@pytest.mark.model
def test_disconnect_mid_stream_frees_blocks(server, reference):
    before = metrics(server).get(("perfx_finished_total", (("reason", "cancelled"),)), 0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTIONS[2]}], "temperature": 0,
            "max_tokens": 400, "stream": True}
    other = ThreadPoolExecutor(1).submit(chat, client(server), QUESTIONS[3], 12)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert response.status_code == 200
        lines = 0
        for line in response.iter_lines():
            lines += line.startswith("data: ")
            if lines == 4:
                break
    assert other.result(timeout=60) == greedy(reference, chat_ids(reference, QUESTIONS[3]), 12)
    assert wait_until(lambda: blocks_in_use(server) == 0)
    assert metrics(server)[("perfx_finished_total", (("reason", "cancelled"),))] == before + 1
    with pytest.raises(httpx.ReadTimeout):           # a client that gives up on a whole-body reply
        raw_post(server, "/v1/chat/completions", {**body, "stream": False}, timeout=1.0)
    assert wait_until(lambda: metrics(server)[("perfx_finished_total", (("reason", "cancelled"),))] == before + 2)
    assert blocks_in_use(server) == 0


@pytest.mark.model
def test_queue_full_gets_429(default_model_path):
    llm = load_model(default_model_path, device="numpy", ctx=256)
    with running(llm, max_batch=1, max_queue=1, step_tokens=64) as server:
        c = client(server)
        first = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[2]}],
                                          temperature=0, max_tokens=200, stream=True)
        next(iter(first))                        # admitted: the batch is full
        second = ThreadPoolExecutor(1).submit(chat, c, QUESTIONS[0], 4)
        assert wait_until(lambda: metrics(server)[("perfx_queue_length", ())] == 1)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        first.close()
        assert second.result(timeout=60) == "The capital of France"
        assert wait_until(lambda: blocks_in_use(server) == 0)


@pytest.mark.model
def test_preemption_keeps_outputs_exact(default_model_path, reference):
    """A pool too small for every sequence at once: the youngest give their blocks back and recompute."""
    llm = load_model(default_model_path, device="numpy", ctx=96)
    scheduler = Scheduler(llm, SchedulerConfig(max_batch=4, block_size=16, kv_tokens=96))
    prompts = [reference.tokenizer.encode(text, special=False)
               for text in ("Once upon a time", "The history of Rome", "In the beginning")]
    n = 40
    requests = [Request(p, Sampling(temperature=0, max_tokens=n)) for p in prompts]

    async def one(request):
        text = ""
        async for event in scheduler.submit(request).events():
            text += event.text if isinstance(event, Delta) else ""
        return text

    async def all_of_them():
        return await asyncio.gather(*(one(r) for r in requests))

    scheduler.start()
    try:
        got = asyncio.run(all_of_them())
    finally:
        scheduler.stop()
    expected = [greedy(reference, p, n) for p in prompts]
    assert got == expected
    assert scheduler.blocks.n_free == scheduler.blocks.n_blocks
    assert scheduler.counters.preemptions > 0


@pytest.mark.model
def test_perfx_serve_command(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "perfx.cli", "serve", "--device", "numpy", "--ctx", "256",
                                "--port", str(port), "--max-batch", "2"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=60), process.stderr.read() if process.poll() is not None else "no answer"
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert chat(c, QUESTIONS[0], 8) == "The capital of France is Paris."
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---------------------------------------------------------------------- the OpenCL CPU backend

@pytest.fixture(scope="module")
def cl_pair(default_model_path):
    pytest.importorskip("pyopencl")
    from perfx.engine.backends.opencl.devices import select
    from perfx.engine.errors import PerfxError

    try:
        device = select("cpu").info.id
    except PerfxError as e:
        pytest.skip(f"no OpenCL CPU device: {e}")
    reference = load_model(default_model_path, device=device, ctx=CTX)
    llm = load_model(default_model_path, device=device, ctx=CTX)
    if not llm.transformer.backend.capabilities.paged_kv:
        pytest.skip("the OpenCL backend has no paged KV cache")
    with running(llm, max_batch=8) as server:
        yield server, reference


@pytest.mark.model
def test_opencl_cpu_equals_generate(cl_pair):
    server, reference = cl_pair
    n = 12
    expected = [greedy(reference, chat_ids(reference, q), n) for q in QUESTIONS]
    c = client(server)
    assert chat(c, QUESTIONS[0], n) == chat(c, QUESTIONS[0], n, stream=True) == expected[0]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        got = list(pool.map(lambda q: chat(c, q, n), QUESTIONS))
    assert got == expected
    assert blocks_in_use(server) == 0
