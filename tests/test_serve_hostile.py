"""`perfx serve` against hostile and careless clients: a real server process on a loopback port.

One client's sampling values, body, JSON or connections must never harm another's request; a bad
start (port, key) is one line before the model loads.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from test_serve import MODEL, QUESTIONS, chat_ids, greedy, running, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "clé-ünï-🔑"                      # not ASCII: compared as UTF-8 bytes
AUTH = {"Authorization": b"Bearer " + KEY.encode()}
CTX = 256
MAX_BODY_MB = 8
HEADER_TIMEOUT = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def few_files() -> None:
    """The server process may open 1024 files, a common default: 1100 connections would exhaust them."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def perfx(*args: str, env: dict | None = None, stderr=subprocess.PIPE, preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "perfx.cli", *args], stdout=subprocess.DEVNULL, stderr=stderr,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            preexec_fn=preexec_fn)


class Served:
    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.url, self.log = process, f"http://127.0.0.1:{port}", log

    def post(self, path: str, body, headers: dict | None = None, timeout: float = 120):
        content = json.dumps(body).encode() if isinstance(body, dict) else body
        return httpx.post(self.url + path, content=content, timeout=timeout,
                          headers={**AUTH, "content-type": "application/json", **(headers or {})})

    def chat(self, question: str, n: int, **extra) -> dict:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": n,
                "temperature": 0, **extra}
        return self.post("/v1/chat/completions", body)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    def health(self, timeout: float = 5) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture(scope="module")
def served(default_model_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    process = perfx("serve", "-m", str(default_model_path), "--device", "numpy", "--ctx", str(CTX),
                    "--port", str(port), "--max-batch", "4", "--max-body-mb", str(MAX_BODY_MB),
                    "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(HEADER_TIMEOUT),
                    env={"PERFX_API_KEY": KEY}, stderr=log.open("w"), preexec_fn=few_files)
    server = Served(process, port, log)
    try:
        assert wait_until(server.health, timeout=120), log.read_text()
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)


def assert_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param:
        assert error["param"] == param, error
    return error


# ---------------------------------------------------------------------- sampling values

@pytest.mark.model
def test_a_nan_making_request_beside_a_stream_leaves_the_stream_exact(served):
    n, story = 8, "Tell me a long story about a dragon."
    sequential = served.chat(story, n).json()["choices"][0]
    body = {"messages": [{"role": "user", "content": story}], "max_tokens": n,
            "temperature": 0, "stream": True}
    pieces, finish, others = [], [], []

    def hostile() -> None:
        for temperature in (1e-307, 5e-324):
            others.append(served.chat(QUESTIONS[0], 2, temperature=temperature, seed=3))

    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        thread = None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk["choices"]:
                pieces.append(chunk["choices"][0]["delta"].get("content") or "")
                finish.append(chunk["choices"][0]["finish_reason"])
            if thread is None:                # the stream is in the batch: now the hostile requests join it
                thread = threading.Thread(target=hostile)
                thread.start()
        thread.join()
    assert "".join(pieces) == sequential["message"]["content"] and finish[-1] == sequential["finish_reason"]
    greedy_text = served.chat(QUESTIONS[0], 2).json()["choices"][0]["message"]["content"]
    for response in others:                   # a tiny temperature is greedy, not NaN
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == greedy_text


@pytest.mark.model
@pytest.mark.parametrize("field, value", [("temperature", 2.5), ("temperature", -1e-307), ("seed", -1),
                                          ("seed", 2**64), ("top_p", 0), ("min_p", 1), ("top_k", -1),
                                          ("repetition_penalty", 0)])
def test_out_of_range_sampling_values_get_400(served, field, value):
    assert_error(served.chat(QUESTIONS[0], 4, **{field: value}), 400, field)


