"""The worker processes: each engine runs in its own process (python -m perfx.engine.bench.worker SPEC),
loads its model once, and answers one JSON request per line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path

from ..errors import PerfxError
from .engines import LlamaCppEngine, PerfxEngine
from .probes import peak_rss
from .results import EngineInfo
from .spec import TestSpec

REBUILD_HINT = "rebuild it with scripts/install-llama-cpp.sh --rebuild"
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def worker_main(argv: list[str]) -> int:
    """A worker process: loads one engine from the JSON spec in argv[0], then answers one JSON request per
    line of stdin with one JSON line ({"op": "run", "test": i} | "memory" | "bandwidth" | "profile" | "quit")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent handles Ctrl-C and ends its workers
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)                                     # what native libraries print goes to stderr

    def send(message: dict) -> None:
        out.write(json.dumps(message) + "\n")

    try:
        spec = json.loads(argv[0])
        tests = [TestSpec(*t) for t in spec["tests"]]
        if spec["engine"] == "perfx":
            engine = PerfxEngine(spec)
        elif spec.get("llama_bench"):
            from .peer import LlamaBenchEngine

            engine = LlamaBenchEngine(spec)
        else:
            engine = LlamaCppEngine(spec)
        send({"ready": asdict(engine.info)})
        for line in sys.stdin:
            request = json.loads(line)
            op = request.get("op")
            if op == "run":
                send({"ns": engine.run(tests[request["test"]])})
            elif op == "memory":
                send({"peak_rss": peak_rss(), "device_bytes": engine.device_bytes()})
            elif op == "bandwidth":
                send({"copy_bandwidth": engine.copy_bandwidth()})
            elif op == "profile":
                send({"profile": [asdict(p) for p in engine.profile(request["n_prompt"], request["n_gen"])]})
            else:
                break
    except PerfxError as e:
        send({"error": str(e)})
        return 1
    except Exception as e:  # anything else: the message for the user, the traceback in the worker's log
        traceback.print_exc()
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


class Worker:
    """An engine in its own process (python -m perfx.engine.bench.worker SPEC), driven over its stdin and stdout.
    The process starts at once; wait_ready() waits for its model to load."""

    info: EngineInfo

    def __init__(self, engine: str, spec: dict, threads: int):
        from ..backends.opencl.devices import THREAD_VARIABLES

        env = dict(os.environ)
        env.update({name: str(threads) for name in THREAD_VARIABLES + THREAD_ENV})
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        self.engine = engine
        self.log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        self.proc = subprocess.Popen(self.command({**spec, "engine": engine}), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, text=True, encoding="utf-8")

    def command(self, spec: dict) -> list[str]:
        return [sys.executable, "-m", "perfx.engine.bench.worker", json.dumps(spec)]

    def wait_ready(self) -> EngineInfo:
        self.info = EngineInfo(**self._receive()["ready"])
        return self.info

    def request(self, op: str, **args) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass                                      # _receive says why the worker is gone
        return self._receive()

    def _receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise PerfxError(exit_message(self.engine, self.proc.wait(), self._last_log_line()))
        message = json.loads(line)
        if "error" in message:
            raise PerfxError(message["error"])
        return message

    def _last_log_line(self) -> str:
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().splitlines() if line.strip()]
        return lines[-1] if lines else "no message"

    def close(self, kill: bool = False) -> None:
        """Ends the worker: asks it to quit (kills it with `kill`, or if it does not quit)."""
        if kill and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def exit_message(engine: str, rc: int, last_line: str) -> str:
    """Why a worker that stopped answering is gone: its exit status, or the signal that killed it and
    what that means (a crash of llama.cpp's native code is fixed by building it again)."""
    if rc >= 0:
        return f"the {engine} worker exited with status {rc}: {last_line}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    if -rc in (9, 15):                                 # SIGKILL, SIGTERM
        return (f"the {engine} worker was killed by {name} (out of memory, or ended by another process): "
                f"{last_line}")
    what = "llama.cpp" if engine == "llama.cpp" else f"the {engine} worker"
    advice = f"; {REBUILD_HINT}" if engine == "llama.cpp" else ""
    return f"{what} crashed with {name} ({last_line}){advice}"


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
