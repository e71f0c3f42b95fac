"""The running node: catalog, store, receiver, DICOM listener and the scheduler's clock."""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import func, select

from xvr_node.catalog.db import make_engine, require_current_schema, session_factory
from xvr_node.catalog.embedded import catalog_server
from xvr_node.catalog.models import IngestEventKind, Job, JobKind, JobStatus, utcnow
from xvr_node.clock import Clock
from xvr_node.config import Settings
from xvr_node.dicom.receive import CarmFallback, Receiver
from xvr_node.dicom.scp import build_ae, handlers, tls_context
from xvr_node.dicom.storage import FileStore
from xvr_node.jobs.assemble import queue_stable_series
from xvr_node.jobs.export import queue_due_deliveries
from xvr_node.jobs.queue import enqueue
from xvr_node.jobs.triggers import queue_missing_finetunes, queue_register
from xvr_node.monitor import MonitorServer

if TYPE_CHECKING:
    from xvr_node.jobs.pipeline import Pipeline

LOG = logging.getLogger(__name__)


def make_receiver(settings: Settings) -> tuple[Receiver, FileStore]:
    """The receive path shared by ``serve`` and ``import``; refuses an outdated catalog."""
    url = settings.database_url
    require_current_schema(url)
    store = FileStore(settings.ensure_storage_root(), settings.storage.min_free_bytes)
    fallbacks = [
        CarmFallback(
            p.manufacturer,
            p.model_name,
            p.station_name,
            p.sid_mm,
            None if p.pixel_spacing_mm is None else tuple(p.pixel_spacing_mm),
        )
        for p in settings.carm_profiles
    ]
    receiver = Receiver(
        store,
        session_factory(make_engine(url)),
        settings.node.max_pixel_bytes,
        on_usable_xray=queue_register,
        fallbacks=fallbacks,
    )
    return receiver, store


class ListenError(OSError):
    """The DICOM port could not be opened: in use, a privileged port, no such address."""


