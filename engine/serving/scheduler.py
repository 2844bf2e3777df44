"""Continuous batching: one thread runs the model, one batched step after another, for every request.

A step is the next token of every decoding sequence plus chunks of the prompts being prefilled,
within a token budget, as one PagedBatch through `Transformer.forward_paged`: each projection is
one matrix product over all of them, attention runs per sequence over its own blocks of the KV
pool. Sequences join the batch (admission) and leave it between steps, by the stop rules and finish
reasons every generation follows (engine.generation: end of turn, stop string, max_tokens, full
context), or cancelled, or failed.

    waiting  requests not yet admitted, FIFO, at most `max_queue` (past that: QueueFull, HTTP 429)
    active   admitted sequences, oldest first, at most `max_batch`; each owns KV blocks for all its
             tokens, taken at admission for the prompt and one block at a time as it grows

A request is admitted when a batch slot and the KV blocks for its whole prompt are free. When a
decoding sequence needs a block and none is free, the youngest active sequence is preempted: its
blocks go back to the pool and it waits again at the head of the queue, to recompute its prompt
and the tokens it generated so far (already sent; its sampler keeps its state), so the oldest
always progress.

A failure stays its request's: an exception while one sequence is sampled ends that sequence with
an error; when a batched step fails, each of its sequences is stepped alone, so only the one that
fails ends (the others go on, their results unchanged).

The asyncio side talks to the thread through `submit` and `Job.cancel` (a lock-guarded inbox and
a wake-up event); the thread answers through `Job`'s asyncio queue with `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import PerfxError
from ..generation import Finish, Sequence
from ..llm import LLM
from ..memory import check_available
from ..paged import PagedBatch
from ..sampler import Sampling
from ..text.tokenizer import Tokenizer
from .blocks import BlockAllocator
from .metrics import EngineCounters


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16          # sequences in the running batch
    max_queue: int = 64          # requests waiting for admission; past it, submit raises QueueFull
    block_size: int = 16         # token positions per KV block
    kv_tokens: int | None = None  # KV pool size in token positions (default: max_batch x ctx, at most 8192, at least ctx)
    step_tokens: int = 128       # most tokens in one step: decode tokens first, then prefill chunks

    def __post_init__(self):
        if self.max_batch < 1:
            raise PerfxError(f"--max-batch must be at least 1 (got {self.max_batch})")
        if self.max_queue < 0:
            raise PerfxError(f"--max-queue must be at least 0 (got {self.max_queue})")
        if self.block_size < 1:
            raise PerfxError(f"the KV block size must be at least 1 (got {self.block_size})")
        if self.kv_tokens is not None and self.kv_tokens < 1:
            raise PerfxError(f"--kv-tokens must be at least 1 (got {self.kv_tokens})")
        if self.step_tokens <= self.max_batch:
            raise PerfxError(f"the step budget ({self.step_tokens} tokens) must exceed --max-batch "
                             f"({self.max_batch}) so prompts get prefilled while the batch decodes")

    def pool_tokens(self, ctx: int) -> int:
        tokens = self.kv_tokens if self.kv_tokens is not None else min(self.max_batch * ctx, 8192)
        return max(tokens, ctx)


@dataclass(frozen=True)
class Request:
    prompt: list[int]                        # token ids
    sampling: Sampling                       # temperature, top-k/p, min-p, seed, max_tokens
    stop: tuple[str, ...] = ()               # stop strings


@dataclass(frozen=True)
class Delta:
    """Text the sequence produced (may be "" while a character or a possible stop string is pending)."""

    text: str


@dataclass(frozen=True)
class Done:
    finish: Finish               # "stop" or "length" (engine.generation)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 500            # the HTTP status it maps to; 499 when the client went away


class QueueFull(PerfxError):
    """More requests wait than the queue holds."""


class Job:
    """One request as the asyncio side sees it: its events arrive on an asyncio queue."""

    def __init__(self, scheduler: "Scheduler", id: int, loop: asyncio.AbstractEventLoop):
        self.id = id
        self.queue: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self._scheduler = scheduler
        self.finished = False

    def emit(self, event) -> None:
        """Called from the scheduler thread."""
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:          # the event loop is gone (server shut down)
            pass

    async def events(self):
        """Delta... then one Done or Failed."""
        while True:
            event = await self.queue.get()
            yield event
            if not isinstance(event, Delta):
                self.finished = True
                return

    def cancel(self) -> None:
        """Ends the job's events and has the scheduler drop the sequence and free its KV blocks (a no-op
        once the job has finished). Called on the event loop."""
        if not self.finished:
            self.finished = True
            self.queue.put_nowait(Failed("the client disconnected", 499))
            self._scheduler.cancel(self.id)


class Served(Sequence):
    """A request's sequence, with where it stands in the scheduler."""

    def __init__(self, id: int, request: Request, job: Job, tokenizer: Tokenizer, ctx: int):
        super().__init__(request.prompt, request.sampling, tokenizer, ctx, request.stop)
        self.id = id
        self.job = job
        self.n_cached = 0                # tokens whose K and V are in the pool
        self.queued = True               # counted among the requests waiting for their first admission

    @property
    def pending(self) -> int:
        """Tokens to run through the model before the next one can be sampled."""
        return len(self.tokens) - self.n_cached


