"""Several ``xvr-node worker`` processes share one PostgreSQL catalog: every job runs once.

Three real worker processes drain 60 short jobs; one is killed with SIGKILL in the middle of
a job. Its job is run again once its heartbeat is missed and completes exactly once; nothing is
lost or run twice to completion.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.support.postgres import new_postgres_database
from xvr_node.catalog.db import make_engine, session_factory
from xvr_node.catalog.models import Job, JobKind, JobStatus
from xvr_node.jobs import queue

pytestmark = pytest.mark.slow

JOBS = 60
LEASE_S = 3.0


def start_worker(url: str, root: Path, index: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XVR_NODE")}
    env |= {
        "XVR_NODE__DATABASE__URL": url,
        "XVR_NODE__STORAGE__ROOT": str(root / "store"),
        "XVR_NODE__WORKER__LEASE_SECONDS": str(LEASE_S),
        "XVR_NODE__WORKER__HEARTBEAT_SECONDS": "0.5",
        "XVR_NODE__WORKER__DEVICE": "cpu",
        "XVR_NODE__SCHEDULER__POLL_INTERVAL_S": "0.2",
        "PYTHONUNBUFFERED": "1",
    }
    log = open(root / f"worker-{index}.log", "w")  # noqa: SIM115 - the process owns it
    return subprocess.Popen(
        [sys.executable, "-m", "xvr_node", "worker", "--kind", "noop"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def trace_lines(trace: Path) -> list[tuple[str, int, str]]:
    if not trace.exists():
        return []
    lines = []
    for line in trace.read_text().splitlines():
        event, job_id, worker = line.split()
        lines.append((event, int(job_id), worker))
    return lines


def test_three_workers_drain_the_queue_once_even_when_one_is_killed(
    tmp_path, postgres_url, migrated_postgres_template
):
    trace = tmp_path / "trace.log"
    with new_postgres_database(postgres_url, migrated_postgres_template) as url:
        engine = make_engine(url)
        sessions = session_factory(engine)
        with sessions() as session:
            for _ in range(JOBS):
                queue.enqueue(session, JobKind.NOOP, {"seconds": 0.3, "trace": str(trace)})
            session.commit()
        workers = [start_worker(url, tmp_path, i) for i in range(3)]
        try:
            # Kill the first worker that is in the middle of a job.
            deadline = time.monotonic() + 120
            victim, victim_job = None, None
            while victim is None:
                assert time.monotonic() < deadline, "no worker started a job"
                with sessions() as session:
                    running = session.scalars(
                        select(Job).where(Job.status == JobStatus.RUNNING)
                    ).all()
                for job in running:
                    pid = int(job.worker.split(":")[1])
                    match = [w for w in workers if w.pid == pid]
                    if match and job.id > 5:
                        victim, victim_job = match[0], job.id
                        break
                time.sleep(0.02)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)

            def settled() -> bool:
                with sessions() as session:
                    return queue.counts_by_status(session) == {"succeeded": JOBS}

            deadline = time.monotonic() + 180
            while not settled():
                assert time.monotonic() < deadline, queue.counts_by_status(sessions())
                time.sleep(0.2)
        finally:
            survivors = [w for w in workers if w.poll() is None]
            for worker in survivors:
                worker.send_signal(signal.SIGTERM)
            for worker in survivors:
                assert worker.wait(timeout=60) == 0  # SIGTERM: a clean stop
        lines = trace_lines(trace)
        done = Counter(job_id for event, job_id, _ in lines if event == "done")
        started = Counter(job_id for event, job_id, _ in lines if event == "start")
        assert sorted(done) == list(range(1, JOBS + 1))  # every job completed ...
        assert set(done.values()) == {1}  # ... exactly once
        assert started[victim_job] == 2  # the killed one started again elsewhere
        assert done[victim_job] == 1
        with sessions() as session:
            job = session.get(Job, victim_job)
            assert job.attempts == 2 and job.result["worker"].split(":")[1] != str(victim.pid)
            others = session.scalars(select(Job).where(Job.id != victim_job)).all()
            assert {j.attempts for j in others} == {1}
            survivors_seen = {j.result["worker"].split(":")[1] for j in others}
            assert len(survivors_seen) >= 2  # the work was shared
        engine.dispose()
