"""The ledger on the engine: priorities, the window, back-off, stalled workers, cancel, retry.

Each test runs real procrastinate workers (``Worker.drain``: every job due now, then stop) on
a migrated catalog. The node's clock is pinned; the engine measures waits by the database's.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from tests.support.postgres import make_due
from xvr_node import clock
from xvr_node.catalog.models import Job, JobKind, JobStatus
from xvr_node.cli import cli
from xvr_node.config import load_settings
from xvr_node.jobs import engine, queue
from xvr_node.jobs.worker import JobYielded, PermanentJobError, Worker

NOON = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
NIGHT = datetime(2026, 11, 24, 23, 0, tzinfo=UTC)  # inside the default overnight window


@pytest.fixture(autouse=True)
def node_clock_at_noon():
    """What the node stamps happens at NOON, on any day the test runs."""
    with clock.pinned(NOON):
        yield


@pytest.fixture
def settings(tmp_path):
    return load_settings(
        None,
        environ={
            "XVR_NODE__STORAGE__ROOT": str(tmp_path / "store"),
            "XVR_NODE__WORKER__LEASE_SECONDS": "2",
            "XVR_NODE__WORKER__HEARTBEAT_SECONDS": "0.5",
        },
    )


def add(session, kind, **options) -> int:
    job = queue.enqueue(session, kind, options.pop("payload", {}), **options)
    session.commit()
    return job.id


def attempts(settings, limit: int):
    """The settings with ``worker.max_attempts`` at ``limit``."""
    limited = settings.worker.model_copy(update={"max_attempts": limit})
    return settings.model_copy(update={"worker": limited})


def worker(settings, sessions, handlers, now=NIGHT) -> Worker:
    every = {str(kind): handlers.get(str(kind), lambda context: {}) for kind in queue.PRIORITY}
    return Worker(settings, sessions, every, clock=lambda: now, device="cpu")


def scheduled_in_s(sessions, job_id) -> float:
    """Seconds from the database's now until the job's engine job is due."""
    with sessions() as session:
        return session.execute(
            text(
                "SELECT extract(epoch FROM scheduled_at - now()) FROM procrastinate_jobs "
                "WHERE id = (SELECT engine_job_id FROM jobs WHERE id = :id)"
            ),
            {"id": job_id},
        ).scalar_one()


def test_jobs_run_by_priority_then_age_and_once(settings, sessions):
    with sessions() as session:
        finetune = add(session, JobKind.FINETUNE)
        assemble = add(session, JobKind.ASSEMBLE)
        first_register = add(session, JobKind.REGISTER, payload={"instance_id": 1})
        second_register = add(session, JobKind.REGISTER, payload={"instance_id": 2})
        export = add(session, JobKind.EXPORT)
    ran = worker(settings, sessions, {}).drain()
    assert ran == [first_register, second_register, export, assemble, finetune]
    assert worker(settings, sessions, {}).drain() == []  # nothing runs twice
    with sessions() as session:
        job = session.get(Job, first_register)
        assert (job.status, job.attempts, job.worker) == (JobStatus.SUCCEEDED, 1, None)
        assert set(job.result) == {"seconds"}


def test_a_job_waits_for_its_time_by_the_engine_clock(settings, sessions):
    with sessions() as session:
        later = add(session, JobKind.NOOP, not_before=NOON + timedelta(minutes=5))
    assert scheduled_in_s(sessions, later) == pytest.approx(300, abs=5)
    assert worker(settings, sessions, {}).drain() == []
    make_due(sessions)
    assert worker(settings, sessions, {}).drain() == [later]


def test_outside_the_window_a_finetune_waits_for_the_night_unless_urgent(settings, sessions):
    with sessions() as session:
        waits = add(session, JobKind.FINETUNE)
        urgent = add(session, JobKind.FINETUNE, urgent=True)
    assert worker(settings, sessions, {}, now=NOON).drain() == [urgent]
    # 12:00 → 20:00 (the window's default start): eight hours, by the engine's clock.
    assert scheduled_in_s(sessions, waits) == pytest.approx(8 * 3600, abs=5)
    with sessions() as session:
        job = session.get(Job, waits)
        assert (job.status, job.attempts) == (JobStatus.QUEUED, 0)
        assert job.error == "outside the overnight window"
    make_due(sessions)
    assert worker(settings, sessions, {}, now=NIGHT).drain() == [waits]


def test_an_urgent_request_lets_a_waiting_finetune_start_now(settings, sessions):
    with sessions() as session:
        job_id = add(session, JobKind.FINETUNE)
    assert worker(settings, sessions, {}, now=NOON).drain() == []  # sent to the night
    with sessions() as session:
        assert queue.make_urgent(session, session.get(Job, job_id))
        session.commit()
    assert worker(settings, sessions, {}, now=NOON).drain() == [job_id]


def test_failures_back_off_then_fail_for_good_with_their_reason(settings, sessions):
    with sessions() as session:
        job_id = add(session, JobKind.REGISTER)
    errors = iter(["PACS down", "PACS still down"])
    settings = attempts(settings, 2)  # worker.max_attempts: the default is 3

    def flaky(context):
        raise RuntimeError(next(errors))

    assert worker(settings, sessions, {"register": flaky}).drain() == [job_id]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempts, job.error) == ("queued", 1, "RuntimeError: PACS down")
    assert scheduled_in_s(sessions, job_id) == pytest.approx(30, abs=5)  # backing off
    assert worker(settings, sessions, {"register": flaky}).drain() == []
    make_due(sessions)
    assert worker(settings, sessions, {"register": flaky}).drain() == [job_id]
    with sessions() as session:
        job = session.get(Job, job_id, populate_existing=True)
        assert (job.status, job.attempts) == ("failed", 2)
        assert job.error == "RuntimeError: PACS still down"
        assert engine.engine_status(session, job.engine_job_id) == "failed"


def test_a_permanent_error_fails_at_once(settings, sessions):
    with sessions() as session:
        job_id = add(session, JobKind.REGISTER)

    def bad(context):
        raise PermanentJobError("not an X-ray")

    worker(settings, sessions, {"register": bad}).drain()
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.error) == ("failed", "not an X-ray")
        assert engine.engine_status(session, job.engine_job_id) == "failed"


def test_a_yielded_job_resumes_without_using_up_an_attempt(settings, sessions):
    with sessions() as session:
        job_id = add(session, JobKind.FINETUNE)
    settings = attempts(settings, 1)
    seen = []

    def finetune(context):
        seen.append(dict(context.payload))
        if not context.payload:
            raise JobYielded("preempted", payload={"resume": True})
        return {}

    assert worker(settings, sessions, {"finetune": finetune}).drain() == [job_id, job_id]
    assert seen == [{}, {"resume": True}]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempts) == ("succeeded", 1)


def taken_by_a_silent_worker(session) -> None:
    """Every engine job was taken by a worker that then went silent (heartbeat long ago)."""
    worker_row = session.execute(
        text(
            "INSERT INTO procrastinate_workers (last_heartbeat) "
            "VALUES (now() - interval '1 hour') RETURNING id"
        )
    ).scalar_one()
    session.execute(
        text("UPDATE procrastinate_jobs SET status = 'doing', worker_id = :w"), {"w": worker_row}
    )


def recover_stalled(alive: Worker) -> list[int]:
    """One stalled-job pass of a live worker, as its loop runs it every heartbeat."""

    async def recover():
        app = engine.make_app(alive._url())
        async with app.open_async():
            return await alive.recover_stalled(app)

    return asyncio.run(recover())


def test_a_job_of_a_silent_worker_runs_again_and_its_old_run_is_a_no_op(settings, sessions):
    with sessions() as session:
        job_id = add(session, JobKind.NOOP)
        taken_by_a_silent_worker(session)
        job = session.get(Job, job_id)
        job.status, job.attempts, job.worker = JobStatus.RUNNING, 1, "silent"
        job.max_attempts = 2  # the silent worker's worker.max_attempts, recorded as it took it
        session.commit()
    alive = worker(settings, sessions, {})
    assert recover_stalled(alive) == [job_id]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.QUEUED
        assert "worker silent stopped answering" in job.error and "attempt 1 of 2" in job.error
    assert alive.drain() == [job_id]  # due at once, by the engine's clock
    with sessions() as session:
        assert session.get(Job, job_id).status == JobStatus.SUCCEEDED


def test_a_silent_deliverer_is_closed_and_its_destination_queued_again(settings, sessions):
    with sessions() as session:
        engine.ensure_delivery(session, "pacs")
        engine.ensure_delivery(session, "pacs")  # one waiting delivery per destination
        taken_by_a_silent_worker(session)
        session.commit()
    alive = worker(settings, sessions, {})
    assert recover_stalled(alive) == []  # no ledger job: the outbox rows are the ledger
    with sessions() as session:
        rows = session.execute(
            text(
                "SELECT status::text, args->>'destination' FROM procrastinate_jobs"
                " WHERE task_name = :task ORDER BY id"
            ),
            {"task": engine.DELIVER_TASK},
        ).all()
    assert [tuple(row) for row in rows] == [("failed", "pacs"), ("todo", "pacs")]


def test_waiting_above_sees_only_more_urgent_due_work(sessions):
    with sessions() as session:
        finetune = queue.PRIORITY[JobKind.FINETUNE]
        add(session, JobKind.FINETUNE)
        assert not engine.waiting_above(session, finetune, None)
        add(session, JobKind.REGISTER, not_before=NOON + timedelta(minutes=1))
        assert not engine.waiting_above(session, finetune, None)  # not due yet
        add(session, JobKind.REGISTER)
        assert engine.waiting_above(session, finetune, None)
        assert not engine.waiting_above(session, finetune, ["finetune", "export"])


def test_dedupe_keys_give_one_job_per_fact(sessions):
    with sessions() as session:
        first = add(session, JobKind.REGISTER, dedupe_key="register:instance:7")
        second = add(session, JobKind.REGISTER, dedupe_key="register:instance:7")
        assert first == second
        assert len(queue.list_jobs(session)) == 1
        engine_jobs = session.execute(text("SELECT count(*) FROM procrastinate_jobs")).scalar()
        assert engine_jobs == 1


def test_a_job_and_its_engine_job_commit_or_roll_back_together(sessions):
    with sessions() as session:
        add(session, JobKind.NOOP)
        queue.enqueue(session, JobKind.NOOP, {})
        session.rollback()
        assert len(queue.list_jobs(session)) == 1
        assert session.execute(text("SELECT count(*) FROM procrastinate_jobs")).scalar() == 1


def test_cancel_and_retry_follow_the_rules(settings, sessions):
    with sessions() as session:
        job_id = add(session, JobKind.NOOP)
        queue.cancel(session, job_id, NOON)
        assert engine.engine_status(session, session.get(Job, job_id).engine_job_id) == (
            "cancelled"
        )
        with pytest.raises(ValueError, match="only queued or running"):
            queue.cancel(session, job_id, NOON)
    assert worker(settings, sessions, {}).drain() == []
    with sessions() as session:
        assert queue.retry(session, job_id, NOON).status == JobStatus.QUEUED
        with pytest.raises(ValueError, match="only failed or cancelled"):
            queue.retry(session, job_id, NOON)
        with pytest.raises(LookupError):
            queue.retry(session, 999, NOON)
    assert worker(settings, sessions, {}).drain() == [job_id]


def test_jobs_cli_lists_cancels_and_retries(tmp_path, monkeypatch):
    from xvr_node.catalog.db import make_engine, session_factory
    from xvr_node.catalog.embedded import EmbeddedCluster, catalog_server

    monkeypatch.setenv("XVR_NODE__STORAGE__ROOT", str(tmp_path / "store"))
    runner = CliRunner()
    assert runner.invoke(cli, ["db", "upgrade"]).exit_code == 0
    assert runner.invoke(cli, ["jobs", "noop", "2"]).output.strip() == "2 noop job(s) queued"
    listed = runner.invoke(cli, ["jobs", "list"])
    assert "noop      queued" in listed.output and "2 queued" in listed.output
    assert runner.invoke(cli, ["jobs", "cancel", "1"]).output.strip() == "job 1: cancelled"
    refused = runner.invoke(cli, ["jobs", "retry", "2"])
    assert refused.exit_code == 1 and "job 2 is queued" in refused.output
    assert runner.invoke(cli, ["jobs", "retry", "1"]).output.strip() == "job 1: queued"
    # Each command started and stopped the node's embedded catalog; it kept the jobs.
    assert not EmbeddedCluster(tmp_path / "store").is_running()
    with catalog_server(None, tmp_path / "store") as url:
        engine_ = make_engine(url)
        with session_factory(engine_)() as session:
            assert queue.counts_by_status(session) == {"queued": 2}
            todo = session.execute(
                text("SELECT count(*) FROM procrastinate_jobs WHERE status = 'todo'")
            ).scalar()
            assert todo == 2
        engine_.dispose()
