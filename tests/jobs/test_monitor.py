"""``/metrics`` and ``/healthz``: figures read from the catalog, exact at any size."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from xvr_node.catalog.models import Job, JobKind, JobStatus
from xvr_node.monitor import MonitorServer, collect_metrics

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels (parsed, not grepped)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def running_finetune(sessions: sessionmaker[Session], progress: dict) -> int:
    with sessions() as session:
        job = Job(kind=JobKind.FINETUNE, status=JobStatus.RUNNING, payload={}, progress=progress)
        session.add(job)
        session.commit()
        return job.id


def test_large_figures_keep_every_digit(sessions):
    """A figure past a million reads back exactly (formatted by hand it read 1.23457e+06, so
    a counter seemed to stall)."""
    job_id = running_finetune(sessions, {"iteration": 1_234_567, "total": 2_000_001})
    with sessions() as session:
        text = collect_metrics(session)
    figures = samples(text)
    progress = (("field", "iteration"), ("job", str(job_id)))
    assert figures[("xvr_node_training_progress", progress)] == 1_234_567
    total = (("field", "total"), ("job", str(job_id)))
    assert figures[("xvr_node_training_progress", total)] == 2_000_001
    assert figures[("xvr_node_jobs", (("kind", "finetune"), ("status", "running")))] == 1
    assert figures[("xvr_node_registrations_total", ())] == 0
    kinds = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert kinds["xvr_node_registrations"] == "counter"
    assert kinds["xvr_node_jobs"] == "gauge"


def test_the_endpoint_serves_catalog_and_process_figures(sessions):
    running_finetune(sessions, {"iteration": 3, "total": 10})
    server = MonitorServer("127.0.0.1", 0, sessions, workers=lambda: (1, 1))
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with OPENER.open(f"{base}/metrics", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            figures = samples(response.read().decode())
        assert figures[("xvr_node_jobs", (("kind", "finetune"), ("status", "running")))] == 1
        # The worker's own memory, for the latency issue's "RSS must not grow" watch.
        assert figures[("xvr_node_process_resident_memory_bytes", ())] > 10e6
        with OPENER.open(f"{base}/healthz", timeout=10) as response:
            assert json.loads(response.read())["status"] == "ok"
        try:
            OPENER.open(f"{base}/nothing", timeout=10)
            raise AssertionError("an unknown path answered")
        except urllib.error.HTTPError as error:
            assert error.code == 404
    finally:
        server.stop()


def test_metrics_say_503_when_the_catalog_is_down(sessions):
    def broken() -> Session:
        raise ConnectionError("catalog host unreachable")

    server = MonitorServer("127.0.0.1", 0, broken, workers=lambda: (1, 1))
    server.start()
    try:
        OPENER.open(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
        raise AssertionError("metrics answered without a catalog")
    except urllib.error.HTTPError as error:
        assert error.code == 503
        assert "catalog unavailable" in error.read().decode()
    finally:
        server.stop()
