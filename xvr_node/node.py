"""The running node: catalog, store, receiver, DICOM listener and the scheduler's clock."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field

from apscheduler.schedulers.background import BackgroundScheduler
from pynetdicom.transport import ThreadedAssociationServer

from xvr_node.catalog.db import make_engine, require_current_schema, session_factory
from xvr_node.catalog.models import IngestEventKind, utcnow
from xvr_node.config import Settings
from xvr_node.dicom.receive import CarmFallback, Receiver
from xvr_node.dicom.scp import build_ae, handlers, tls_context
from xvr_node.dicom.storage import FileStore
from xvr_node.jobs.assemble import queue_stable_series

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
        store, session_factory(make_engine(url)), settings.node.max_pixel_bytes, fallbacks
    )
    return receiver, store


@dataclass
class Node:
    """``xvr-node serve``: start, run until told to stop, stop cleanly."""

    settings: Settings
    server: ThreadedAssociationServer | None = None
    scheduler: BackgroundScheduler | None = None
    stopped: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        settings = self.settings
        receiver, store = make_receiver(settings)
        self.receiver = receiver
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
        self.server = ae.start_server(
            (settings.node.host, settings.node.port),
            block=False,
            evt_handlers=handlers(receiver, on_rejected),
            ssl_context=tls_context(settings.node),
        )
        self.scheduler = BackgroundScheduler(timezone=settings.scheduler.zone)
        self.scheduler.add_job(
            self.check_stable_series,
            "interval",
            seconds=settings.scheduler.poll_interval_s,
            id="stable-series",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.start()
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

    def check_stable_series(self) -> None:
        with self.receiver.sessions() as session:
            queue_stable_series(session, utcnow(), self.settings.scheduler.stable_series_seconds)

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT; then stop accepting and finish cleanly."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stopped.set())
        self.start()
        self.stopped.wait()
        self.stop()

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.server is not None:
            self.server.shutdown()
        LOG.info("stopped", extra={"event": "stopped"})
