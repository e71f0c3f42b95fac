"""``xvr-node jobs``: list, retry, cancel and queue no-op jobs."""

from __future__ import annotations

import json
import sys

import click

from xvr_node.cli.root import CliState, cli, open_catalog


@cli.group("jobs")
def jobs_group() -> None:
    """The job queue: list, retry and cancel jobs."""


@jobs_group.command("list")
@click.option(
    "--status",
    type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]),
    default=None,
)
@click.option(
    "--kind",
    type=click.Choice(["assemble", "finetune", "register", "export", "retention", "noop"]),
    default=None,
)
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def jobs_list(state: CliState, status, kind, limit: int, as_json: bool) -> None:
    """Newest first: id, kind, status, attempts, timings, error."""
    from xvr_node.jobs.queue import counts_by_status, job_record, list_jobs

    with open_catalog(state) as (_, session):
        records = [job_record(job) for job in list_jobs(session, status, kind, limit)]
        counts = counts_by_status(session)
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    for r in records:
        flag = " urgent" if r["urgent"] else ""
        line = (
            f"{r['id']:>6} {r['kind']:<9} {r['status']:<9} p{r['priority']:<3}{flag} "
            f"attempts={r['attempts']}/{r['max_attempts']} created {r['created_at']} "
            f"{json.dumps(r['payload'], sort_keys=True)}"
        )
        if r["worker"]:
            line += f" on {r['worker']}"
        click.echo(line + (f"  ({r['error']})" if r["error"] else ""))
    click.echo(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no jobs")


def _change_jobs(state: CliState, ids: tuple[int, ...], change, verb: str) -> None:
    from xvr_node.catalog.models import utcnow

    failed = False
    with open_catalog(state) as (_, session):
        for job_id in ids:
            try:
                job = change(session, job_id, utcnow())
                click.echo(f"job {job.id}: {job.status}")
            except (LookupError, ValueError) as error:
                session.rollback()
                click.echo(f"{verb}: {error}", err=True)
                failed = True
    if failed:
        sys.exit(1)


@jobs_group.command("retry")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.pass_obj
def jobs_retry(state: CliState, ids: tuple[int, ...]) -> None:
    """Queue failed or cancelled jobs again, due now, with a fresh set of attempts."""
    from xvr_node.jobs.queue import retry

    _change_jobs(state, ids, retry, "retry")


@jobs_group.command("cancel")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.pass_obj
def jobs_cancel(state: CliState, ids: tuple[int, ...]) -> None:
    """Cancel queued or running jobs (a running one stops at its next heartbeat or step)."""
    from xvr_node.jobs.queue import cancel

    _change_jobs(state, ids, cancel, "cancel")


@jobs_group.command("noop")
@click.argument("count", type=int)
@click.option("--seconds", type=float, default=0.0, show_default=True)
@click.pass_obj
def jobs_noop(state: CliState, count: int, seconds: float) -> None:
    """Queue COUNT jobs that only wait: checks that workers run, and measures the queue."""
    from xvr_node.catalog.models import JobKind
    from xvr_node.jobs.queue import enqueue

    with open_catalog(state) as (_, session):
        for _ in range(count):
            enqueue(session, JobKind.NOOP, {"seconds": seconds})
        session.commit()
    click.echo(f"{count} noop job(s) queued")
