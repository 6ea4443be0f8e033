"""Dynamic batching: one worker thread owns the model; requests queue for it and run in batches.

A `VLM` is not thread-safe, so exactly one thread (the worker) ever calls it. HTTP handlers build a
`Job` and `submit` it; the bounded queue refuses more than `max_queue` waiting jobs (`ServeError` 429).
The worker takes the first waiting job, then keeps taking jobs until it holds `max_batch_size` or
`max_wait_ms` have passed since it took the first, and splits what it holds into groups of jobs with
the same `GenSettings.batch_key`. Each group is ONE `vlm.chat_batch` call (prompts left-padded, so a
greedy answer does not depend on its batch-mates). Groups run one after another, in arrival order.

Which jobs never share a batch:
- streaming jobs run alone (their tokens feed one client as they are chosen);
- seeded sampling (temperature > 0 with a seed) runs alone: a seed names one random stream, and rows
  of a batch draw from a shared generator, so batch-mates would change the answer;
- compression that is not `batch_safe` (a row's result could depend on its batch-mates) runs alone,
  one row per `chat_batch` call;
- different max_tokens / temperature / top_p / top_k / stop / compression. For greedy requests
  (temperature 0) top_p, top_k and seed do not change the answer and are left out of the key. Batches
  are therefore homogeneous in compression: every row of a `chat_batch` call has the same spec (the
  canonical string of the parsed spec is the key, so "fastervlm:keep=0.10" and {"fastervlm": {"keep":
  0.1}} share batches).

If a batch of several jobs fails, each job is retried alone, so one bad request cannot fail others.

Lifecycle: `start()`; `begin_shutdown()` stops accepting (new submits: 503) and, after
`shutdown_grace_s`, aborts: queued jobs fail with 503 and a running batch is stopped at its next token
(its jobs fail with 503). `close()` does both and joins the worker. A handler that gives up on a job
(timeout, client gone) cancels its future; the worker skips cancelled jobs and stops a batch whose jobs
are all cancelled at the next token. Every job's future is resolved (result or error) exactly once.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InputError

log = logging.getLogger("llavakit.serve")


class ServeError(Exception):
    """An error with its HTTP status and OpenAI error `type` / `code`."""

    def __init__(self, message: str, status: int, code: str | None = None,
                 type_: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code, self.type, self.param = message, status, code, type_, param


def queue_full(n: int) -> ServeError:
    return ServeError(f"the server is busy: {n} requests are already waiting; retry later", 429,
                      "queue_full", "rate_limit_error")


def shutting_down() -> ServeError:
    return ServeError("the server is shutting down; the request was not completed", 503, "shutting_down",
                      "server_error")


def timed_out(seconds: float) -> ServeError:
    return ServeError(f"the request did not complete within {seconds:g} s", 504, "timeout", "timeout_error")


class _Aborted(Exception):
    """Raised from on_token to stop a running batch (shutdown, or every job in it cancelled)."""


@dataclass(frozen=True)
class GenSettings:
    """The generation options of one request (what `chat_batch` takes besides prompts and images)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # the canonical compression spec ("none" = off; None = the model's own default), the batching key
    compression: str | None = None
    # the parsed spec (`llavakit.compression.Compression`) passed to chat_batch; not part of the key
    plan: Any = field(default=None, compare=False, hash=False, repr=False)
    batch_safe: bool = True  # False: the compression is not batch-safe, so the request runs alone

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def solo(self) -> bool:
        """Must run alone: seeded sampling, or compression that is not batch-safe (see the module docstring)."""
        return (not self.greedy and self.seed is not None) or not self.batch_safe

    def batch_key(self) -> tuple:
        if self.greedy:
            return (self.max_new_tokens, 0.0, 1.0, 0, self.stop, None, self.compression)
        return (self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.stop, self.seed, self.compression)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `chat_batch` (greedy: sampling options normalised away)."""
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature}
        if not self.greedy:
            kw.update(top_p=self.top_p, top_k=self.top_k, seed=self.seed)
        if self.stop:
            kw["stop_strings"] = self.stop
        if self.plan is not None:
            kw["compression"] = self.plan
        elif self.compression is not None:
            kw["compression"] = _compression_arg(self.compression)
        return kw


def _compression_arg(spec: str) -> Any:
    """A spec string as chat_batch takes it (a JSON list / mapping string is decoded)."""
    if spec.startswith(("{", "[")):
        try:
            return json.loads(spec)
        except json.JSONDecodeError:  # the bracketed string form, e.g. "[hired:rho=0.2, fastv:layer=2]"
            pass
    return spec


@dataclass(frozen=True)
class JobResult:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    queued_s: float
    batch_size: int


@dataclass(eq=False)
class Job:
    """One request for the worker. `on_token(token_id)` (streaming) is called from the worker thread."""

    messages: list[dict[str, Any]]
    images: list[Any]
    gen: GenSettings
    deadline: float  # time.monotonic() after which the job is not started
    on_token: Callable[[int], None] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    submitted: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    key: tuple = ()

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()


_unique = itertools.count()


class Scheduler:
    """The queue and the worker thread in front of one VLM. See the module docstring."""

    def __init__(self, vlm: Any, *, max_batch_size: int = 8, max_wait_ms: float = 10.0, max_queue: int = 64,
                 shutdown_grace_s: float = 10.0) -> None:
        self.vlm = vlm
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.shutdown_grace_s = shutdown_grace_s
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._closing = False
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._eos = frozenset(vlm.generation_config().eos_token_ids)
        self.stats: Counter = Counter()  # batches, requests, batch_size_<n>, errors, timeouts, cancelled
        self.busy = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llavakit-serve-worker", daemon=True)
            self._thread.start()
        return self

    @property
    def accepting(self) -> bool:
        return not self._closing

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def begin_shutdown(self) -> None:
        """Stop accepting; after `shutdown_grace_s`, fail what is still queued or running (503)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._timer = threading.Timer(self.shutdown_grace_s, self._abort_now)
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        """`begin_shutdown`, wait (at most the grace period) for the worker to finish, then abort the rest."""
        self.begin_shutdown()
        if self._thread is not None:
            self._thread.join(self.shutdown_grace_s + 1.0)
        self._abort_now()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._timer is not None:
            self._timer.cancel()

    def _abort_now(self) -> None:
        self._abort.set()
        self._fail_queued()

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            _fail(job, shutting_down())

    # ------------------------------------------------------------------ producer side
    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue `job`; raises ServeError 503 while shutting down, 429 when the queue is full."""
        key = job.gen.batch_key()
        job.key = ("solo", next(_unique)) if (job.on_token is not None or job.gen.solo) else key
        with self._lock:
            if self._thread is None:
                raise ServeError("the scheduler was not started (serve the app with its lifespan, or call "
                                 "Scheduler.start())", 503, "not_started", "server_error")
            if self._closing:
                raise shutting_down()
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.stats["rejected_queue_full"] += 1
                raise queue_full(self.max_queue) from None
        return job.future

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while not self._abort.is_set():
            with self._lock:
                if self._closing and self._queue.empty():
                    break
            jobs = self._collect()
            if not jobs:
                continue
            self.busy = True
            try:
                for group in _groups(jobs):
                    self._run_group(group)
            finally:
                self.busy = False
        self._fail_queued()

    def _collect(self) -> list[Job]:
        try:
            first = self._queue.get(timeout=0.05)
        except queue.Empty:
            return []
        jobs = [first]
        if first.key[0] == "solo":
            return jobs
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch_size:  # past the deadline, still take what is already waiting
            remaining = deadline - time.monotonic()
            try:
                jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _run_group(self, group: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in group:
            if job.cancelled:
                self.stats["cancelled"] += 1
            elif self._abort.is_set():
                _fail(job, shutting_down())
            elif now > job.deadline:
                self.stats["timeouts"] += 1
                _fail(job, timed_out(job.deadline - job.submitted))
            else:
                live.append(job)
        if not live:
            return
        try:
            texts = self._generate(live)
        except _Aborted:
            for job in live:
                _fail(job, shutting_down())
            return
        except BaseException as e:  # noqa: BLE001 - every error goes back to its request
            if len(live) > 1:
                self.stats["batch_retries"] += 1
                for job in live:
                    self._run_group([job])
                return
            self.stats["errors"] += 1
            if not isinstance(e, InputError):
                log.exception("generation failed")
            _fail(live[0], e)
            return
        for job, text in zip(live, texts):
            _resolve(job, JobResult(text=text, completion_tokens=len(job.tokens),
                                    finish_reason=self._finish_reason(job), queued_s=now - job.submitted,
                                    batch_size=len(live)))

    def _generate(self, jobs: list[Job]) -> list[str]:
        for job in jobs:
            job.tokens.clear()

        def on_token(i: int, tok: int) -> None:
            if self._abort.is_set() or all(j.cancelled for j in jobs):
                raise _Aborted
            job = jobs[i]
            job.tokens.append(tok)
            if job.on_token is not None and not job.cancelled:
                try:
                    job.on_token(tok)
                except Exception:  # the consumer is gone (event loop closed): stop feeding it
                    job.future.cancel()

        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats[f"batch_size_{len(jobs)}"] += 1
        self.stats["max_batch_size_seen"] = max(self.stats["max_batch_size_seen"], len(jobs))
        return self.vlm.chat_batch([j.messages for j in jobs], [j.images for j in jobs], on_token=on_token,
                                   **jobs[0].gen.kwargs())

    def _finish_reason(self, job: Job) -> str:
        toks = job.tokens
        if toks and toks[-1] in self._eos:
            return "stop"
        if len(toks) >= job.gen.max_new_tokens:
            if job.gen.stop and any(s in self.vlm.processor.decode(toks) for s in job.gen.stop):
                return "stop"
            return "length"
        return "stop"


def _groups(jobs: list[Job]) -> list[list[Job]]:
    """Jobs split by batch key, groups ordered by their first job's arrival."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.key, []).append(job)
    return list(groups.values())


def _resolve(job: Job, result: JobResult) -> None:
    try:
        job.future.set_result(result)
    except concurrent.futures.InvalidStateError:  # cancelled by its handler meanwhile
        pass


def _fail(job: Job, error: BaseException) -> None:
    try:
        job.future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass
