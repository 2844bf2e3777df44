"""`perfx serve`: an OpenAI-compatible HTTP server with continuous batching (engine.serving)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from perfx.engine.errors import PerfxError
from perfx.cli.main import CtxOpt, DeviceOpt, ModelOpt, ThreadsOpt, command, err, load

INSTALL_HINT = "perfx serve needs starlette and uvicorn: pip install 'perfx-llm[serve]'"


def model_id(name_or_path: Optional[str]) -> str:
    """The name clients send as "model": the registry name, or the model file's name without suffix."""
    from perfx.engine.hub.registry import load_registry

    registry = load_registry()
    if name_or_path is None:
        return registry.default
    if name_or_path in registry.models and not Path(name_or_path).is_file():
        return name_or_path
    return Path(name_or_path).name.removesuffix(".gguf").removesuffix(".safetensors")


@command
def serve(
    model: Optional[str] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    ctx: Optional[int] = CtxOpt,
    max_batch: int = typer.Option(16, "--max-batch", help="Most sequences decoded together."),
    max_queue: int = typer.Option(64, "--max-queue", help="Most requests waiting to join the batch; past it, HTTP 429."),
    kv_tokens: Optional[int] = typer.Option(None, "--kv-tokens",
                                            help="KV pool size in tokens (default: max-batch x ctx, at most 8192)."),
    alias: list[str] = typer.Option([], "--alias", help="Another name clients may send as \"model\" (repeat it); "
                                                         "'*' accepts any name, as llama-server does."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PERFX_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on every route but /health."),
    max_body_mb: float = typer.Option(4.0, "--max-body-mb", help="Largest request body in MB; past it, HTTP 413."),
    max_connections: int = typer.Option(1000, "--max-connections",
                                        help="Most open connections; past it, the one idle longest is closed."),
    header_timeout: float = typer.Option(10.0, "--header-timeout",
                                         help="Seconds a client has to send a request's headers."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", help="Seconds a client has to send a request's body."),
):
    """Serve a model over an OpenAI-compatible HTTP API (chat and text completions, streaming, /metrics)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PerfxError(INSTALL_HINT) from None
    from perfx.engine.serving.api import ServerConfig, create_app
    from perfx.engine.serving.scheduler import Scheduler, SchedulerConfig
    from perfx.engine.serving.server import Limits, listen
    from perfx.engine.serving.server import serve as run_server

    if api_key is None and os.environ.get("PERFX_API_KEY") == "":
        api_key = ""                        # set but empty: refused below, as --api-key '' is
    config = SchedulerConfig(max_batch=max_batch, max_queue=max_queue, kv_tokens=kv_tokens)
    name = model_id(model)
    if not 1e-6 <= max_body_mb <= 1e6:
        raise PerfxError(f"--max-body-mb must be between 0.000001 and 1000000 (got {max_body_mb})")
    server_config = ServerConfig(model_id=name, aliases=tuple(alias), api_key=api_key,
                                 max_body_bytes=int(max_body_mb * 1e6))
    limits = Limits(header_timeout=header_timeout, body_timeout=body_timeout, max_connections=max_connections)
    sock = listen(host, port)               # a bad or busy port fails here, before the model loads
    port = sock.getsockname()[1]
    llm = load(model, device, ctx, threads)
    if not llm.transformer.backend.capabilities.paged_kv:
        raise PerfxError(f"{llm.device} cannot run batched steps yet; serve with --device numpy")
    scheduler = Scheduler(llm, config)
    app = create_app(llm, scheduler, server_config)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]listening on {host} without --api-key: anyone who reaches it can use it[/]")
    blocks = scheduler.blocks
    err.print(f"[dim]{name} on {llm.device} · ctx {llm.ctx} · batch {max_batch} · KV pool {blocks.n_blocks} blocks "
              f"of {blocks.block_size} tokens[/]", soft_wrap=True)
    err.print(f"serving http://{host}:{port}/v1 (OpenAI API) · /metrics · /health")
    run_server(app, sock, limits)
