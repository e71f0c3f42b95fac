"""The durable job queue in the catalog: enqueue, claim under a lease, heartbeat, finish.

Every transition is one guarded UPDATE, so two workers never both own a job:

* **claim** picks the best due job (priority, then age) and leases it to one worker. The
  pick is ``FOR UPDATE SKIP LOCKED``, so workers on several machines claim different rows
  without waiting on each other.
* **heartbeat**, **complete**, **fail** and **release** only touch a job still leased to the
  caller: a worker that lost its lease (it stalled past expiry and another worker took the
  job, or a person cancelled it) cannot overwrite what happened since.
* **reclaim_expired** re-queues jobs whose worker stopped answering; the attempt counts.

Functions take ``now`` so that tests drive time instead of sleeping; they commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from xvr_node.catalog.models import Job, JobKind, JobStatus

#: Register (a clinician is waiting) > export > assemble > retention > finetune (DESIGN.md §2).
PRIORITY: dict[str, int] = {
    JobKind.REGISTER: 100,
    JobKind.EXPORT: 80,
    JobKind.ASSEMBLE: 50,
    JobKind.RETENTION: 20,
    JobKind.FINETUNE: 10,
    JobKind.NOOP: 0,
}

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
    max_attempts: int = 3,
    not_before: datetime | None = None,
) -> Job:
    """Add a job (flushed, not committed: it commits with the caller's transaction).

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
        max_attempts=max_attempts,
        dedupe_key=dedupe_key,
    )
    if not_before is not None:
        job.next_attempt_at = not_before
    session.add(job)
    session.flush()
    return job


def _claimable(now: datetime, window_open: bool) -> ColumnElement[bool]:
    """Due, queued, and for a finetune: inside the overnight window or urgent."""
    due = and_(Job.status == JobStatus.QUEUED, Job.next_attempt_at <= now)
    if window_open:
        return due
    return and_(due, or_(Job.kind != JobKind.FINETUNE, Job.urgent.is_(True)))


def claim(
    session: Session,
    worker_id: str,
    now: datetime,
    lease_s: float,
    *,
    window_open: bool,
    kinds: Sequence[str] | None = None,
) -> Job | None:
    """Lease the best due job to ``worker_id``; ``None`` when nothing is due."""
    pick = (
        select(Job.id)
        .where(_claimable(now, window_open))
        .order_by(Job.priority.desc(), Job.next_attempt_at, Job.id)
        .limit(1)
    )
    if kinds:
        pick = pick.where(Job.kind.in_([str(k) for k in kinds]))
    pick = pick.with_for_update(skip_locked=True)
    claimed = session.execute(
        update(Job)
        .where(Job.id == pick.scalar_subquery(), Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.RUNNING,
            lease_owner=worker_id,
            heartbeat_at=now,
            lease_expires_at=now + timedelta(seconds=lease_s),
            started_at=now,
            finished_at=None,
            attempts=Job.attempts + 1,
        )
        .returning(Job.id)
    ).scalar()
    session.commit()
    return None if claimed is None else session.get(Job, claimed, populate_existing=True)


def _owned(job_id: int, worker_id: str) -> ColumnElement[bool]:
    return and_(Job.id == job_id, Job.lease_owner == worker_id, Job.status == JobStatus.RUNNING)


def _guarded(session: Session, job_id: int, worker_id: str, **values: Any) -> bool:
    """One UPDATE of a job still leased to ``worker_id``; False when the lease is gone."""
    updated = session.execute(update(Job).where(_owned(job_id, worker_id)).values(**values))
    session.commit()
    return updated.rowcount == 1


def heartbeat(session: Session, job_id: int, worker_id: str, now: datetime, lease_s: float) -> bool:
    """Extend the lease; False when the job is no longer ours (reclaimed or cancelled)."""
    return _guarded(
        session,
        job_id,
        worker_id,
        heartbeat_at=now,
        lease_expires_at=now + timedelta(seconds=lease_s),
    )


def complete(
    session: Session, job_id: int, worker_id: str, now: datetime, result: dict[str, Any] | None
) -> bool:
    return _guarded(
        session,
        job_id,
        worker_id,
        status=JobStatus.SUCCEEDED,
        finished_at=now,
        result=result,
        error=None,
        lease_owner=None,
        lease_expires_at=None,
    )


