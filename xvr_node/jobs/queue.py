"""The node's ledger of jobs: what was asked (kind, payload, dedupe key), how it ended.

Running them is the engine's part (:mod:`xvr_node.jobs.engine`, procrastinate): a ledger row
is queued together with the engine job that runs it, in the caller's transaction, so a
crash never leaves one without the other. Functions that change state take ``now`` from
the node's clock (tests drive it); those named so commit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from xvr_node.catalog.models import Job, JobStatus, utcnow
from xvr_node.jobs import engine
from xvr_node.jobs.engine import PRIORITY

__all__ = ["PRIORITY", "cancel", "counts_by_status", "enqueue", "list_jobs", "retry"]

#: Statuses a person may still cancel, and those a person may send back to the queue.
CANCELLABLE = (JobStatus.QUEUED, JobStatus.RUNNING)
RETRYABLE = (JobStatus.FAILED, JobStatus.CANCELLED)


def enqueue(
    session: Session,
    kind: str,
    payload: dict[str, Any],
    *,
    dedupe_key: str | None = None,
    priority: int | None = None,
    urgent: bool = False,
    not_before: datetime | None = None,
) -> Job:
    """Add a job and its engine job (flushed, not committed: both commit with the caller).

    With ``dedupe_key``, an existing job of that key is returned instead of a second one.
    """
    if dedupe_key is not None:
        existing = session.scalars(select(Job).where(Job.dedupe_key == dedupe_key)).first()
        if existing is not None:
            return existing
    job = Job(
        kind=str(kind),
        payload=dict(payload),
        priority=PRIORITY[kind] if priority is None else priority,
        urgent=urgent,
        dedupe_key=dedupe_key,
    )
    if not_before is not None:
        job.next_attempt_at = not_before
    session.add(job)
    session.flush()
    delay_s = None if not_before is None else (not_before - utcnow()).total_seconds()
    job.engine_job_id = engine.defer(
        session, job.id, job.kind, priority=job.priority, delay_s=delay_s
    )
    return job


def make_urgent(session: Session, job: Job) -> bool:
    """A queued finetune may start now, outside the window (not committed)."""
    if job.urgent or job.status != JobStatus.QUEUED:
        return False
    job.urgent = True
    engine.cancel(session, job.engine_job_id)
    job.engine_job_id = engine.defer(session, job.id, job.kind, priority=job.priority)
    return True


def cancel(session: Session, job_id: int, now: datetime) -> Job:
    """Cancel a queued or running job; a running one stops at its next heartbeat or step."""
    job = _require(session, job_id)
    if job.status not in CANCELLABLE:
        raise ValueError(f"job {job_id} is {job.status}; only queued or running jobs cancel")
    job.status, job.finished_at, job.worker = JobStatus.CANCELLED, now, None
    engine.cancel(session, job.engine_job_id)
    session.commit()
    return job


def retry(session: Session, job_id: int, now: datetime) -> Job:
    """Send a failed or cancelled job back to the queue with a fresh set of attempts."""
    job = _require(session, job_id)
    if job.status not in RETRYABLE:
        raise ValueError(f"job {job_id} is {job.status}; only failed or cancelled jobs retry")
    job.status, job.attempts, job.next_attempt_at = JobStatus.QUEUED, 0, now
    job.finished_at = None
    job.engine_job_id = engine.defer(session, job.id, job.kind, priority=job.priority)
    session.commit()
    return job


def _require(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise LookupError(f"job {job_id} is not in the catalog")
    return job


def list_jobs(
    session: Session, status: str | None = None, kind: str | None = None, limit: int = 100
) -> list[Job]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    return list(session.scalars(query))


def counts_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {str(status): int(count) for status, count in rows}


def job_record(job: Job) -> dict[str, Any]:
    """A job as plain JSON (``xvr-node jobs list --json``)."""

    def iso(moment: datetime | None) -> str | None:
        return None if moment is None else moment.isoformat()

    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "priority": job.priority,
        "urgent": job.urgent,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "payload": job.payload,
        "worker": job.worker,
        "created_at": iso(job.created_at),
        "next_attempt_at": iso(job.next_attempt_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "error": job.error,
        "result": job.result,
    }
