"""Workers: run the node's jobs on the engine (procrastinate), one ledger row at a time.

``xvr-node serve`` runs a :class:`Worker` (``worker.concurrency`` jobs at once) inside the
node; ``xvr-node worker`` runs it alone, for more GPUs or more machines sharing the catalog
and the store. procrastinate fetches, heartbeats, retries and recovers; this module turns an
engine job into a run of the ledger job it points at, and records how that ended. What each
kind does lives in :mod:`xvr_node.jobs.pipeline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import procrastinate
from sqlalchemy.orm import Session, sessionmaker

from xvr_node.catalog.models import Job, JobKind, JobStatus, utcnow
from xvr_node.clock import Clock
from xvr_node.config import Settings
from xvr_node.dicom.storage import FileStore
from xvr_node.jobs import engine, export
from xvr_node.jobs.engine import JobFailed, PermanentJobError

__all__ = ["JobContext", "JobYielded", "PermanentJobError", "Worker", "start_workers"]

LOG = logging.getLogger(__name__)

#: Ledger statuses an engine job may still run (RUNNING: its worker went silent before).
UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


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
    engine_context: procrastinate.JobContext | None = None

    @property
    def device(self) -> str:
        return self.worker.device

    def now(self) -> datetime:
        return self.worker.clock()

    def should_yield(self) -> bool:
        """Stop now? The worker is stopping, a person cancelled the job, or more urgent
        work waits. Long jobs (finetuning) ask between steps; one indexed query."""
        if self.worker.stopping.is_set():
            return True
        if self.engine_context is not None and self.engine_context.should_abort():
            return True
        with self.worker.sessions() as session:
            return engine.waiting_above(session, self.priority, self.worker.kinds)


Handler = Callable[[JobContext], "dict[str, Any] | None"]


def run_ledger_job(context: procrastinate.JobContext, job_id: int) -> Any:
    """The body of every engine task: run ledger job ``job_id`` on this worker."""
    runner: Worker = context.additional_context["runner"]
    return runner.execute(context, job_id)


def run_delivery(context: procrastinate.JobContext, destination: str) -> Any:
    """The body of the ``deliver`` task: send one destination's due outbox rows."""
    runner: Worker = context.additional_context["runner"]
    return runner.deliver(destination)


