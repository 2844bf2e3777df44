"""Two `perfx serve` replicas behind HAProxy (docs/haproxy.cfg, as docs/serving.md runs it), on loopback:
requests are spread over both, and a stopped replica is routed around."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from perfx.engine.serving.metrics import parse
from tests.test_cli import ROOT

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def answered(url: str, route: str) -> int:
    """Requests to `route` a replica answered with 200, from its /metrics."""
    samples = parse(httpx.get(url + "/metrics").text)
    return int(sum(v for (name, labels), v in samples.items()
                   if name == "perfx_requests_total" and dict(labels) == {"route": route, "code": "200"}))


def completions(url: str) -> int:
    return answered(url, "/v1/completions")


def test_requests_spread_and_a_stopped_replica_is_routed_around(tiny_gguf) -> None:
    path, *_ = tiny_gguf
    ports = {"a": free_port(), "b": free_port()}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    replicas = {name: subprocess.Popen(
        [sys.executable, "-m", "perfx.cli", "serve", "-m", str(path), "--device", "numpy", "-c", "64",
         "--port", str(port), "--alias", "*"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        for name, port in ports.items()}
    proxy_port = free_port()
    proxy = subprocess.Popen([HAPROXY, "-f", str(ROOT / "docs/haproxy.cfg")], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env={**env, "PERFX_PROXY": f"127.0.0.1:{proxy_port}",
                                                           "PERFX_REPLICA_A": f"127.0.0.1:{ports['a']}",
                                                           "PERFX_REPLICA_B": f"127.0.0.1:{ports['b']}"})
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    body = {"model": "any-name", "prompt": "the thin", "max_tokens": 3, "temperature": 0}
    try:
        for name, url in urls.items():
            wait_for(lambda url=url: httpx.get(url + "/health").status_code == 200, 90, f"replica {name}")
        wait_for(lambda: httpx.get(proxy_url + "/health").status_code == 200, 10, "the proxy")
        # Both replicas in rotation: a health check of the proxy's answered by each after it was up (rise 1)
        seen = {name: answered(url, "/health") for name, url in urls.items()}
        wait_for(lambda: all(answered(url, "/health") > seen[name] + 1 for name, url in urls.items()), 15,
                 "the proxy's health checks of both replicas")

        served = [httpx.post(proxy_url + "/v1/completions", json=body, timeout=30) for _ in range(6)]
        assert all(r.status_code == 200 for r in served), [r.text for r in served]
        assert sorted(r.headers["X-Perfx-Replica"] for r in served) == ["a"] * 3 + ["b"] * 3
        assert {name: completions(url) for name, url in urls.items()} == {"a": 3, "b": 3}
        texts = {r.json()["choices"][0]["text"] for r in served}
        assert len(texts) == 1                     # same model, greedy: the same reply from both

        replicas["a"].send_signal(signal.SIGTERM)
        replicas["a"].wait(timeout=30)
        after = [httpx.post(proxy_url + "/v1/completions", json=body, timeout=30) for _ in range(4)]
        assert [r.status_code for r in after] == [200] * 4
        assert [r.headers["X-Perfx-Replica"] for r in after] == ["b"] * 4
        assert completions(urls["b"]) == 7
    finally:
        for process in (*replicas.values(), proxy):
            if process.poll() is None:
                process.terminate()
        for process in (*replicas.values(), proxy):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
