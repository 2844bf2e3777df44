"""The OpenAI-compatible HTTP API: a Starlette app over a Scheduler.

    POST /v1/chat/completions   messages rendered with the model's chat template (as `perfx run`)
    POST /v1/completions        a raw prompt (as `perfx run --raw`), or token ids
    GET  /v1/models             the one model served
    GET  /health                liveness; never needs the API key
    GET  /metrics               Prometheus text: requests, tokens/s, batch occupancy, queue, KV blocks

Both completion routes answer in one JSON body, or with `"stream": true` as server-sent events
(`data: {chunk}` lines, then `data: [DONE]`). Every error is OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with its HTTP status. A client that disconnects
cancels its request: the scheduler drops the sequence and frees its KV blocks at the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import PerfxError
from ..llm import LLM
from ..sampler import OPTIONS, Sampling, SamplingError
from .metrics import RequestCounter, exposition
from .scheduler import Delta, Done, Failed, Job, QueueFull, Request, Scheduler

MAX_STOPS = 4


@dataclass(frozen=True)
class ServerConfig:
    model_id: str                    # the name clients put in "model"
    api_key: str | None = None       # when set, every route but /health needs "Authorization: Bearer KEY"
    aliases: tuple[str, ...] = ()    # other names accepted in "model"; "*" accepts any name, as llama-server does
    max_body_bytes: int = 4 << 20    # a longer request body gets 413 before it is read in full

    def __post_init__(self):
        if self.api_key is not None and not self.api_key:
            raise PerfxError("--api-key is empty; give a key, or leave the option out to serve without one")
        if self.max_body_bytes < 1:
            raise PerfxError(f"the request body limit must be at least 1 byte (got {self.max_body_bytes})")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------- request bodies

@dataclass(frozen=True)
class Generation:
    """What a completion request asks for, checked."""

    prompt: list[int]
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


async def read_body(request: HttpRequest, limit: int) -> dict:
    """The JSON object a request sends; 413 as soon as the body is known to pass `limit` bytes."""
    too_large = ApiError(413, f"the request body is larger than {limit} bytes, the most this server reads "
                              "(perfx serve --max-body-mb)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_large
    except ClientDisconnect:               # gone (or too slow: closed by the server); nobody reads the answer
        raise ApiError(400, "the client disconnected while sending the request") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:    # ValueError: bad JSON, bad UTF-8, an integer of 5000 digits
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ApiError(400, f"the request body is not valid JSON ({reason}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def field(data: dict, key: str, kinds: tuple[type, ...], default: Any) -> Any:
    """data[key] if it has one of `kinds` (null means the default); ApiError naming the field otherwise."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                             list: "a list", dict: "an object"}[k] for k in kinds)
        raise ApiError(400, f"'{key}' must be {names}", param=key)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"'{key}' must be a finite number", param=key)
    return value


def parse_generation(data: dict, prompt: list[int], ctx: int, prompt_param: str, default_max: int | None) -> Generation:
    """The sampling settings, stop strings and token limits of a request whose prompt is `prompt`."""
    if field(data, "n", (int,), 1) != 1:
        raise ApiError(400, "only n=1 is supported; send one request per completion", param="n")
    for key in ("presence_penalty", "frequency_penalty"):
        if field(data, key, (int, float), 0) != 0:
            raise ApiError(400, f"'{key}' is not supported; leave it at 0 (repetition_penalty is)", param=key)
    if field(data, "logprobs", (bool, int), False) or data.get("echo"):
        raise ApiError(400, "logprobs and echo are not supported", param="logprobs")
    if not prompt:
        raise ApiError(400, "the prompt is empty", param=prompt_param)
    if len(prompt) + 1 > ctx:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens, longer than the context of {ctx}; shorten it",
                       param=prompt_param, code="context_length_exceeded")
    room = ctx - len(prompt)
    max_tokens = field(data, "max_completion_tokens", (int,), None)
    max_tokens = field(data, "max_tokens", (int,), max_tokens)
    if max_tokens is None:
        max_tokens = room if default_max is None else min(default_max, room)
    elif max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1 (got {max_tokens})", param="max_tokens")
    elif max_tokens > room:
        raise ApiError(400, f"max_tokens {max_tokens} plus the {len(prompt)} prompt tokens exceed the context of "
                            f"{ctx}; ask for at most {room}", param="max_tokens", code="context_length_exceeded")
    stop = field(data, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    options = field(data, "stream_options", (dict,), {})
    settings = {o.name: field(data, o.api, (int,) if o.type is int else (int, float), o.api_default)
                for o in OPTIONS if o.api}
    try:
        sampling = Sampling(**settings, max_tokens=max_tokens)
    except SamplingError as e:
        raise ApiError(400, f"'{e.option.api}' {e.problem} (got {e.value})", param=e.option.api) from None
    return Generation(prompt, sampling, tuple(stop), bool(field(data, "stream", (bool,), False)),
                      bool(options.get("include_usage")))


def too_long(chars: int, ctx: int, param: str) -> ApiError:
    return ApiError(400, f"the prompt is {chars} characters, far more than the context of {ctx} tokens holds; "
                         "shorten it", param=param, code="context_length_exceeded")


def fitting_text(text: str, most_chars: int, ctx: int, param: str) -> str:
    """text, once it is known that it could fit the context and is valid Unicode; ApiError otherwise."""
    if len(text) > most_chars:
        raise too_long(len(text), ctx, param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the prompt is not valid Unicode (a lone surrogate escape such as \\ud800)",
                       param=param) from None
    return text


def chat_prompt(llm: LLM, data: dict, most_chars: int) -> list[int]:
    """The token ids of the messages rendered with the model's chat template, as `perfx run` makes them."""
    messages = field(data, "messages", (list,), None)
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"message {i} must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):           # content parts: only text ones are understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"message {i}: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"message {i}: 'content' must be a string or a list of text parts", param="messages")
        rendered.append({"role": m["role"], "content": content})
    chars = sum(len(m["content"]) for m in rendered)
    if chars > most_chars:
        raise too_long(chars, llm.ctx, "messages")
    try:
        text = llm.chat_template.render(rendered)
    except PerfxError as e:
        raise ApiError(400, str(e), param="messages") from None
    return llm.tokenizer.encode(fitting_text(text, most_chars, llm.ctx, "messages"), special=True)


