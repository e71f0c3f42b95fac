"""``GET /healthz`` and Prometheus ``GET /metrics``, on loopback by default.

Every figure is read from the catalog at scrape time, so one scrape of any node sees the work
of every worker sharing that catalog, and a restart loses no counter.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
from collections.abc import Callable
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
    utcnow,
)

LOG = logging.getLogger(__name__)

#: Figures over recent work (queue wait, registration time and similarity) use this many rows.
RECENT = 200


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Prometheus text exposition format, one family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        label = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
        self.lines.append(f"{name}{{{label}}} {value:g}" if label else f"{name} {value:g}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def collect_metrics(session: Session) -> str:
    """The node's figures from the catalog."""
    m = Metrics()
    m.family("xvr_node_info", "gauge", "Version of this node.")
    m.sample("xvr_node_info", 1, version=__version__)

    m.family("xvr_node_instances_stored", "gauge", "Instances received and stored, by usability.")
    for usability, count in session.execute(
        select(Instance.usability, func.count()).group_by(Instance.usability)
    ):
        m.sample("xvr_node_instances_stored", count, usability=str(usability))

    m.family("xvr_node_ingest_events", "gauge", "Refused associations and instances, by kind.")
    for event, count in session.execute(
        select(IngestEvent.event, func.count()).group_by(IngestEvent.event)
    ):
        m.sample("xvr_node_ingest_events", count, event=str(event))

    m.family("xvr_node_jobs", "gauge", "Jobs by kind and state.")
    for kind, status, count in session.execute(
        select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
    ):
        m.sample("xvr_node_jobs", count, kind=str(kind), status=str(status))

    m.family(
        "xvr_node_job_queue_wait_seconds",
        "gauge",
        f"Median wait from queued to started over the last {RECENT} started jobs, by kind.",
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
        m.sample("xvr_node_job_queue_wait_seconds", statistics.median(values), kind=kind)

    recent = session.execute(
        select(Registration.wall_time_s, Registration.similarity)
        .order_by(Registration.id.desc())
        .limit(RECENT)
    ).all()
    m.family("xvr_node_registrations_total", "counter", "Frames registered since installation.")
    m.sample(
        "xvr_node_registrations_total", session.scalar(select(func.count(Registration.id))) or 0
    )
    m.family(
        "xvr_node_registrations_by_quality",
        "gauge",
        "Frames registered, by the quality gate's verdict (unassessed: before the gate).",
    )
    verdicts = dict(
        session.execute(
            select(Registration.reliable, func.count()).group_by(Registration.reliable)
        ).all()
    )
    for verdict, label in ((True, "reliable"), (False, "unreliable"), (None, "unassessed")):
        m.sample("xvr_node_registrations_by_quality", verdicts.get(verdict, 0), verdict=label)
    for name, index, help_text in (
        ("xvr_node_registration_seconds", 0, "Median refinement time per frame"),
        ("xvr_node_registration_similarity", 1, "Median final similarity per frame"),
    ):
        values = [row[index] for row in recent if row[index] is not None]
        m.family(name, "gauge", f"{help_text}, last {RECENT} frames.")
        if values:
            m.sample(name, statistics.median(values))

    m.family("xvr_node_models", "gauge", "Pose models by state and held-out validation.")
    for state, validated, count in session.execute(
        select(PoseModel.state, PoseModel.validated, func.count()).group_by(
            PoseModel.state, PoseModel.validated
        )
    ):
        m.sample("xvr_node_models", count, state=str(state), validated=str(bool(validated)).lower())
    m.family(
        "xvr_node_training_progress",
        "gauge",
        "Running finetunes: iterations done, planned total and seconds left, by job.",
    )
    for job_id, progress in session.execute(
        select(Job.id, Job.progress).where(
            Job.kind == JobKind.FINETUNE, Job.status == JobStatus.RUNNING
        )
    ):
        if not progress:
            continue
        for field in ("iteration", "total", "eta_s"):
            if progress.get(field) is not None:
                m.sample(
                    "xvr_node_training_progress", progress[field], job=str(job_id), field=field
                )

    m.family("xvr_node_exports", "gauge", "Result objects in the outbox, by state.")
    for status, count in session.execute(
        select(Export.status, func.count()).group_by(Export.status)
    ):
        m.sample("xvr_node_exports", count, status=str(status))
    return m.text()


def health(session: Session, workers_alive: int, workers_expected: int) -> tuple[int, dict]:
    """200 when the catalog answers and every worker thread runs; 503 otherwise."""
    body: dict[str, Any] = {"version": __version__, "workers": workers_alive}
    try:
        now = utcnow()
        stale = session.scalar(
            select(func.count(Job.id)).where(
                Job.status == JobStatus.RUNNING, Job.lease_expires_at < now - timedelta(minutes=1)
            )
        )
        body |= {"catalog": "ok", "expired_leases": stale}
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
                with self.sessions() as session:
                    text = collect_metrics(session)
            except Exception as error:
                self._send(request, 503, "text/plain", f"catalog unavailable: {error}\n")
                return
            self._send(request, 200, "text/plain; version=0.0.4; charset=utf-8", text)
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
