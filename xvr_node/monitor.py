"""``GET /healthz`` and Prometheus ``GET /metrics``, on loopback by default.

Every figure is read from the catalog at scrape time, so one scrape of any node sees the work
of every worker sharing that catalog, and a restart loses no counter.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from xvr_node import __version__
from xvr_node.catalog.models import (
    Export,
    IngestEvent,
    Instance,
    Job,
    JobKind,
    JobStatus,
    PoseModel,
    Registration,
)
from xvr_node.jobs.engine import stalled_jobs

LOG = logging.getLogger(__name__)

#: A running job whose worker was silent this long is reported by ``/healthz``.
STALLED_AFTER_S = 60.0

#: Figures over recent work (queue wait, registration time and similarity) use this many rows.
RECENT = 200


def _figures(session: Session) -> Iterator[Metric]:
    """The node's figures from the catalog, as Prometheus metric families."""
    info = GaugeMetricFamily("xvr_node_info", "Version of this node.", labels=["version"])
    info.add_metric([__version__], 1)
    yield info

    yield _grouped(
        session,
        "xvr_node_instances_stored",
        "Instances received and stored, by usability.",
        [Instance.usability],
        ["usability"],
    )
    yield _grouped(
        session,
        "xvr_node_ingest_events",
        "Refused associations and instances, by kind.",
        [IngestEvent.event],
        ["event"],
    )
    yield _grouped(
        session,
        "xvr_node_jobs",
        "Jobs by kind and state.",
        [Job.kind, Job.status],
        ["kind", "status"],
    )

    wait = GaugeMetricFamily(
        "xvr_node_job_queue_wait_seconds",
        f"Median wait from queued to started over the last {RECENT} started jobs, by kind.",
        labels=["kind"],
    )
    waits: dict[str, list[float]] = {}
    for kind, created, started in session.execute(
        select(Job.kind, Job.created_at, Job.started_at)
        .where(Job.started_at.is_not(None), Job.attempts == 1)
        .order_by(Job.id.desc())
        .limit(RECENT)
    ):
        waits.setdefault(str(kind), []).append((started - created).total_seconds())
    for kind, values in sorted(waits.items()):
        wait.add_metric([kind], statistics.median(values))
    yield wait

    yield CounterMetricFamily(
        "xvr_node_registrations",
        "Frames registered since installation.",
        value=session.scalar(select(func.count(Registration.id))) or 0,
    )
    quality = GaugeMetricFamily(
        "xvr_node_registrations_by_quality",
        "Frames registered, by the quality gate's verdict (unassessed: before the gate).",
        labels=["verdict"],
    )
    verdicts = dict(
        session.execute(
            select(Registration.reliable, func.count()).group_by(Registration.reliable)
        ).all()
    )
    for verdict, label in ((True, "reliable"), (False, "unreliable"), (None, "unassessed")):
        quality.add_metric([label], verdicts.get(verdict, 0))
    yield quality
    recent = session.execute(
        select(Registration.wall_time_s, Registration.similarity)
        .order_by(Registration.id.desc())
        .limit(RECENT)
    ).all()
    for name, index, help_text in (
        ("xvr_node_registration_seconds", 0, "Median refinement time per frame"),
        ("xvr_node_registration_similarity", 1, "Median final similarity per frame"),
    ):
        values = [row[index] for row in recent if row[index] is not None]
        median = GaugeMetricFamily(name, f"{help_text}, last {RECENT} frames.")
        if values:
            median.add_metric([], statistics.median(values))
        yield median

    models = GaugeMetricFamily(
        "xvr_node_models",
        "Pose models by state and held-out validation.",
        labels=["state", "validated"],
    )
    for state, validated, count in session.execute(
        select(PoseModel.state, PoseModel.validated, func.count()).group_by(
            PoseModel.state, PoseModel.validated
        )
    ):
        models.add_metric([str(state), str(bool(validated)).lower()], count)
    yield models
    training = GaugeMetricFamily(
        "xvr_node_training_progress",
        "Running finetunes: iterations done, planned total and seconds left, by job.",
        labels=["job", "field"],
    )
    for job_id, progress in session.execute(
        select(Job.id, Job.progress).where(
            Job.kind == JobKind.FINETUNE, Job.status == JobStatus.RUNNING
        )
    ):
        for field in ("iteration", "total", "eta_s"):
            if progress and progress.get(field) is not None:
                training.add_metric([str(job_id), field], progress[field])
    yield training

    yield _grouped(
        session,
        "xvr_node_exports",
        "Result objects in the outbox, by state.",
        [Export.status],
        ["status"],
    )


def _grouped(
    session: Session, name: str, help_text: str, columns: list[Any], labels: list[str]
) -> GaugeMetricFamily:
    """A gauge with one sample per distinct value of ``columns``: its row count."""
    family = GaugeMetricFamily(name, help_text, labels=labels)
    for *values, count in session.execute(select(*columns, func.count()).group_by(*columns)):
        family.add_metric([str(value) for value in values], count)
    return family


class CatalogCollector(Collector):
    """Reads the figures from the catalog at each scrape, in one session."""

    def __init__(self, open_session: Callable[[], AbstractContextManager[Session]]) -> None:
        self.open_session = open_session

    def collect(self) -> Iterator[Metric]:
        with self.open_session() as session:
            yield from list(_figures(session))


def metrics_registry(
    open_session: Callable[[], AbstractContextManager[Session]],
) -> CollectorRegistry:
    """The catalog's figures and this process's own (memory, CPU, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(open_session))
    ProcessCollector(namespace="xvr_node", registry=registry)
    return registry


def collect_metrics(session: Session) -> str:
    """The catalog's figures in Prometheus's text format, read in ``session``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(lambda: nullcontext(session)))
    return generate_latest(registry).decode()


def health(session: Session, workers_alive: int, workers_expected: int) -> tuple[int, dict]:
    """200 when the catalog answers and every worker thread runs; 503 otherwise."""
    body: dict[str, Any] = {"version": __version__, "workers": workers_alive}
    try:
        body |= {"catalog": "ok", "stalled_jobs": stalled_jobs(session, STALLED_AFTER_S)}
    except Exception as error:  # the catalog is down: say so, do not crash the endpoint
        body |= {"catalog": f"error: {type(error).__name__}"}
        return 503, {**body, "status": "unhealthy"}
    healthy = workers_alive >= workers_expected
    return (200 if healthy else 503), {**body, "status": "ok" if healthy else "unhealthy"}


class MonitorServer:
    """The HTTP endpoints in a thread of the node."""

    def __init__(
        self,
        host: str,
        port: int,
        sessions: sessionmaker[Session],
        workers: Callable[[], tuple[int, int]],
    ) -> None:
        self.sessions = sessions
        self.workers = workers
        self.registry = metrics_registry(sessions)
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                monitor.answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                LOG.debug("monitor: " + format, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            with self.sessions() as session:
                status, body = health(session, *self.workers())
            self._send(request, status, "application/json", json.dumps(body))
        elif path == "/metrics":
            try:
                text = generate_latest(self.registry).decode()
            except Exception as error:  # the catalog is down: say so, do not crash the endpoint
                self._send(request, 503, "text/plain", f"catalog unavailable: {error}\n")
                return
            self._send(request, 200, CONTENT_TYPE_LATEST, text)
        else:
            self._send(request, 404, "text/plain", "GET /healthz or /metrics\n")

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, kind: str, body: str) -> None:
        data = body.encode()
        request.send_response(status)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)
