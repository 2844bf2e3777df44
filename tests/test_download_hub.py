"""Hub downloads (hf:ORG/REPO/FILE), offline: a local server that behaves like the hub (a 302 to a CDN on
another port, X-Linked-Etag / X-Linked-Size) and its CDN (Range requests, a dropped connection)."""
from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from perfx.engine.errors import PerfxError
from perfx.engine.dirs import models_dir
from perfx.engine.hub import download
from perfx.engine.hub.registry import Source, load_registry, local_path, resolve
from tests import test_download
from tests.test_download import PAYLOAD, leftovers, make_entry, send_ranged

home = test_download.home            # the fixture: PERFX_HOME in a temporary directory

class HubServer(ThreadingHTTPServer):
    """A hub (302 from /ORG/REPO/resolve/main/FILE to the CDN, with X-Linked-Etag/X-Linked-Size) or its CDN
    (the blob, with Range support; the first `drops` responses stop half-way)."""

    def __init__(self, files: dict[str, bytes], cdn: HubServer | None = None, drops: int = 0,
                 etag: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files = files
        self.cdn = cdn
        self.drops = drops
        self.etag = etag
        self.requests: list[tuple[str, str, str | None, str | None]] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    server: HubServer

    def answer(self, head: bool) -> None:
        srv = self.server
        srv.requests.append((self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization")))
        if srv.cdn is None:              # the CDN
            data = srv.files.get(self.path.removeprefix("/blobs/"))
            if data is None:
                self.send_error(404)
                return
            if head:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return
            drop = srv.drops > 0
            srv.drops -= drop
            send_ranged(self, data, drop, {"ETag": '"cdn-etag"'})
            return
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/main/(.+)", self.path)
        data = srv.files.get(f"{match.group(1)}/{match.group(2)}") if match else None
        if data is None:
            self.send_error(404)
            return
        digest = hashlib.sha256(data).hexdigest()
        srv.cdn.files[digest] = data
        self.send_response(302)
        self.send_header("Location", f"{srv.cdn.base}/blobs/{digest}")
        self.send_header("X-Linked-Etag", f'"{srv.etag or digest}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef01234567"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self.answer(head=True)

    def do_GET(self) -> None:
        self.answer(head=False)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hub(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[HubServer, HubServer]]]:
    servers: list[HubServer] = []

    def start(drops: int = 0, etag: str | None = None) -> tuple[HubServer, HubServer]:
        cdn = HubServer({}, drops=drops)
        hub = HubServer({"org/repo-GGUF/model-Q4_K_M.gguf": PAYLOAD}, cdn=cdn, etag=etag)
        for server in (cdn, hub):
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
            servers.append(server)
        monkeypatch.setenv("HF_ENDPOINT", hub.base)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        return hub, cdn

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


SPEC = "hf:org/repo-GGUF/model-Q4_K_M.gguf"


def test_hub_file_resumes_and_is_checked_by_the_hub_sha256(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_server, cdn = hub(drops=1)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    entry = load_registry().get(SPEC)
    path = download.ensure(entry, progress=True)
    assert path == models_dir() / "hf/org/repo-GGUF/model-Q4_K_M.gguf"
    assert path.read_bytes() == PAYLOAD
    assert hub_server.requests == [("HEAD", "/org/repo-GGUF/resolve/main/model-Q4_K_M.gguf", None, "Bearer hf_secret")]
    blob = f"/blobs/{hashlib.sha256(PAYLOAD).hexdigest()}"
    assert cdn.requests == [("HEAD", blob, None, None), ("GET", blob, None, None),
                            ("GET", blob, f"bytes={len(PAYLOAD) // 2}-", None)]
    assert sorted(p.name for p in path.parent.iterdir()) == [".model-Q4_K_M.gguf.sha256", "model-Q4_K_M.gguf"]
    assert download.expected_digest(entry) == (len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())
    assert download.verify(entry)
    path.write_bytes(bytes(len(PAYLOAD)))
    assert not download.verify(entry)


def test_hub_file_with_wrong_etag_is_not_kept(hub) -> None:
    hub(etag="a" * 64)
    entry = load_registry().get(SPEC)
    with pytest.raises(PerfxError, match=r"^checksum mismatch for model-Q4_K_M\.gguf: expected a{64}, .*not kept$"):
        download.ensure(entry, progress=False)
    assert not local_path(entry).parent.exists() or list(local_path(entry).parent.iterdir()) == []


def test_registry_sha256_wins_over_the_hub(hub) -> None:
    hub()
    entry = make_entry(Source(kind="hf", hf=SPEC.removeprefix("hf:")), sha256="b" * 64)
    with pytest.raises(PerfxError, match=r"^checksum mismatch for tiny\.bin: expected b{64}"):
        download.ensure(entry, progress=False)
    good = make_entry(Source(kind="hf", hf=SPEC.removeprefix("hf:")))
    assert download.ensure(good, progress=False).read_bytes() == PAYLOAD
    assert leftovers(good) == ["tiny.bin"]


def test_resolve_takes_hub_specs(hub) -> None:
    hub()
    path, entry = resolve(SPEC, progress=False)
    assert path.read_bytes() == PAYLOAD and entry is not None and entry.name == SPEC


@pytest.mark.parametrize(("spec", "message"), [
    ("hf:org/repo-GGUF/missing.gguf", r"^the hub has no file org/repo-GGUF/missing\.gguf; check ORG/REPO/FILE"),
    ("hf:org/repo", r"^'hf:org/repo' is not a hub file; write it as hf:ORG/REPO/FILE\.gguf$"),
    ("hf:org/repo/../x.gguf", r"is not a hub file"),
])
def test_bad_hub_specs_are_one_line(hub, spec: str, message: str) -> None:
    hub()
    with pytest.raises(PerfxError, match=message):
        resolve(spec, progress=False)
