"""A worker: claim a job, keep its lease alive, run it, record the outcome; repeat.

``xvr-node serve`` runs one (or ``worker.concurrency``) inside the node; ``xvr-node worker``
runs them alone, for more GPUs or more machines sharing a PostgreSQL catalog and a store.
What each job kind does lives in :mod:`xvr_node.jobs.pipeline`; this module only runs jobs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from xvr_node.catalog.models import utcnow
from xvr_node.clock import Clock
from xvr_node.config import Settings
from xvr_node.jobs import queue
from xvr_node.jobs.export import exponential_backoff

LOG = logging.getLogger(__name__)


class JobYielded(Exception):
    """Raised by a handler that stops early to be resumed later (preempted, or shutdown)."""

    def __init__(
        self,
        reason: str,
        payload: dict[str, Any] | None = None,
        resume_at: datetime | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.payload = payload
        self.resume_at = resume_at  # None: as soon as a worker is free


class PermanentJobError(Exception):
    """Bad input: trying again cannot help, so the job fails at once with this reason."""


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_worker_id(index: int = 0, name: str = "") -> str:
    """host:pid:index (or host:pid:name.index): unique, and says where to look."""
    return f"{socket.gethostname()}:{os.getpid()}:{f'{name}.' if name else ''}{index}"


@dataclass
class JobContext:
    """What a handler sees: its job, a session, the worker's device and clock."""

    job_id: int
    kind: str
    payload: dict[str, Any]
    priority: int
    attempts: int
    max_attempts: int
    session: Session
    worker: Worker
    lease_lost: threading.Event = field(default_factory=threading.Event)

    @property
    def device(self) -> str:
        return self.worker.device

    def now(self) -> datetime:
        return self.worker.clock()

    def should_yield(self) -> bool:
        """Stop now? The worker is stopping, the lease is gone, or more urgent work waits.

        Long jobs (finetuning) ask between steps; the answer costs one indexed query.
        """
        if self.worker.stopping.is_set() or self.lease_lost.is_set():
            return True
        with self.worker.sessions() as session:
            now = self.now()
            return queue.waiting_above(session, self.priority, now, self.worker.window_open(now))


Handler = Callable[[JobContext], "dict[str, Any] | None"]


