"""A bench run as text: llama-bench's JSON record of each result (json, jsonl, csv), or the markdown
table (markdown.py)."""
from __future__ import annotations

import csv
import io
import json
import sys
from typing import TextIO

from ..errors import PerfxError
from .markdown import format_markdown
from .probes import Build
from .results import BenchRun, Result

FORMATS = ("md", "json", "jsonl", "csv")


RECORD_FIELDS = (
    "build_commit", "perfx_version", "engine", "engine_version", "cpu_info", "gpu_info", "backends", "device",
    "device_name", "model_filename", "model_type", "model_size", "model_n_params", "synthetic", "n_batch",
    "n_ubatch", "n_threads", "type_k", "type_v", "n_gpu_layers", "n_ctx", "n_prompt", "n_gen", "n_depth", "test",
    "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "median_ts", "peak_rss_bytes", "device_bytes",
    "bytes_per_token", "bandwidth_bytes_per_s", "copy_bandwidth_bytes_per_s", "bandwidth_share", "vs_llama_cpp",
    "samples_ns", "samples_ts",
)


def record(r: Result, build: Build) -> dict:
    """One result as llama-bench's JSON record (its fields where they apply), plus perfx's fields; with
    --profile, perfx's records also carry the launch budget of their model, device and threads."""
    s, i = r.samples, r.info
    rec = {
        "build_commit": build.commit,
        "perfx_version": build.version,
        "engine": r.engine,
        "engine_version": i.version,
        "cpu_info": build.cpu,
        "gpu_info": i.device_name if i.device_type == "gpu" else "",
        "backends": i.backend,
        "device": i.device,
        "device_name": i.device_name,
        "model_filename": r.model.path or "",
        "model_type": r.model.description,
        "model_size": r.model.size,
        "model_n_params": r.model.n_params,
        "synthetic": r.model.shape,
        "n_batch": i.n_batch,
        "n_ubatch": i.n_ubatch,
        "n_threads": r.threads,
        "type_k": i.kv_type,
        "type_v": i.kv_type,
        "n_gpu_layers": i.n_gpu_layers,
        "n_ctx": i.n_ctx,
        "n_prompt": r.test.n_prompt,
        "n_gen": r.test.n_gen,
        "n_depth": 0,
        "test": r.test.name,
        "test_time": r.test_time,
        "avg_ns": s.avg_ns,
        "stddev_ns": s.stddev_ns,
        "avg_ts": s.avg_ts,
        "stddev_ts": s.stddev_ts,
        "median_ts": s.median_ts,
        "peak_rss_bytes": i.peak_rss,
        "device_bytes": i.device_bytes,
        "bytes_per_token": r.bytes_per_token,
        "bandwidth_bytes_per_s": r.bandwidth,
        "copy_bandwidth_bytes_per_s": i.copy_bandwidth,
        "bandwidth_share": r.bandwidth_share,
        "vs_llama_cpp": r.ratio,
        "samples_ns": list(s.ns),
        "samples_ts": s.ts,
    }
    if i.profile is not None:
        rec["profile"] = [phase.record(i.copy_bandwidth) for phase in i.profile]
    return rec


def format_json(run: BenchRun) -> str:
    return json.dumps([record(r, run.build) for r in run.results], indent=2) + "\n"


def format_jsonl(run: BenchRun) -> str:
    return "".join(json.dumps(record(r, run.build)) + "\n" for r in run.results)


def format_csv(run: BenchRun) -> str:
    """llama-bench's CSV: a header, then one row per result; the samples joined by ';'."""
    out = io.StringIO()
    # The launch budget (--profile) has no column: json and jsonl carry it.
    writer = csv.DictWriter(out, fieldnames=RECORD_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for rec in (record(r, run.build) for r in run.results):
        rec = {k: ";".join(str(x) for x in v) if isinstance(v, list) else ("" if v is None else v)
               for k, v in rec.items()}
        writer.writerow(rec)
    return out.getvalue()


def format_run(run: BenchRun, fmt: str) -> str:
    formats = {"md": format_markdown, "json": format_json, "jsonl": format_jsonl, "csv": format_csv}
    if fmt not in formats:
        raise PerfxError(f"unknown output format '{fmt}' (choose from: {', '.join(FORMATS)})")
    return formats[fmt](run)


def write(run: BenchRun, fmt: str, out: TextIO = sys.stdout) -> None:
    out.write(format_run(run, fmt))
    out.flush()