class Worker:
    """Runs engine jobs (``concurrency`` at once) until :attr:`stopping` is set."""

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
        concurrency: int = 1,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.handlers = dict(handlers)
        self.worker_id = worker_id or default_worker_id()
        self.clock = clock
        self.device = device or resolve_device(settings.worker.device)
        self.kinds = [str(kind) for kind in (kinds or self.handlers)]
        self.stopping = stopping or threading.Event()
        self.concurrency = concurrency
        self.ran: list[int] = []  # ledger ids this worker ran (tests, benchmarks)
        self._stop_after_one = False
        self._engine: tuple[asyncio.AbstractEventLoop, asyncio.Task[None]] | None = None
        self._store: FileStore | None = None

    @property
    def store(self) -> FileStore:
        """The file store the outbox reads its result objects from."""
        if self._store is None:
            storage = self.settings.storage
            self._store = FileStore(self.settings.storage_root, storage.min_free_bytes)
        return self._store

    # --- time ----------------------------------------------------------------------------

    def window_open(self, now: datetime) -> bool:
        """Is ``now`` inside the overnight window, in the configured time zone?"""
        scheduler = self.settings.scheduler
        return scheduler.overnight_window.contains(now.astimezone(scheduler.zone).time())

    # --- the engine ----------------------------------------------------------------------

    def run(self) -> None:
        """Run jobs until stopped (new ones wake the worker by LISTEN/NOTIFY)."""
        LOG.info(
            "worker started",
            extra={"event": "worker_started", "worker": self.worker_id, "device": self.device},
        )
        # The engine stops when it loses the catalog; the worker waits and starts it again.
        while not self.stopping.is_set():
            try:
                asyncio.run(self._serve(wait=True))
            except Exception:  # the catalog was unreachable: wait and try again
                LOG.exception("worker loop error", extra={"event": "worker_error"})
            if not self.stopping.is_set():
                self.stopping.wait(self.settings.scheduler.poll_interval_s)
        LOG.info("worker stopped", extra={"event": "worker_stopped", "worker": self.worker_id})

    def drain(self) -> list[int]:
        """Run every job due now, then return the ledger ids run (tests and the CLI)."""
        before = len(self.ran)
        asyncio.run(self._serve(wait=False))
        return self.ran[before:]

    def run_one(self) -> int | None:
        """Run the best job due now; its ledger id, or None when none was due."""
        self._stop_after_one = True
        try:
            ran = self.drain()
        finally:
            self._stop_after_one = False
        return ran[0] if ran else None

    def _stop_engine(self) -> None:
        """Stop fetching (from a job's thread): the job in hand still finishes."""
        if self._engine is not None:
            loop, task = self._engine
            loop.call_soon_threadsafe(task.cancel)

    def _url(self) -> str:
        bind = self.sessions.kw["bind"]
        return bind.url.render_as_string(hide_password=False)

    async def _serve(self, wait: bool) -> None:
        worker = self.settings.worker
        app = engine.make_app(self._url(), pool_size=self.concurrency + 3)
        async with app.open_async():
            running = asyncio.create_task(
                app.run_worker_async(
                    queues=self.kinds,
                    name=self.worker_id,
                    concurrency=self.concurrency,
                    wait=wait,
                    listen_notify=wait,
                    install_signal_handlers=False,
                    additional_context={"runner": self},
                    fetch_job_polling_interval=self.settings.scheduler.poll_interval_s,
                    abort_job_polling_interval=worker.heartbeat_seconds,
                    update_heartbeat_interval=worker.heartbeat_seconds,
                    stalled_worker_timeout=worker.lease_seconds,
                )
            )
            self._engine = (asyncio.get_running_loop(), running)
            if not wait:
                with contextlib.suppress(asyncio.CancelledError):
                    await running
                self._engine = None
                return
            next_recovery = 0.0
            while not self.stopping.is_set() and not running.done():
                if time.monotonic() >= next_recovery:
                    next_recovery = time.monotonic() + worker.heartbeat_seconds
                    try:
                        await self.recover_stalled(app)
                    except Exception:  # the catalog was unreachable: try again next time
                        LOG.warning("stalled-job check failed", exc_info=True)
                await asyncio.sleep(0.1)
            running.cancel()  # the engine's graceful stop: running jobs finish or yield
            with contextlib.suppress(asyncio.CancelledError):
                await running
            self._engine = None

    async def recover_stalled(self, app: procrastinate.App) -> list[int]:
        """Jobs of workers that stopped heartbeating: run again, or fail after the last try."""
        lease_s = self.settings.worker.lease_seconds
        stalled = await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=lease_s)
        recovered = []
        for engine_job in stalled:
            if engine_job.task_name == engine.DELIVER_TASK:
                await self._recover_delivery(app, engine_job)
                continue
            job_id = int(engine_job.task_kwargs["job_id"])
            gave_up, database_now = await asyncio.to_thread(
                self._record_stall, job_id, engine_job.id, lease_s
            )
            if gave_up:
                await app.job_manager.finish_job_by_id_async(
                    engine_job.id, status=procrastinate.jobs.Status.FAILED, delete_job=False
                )
            else:
                # Due now by the database's clock (procrastinate's default is this host's).
                await app.job_manager.retry_job(engine_job, retry_at=database_now)
            recovered.append(job_id)
            LOG.warning(
                "worker stopped answering; job %s",
                "failed" if gave_up else "re-queued",
                extra={"event": "job_reclaimed", "job": job_id, "worker": self.worker_id},
            )
        return recovered

    async def _recover_delivery(
        self, app: procrastinate.App, engine_job: procrastinate.jobs.Job
    ) -> None:
        """A deliverer that died: its rows wait in the outbox; queue the next delivery."""
        destination = str(engine_job.task_kwargs["destination"])
        await app.job_manager.finish_job_by_id_async(
            engine_job.id, status=procrastinate.jobs.Status.FAILED, delete_job=False
        )

        def queue() -> None:
            with self.sessions() as session:
                engine.ensure_delivery(session, destination)
                session.commit()

        await asyncio.to_thread(queue)
        LOG.warning(
            "deliverer stopped answering; delivery to %s queued again",
            destination,
            extra={"event": "delivery_reclaimed", "destination": destination},
        )

    def _record_stall(
        self, job_id: int, engine_job_id: int, lease_s: float
    ) -> tuple[bool, datetime]:
        """Record why the job runs again (or fails): (attempts used up?, the database's now)."""
        with self.sessions() as session:
            database_now = engine.engine_time_after(session, 0.0)
            job = session.get(Job, job_id, populate_existing=True)
            if job is None or job.engine_job_id != engine_job_id:
                return False, database_now  # a stale engine job: retried into a no-op
            gave_up = job.attempts >= job.max_attempts
            reason = (
                f"worker {job.worker} stopped answering (no heartbeat for {lease_s:g} s); "
                f"attempt {job.attempts} of {job.max_attempts}"
            )
            if job.status == JobStatus.RUNNING:
                job.status = JobStatus.FAILED if gave_up else JobStatus.QUEUED
                job.error, job.worker = reason, None
                if gave_up:
                    job.finished_at = self.clock()
            session.commit()
            return gave_up, database_now

    # --- one job -------------------------------------------------------------------------

    def deliver(self, destination: str) -> dict[str, Any]:
        """Send ``destination``'s due outbox rows (the ``deliver`` task)."""
        began = time.perf_counter()
        with self.sessions() as session:
            summary = export.deliver(session, self.store, self.settings, destination, self.clock())
        if not summary["busy"] and (summary["due"] or summary["confirmed"] or summary["parked"]):
            counts = {key: summary[key] for key in export.DELIVERY_COUNTS}
            LOG.info(
                "delivered to %s",
                destination,
                extra={
                    "event": "delivery_done",
                    "destination": destination,
                    "worker": self.worker_id,
                    **counts,
                    "s": round(time.perf_counter() - began, 3),
                },
            )
        return summary

    def execute(self, engine_context: procrastinate.JobContext, job_id: int) -> Any:
        """Run ledger job ``job_id`` if ``engine_context``'s job is still the one for it."""
        engine_job_id = engine_context.job.id
        with self.sessions() as session:
            job = session.get(Job, job_id, populate_existing=True)
            current = job is not None and job.engine_job_id == engine_job_id
            if not current or job.status not in UNFINISHED:
                LOG.info(
                    "engine job %s is no longer current for job %s; nothing to do",
                    engine_job_id,
                    job_id,
                    extra={"event": "job_stale", "job": job_id},
                )
                return None
            now = self.clock()
            if job.kind == JobKind.FINETUNE and not job.urgent and not self.window_open(now):
                resume = self.settings.scheduler.overnight_window.next_start(
                    now.astimezone(self.settings.scheduler.zone)
                )
                self._requeue(session, job, "outside the overnight window", resume, None)
                return None
            job.status, job.worker = JobStatus.RUNNING, self.worker_id
            job.attempts += 1
            # The limit in force is this worker's (worker.max_attempts); the row keeps it so
            # that a stall noticed by another worker, and `jobs list`, use the same.
            job.max_attempts = self.settings.worker.max_attempts
            job.started_at, job.finished_at = now, None
            queued_s = (now - job.created_at).total_seconds()
            session.commit()
            context = JobContext(
                job.id,
                job.kind,
                dict(job.payload),
                job.priority,
                job.attempts,
                job.max_attempts,
                session,
                self,
                engine_context,
            )
            self.ran.append(job.id)
            if self._stop_after_one:
                self._stop_engine()
            return self._run(context, queued_s)

    def _run(self, context: JobContext, queued_s: float) -> Any:
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
        began = time.perf_counter()
        try:
            result = self.handlers[context.kind](context) or {}
        except JobYielded as yielded:
            context.session.rollback()
            with self.sessions() as session:
                job = session.get(Job, context.job_id, populate_existing=True)
                cancelled = job.status == JobStatus.CANCELLED
                if not cancelled:
                    job.attempts = max(job.attempts - 1, 0)  # yielding is no failure
                    self._requeue(session, job, yielded.reason, yielded.resume_at, yielded.payload)
            outcome = "cancelled" if cancelled else "yielded"
            extra["reason"] = yielded.reason
            self._log(outcome, extra, began)
            return None
        except Exception as error:  # every failure is recorded; none kills the worker
            context.session.rollback()
            retry_at = self._record_failure(context, error)
            extra["error"] = describe_error(error, self.device)
            self._log("retrying" if retry_at is not None else "failed", extra, began)
            raise JobFailed(extra["error"], retry_at) from error
        seconds = round(time.perf_counter() - began, 3)
        context.session.rollback()
        with self.sessions() as session:
            job = session.get(Job, context.job_id, populate_existing=True)
            if job.status == JobStatus.RUNNING:
                job.status, job.finished_at = JobStatus.SUCCEEDED, self.clock()
                job.result, job.error, job.worker = {**result, "seconds": seconds}, None, None
                session.commit()
        self._log("succeeded", extra, began)
        return {"job": context.job_id}

    def _requeue(
        self,
        session: Session,
        job: Job,
        reason: str,
        resume_at: datetime | None,
        payload: dict[str, Any] | None,
    ) -> None:
        """Give ``job`` back to the queue with a new engine job, in one commit."""
        now = self.clock()
        job.status, job.worker, job.error = JobStatus.QUEUED, None, reason or None
        job.next_attempt_at = resume_at or now
        if payload is not None:
            job.payload = payload
        job.engine_job_id = engine.defer(
            session,
            job.id,
            job.kind,
            priority=job.priority,
            delay_s=None if resume_at is None else (resume_at - now).total_seconds(),
        )
        session.commit()

    def _record_failure(self, context: JobContext, error: Exception) -> datetime | None:
        """Record the reason; when the engine runs it again (its clock), or None: failed."""
        reason = describe_error(error, self.device)
        permanent = isinstance(error, PermanentJobError)
        if not permanent:
            LOG.error("job raised", exc_info=error, extra={"event": "job_error"})
        if _is_gpu_oom(error):
            _free_gpu_memory()
        retry = not permanent and context.attempts < context.max_attempts
        retry_in = engine.backoff_seconds(context.attempts) if retry else None
        with self.sessions() as session:
            job = session.get(Job, context.job_id, populate_existing=True)
            if job.status != JobStatus.RUNNING:
                return None  # cancelled meanwhile: stays so
            now = self.clock()
            job.error, job.worker = reason, None
            retry_at = None
            if retry_in is not None:
                job.status, job.next_attempt_at = (
                    JobStatus.QUEUED,
                    now + timedelta(seconds=retry_in),
                )
                retry_at = engine.engine_time_after(session, retry_in)
            else:
                job.status, job.finished_at = JobStatus.FAILED, now
            session.commit()
        return retry_at

    def _log(self, outcome: str, extra: dict[str, Any], began: float) -> None:
        seconds = round(time.perf_counter() - began, 3)
        level = logging.INFO if outcome in ("succeeded", "yielded") else logging.WARNING
        LOG.log(level, "job %s", outcome, extra={"event": f"job_{outcome}", **extra, "s": seconds})


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
        if context.engine_context is not None and context.engine_context.should_abort():
            raise JobYielded("cancelled")
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
