"""The job engine: procrastinate on the catalog's PostgreSQL.

procrastinate owns *when and where* a job runs: its ``procrastinate_jobs`` rows are fetched
by priority with ``SKIP LOCKED``, new ones wake idle workers by LISTEN/NOTIFY, workers
heartbeat, failed attempts are retried with back-off, and an abort request reaches a running
job. The catalog's ``jobs`` table stays the node's ledger of *what* was asked and how it
ended (kind, payload, dedupe key, reason, result); each ledger row points at the engine job
that runs it now (``engine_job_id``), so a stale engine job (a worker presumed dead that comes
back) sees that it is no longer the current one and does nothing.

The outbox is delivered by engine jobs too, one task per destination (``deliver``), with no
ledger row: the ``exports`` rows are that ledger. A queueing lock keeps at most one waiting
delivery per destination; a PostgreSQL advisory lock (:mod:`xvr_node.jobs.export`) keeps one
running.

Queue names are job kinds, so ``xvr-node worker --kinds`` listens to those queues only;
deliveries run in the ``export`` queue.
Times the engine compares (``scheduled_at``) are in the database's clock; the node's clock
only decides the node's rules (the overnight window, training budgets).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import procrastinate
from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.jobs import Job as EngineJob
from procrastinate.retry import BaseRetryStrategy, RetryDecision
from sqlalchemy import make_url, text
from sqlalchemy.orm import Session

from xvr_node.catalog.models import JobKind

LOG = logging.getLogger(__name__)

#: Register (a clinician is waiting) > export > assemble > retention > finetune (DESIGN.md §2).
PRIORITY: dict[str, int] = {
    JobKind.REGISTER: 100,
    JobKind.EXPORT: 80,
    JobKind.ASSEMBLE: 50,
    JobKind.RETENTION: 20,
    JobKind.FINETUNE: 10,
    JobKind.NOOP: 0,
}

#: Back-off after a transient failure: 30 s, doubling, at most an hour.
BACKOFF_BASE_S = 30.0
BACKOFF_CAP_S = 3600.0


def backoff_seconds(failures: int) -> float:
    """Wait after the ``failures``-th failure: a PACS down all weekend is tried hourly."""
    exponent = min(max(failures - 1, 0), 20)
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**exponent)


#: The task that sends one destination's due outbox rows.
DELIVER_TASK = "xvr_node.deliver"


def task_name(kind: str) -> str:
    return f"xvr_node.{kind}"


def delivery_key(destination: str) -> str:
    """The queueing lock of a destination's deliveries (one waiting at a time)."""
    return f"deliver:{destination}"


class PermanentJobError(Exception):
    """Bad input: trying again cannot help, so the job fails at once with this reason."""


class JobFailed(Exception):
    """What the engine sees of a failed attempt: the ledger's decision, already recorded."""

    def __init__(self, reason: str, retry_at: datetime | None) -> None:
        super().__init__(reason)
        self.retry_at = retry_at  # by the engine's clock; None: failed for good


class NodeRetry(BaseRetryStrategy):
    """Retry when the ledger said so (:class:`JobFailed` with a time), never otherwise."""

    def get_retry_decision(self, *, exception: BaseException, job: EngineJob):
        if not isinstance(exception, JobFailed) or exception.retry_at is None:
            return None
        return RetryDecision(retry_at=exception.retry_at)


def conninfo(url: str) -> str:
    """The libpq URI of a SQLAlchemy ``postgresql+psycopg://`` catalog URL."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def make_app(url: str | None = None, *, pool_size: int = 4) -> procrastinate.App:
    """The engine with the node's tasks registered; a pool on ``url`` when given.

    Without a URL the app can only defer on a caller's connection (the catalog session).
    """
    from xvr_node.jobs import worker  # the task bodies; worker imports this module

    kwargs: dict[str, Any] = {"min_size": 1, "max_size": max(pool_size, 2)}
    if url is not None:
        kwargs["conninfo"] = conninfo(url)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(**kwargs))
    for kind in PRIORITY:
        app.task(
            name=task_name(kind),
            queue=str(kind),
            priority=PRIORITY[kind],
            pass_context=True,
            retry=NodeRetry(),
        )(worker.run_ledger_job)
    # No retry strategy: a delivery reschedules itself, and the node's sweep backs it up.
    app.task(
        name=DELIVER_TASK,
        queue=str(JobKind.EXPORT),
        priority=PRIORITY[JobKind.EXPORT],
        pass_context=True,
    )(worker.run_delivery)
    return app


_DEFERRER: procrastinate.App | None = None


def _deferrer() -> procrastinate.App:
    global _DEFERRER
    if _DEFERRER is None:
        _DEFERRER = make_app()
    return _DEFERRER


def driver_connection(session: Session) -> Any:
    """The psycopg connection under ``session``'s transaction (deferral joins it)."""
    return session.connection().connection.driver_connection