@dataclass(eq=False)
class _Inbox:
    """What the asyncio side hands the thread; guarded by the scheduler's lock."""

    new: list[Served] = field(default_factory=list)
    cancelled: set[int] = field(default_factory=set)


class Scheduler:
    def __init__(self, llm: LLM, config: SchedulerConfig = SchedulerConfig()):
        self.llm = llm
        self.config = config
        self.backend = backend = llm.transformer.backend
        block_size = config.block_size
        n_blocks = -(-config.pool_tokens(llm.ctx) // block_size)
        c = llm.transformer.config
        check_available(2 * c.n_layers * n_blocks * block_size * c.kv_dim * 4,      # K and V, float32
                        f"a KV pool of {n_blocks * block_size} tokens", hint="give a smaller --kv-tokens")
        backend.kv_pool(n_blocks, block_size)
        self.blocks = BlockAllocator(n_blocks, block_size)
        limit = backend.capabilities.max_tokens or config.step_tokens
        self.step_tokens = min(config.step_tokens, limit)
        if self.step_tokens <= config.max_batch:
            raise PerfxError(f"the backend takes {limit} tokens per step: lower --max-batch below it")
        self.counters = EngineCounters()
        self.waiting: deque[Served] = deque()
        self.active: list[Served] = []
        self._lock = threading.Lock()
        self._inbox = _Inbox()
        self._queued = 0                     # requests submitted and not yet admitted (guarded by _lock)
        self._wake = threading.Event()
        self._stopping = False
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ asyncio side

    def submit(self, request: Request) -> Job:
        """Queues a request; raises QueueFull when max_queue requests already wait."""
        loop = asyncio.get_running_loop()
        tok = self.llm.tokenizer
        with self._lock:
            free_slots = max(0, self.config.max_batch - len(self.active))
            if self._queued >= self.config.max_queue + free_slots:
                raise QueueFull(f"{self._queued} requests are waiting, the most the queue holds; retry later")
            seq_id = next(self._ids)
            job = Job(self, seq_id, loop)
            self._inbox.new.append(Served(seq_id, request, job, tok, self.llm.ctx))
            self._queued += 1
        self._wake.set()
        return job

    def cancel(self, seq_id: int) -> None:
        with self._lock:
            self._inbox.cancelled.add(seq_id)
        self._wake.set()

    @property
    def queue_length(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return len(self.active)

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="perfx-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread; requests still running or waiting fail."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._take_inbox()
            self._admit()
            if not self.active:
                self._wake.wait()
                continue
            try:
                self.step()
            except Exception as e:       # a failed step fails its sequences; the server goes on
                traceback.print_exc(file=sys.stderr)
                for seq in list(self.active):
                    self._finish(seq, Failed(f"the model step failed: {type(e).__name__}: {e}"), "error")
        self._take_inbox()
        for seq in [*self.active, *self.waiting]:
            self._finish(seq, Failed("the server is shutting down"), "error")
        self.waiting.clear()

    def _take_inbox(self) -> None:
        with self._lock:
            new, cancelled = self._inbox.new, self._inbox.cancelled
            self._inbox = _Inbox()
        self.waiting.extend(new)
        if not cancelled:
            return
        for seq in [s for s in self.waiting if s.id in cancelled]:
            self.waiting.remove(seq)
            self._dequeued(seq)
            self._finish(seq, None, "cancelled")
        for seq in [s for s in self.active if s.id in cancelled]:
            self._finish(seq, None, "cancelled")

    def _admit(self) -> None:
        """Moves waiting requests into the batch while a slot and the blocks for the prompt are free; a few
        blocks stay free for the running sequences to grow into."""
        while self.waiting and len(self.active) < self.config.max_batch:
            seq = self.waiting[0]
            need = self.blocks.extra_for(seq.id, len(seq.tokens))
            headroom = len(self.active)
            if need + headroom > self.blocks.n_free or not self.blocks.grow(seq.id, len(seq.tokens)):
                return
            self.waiting.popleft()
            self.active.append(seq)
            self._dequeued(seq)

    def _dequeued(self, seq: Served) -> None:
        if seq.queued:
            seq.queued = False
            with self._lock:
                self._queued -= 1

    # ------------------------------------------------------------------ one step

    def step(self) -> None:
        """Runs one batched model step over the active sequences and samples where a sequence is due. When
        the step fails, each sequence is stepped alone: the one that fails ends with an error, the others go on."""
        self._grow_decoders()
        plan = self._plan()
        if not plan:
            return
        try:
            self._step(plan)
        except Exception as e:
            if len(plan) == 1:
                self._fail(plan[0][0], e)
                return
            for seq, n in plan:
                try:
                    self._step([(seq, n)])
                except Exception as e:
                    self._fail(seq, e)

    def _step(self, plan: list[tuple[Served, int]]) -> None:
        """One model step over `plan`; a sequence whose sampling fails ends alone."""
        ids, pos, rows, due = [], [], [], []
        for row, (seq, n) in enumerate(plan):
            start = seq.n_cached
            ids.extend(seq.tokens[start:start + n])
            pos.extend(range(start, start + n))
            rows.extend([row] * n)
            if n == seq.pending:
                due.append((seq, len(ids) - 1))
        batch = PagedBatch(np.array(pos), np.array(rows), self.blocks.table([s.id for s, _ in plan]),
                           self.blocks.block_size)
        transformer = self.llm.transformer
        h = transformer.forward_paged(np.asarray(ids, np.int64), batch)
        logits = self.backend.logits_rows(h, transformer.w.output, np.array([r for _, r in due], np.int32)) \
            if due else None
        n_prompt = sum(n for seq, n in plan if not (seq.generated and seq.pending == 1))
        for seq, n in plan:
            seq.n_cached += n
        for i, (seq, _) in enumerate(due):
            try:
                self._sample(seq, np.asarray(logits[i]))
            except Exception as e:
                self._fail(seq, e)
        self.counters.record_step(len(ids), len(plan), n_prompt, len(due))

    def _fail(self, seq: Served, e: Exception) -> None:
        """Ends one sequence with the error that stopped it; its batch-mates are not touched."""
        if not isinstance(e, PerfxError):
            traceback.print_exc(file=sys.stderr)
        self._finish(seq, Failed(f"generating this reply failed: {type(e).__name__}: {e}"), "error")

    def _grow_decoders(self) -> None:
        """Every active sequence owns the blocks for all its tokens; when one cannot grow, the youngest
        active sequence gives its blocks back and waits again."""
        i = 0
        while i < len(self.active):
            seq = self.active[i]
            while not self.blocks.grow(seq.id, len(seq.tokens)):
                victim = self.active[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.active:
                i += 1

    def _preempt(self, seq: Served) -> None:
        self.blocks.release(seq.id)
        self.active.remove(seq)
        seq.n_cached = 0
        self.waiting.appendleft(seq)
        self.counters.preemptions += 1

    def _plan(self) -> list[tuple[Served, int]]:
        """(sequence, tokens this step): decoding sequences first, then prompt chunks, oldest first."""
        budget = self.step_tokens
        decoding = [s for s in self.active if s.pending == 1]
        prefilling = [s for s in self.active if s.pending > 1]
        plan = [(s, 1) for s in decoding]
        budget -= len(plan)
        for seq in prefilling:
            if budget <= 0:
                break
            n = min(seq.pending, budget)
            plan.append((seq, n))
            budget -= n
        return plan

    def _sample(self, seq: Served, logits: np.ndarray) -> None:
        piece = seq.push(seq.sample(logits))
        if seq.finish is None:
            seq.job.emit(Delta(piece.text))
        else:
            self._finish(seq, Delta(piece.text), seq.finish)

    def _finish(self, seq: Served, last: Delta | Failed | None, reason: Finish) -> None:
        """Takes seq out of the batch, gives back its blocks at once, and tells its job."""
        seq.end(reason)
        self.blocks.release(seq.id)
        if seq in self.active:
            self.active.remove(seq)
        self.counters.finished[reason] += 1
        if isinstance(last, Failed):
            seq.job.emit(last)
            return
        if last is not None and last.text:
            seq.job.emit(last)
        if reason != "cancelled":
            seq.job.emit(Done(reason, seq.n_prompt, seq.generated))
