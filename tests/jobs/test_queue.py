"""The job table as a queue: priorities, the overnight window, leases, retries, reclaiming."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from xvr_node import clock
from xvr_node.catalog.models import Job, JobKind, JobStatus
from xvr_node.cli import cli
from xvr_node.jobs import queue

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LEASE_S = 60.0


@pytest.fixture(autouse=True)
def node_clock_at_t0():
    """Enqueue stamps by the node's clock, claims pass ``now``: both read T0, on any day."""
    with clock.pinned(T0):
        yield


def add(session, kind, **options) -> int:
    job = queue.enqueue(session, kind, options.pop("payload", {}), **options)
    session.commit()
    return job.id


def claim(session, worker="w1", now=T0, window_open=True, **options):
    return queue.claim(session, worker, now, LEASE_S, window_open=window_open, **options)


def test_claims_go_by_priority_then_age_and_never_twice(sessions):
    with sessions() as session:
        finetune = add(session, JobKind.FINETUNE)
        assemble = add(session, JobKind.ASSEMBLE)
        first_register = add(session, JobKind.REGISTER, payload={"instance_id": 1})
        second_register = add(session, JobKind.REGISTER, payload={"instance_id": 2})
        export = add(session, JobKind.EXPORT)
        order = [claim(session, worker=f"w{i}").id for i in range(5)]
        assert order == [first_register, second_register, export, assemble, finetune]
        assert claim(session) is None  # all leased: nothing left to claim
        job = session.get(Job, first_register)
        assert (job.status, job.lease_owner, job.attempts) == (JobStatus.RUNNING, "w0", 1)
        assert job.lease_expires_at == T0 + timedelta(seconds=LEASE_S)


def test_a_job_is_not_claimed_before_its_time(sessions):
    with sessions() as session:
        later = add(session, JobKind.NOOP, not_before=T0 + timedelta(minutes=5))
        assert claim(session) is None
        assert claim(session, now=T0 + timedelta(minutes=5)).id == later


def test_outside_the_window_a_finetune_waits_unless_urgent(sessions):
    with sessions() as session:
        waits = add(session, JobKind.FINETUNE)
        assert claim(session, window_open=False) is None
        urgent = add(session, JobKind.FINETUNE, urgent=True)
        assert claim(session, window_open=False).id == urgent
        assert claim(session, window_open=True).id == waits


def test_failures_back_off_then_fail_for_good_with_their_reason(sessions):
    with sessions() as session:
        job_id = add(session, JobKind.REGISTER, max_attempts=2)
        claim(session)
        status = queue.fail(session, job_id, "w1", T0, "PACS down", timedelta(seconds=30))
        assert status == JobStatus.QUEUED
        assert claim(session, now=T0 + timedelta(seconds=29)) is None  # backing off
        assert claim(session, now=T0 + timedelta(seconds=30)).attempts == 2
        status = queue.fail(session, job_id, "w1", T0, "PACS still down", timedelta(seconds=60))
        assert status == JobStatus.FAILED
        job = session.get(Job, job_id, populate_existing=True)
        assert (job.status, job.error, job.lease_owner) == ("failed", "PACS still down", None)


def test_a_permanent_error_fails_at_once(sessions):
    with sessions() as session:
        job_id = add(session, JobKind.REGISTER)
        claim(session)
        assert queue.fail(session, job_id, "w1", T0, "not an X-ray", None) == JobStatus.FAILED


def test_an_expired_lease_is_reclaimed_and_the_stale_worker_cannot_finish(sessions):
    with sessions() as session:
        job_id = add(session, JobKind.NOOP)
        claim(session, worker="dead")
        assert queue.reclaim_expired(session, T0 + timedelta(seconds=LEASE_S - 1)) == []
        assert queue.heartbeat(session, job_id, "dead", T0 + timedelta(seconds=30), LEASE_S)
        # The heartbeat moved the expiry: 61 s after the claim the lease still holds.
        assert queue.reclaim_expired(session, T0 + timedelta(seconds=LEASE_S + 1)) == []
        later = T0 + timedelta(seconds=30 + LEASE_S + 1)
        assert queue.reclaim_expired(session, later) == [job_id]
        job = session.get(Job, job_id, populate_existing=True)
        assert job.status == JobStatus.QUEUED and "lease of worker dead expired" in job.error
        assert claim(session, worker="alive", now=later).id == job_id
        # The first worker wakes up: it cannot heartbeat, complete or fail a job it lost.
        assert not queue.heartbeat(session, job_id, "dead", later, LEASE_S)
        assert not queue.complete(session, job_id, "dead", later, {"by": "dead"})
        assert queue.fail(session, job_id, "dead", later, "x", timedelta(0)) is None
        assert queue.complete(session, job_id, "alive", later, {"by": "alive"})
        job = session.get(Job, job_id, populate_existing=True)
        assert (job.status, job.result, job.attempts) == ("succeeded", {"by": "alive"}, 2)


def test_a_lease_that_expires_once_too_often_fails_the_job(sessions):
    with sessions() as session:
        job_id = add(session, JobKind.NOOP, max_attempts=1)
        claim(session, worker="dead")
        queue.reclaim_expired(session, T0 + timedelta(hours=1))
        job = session.get(Job, job_id, populate_existing=True)
        assert job.status == JobStatus.FAILED and "attempt 1 of 1" in job.error


def test_a_released_job_does_not_use_up_an_attempt(sessions):
    with sessions() as session:
        job_id = add(session, JobKind.FINETUNE, max_attempts=1)
        claim(session)
        assert queue.release(session, job_id, "w1", T0, {"resume": True}, "preempted")
        job = session.get(Job, job_id, populate_existing=True)
        assert (job.status, job.attempts, job.payload) == ("queued", 0, {"resume": True})
        assert claim(session).attempts == 1


def test_waiting_above_sees_only_more_urgent_due_work(sessions):
    with sessions() as session:
        finetune = queue.PRIORITY[JobKind.FINETUNE]
        add(session, JobKind.FINETUNE)
        assert not queue.waiting_above(session, finetune, T0, True)
        add(session, JobKind.REGISTER, not_before=T0 + timedelta(minutes=1))
        assert not queue.waiting_above(session, finetune, T0, True)  # not due yet
        assert queue.waiting_above(session, finetune, T0 + timedelta(minutes=1), True)


def test_dedupe_keys_give_one_job_per_fact(sessions):
    with sessions() as session:
        first = add(session, JobKind.REGISTER, dedupe_key="register:instance:7")
        second = add(session, JobKind.REGISTER, dedupe_key="register:instance:7")
        assert first == second
        assert len(queue.list_jobs(session)) == 1


def test_cancel_and_retry_follow_the_rules(sessions):
    with sessions() as session:
        job_id = add(session, JobKind.NOOP)
        claim(session)
        queue.cancel(session, job_id, T0)
        assert not queue.heartbeat(session, job_id, "w1", T0, LEASE_S)  # the worker stops
        with pytest.raises(ValueError, match="only queued or running"):
            queue.cancel(session, job_id, T0)
        assert queue.retry(session, job_id, T0).status == JobStatus.QUEUED
        with pytest.raises(ValueError, match="only failed or cancelled"):
            queue.retry(session, job_id, T0)
        with pytest.raises(LookupError):
            queue.retry(session, 999, T0)


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
        engine = make_engine(url)
        with session_factory(engine)() as session:
            assert queue.counts_by_status(session) == {"queued": 2}
        engine.dispose()