def raw_prompt(llm: LLM, data: dict, most_chars: int) -> list[int]:
    """The prompt as `perfx run --raw` encodes it: a string, a one-string list, or a list of token ids."""
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return llm.tokenizer.encode(fitting_text(prompt, most_chars, llm.ctx, "prompt"), special=False)
    if isinstance(prompt, list) and len(prompt) >= llm.ctx:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens, longer than the context of {llm.ctx}; shorten it",
                       param="prompt", code="context_length_exceeded")
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = llm.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, f"token ids in 'prompt' must be in 0..{vocab - 1}", param="prompt")
        return list(prompt)
    raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt")


# ---------------------------------------------------------------------- responses

def chat_chunk(base: dict, delta: dict, finish: str | None) -> dict:
    return {**base, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def text_chunk(base: dict, text: str, finish: str | None) -> dict:
    return {**base, "object": "text_completion",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def cancel_on_disconnect(receive, job: Job) -> None:
    """Waits for the client to go away, then cancels its job."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


class EventStream:
    """An ASGI response of server-sent events from a job; a client that disconnects cancels the job at once."""

    HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]

    def __init__(self, job: Job, chunks: AsyncIterator[bytes]):
        self.job, self.chunks = job, chunks

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.HEADERS})
        watcher = asyncio.ensure_future(cancel_on_disconnect(receive, self.job))
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:                      # the client went away while we wrote
            pass
        finally:
            watcher.cancel()
            self.job.cancel()


# ---------------------------------------------------------------------- the app

def create_app(llm: LLM, scheduler: Scheduler, config: ServerConfig) -> Starlette:
    requests = RequestCounter()
    started = int(time.time())
    most_chars = llm.most_prompt_chars

    def check_model(data: dict) -> str:
        model = field(data, "model", (str,), config.model_id)
        if model != config.model_id and model not in config.aliases and "*" not in config.aliases:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{config.model_id}'",
                           param="model", code="model_not_found")
        return model

    def submit(gen: Generation) -> Job:
        try:
            return scheduler.submit(Request(gen.prompt, gen.sampling, gen.stop))
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full") from None

    async def collect(job: Job, receive) -> tuple[str, Done]:
        """The whole text of a job; a client that disconnects meanwhile cancels it."""
        watcher = asyncio.ensure_future(cancel_on_disconnect(receive, job))
        parts = []
        try:
            async for event in job.events():
                if isinstance(event, Delta):
                    parts.append(event.text)
                elif isinstance(event, Failed):
                    raise ApiError(event.status, event.message, type="server_error")
                else:
                    return "".join(parts), event
        finally:
            watcher.cancel()
            job.cancel()
        raise AssertionError("a job ends with Done or Failed")

    async def completion(request: HttpRequest, chat: bool) -> Response | EventStream:
        data = await read_body(request, config.max_body_bytes)
        model = check_model(data)
        prompt = await run_in_threadpool(chat_prompt if chat else raw_prompt, llm, data, most_chars)
        gen = parse_generation(data, prompt, llm.ctx, "messages" if chat else "prompt", None if chat else 16)
        job = submit(gen)
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model, "system_fingerprint": None}
        if gen.stream:
            return EventStream(job, stream_chunks(job, base, chat, gen.include_usage))
        text, done = await collect(job, request.receive)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done.finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish}
        return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion",
                             "choices": [choice], "usage": usage(done)})

    async def stream_chunks(job: Job, base: dict, chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
        if chat:
            yield sse(chat_chunk(base, {"role": "assistant", "content": ""}, None))
        async for event in job.events():
            if isinstance(event, Delta):
                if event.text:
                    yield sse(chat_chunk(base, {"content": event.text}, None) if chat else
                              text_chunk(base, event.text, None))
            elif isinstance(event, Failed):
                yield sse({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})
                return
            else:
                yield sse(chat_chunk(base, {}, event.finish) if chat else text_chunk(base, "", event.finish))
                if include_usage:
                    yield sse({**base, "object": "chat.completion.chunk" if chat else "text_completion",
                               "choices": [], "usage": usage(event)})
        yield b"data: [DONE]\n\n"

    async def chat_completions(request: HttpRequest) -> Response | EventStream:
        return await completion(request, chat=True)

    async def completions(request: HttpRequest) -> Response | EventStream:
        return await completion(request, chat=False)

    async def models(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_id, "object": "model", "created": started, "owned_by": "perfx",
             "max_model_len": llm.ctx}]})

    async def health(request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: HttpRequest) -> Response:
        return PlainTextResponse(render_metrics(scheduler, requests),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def api_error(request: HttpRequest, exc: ApiError) -> Response:
        return exc.response()

    async def http_error(request: HttpRequest, exc: HTTPException) -> Response:
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                              code="not_found" if exc.status_code == 404 else None)

    async def server_error(request: HttpRequest, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/health", health, methods=["GET"]),
                Route("/metrics", metrics, methods=["GET"])],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.add_middleware(ApiKey, api_key=config.api_key)
    app.add_middleware(CountRequests, counter=requests)
    return app


class ApiKey:
    """ASGI middleware: every route but /health needs "Authorization: Bearer KEY" when a key is set."""

    OPEN = ("/health",)

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, None if api_key is None else api_key.encode()   # compared as UTF-8 bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.key is None or scope["path"] in self.OPEN:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        message = ("missing API key: send the header 'Authorization: Bearer KEY'" if not header else
                   "incorrect API key; send the key the server was started with (--api-key)")
        response = error_response(401, message, code="invalid_api_key", headers={"www-authenticate": "Bearer"})
        await response(scope, receive, send)


class CountRequests:
    """ASGI middleware: counts HTTP requests by route and status for /metrics."""

    ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, counter: RequestCounter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.ROUTES else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.counter.add(route, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def render_metrics(scheduler: Scheduler, requests: RequestCounter) -> str:
    c, blocks, max_batch = scheduler.counters, scheduler.blocks, scheduler.config.max_batch
    running = scheduler.running
    return exposition([
        ("perfx_requests_total", "counter", "HTTP requests by route and status code.",
         [({"route": route, "code": str(status)}, n) for (route, status), n in requests.items()]),
        ("perfx_finished_total", "counter", "Sequences finished, by reason (stop, length, cancelled, error).",
         [({"reason": reason}, n) for reason, n in sorted(c.finished.items())]),
        ("perfx_prompt_tokens_total", "counter", "Prompt tokens computed (recomputation after preemption included).",
         [({}, c.prompt_tokens)]),
        ("perfx_generation_tokens_total", "counter", "Tokens generated.", [({}, c.generation_tokens)]),
        ("perfx_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
         [({}, round(c.tokens_per_second(), 3))]),
        ("perfx_steps_total", "counter", "Batched model steps.", [({}, c.steps)]),
        ("perfx_step_tokens_total", "counter", "Tokens over all model steps.", [({}, c.step_tokens)]),
        ("perfx_step_sequences_total", "counter", "Sequences over all model steps (divide by steps: mean batch).",
         [({}, c.step_sequences)]),
        ("perfx_preemptions_total", "counter", "Sequences sent back to wait for KV blocks.", [({}, c.preemptions)]),
        ("perfx_running_sequences", "gauge", "Sequences in the running batch.", [({}, running)]),
        ("perfx_max_batch", "gauge", "Most sequences in the running batch.", [({}, max_batch)]),
        ("perfx_batch_occupancy", "gauge", "Running sequences over the most the batch holds.",
         [({}, round(running / max_batch, 4))]),
        ("perfx_queue_length", "gauge", "Requests waiting to join the batch.", [({}, scheduler.queue_length)]),
        ("perfx_kv_blocks", "gauge", "KV pool blocks, by state.",
         [({"state": "free"}, blocks.n_free), ({"state": "used"}, blocks.n_used)]),
        ("perfx_kv_block_size", "gauge", "Token positions per KV block.", [({}, blocks.block_size)]),
        ("perfx_kv_blocks_allocated_total", "counter", "KV blocks handed to sequences.", [({}, blocks.allocated_total)]),
        ("perfx_kv_blocks_freed_total", "counter", "KV blocks given back by sequences.", [({}, blocks.freed_total)]),
    ])