class Worker:
    """One job at a time; ``run`` loops until :attr:`stopping` is set."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        handlers: Mapping[str, Handler],
        *,
        worker_id: str | None = None,
        clock: Clock = utcnow,
        device: str | None = None,
        kinds: list[str] | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.handlers = dict(handlers)
        self.worker_id = worker_id or default_worker_id()
        self.clock = clock
        self.device = device or resolve_device(settings.worker.device)
        self.kinds = kinds or list(self.handlers)
        self.stopping = stopping or threading.Event()

    # --- time ----------------------------------------------------------------------------

    def window_open(self, now: datetime) -> bool:
        """Is ``now`` inside the overnight window, in the configured time zone?"""
        scheduler = self.settings.scheduler
        return scheduler.overnight_window.contains(now.astimezone(scheduler.zone).time())

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Claim and run jobs until stopped; when idle, reclaim leases of dead workers."""
        poll = self.settings.scheduler.poll_interval_s
        LOG.info(
            "worker started",
            extra={"event": "worker_started", "worker": self.worker_id, "device": self.device},
        )
        while not self.stopping.is_set():
            try:
                ran = self.run_one()
            except Exception:  # the catalog was unreachable: wait and try again
                LOG.exception("worker loop error", extra={"event": "worker_error"})
                ran = None
            if ran is None:
                self.reclaim()
                self.stopping.wait(poll)
        LOG.info("worker stopped", extra={"event": "worker_stopped", "worker": self.worker_id})

    def reclaim(self) -> list[int]:
        with self.sessions() as session:
            reclaimed = queue.reclaim_expired(session, self.clock())
        for job_id in reclaimed:
            LOG.warning(
                "lease expired; job re-queued",
                extra={"event": "job_reclaimed", "job": job_id, "worker": self.worker_id},
            )
        return reclaimed

    def run_one(self) -> int | None:
        """Claim the best due job and run it; its id, or ``None`` when none was due."""
        with self.sessions() as session:
            now = self.clock()
            job = queue.claim(
                session,
                self.worker_id,
                now,
                self.settings.worker.lease_seconds,
                window_open=self.window_open(now),
                kinds=self.kinds,
            )
            if job is None:
                return None
            claimed = (job.id, job.kind, dict(job.payload), job.priority, job.attempts)
            limit, queued_s = job.max_attempts, (now - job.created_at).total_seconds()
        with self.sessions() as session:
            job_id, kind, payload, priority, attempts = claimed
            context = JobContext(job_id, kind, payload, priority, attempts, limit, session, self)
            self._execute(context, queued_s)
        return job_id

    def _execute(self, context: JobContext, queued_s: float) -> None:
        extra = {"job": context.job_id, "kind": context.kind, "worker": self.worker_id}
        LOG.info(
            "job started",
            extra={
                "event": "job_started",
                **extra,
                "attempt": context.attempts,
                "queued_s": round(queued_s, 3),
            },
        )
        beating = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(context, beating), daemon=True)
        beat.start()
        began = time.perf_counter()
        outcome: str
        try:
            handler = self.handlers[context.kind]
            result = handler(context) or {}
            result = {**result, "seconds": round(time.perf_counter() - began, 3)}
            with self.sessions() as session:
                done = queue.complete(session, context.job_id, self.worker_id, self.clock(), result)
            outcome = "succeeded" if done else "lease_lost"
        except JobYielded as yielded:
            with self.sessions() as session:
                released = queue.release(
                    session,
                    context.job_id,
                    self.worker_id,
                    self.clock(),
                    yielded.payload,
                    yielded.reason,
                    yielded.resume_at,
                )
            outcome = "yielded" if released else "lease_lost"
            extra["reason"] = yielded.reason
        except Exception as error:  # every failure is recorded; none kills the worker
            outcome = self._record_failure(context, error)
            extra["error"] = describe_error(error, self.device)
        finally:
            beating.set()
            beat.join()
            context.session.rollback()
        seconds = round(time.perf_counter() - began, 3)
        level = logging.WARNING if outcome not in ("succeeded", "yielded") else logging.INFO
        LOG.log(level, "job %s", outcome, extra={"event": f"job_{outcome}", **extra, "s": seconds})

    def _record_failure(self, context: JobContext, error: Exception) -> str:
        reason = describe_error(error, self.device)
        permanent = isinstance(error, PermanentJobError)
        if not permanent:
            LOG.error("job raised", exc_info=error, extra={"event": "job_error"})
        if _is_gpu_oom(error):
            _free_gpu_memory()
        retry_after = None if permanent else exponential_backoff(context.attempts)
        with self.sessions() as session:
            status = queue.fail(
                session, context.job_id, self.worker_id, self.clock(), reason, retry_after
            )
        if status is None:
            return "lease_lost"
        return "failed" if status == "failed" else "retrying"

    def _heartbeat(self, context: JobContext, done: threading.Event) -> None:
        interval = self.settings.worker.heartbeat_seconds
        lease_s = self.settings.worker.lease_seconds
        while not done.wait(interval):
            try:
                with self.sessions() as session:
                    alive = queue.heartbeat(
                        session, context.job_id, self.worker_id, self.clock(), lease_s
                    )
            except Exception:  # a missed beat is retried; lease expiry is the backstop
                LOG.warning("heartbeat failed", extra={"event": "heartbeat_failed"}, exc_info=True)
                continue
            if not alive:
                context.lease_lost.set()
                LOG.warning(
                    "lease lost (cancelled or reclaimed)",
                    extra={"event": "lease_lost", "job": context.job_id},
                )
                return


def _is_gpu_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError)


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe_error(error: BaseException, device: str) -> str:
    """The reason stored with a failed job: what happened, in words an operator can act on."""
    if _is_gpu_oom(error):
        return (
            f"GPU out of memory on {device} ({str(error).splitlines()[0]}); lower "
            "training.batch_size or registration.scales, or run this worker on a larger GPU"
        )
    if isinstance(error, PermanentJobError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def noop(context: JobContext) -> dict[str, Any]:
    """A job that does nothing but wait ``payload["seconds"]``: queue tests and benchmarks.

    With ``payload["trace"]`` (a file path), appends ``start``/``done`` lines so that a test
    can count how often each job ran, across processes.
    """
    seconds = float(context.payload.get("seconds", 0.0))
    trace = context.payload.get("trace")
    line = f"{context.job_id} {context.worker.worker_id}"
    if trace:
        _append(trace, f"start {line}\n")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if context.lease_lost.is_set():
            raise JobYielded("lease lost")
        time.sleep(min(0.05, max(deadline - time.monotonic(), 0.0)))
    if trace:
        _append(trace, f"done {line}\n")
    return {"worker": context.worker.worker_id}


def _append(path: str, text: str) -> None:
    """One ``write`` on an O_APPEND file: lines from several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def start_workers(
    settings: Settings,
    sessions: sessionmaker[Session],
    handlers: Mapping[str, Handler],
    stopping: threading.Event,
    *,
    clock: Clock = utcnow,
    kinds: list[str] | None = None,
    name: str = "",
) -> list[threading.Thread]:
    """``worker.concurrency`` workers in threads sharing one stop event."""
    device = resolve_device(settings.worker.device)
    threads = []
    for index in range(settings.worker.concurrency):
        worker = Worker(
            settings,
            sessions,
            handlers,
            worker_id=default_worker_id(index, name),
            clock=clock,
            device=device,
            kinds=kinds,
            stopping=stopping,
        )
        thread = threading.Thread(target=worker.run, name=f"worker-{index}", daemon=True)
        thread.start()
        threads.append(thread)
    return threads