@dataclass
class Node:
    """``xvr-node serve``: listener, scheduler and (by default) workers; stops cleanly.

    ``clock`` is what the scheduler's checks and the workers take as "now" (tests move it).
    """

    settings: Settings
    run_workers: bool = True
    clock: Clock = utcnow
    server: ThreadedAssociationServer | None = None
    scheduler: BackgroundScheduler | None = None
    stopped: threading.Event = field(default_factory=threading.Event)
    stopping_workers: threading.Event = field(default_factory=threading.Event)
    workers: list[threading.Thread] = field(default_factory=list)
    workers_ready: threading.Event = field(default_factory=threading.Event)
    worker_starter: threading.Thread | None = None
    worker_lock: threading.Lock = field(default_factory=threading.Lock)
    monitor: MonitorServer | None = None
    holds: ExitStack = field(default_factory=ExitStack)

    def start(self) -> None:
        """Hold the catalog (starting the embedded server if it is ours), then open up."""
        self.holds.enter_context(
            catalog_server(self.settings.database.url, self.settings.storage_root)
        )
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        settings = self.settings
        receiver, store = make_receiver(settings)
        self.receiver = receiver
        self.store = store
        leftovers = store.discard_partial_files()
        if leftovers:
            LOG.warning(
                "discarded partial files", extra={"event": "partial_discarded", "count": leftovers}
            )

        def on_rejected(calling_ae: str, address: str, reason: str) -> None:
            LOG.warning(
                "association rejected",
                extra={
                    "event": "association_rejected",
                    "calling_ae": calling_ae,
                    "peer": address,
                    "reason": reason,
                },
            )
            receiver.record_event(
                IngestEventKind.ASSOCIATION_REJECTED, calling_ae, address, None, None, reason
            )

        ae = build_ae(settings.node)
        address = (settings.node.host, settings.node.port)
        try:
            self.server = ae.start_server(
                address,
                block=False,
                evt_handlers=handlers(receiver, on_rejected),
                ssl_context=tls_context(settings.node),
            )
        except OSError as error:
            raise ListenError(
                f"cannot listen on {address[0]}:{address[1]}: {error.strerror or error}"
            ) from error
        # Periodic work never piles up: a run still going at the next tick makes it skip.
        self.scheduler = BackgroundScheduler(
            timezone=settings.scheduler.zone,
            job_defaults={"max_instances": 1, "coalesce": True},
        )
        self.scheduler.add_job(
            self.check_stable_series,
            "interval",
            seconds=settings.scheduler.poll_interval_s,
            id="stable-series",
        )
        # At once (by the scheduler's own clock): a restart resumes the outbox.
        self.scheduler.add_job(
            self.queue_deliveries,
            "interval",
            seconds=settings.scheduler.poll_interval_s,
            id="queue-deliveries",
            next_run_time=datetime.now(UTC),
        )
        window = settings.scheduler.overnight_window
        self.scheduler.add_job(
            self.open_overnight_window,
            CronTrigger(
                hour=window.start_time.hour,
                minute=window.start_time.minute,
                timezone=settings.scheduler.zone,
            ),
            id="overnight-window",
        )
        if settings.scheduler.retention.purge_originals_after_days is not None:
            self.scheduler.add_job(
                self.queue_retention,
                CronTrigger(hour=3, minute=0, timezone=settings.scheduler.zone),
                id="retention",
            )
        self.scheduler.start()
        if settings.monitoring.enabled:
            self.start_monitor()
        if self.run_workers:
            # The registration stack (torch, timm) takes seconds to import; the listener does
            # not wait for it. Received data is safe in the catalog and waits for a worker.
            self.worker_starter = threading.Thread(
                target=self._start_workers, name="worker-start", daemon=True
            )
            self.worker_starter.start()
        else:
            self.workers_ready.set()
        LOG.info(
            "listening",
            extra={
                "event": "listening",
                "ae_title": settings.node.ae_title,
                "host": settings.node.host,
                "port": settings.node.port,
                "tls": settings.node.tls.enabled,
            },
        )

    def _start_workers(self) -> None:
        began = time.perf_counter()
        try:
            from xvr_node.jobs.pipeline import Pipeline
            from xvr_node.jobs.worker import resolve_device, start_workers

            device = resolve_device(self.settings.worker.device)
            self.pipeline = Pipeline(self.settings, self.store, device)
            with self.worker_lock:
                if self.stopping_workers.is_set():  # stopped while the stack was loading
                    return
                self.workers = start_workers(
                    self.settings,
                    self.receiver.sessions,
                    self.pipeline.handlers(),
                    self.stopping_workers,
                    clock=self.clock,
                )
        except Exception:  # /healthz reports the missing workers; the listener keeps taking data
            LOG.exception("workers did not start", extra={"event": "workers_failed"})
            return
        finally:
            self.workers_ready.set()
        LOG.info(
            "workers ready",
            extra={
                "event": "workers_ready",
                "device": device,
                "count": len(self.workers),
                "s": round(time.perf_counter() - began, 3),
            },
        )

    def wait_for_workers(self, timeout: float | None = None) -> Pipeline:
        """Block until the workers run (the demo and tests use the pipeline they share)."""
        if not self.workers_ready.wait(timeout) or not self.workers:
            raise RuntimeError("the node's workers did not start; see the log")
        return self.pipeline

    def start_monitor(self) -> None:
        """The HTTP endpoints; a busy port costs the metrics, never the DICOM service."""
        where = f"{self.settings.monitoring.host}:{self.settings.monitoring.port}"
        try:
            self.monitor = MonitorServer(
                self.settings.monitoring.host,
                self.settings.monitoring.port,
                self.receiver.sessions,
                self.workers_alive,
            )
        except OSError as error:
            LOG.error(
                "monitoring disabled: cannot listen on %s: %s",
                where,
                error,
                extra={"event": "monitoring_failed"},
            )
            return
        self.monitor.start()
        LOG.info("monitoring on http://%s/healthz", where, extra={"event": "monitoring"})

    def workers_alive(self) -> tuple[int, int]:
        """(running worker threads, how many there should be) for ``/healthz``."""
        expected = self.settings.worker.concurrency if self.run_workers else 0
        return sum(thread.is_alive() for thread in self.workers), expected

    def check_stable_series(self) -> None:
        with self.receiver.sessions() as session:
            queue_stable_series(
                session, self.clock(), self.settings.scheduler.stable_series_seconds
            )

    def queue_deliveries(self) -> None:
        """Every destination with results to deliver has its ``deliver`` job queued (after a
        restart, after a deliverer died); the workers send, backing off per row."""
        with self.receiver.sessions() as session:
            queue_due_deliveries(session, self.clock())

    def queue_retention(self) -> None:
        """Once a day (03:00 local): purge originals past the retention period."""
        now = self.clock()
        with self.receiver.sessions() as session:
            enqueue(session, JobKind.RETENTION, {}, dedupe_key=f"retention:{now:%Y-%m-%d}")
            session.commit()

    def open_overnight_window(self) -> None:
        """The window opens: finetunes wait no longer; volumes left without one get it."""
        with self.receiver.sessions() as session:
            queued = queue_missing_finetunes(session)
            waiting = session.scalar(
                select(func.count(Job.id)).where(
                    Job.kind == JobKind.FINETUNE, Job.status == JobStatus.QUEUED
                )
            )
        LOG.info(
            "overnight window open",
            extra={"event": "window_open", "finetunes_waiting": waiting, "added": len(queued)},
        )

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT; then stop accepting and finish cleanly."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stopped.set())
        self.start()
        self.stopped.wait()
        self.stop()

    def stop(self) -> None:
        """Stop listening, let workers finish or re-queue their job, then stop the clock."""
        if self.server is not None:
            self.server.shutdown()
        # Under the lock, so that a stack still loading starts no workers (it is not waited for).
        with self.worker_lock:
            self.stopping_workers.set()
        for thread in self.workers:
            thread.join()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.monitor is not None:
            self.monitor.stop()
        self.holds.close()  # the last holder of the embedded catalog server stops it
        LOG.info("stopped", extra={"event": "stopped"})
