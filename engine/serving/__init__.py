"""Serving many requests at once on one model: an OpenAI-compatible HTTP API over a continuous-batching
scheduler and a paged KV cache.

    blocks.py     the KV block allocator (which pool blocks each sequence owns)
    stops.py      stop strings over streamed text
    scheduler.py  the engine thread: admission, one batched model step after another, sampling
    metrics.py    counters and gauges in Prometheus text format
    api.py        the Starlette app: OpenAI routes, SSE streams, errors, API key
    server.py     uvicorn in the foreground (the CLI) or in a background thread (tests, load test), with read
                  deadlines and a connection limit against slow or half-open clients (docs/security.md)
"""
