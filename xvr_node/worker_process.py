"""``xvr-node worker``: job workers without a listener, until SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading

from xvr_node.catalog.db import make_engine, require_current_schema, session_factory
from xvr_node.catalog.embedded import catalog_server
from xvr_node.config import Settings
from xvr_node.dicom.storage import FileStore
from xvr_node.jobs.pipeline import Pipeline
from xvr_node.jobs.worker import resolve_device, start_workers

LOG = logging.getLogger(__name__)


def run_worker_process(settings: Settings, kinds: list[str] | None = None, name: str = "") -> None:
    """Run ``worker.concurrency`` workers; SIGTERM/SIGINT stop them after their current job."""
    with catalog_server(settings.database.url, settings.storage_root) as url:
        _run_workers(settings, url, kinds, name)


def _run_workers(settings: Settings, url: str, kinds: list[str] | None, name: str) -> None:
    require_current_schema(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    store = FileStore(settings.ensure_storage_root(), settings.storage.min_free_bytes)
    handlers = Pipeline(settings, store, resolve_device(settings.worker.device)).handlers()
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    threads = start_workers(settings, sessions, handlers, stopping, kinds=kinds, name=name)
    # The main thread waits for the signal; joining with a timeout keeps it responsive.
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(timeout=0.5)
    engine.dispose()
    LOG.info("workers stopped", extra={"event": "workers_stopped"})
