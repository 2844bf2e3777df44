"""Running the app on uvicorn: in the foreground (`perfx serve`) or in a background thread (tests and the
load test), on a socket bound before anything else happens (a port in use is one line, before the model loads).

    with BackgroundServer(app) as server:
        httpx.get(server.url + "/health")

Hostile clients are kept in bounds by the HTTP protocol itself (uvicorn's h11 protocol, guarded):
    a client has `header_timeout` seconds to send a request's headers and `body_timeout` more for its body,
    from the moment it connects or its previous response ended; then the connection is closed. No time
    limit runs while the server works on a request or streams its reply.
    past `max_connections` open connections, the one that has waited longest on its client is closed to
    make room (a flood of half-open connections cannot lock out /health), or the new one when none waits.
    headers are at most `max_header_bytes`; the file descriptor limit is raised to fit the connections.
    a warning that repeats is logged once a minute at most.
"""
from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass, replace

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import PerfxError


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0     # seconds from connecting (or the last response) to a request's full headers
    body_timeout: float = 30.0       # seconds from the headers to the end of the body
    keep_alive: int = 5              # seconds an idle keep-alive connection stays open
    max_connections: int = 1000      # open connections, all states
    max_header_bytes: int = 16 << 10

    def __post_init__(self):
        for name, seconds in (("--header-timeout", self.header_timeout), ("--body-timeout", self.body_timeout),
                              ("keep-alive", self.keep_alive)):
            if not 0 < seconds < 1e6:
                raise PerfxError(f"{name} must be a positive number of seconds (got {seconds})")
        if self.max_connections < 1:
            raise PerfxError(f"--max-connections must be at least 1 (got {self.max_connections})")


def guarded_protocol(limits: Limits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with read deadlines and a connection limit; one class per server."""
    waiting: dict[GuardedH11, None] = {}    # connections waiting on their client, longest first

    class GuardedH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._phase: str | None = None
            self._timer = None
            if len(self.connections) > limits.max_connections:
                victim = next(iter(waiting), self)
                victim.transport.close()
                waiting.pop(victim, None)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc) -> None:
            self._set_phase(None)
            super().connection_lost(exc)

        def _watch(self) -> None:
            """Starts a deadline when the connection begins to wait on its client for headers or a body."""
            state = None if self.transport.is_closing() else self.conn.their_state
            self._set_phase({h11.IDLE: "headers", h11.SEND_BODY: "body"}.get(state))

        def _set_phase(self, phase: str | None) -> None:
            if phase == self._phase:
                return
            self._phase = phase
            waiting.pop(self, None)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if phase is not None:
                waiting[self] = None
                timeout = limits.header_timeout if phase == "headers" else limits.body_timeout
                self._timer = self.loop.call_later(timeout, self._too_slow)

        def _too_slow(self) -> None:
            self._timer = None
            waiting.pop(self, None)
            self.transport.close()

    return GuardedH11


class QuietRepeats(logging.Filter):
    """Lets a warning with the same text through once a minute at most: a flood of bad requests must not
    fill the disk."""

    def __init__(self, every: float = 60.0):
        super().__init__()
        self.every, self.last = every, {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING and record.name != "asyncio":
            return True
        now, key = time.monotonic(), (record.name, str(record.msg))
        if now - self.last.get(key, -self.every) < self.every:
            return False
        self.last[key] = now
        return True


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or a one-line PerfxError that says what to do."""
    if not 0 <= port <= 65535:
        raise PerfxError(f"--port must be in 0..65535 (got {port})")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise PerfxError(f"cannot listen on --host {host}: {getattr(e, 'strerror', None) or e}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = {errno.EADDRINUSE: "another program uses that port; pick another with --port",
                errno.EACCES: "ports below 1024 need privileges; pick --port 1024 or above",
                errno.EADDRNOTAVAIL: "that address is not one of this machine's; see --host"}.get(e.errno, "")
        raise PerfxError(f"cannot listen on {host}:{port}: {e.strerror or e}" + (f"; {hint}" if hint else "")) \
            from None
    return sock


def fit_open_files(limits: Limits) -> Limits:
    """Raises the soft limit on open files toward what max_connections needs; fewer connections when the
    hard limit is lower (an accept that fails for want of descriptors floods the log)."""
    try:
        import resource
    except ImportError:          # Windows
        return limits
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limits.max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft - 256 < limits.max_connections:
        return replace(limits, max_connections=max(1, soft - 256))
    return limits


def server_for(app, limits: Limits, log_level: str, graceful: float) -> uvicorn.Server:
    config = uvicorn.Config(app, http=guarded_protocol(limits), lifespan="on", log_level=log_level,
                            timeout_keep_alive=limits.keep_alive, timeout_graceful_shutdown=graceful,
                            h11_max_incomplete_event_size=limits.max_header_bytes)
    return uvicorn.Server(config)


def serve(app, sock: socket.socket, limits: Limits = Limits(), log_level: str = "info") -> None:
    """Serves on `sock` (from listen) until Ctrl-C or SIGTERM."""
    quiet = QuietRepeats()
    for name in ("uvicorn.error", "asyncio"):
        logging.getLogger(name).addFilter(quiet)
    server_for(app, fit_open_files(limits), log_level, 5).run(sockets=[sock])


class BackgroundServer:
    """uvicorn in a thread on host:port (port 0: a free one); stop() or the with-block's end shuts it down."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 limits: Limits = Limits()):
        self.sock = listen(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = server_for(app, limits, log_level, 2)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="perfx-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
