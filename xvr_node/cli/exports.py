"""``xvr-node export``: the outbox of result objects."""

from __future__ import annotations

import json
import sys

import click

from xvr_node.cli.root import CliState, cli, open_catalog


@cli.group("export")
def export_group() -> None:
    """The outbox of result objects for PACS: list, retry, re-send, deliver."""


@export_group.command("list")
@click.option(
    "--status",
    type=click.Choice(["pending", "sending", "sent", "retrying", "parked"]),
    default=None,
    help="Only rows with this status.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def export_list(state: CliState, status: str | None, as_json: bool) -> None:
    """One line per object and destination: status, attempts, next attempt, last error."""
    from xvr_node.jobs.export import export_record, list_exports

    with open_catalog(state) as (_, session):
        records = [export_record(row) for row in list_exports(session, status)]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    for r in records:
        when = r["sent_at"] if r["status"] == "sent" else r["next_attempt_at"]
        line = (
            f"{r['id']:>6} {r['status']:<8} {r['object_kind']:<3} {r['destination']} "
            f"attempts={r['attempts']} {when} {r['sop_instance_uid']}"
        )
        click.echo(line + (f"  ({r['last_error']})" if r["last_error"] else ""))
    click.echo(f"{len(records)} export(s)")


@export_group.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "all_parked", is_flag=True, help="Every parked row.")
@click.pass_obj
def export_retry(state: CliState, ids: tuple[int, ...], all_parked: bool) -> None:
    """Put parked (or waiting) rows back to pending, due now; sent rows need `resend`."""
    from xvr_node.jobs.export import retry

    if not ids and not all_parked:
        raise click.UsageError("give export IDS or --all")
    with open_catalog(state) as (_, session):
        changed = [row.id for row in retry(session, ids, all_parked=all_parked)]
    _report_requeued("retry", ids, changed, "not found, or already sent (use `export resend`)")


@export_group.command("resend")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.pass_obj
def export_resend(state: CliState, ids: tuple[int, ...]) -> None:
    """Send already delivered rows once more (e.g. the PACS lost them)."""
    from xvr_node.jobs.export import resend

    with open_catalog(state) as (_, session):
        changed = [row.id for row in resend(session, ids)]
    _report_requeued("resend", ids, changed, "not found, or not sent yet (use `export retry`)")


def _report_requeued(command: str, ids: tuple[int, ...], changed: list[int], why: str) -> None:
    for missed in sorted(set(ids) - set(changed)):
        click.echo(f"{command}: export {missed}: {why}", err=True)
    click.echo(f"{len(changed)} export(s) pending again: {' '.join(map(str, changed)) or '-'}")
    if set(ids) - set(changed):
        sys.exit(1)


@export_group.command("deliver")
@click.pass_obj
def export_deliver(state: CliState) -> None:
    """Send every due row to its destination now, once, and print what happened.

    Safe while the node runs: a destination its workers are sending to is skipped (busy).
    """
    from xvr_node.catalog.models import utcnow
    from xvr_node.dicom.storage import FileStore
    from xvr_node.jobs.export import DELIVERY_COUNTS, deliver_all
    from xvr_node.log import configure_logging

    with open_catalog(state) as (settings, session):
        configure_logging(settings.logging)
        store = FileStore(settings.storage_root, settings.storage.min_free_bytes)
        summaries = deliver_all(session, store, settings, utcnow())
    totals = {key: sum(s[key] for s in summaries) for key in DELIVERY_COUNTS}
    click.echo(", ".join(f"{key} {value}" for key, value in totals.items()))
    for summary in summaries:
        if summary["busy"]:
            click.echo(f"  {summary['destination']}: busy (a worker is sending to it now)")
        else:
            counts = ", ".join(f"{key} {summary[key]}" for key in DELIVERY_COUNTS)
            click.echo(f"  {summary['destination']}: {counts}")