def fail(
    session: Session,
    job_id: int,
    worker_id: str,
    now: datetime,
    error: str,
    retry_after: timedelta | None,
) -> str | None:
    """Retry after ``retry_after`` while attempts remain, else fail for good.

    ``retry_after=None`` means the error is permanent (bad input): no retry. Returns the new
    status, or ``None`` when the lease was already lost.
    """
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None
    retry = retry_after is not None and job.attempts < job.max_attempts
    values: dict[str, Any] = {"error": error, "lease_owner": None, "lease_expires_at": None}
    if retry:
        values |= {"status": JobStatus.QUEUED, "next_attempt_at": now + retry_after}
    else:
        values |= {"status": JobStatus.FAILED, "finished_at": now}
    if not _guarded(session, job_id, worker_id, **values):
        return None
    return values["status"]


def release(
    session: Session,
    job_id: int,
    worker_id: str,
    now: datetime,
    payload: dict[str, Any] | None = None,
    reason: str = "",
    resume_at: datetime | None = None,
) -> bool:
    """Give a job back unfinished (preempted, the worker is stopping, or it cannot run before
    ``resume_at``); not an attempt."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return False
    values: dict[str, Any] = {
        "status": JobStatus.QUEUED,
        "next_attempt_at": now if resume_at is None else resume_at,
        "attempts": max(job.attempts - 1, 0),
        "lease_owner": None,
        "lease_expires_at": None,
        "error": reason or None,
    }
    if payload is not None:
        values["payload"] = payload
    return _guarded(session, job_id, worker_id, **values)


def reclaim_expired(session: Session, now: datetime) -> list[int]:
    """Re-queue jobs whose lease ran out (their worker died or hung); the attempt counts."""
    expired = session.scalars(
        select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
    ).all()
    reclaimed = []
    for job in expired:
        expiry = f"{job.lease_expires_at:%Y-%m-%d %H:%M:%S}Z"
        reason = f"lease of worker {job.lease_owner} expired at {expiry}"
        gave_up = job.attempts >= job.max_attempts
        updated = session.execute(
            update(Job)
            .where(
                Job.id == job.id,
                Job.status == JobStatus.RUNNING,
                Job.lease_owner == job.lease_owner,
                Job.lease_expires_at < now,
            )
            .values(
                status=JobStatus.FAILED if gave_up else JobStatus.QUEUED,
                next_attempt_at=now,
                finished_at=now if gave_up else None,
                lease_owner=None,
                lease_expires_at=None,
                error=f"{reason}; attempt {job.attempts} of {job.max_attempts}",
            )
        )
        if updated.rowcount == 1:
            reclaimed.append(job.id)
    session.commit()
    return reclaimed


def waiting_above(session: Session, priority: int, now: datetime, window_open: bool) -> bool:
    """Is a job of higher priority than ``priority`` due? (A finetune yields to it.)"""
    return (
        session.scalar(
            select(Job.id).where(_claimable(now, window_open), Job.priority > priority).limit(1)
        )
        is not None
    )


def cancel(session: Session, job_id: int, now: datetime) -> Job:
    """Cancel a queued or running job; a running one stops at its next heartbeat or step."""
    job = _require(session, job_id)
    if job.status not in CANCELLABLE:
        raise ValueError(f"job {job_id} is {job.status}; only queued or running jobs cancel")
    job.status, job.finished_at = JobStatus.CANCELLED, now
    job.lease_owner = job.lease_expires_at = None
    session.commit()
    return job


def retry(session: Session, job_id: int, now: datetime) -> Job:
    """Send a failed or cancelled job back to the queue with a fresh set of attempts."""
    job = _require(session, job_id)
    if job.status not in RETRYABLE:
        raise ValueError(f"job {job_id} is {job.status}; only failed or cancelled jobs retry")
    job.status, job.attempts, job.next_attempt_at = JobStatus.QUEUED, 0, now
    job.finished_at = None
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
        "lease_owner": job.lease_owner,
        "created_at": iso(job.created_at),
        "next_attempt_at": iso(job.next_attempt_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "error": job.error,
        "result": job.result,
    }