@pytest.mark.model
def test_a_failing_sequence_ends_alone(default_model_path, monkeypatch):
    """A fault injected into one sequence's sampling, then into the model step that holds it: that request
    fails, its batch-mates finish exactly as alone."""
    from perfx.engine import load_model
    from perfx.engine.sampler import Sampler

    llm = load_model(default_model_path, device="numpy", ctx=CTX)
    reference = greedy(llm, chat_ids(llm, QUESTIONS[2]), 8)
    poison = llm.tokenizer.encode("zebra", special=False)[-1]
    call, forward = Sampler.__call__, llm.transformer.forward_paged

    def sample(self, logits, history=()):
        if self.s.seed == 666:
            raise RuntimeError("injected sampling fault")
        return call(self, logits, history)

    def forward_paged(ids, batch):
        if poison in ids.tolist():
            raise RuntimeError("injected step fault")
        return forward(ids, batch)

    monkeypatch.setattr(Sampler, "__call__", sample)
    monkeypatch.setattr(llm.transformer, "forward_paged", forward_paged)
    with running(llm, api_key=None, max_batch=4) as server:
        def normal():
            body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTIONS[2]}], "max_tokens": 8,
                    "temperature": 0}
            return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)

        def bad_sampling():
            body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.7, "seed": 666}
            return httpx.post(server.url + "/v1/completions", json=body, timeout=120)

        def bad_step():
            body = {"model": MODEL, "prompt": [1, 2, poison, 3] * 8, "max_tokens": 4}
            return httpx.post(server.url + "/v1/completions", json=body, timeout=120)

        results: dict[str, httpx.Response] = {}
        threads = [threading.Thread(target=lambda f=f: results.__setitem__(f.__name__, f()))
                   for f in (normal, bad_sampling, bad_step)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["normal"].status_code == 200, results["normal"].text
        assert results["normal"].json()["choices"][0]["message"]["content"] == reference
        assert "injected sampling fault" in assert_error(results["bad_sampling"], 500)["message"]
        assert "injected step fault" in assert_error(results["bad_step"], 500)["message"]
        assert server.scheduler.counters.finished["error"] == 2
        assert wait_until(lambda: server.scheduler.blocks.n_free == server.scheduler.blocks.n_blocks)


# ---------------------------------------------------------------------- bodies and prompts

@pytest.mark.model
def test_an_oversized_body_gets_413(served):
    body = b'{"model": "x", "prompt": "' + b"a" * (MAX_BODY_MB * 1_000_000 + 1000) + b'"}'
    error = assert_error(served.post("/v1/completions", body), 413)
    assert "--max-body-mb" in error["message"]
    chunked = iter([b'{"prompt": "', b"b" * (MAX_BODY_MB * 1_000_000), b'"}'])  # no Content-Length
    assert_error(served.post("/v1/completions", chunked), 413)
    assert served.health()


@pytest.mark.model
def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(served):
    before = served.peak_rss_mb()
    text = "word " * 1_000_000                # 5 MB of text: tokenized in full, it would cost gigabytes
    started = time.monotonic()
    for path, body in [("/v1/completions", {"prompt": text}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w "}]
                                                 * 200_000})]:
        assert assert_error(served.post(path, body), 400)["code"] == "context_length_exceeded"
    assert time.monotonic() - started < 10
    assert served.peak_rss_mb() - before < 300, (before, served.peak_rss_mb())
    assert_error(served.post("/v1/completions", {"prompt": [1] * (CTX * 100)}), 400, "prompt")


@pytest.mark.model
@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000,
                                  b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                  b'{"seed": 1' + b"0" * 5000 + b"}",
                                  b'{"prompt": "a\\ud800b", "max_tokens": 2}'])
def test_hostile_json_gets_400(served, body):
    assert_error(served.post("/v1/completions", body), 400)


# ---------------------------------------------------------------------- connections

def half_open(url: str, n: int, body: bool = False) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=10)
        if body:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\"")
        else:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    return socks


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.01)
    try:
        return s.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, socket.timeout, BlockingIOError):
        return False


@pytest.mark.model
def test_half_open_connections_are_dropped_while_health_answers(served):
    socks = half_open(served.url, 1100) + half_open(served.url, 20, body=True)
    try:
        started = time.monotonic()
        for _ in range(5):
            assert served.health(timeout=5), "/health did not answer beside 1120 half-open connections"
        bound = HEADER_TIMEOUT + 8
        assert wait_until(lambda: all(closed_by_server(s) for s in socks), timeout=bound), \
            f"{sum(not closed_by_server(s) for s in socks)} half-open connections still open after {bound} s"
        assert time.monotonic() - started < bound + 1
        assert served.health() and served.process.poll() is None
    finally:
        for s in socks:
            s.close()
    assert served.log.stat().st_size < 100_000, "the server's log floods"


# ---------------------------------------------------------------------- API key and start-up

@pytest.mark.model
def test_api_key_is_compared_as_bytes(served):
    assert httpx.get(served.url + "/v1/models", headers=AUTH).status_code == 200
    wrong = {"Authorization": b"Bearer " + KEY.encode()[:-1] + b"x"}
    assert_error(httpx.get(served.url + "/v1/models", headers=wrong), 401)
    assert_error(httpx.get(served.url + "/v1/models", headers={"Authorization": "Bearer"}), 401)
    assert_error(httpx.get(served.url + "/v1/models", headers={"Authorization": b"Bearer \xff\xfe"}), 401)
    assert_error(httpx.get(served.url + "/v1/models"), 401)


def start_fails(*args: str, env: dict | None = None) -> str:
    """The one line `perfx serve ARGS` fails with; it must fail before the model loads."""
    process = perfx("serve", "--device", "numpy", *args, env=env)
    _, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 1 and len(lines) == 1, stderr
    assert "serving" not in stderr and "Traceback" not in stderr
    return lines[0]


@pytest.mark.model
def test_bad_start_is_one_line_before_the_model_loads():
    assert "--port must be in 0..65535" in start_fails("--port", "99999")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        line = start_fails("--port", str(busy.getsockname()[1]))
        assert "Address already in use" in line and "--port" in line
    assert "--api-key is empty" in start_fails("--api-key", "")
    assert "--api-key is empty" in start_fails(env={"PERFX_API_KEY": ""})
