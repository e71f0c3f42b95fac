"""Running the node and working its catalog: serve, worker, import, link, status, purge."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from xvr_node.cli.root import CliState, cli, open_catalog


@cli.command("serve")
@click.option(
    "--no-worker",
    is_flag=True,
    help="Listener and scheduler only; `xvr-node worker` processes run the jobs.",
)
@click.pass_obj
def serve_command(state: CliState, no_worker: bool) -> None:
    """Run the node: DICOM listener, scheduler and a worker, until SIGTERM."""
    from xvr_node.catalog.db import SchemaOutdatedError
    from xvr_node.catalog.embedded import EmbeddedPostgresError
    from xvr_node.log import configure_logging
    from xvr_node.node import ListenError, Node

    settings = state.settings()
    configure_logging(settings.logging)
    try:
        Node(settings, run_workers=not no_worker).run_forever()
    except (SchemaOutdatedError, EmbeddedPostgresError) as error:
        click.echo(f"serve: {error}", err=True)
        sys.exit(3)
    except ListenError as error:
        click.echo(f"serve: {error}", err=True)
        sys.exit(4)
    except OSError as error:  # the storage root or its disk: permissions, space
        click.echo(f"serve: {error}", err=True)
        sys.exit(5)


@cli.command("worker")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(["assemble", "finetune", "register", "export", "retention", "noop"]),
    help="Only these job kinds (repeatable); default: all.",
)
@click.option(
    "--name", default="", help="Added to the worker ids in the job rows and logs (systemd: %i)."
)
@click.pass_obj
def worker_command(state: CliState, kinds: tuple[str, ...], name: str) -> None:
    """Run jobs only (no listener): more GPUs, or more machines sharing one catalog and store.

    SIGTERM lets the current job finish, or a finetune checkpoint and go back to the queue.
    """
    from xvr_node.catalog.db import SchemaOutdatedError
    from xvr_node.catalog.embedded import EmbeddedPostgresError
    from xvr_node.log import configure_logging
    from xvr_node.worker_process import run_worker_process

    settings = state.settings()
    configure_logging(settings.logging)
    try:
        run_worker_process(settings, list(kinds) or None, name)
    except (SchemaOutdatedError, EmbeddedPostgresError) as error:
        click.echo(f"worker: {error}", err=True)
        sys.exit(3)


@cli.command("purge")
@click.option("--days", type=click.IntRange(min=0), default=None, help="Default: from config.")
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@click.pass_obj
def purge_command(state: CliState, days: int | None, dry_run: bool) -> None:
    """Delete received originals past the retention period that no work still needs."""
    from xvr_node.catalog.models import utcnow
    from xvr_node.dicom.storage import FileStore
    from xvr_node.jobs.retention import purge_originals

    with open_catalog(state) as (settings, session):
        retention = settings.scheduler.retention
        days = retention.purge_originals_after_days if days is None else days
        if days is None:
            raise click.UsageError(
                "give --days, or set scheduler.retention.purge_originals_after_days"
            )
        store = FileStore(settings.storage_root, settings.storage.min_free_bytes)
        counts = purge_originals(session, store, utcnow(), days, dry_run=dry_run)
    verb = "would purge" if dry_run else "purged"
    click.echo(
        f"{verb} {counts['purged']} original(s), {counts['bytes'] / 1e6:.1f} MB; "
        f"kept {counts['kept']} still needed"
    )


@cli.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.pass_obj
def import_command(state: CliState, paths: tuple[Path, ...]) -> None:
    """Import DICOM files, folders or DICOMDIRs through the same path as a C-STORE."""
    from xvr_node.catalog.db import SchemaOutdatedError
    from xvr_node.dicom.importer import import_paths
    from xvr_node.log import configure_logging
    from xvr_node.node import make_receiver

    settings = state.settings()
    configure_logging(settings.logging)
    state.catalog_url(settings)
    try:
        receiver, _ = make_receiver(settings)
    except SchemaOutdatedError as error:
        click.echo(f"import: {error}", err=True)
        sys.exit(3)
    report = import_paths(receiver, paths)
    for line in report.failures:
        click.echo(f"failed: {line}", err=True)
    click.echo(report.describe())
    if report.failures:
        sys.exit(1)


@cli.command("link")
@click.argument("xray")
@click.option("--patient-id", default=None, help="Patient ID of the CT's patient.")
@click.option("--issuer", default="", help="Issuer of Patient ID of that patient.")
@click.option("--volume", "volume_id", type=int, default=None, help="A CT volume id instead.")
@click.pass_obj
def link_command(
    state: CliState, xray: str, patient_id: str | None, issuer: str, volume_id: int | None
) -> None:
    """Assign an X-ray (SOP Instance UID or id) to a patient's CT and queue its registration.

    For X-rays the node cannot link itself, e.g. sent without a Patient ID. The CT is the
    patient's newest usable volume unless --volume names one.
    """
    from xvr_node.jobs.link import LinkError, link_xray

    with open_catalog(state) as (_, session):
        try:
            outcome = link_xray(
                session, xray, patient_id=patient_id, issuer=issuer, volume_id=volume_id
            )
        except LinkError as error:
            raise click.ClickException(str(error)) from error
        session.commit()
        click.echo(
            f"linked instance {outcome.instance.id} ({outcome.instance.sop_instance_uid}) to "
            f"volume {outcome.volume.id}; register job {outcome.job.id} queued"
            + (f" (was: {outcome.previous_reason})" if outcome.previous_reason else "")
        )


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status_command(state: CliState, as_json: bool) -> None:
    """Per patient: CT series and volumes, X-rays, models and jobs; and totals."""
    from xvr_node.status import collect_status, format_status

    with open_catalog(state) as (_, session):
        report = collect_status(session)
    click.echo(json.dumps(report, indent=2) if as_json else format_status(report))