def defer(
    session: Session, job_id: int, kind: str, *, priority: int, delay_s: float | None = None
) -> int:
    """Queue the engine job that runs ledger job ``job_id``, in the caller's transaction.

    The node's clock says how long to wait (``delay_s``); the engine measures it by the
    database's clock, which is the one it compares ``scheduled_at`` with.
    """
    schedule_at = None if delay_s is None or delay_s <= 0 else engine_time_after(session, delay_s)
    deferrer = _deferrer().configure_task(
        task_name(kind),
        priority=priority,
        schedule_at=schedule_at,
        queue=str(kind),
        connection=driver_connection(session),
    )
    return deferrer.defer(job_id=job_id)


def ensure_delivery(session: Session, destination: str, delay_s: float | None = None) -> None:
    """After the caller commits, a delivery to ``destination`` is due within ``delay_s``.

    A waiting delivery that is due soon enough stays; one due later is replaced (a new
    result does not wait out a back-off meant for older rows). Two callers racing for the
    one waiting slot both succeed: the loser's savepoint rolls back and the winner's job
    does the work.
    """
    due_at = None if delay_s is None or delay_s <= 0 else engine_time_after(session, delay_s)
    key = delivery_key(destination)
    waiting = session.execute(
        text(
            "SELECT id, scheduled_at IS NULL OR scheduled_at <= COALESCE(:due_at, now())"
            " FROM procrastinate_jobs WHERE queueing_lock = :key AND status = 'todo'"
        ),
        {"key": key, "due_at": due_at},
    ).first()
    if waiting is not None:
        if waiting[1]:
            return
        cancel(session, waiting[0])
    deferrer = _deferrer().configure_task(
        DELIVER_TASK,
        schedule_at=due_at,
        queueing_lock=key,
        connection=driver_connection(session),
    )
    savepoint = session.begin_nested()
    try:
        deferrer.defer(destination=destination)
    except AlreadyEnqueued:
        savepoint.rollback()
    else:
        savepoint.commit()


def engine_time_after(session: Session, seconds: float) -> datetime:
    """``seconds`` from now by the database's clock, the one the engine schedules by."""
    return session.execute(text("SELECT now()")).scalar_one() + timedelta(seconds=seconds)


def cancel(session: Session, engine_job_id: int | None) -> None:
    """Cancel a queued engine job, or ask a running one to stop (in the caller's transaction)."""
    if engine_job_id is None:
        return
    _deferrer().job_manager.cancel_job_by_id(
        engine_job_id, abort=True, connection=driver_connection(session)
    )


def waiting_above(session: Session, priority: int, queues: list[str] | None) -> bool:
    """Is an engine job of higher priority due in these queues? (A finetune yields to it.)"""
    row = session.execute(
        text(
            "SELECT 1 FROM procrastinate_jobs WHERE status = 'todo' AND priority > :priority"
            " AND (scheduled_at IS NULL OR scheduled_at <= now())"
            " AND (CAST(:queues AS text[]) IS NULL OR queue_name = ANY(CAST(:queues AS text[])))"
            " LIMIT 1"
        ),
        {"priority": priority, "queues": queues},
    ).first()
    return row is not None


def engine_status(session: Session, engine_job_id: int) -> str | None:
    """The engine's status of one job (todo, doing, succeeded, failed, cancelled, aborted)."""
    return session.execute(
        text("SELECT status::text FROM procrastinate_jobs WHERE id = :id"), {"id": engine_job_id}
    ).scalar()


def stalled_jobs(session: Session, seconds: float) -> int:
    """Running engine jobs whose worker sent no heartbeat for ``seconds`` (or is gone)."""
    return int(
        session.execute(
            text(
                "SELECT count(*) FROM procrastinate_jobs job"
                " LEFT JOIN procrastinate_workers worker ON worker.id = job.worker_id"
                " WHERE job.status = 'doing' AND (worker.id IS NULL"
                " OR worker.last_heartbeat < now() - make_interval(secs => :seconds))"
            ),
            {"seconds": seconds},
        ).scalar()
        or 0
    )
