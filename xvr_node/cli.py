"""The one command-line entry point: ``xvr-node``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from xvr_node.config import Settings


@dataclass
class CliState:
    """What every sub-command may need: the config file chosen with ``--config``."""

    config_path: Path | None

    def settings(self):
        """Load the settings, turning a configuration error into a clean exit."""
        from xvr_node.config import ConfigError, load_settings

        try:
            return load_settings(self.config_path)
        except ConfigError as error:
            for problem in error.problems:
                click.echo(f"config: {problem}", err=True)
            sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="XVR_NODE_CONFIG",
    default=None,
    help="Configuration file (default: ./config.yaml when present, else built-in defaults).",
)
@click.version_option(package_name="xvr-node")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None) -> None:
    """xvr-node: receive CT and fluoroscopy, register each X-ray to its CT, return results."""
    ctx.obj = CliState(config_path=config_path)


# --- configuration -------------------------------------------------------------------------


@cli.group("config")
def config_group() -> None:
    """Inspect and validate the configuration."""


@config_group.command("check")
@click.pass_obj
def config_check(state: CliState) -> None:
    """Validate the configuration; exit non-zero naming each bad key and why."""
    from xvr_node.config import check_config

    problems = check_config(state.config_path)
    if problems:
        for problem in problems:
            click.echo(f"config: {problem}", err=True)
        sys.exit(2)
    click.echo("config: OK")


@config_group.command("show")
@click.pass_obj
def config_show(state: CliState) -> None:
    """Print the effective configuration (file + environment overrides) as JSON."""
    settings = state.settings()
    click.echo(json.dumps(settings.model_dump(mode="json"), indent=2))


# --- catalog -------------------------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """Manage the catalog database schema."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_obj
def db_upgrade(state: CliState, revision: str) -> None:
    """Apply Alembic migrations to the configured catalog."""
    from xvr_node.catalog.db import current_revision, upgrade

    settings = state.settings()
    settings.ensure_storage_root()
    url = settings.database_url
    upgrade(url, revision)
    click.echo(f"catalog at revision {current_revision(url)} ({settings.database_url_redacted})")


@db_group.command("current")
@click.pass_obj
def db_current(state: CliState) -> None:
    """Print the catalog's schema revision and the newest one this version knows."""
    from xvr_node.catalog.db import current_revision, head_revision

    url = state.settings().database_url
    click.echo(f"current: {current_revision(url) or 'none'}; head: {head_revision()}")


# --- the node --------------------------------------------------------------------------------


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
    from xvr_node.log import configure_logging
    from xvr_node.node import Node

    settings = state.settings()
    configure_logging(settings.logging)
    try:
        Node(settings, run_workers=not no_worker).run_forever()
    except SchemaOutdatedError as error:
        click.echo(f"serve: {error}", err=True)
        sys.exit(3)
    except OSError as error:
        click.echo(
            f"serve: cannot listen on {settings.node.host}:{settings.node.port}: {error}", err=True
        )
        sys.exit(4)


@cli.command("worker")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(["assemble", "finetune", "register", "export", "retention", "noop"]),
    help="Only these job kinds (repeatable); default: all.",
)
@click.option(
    "--name", default="", help="Added to the worker ids in leases and logs (systemd: %i)."
)
@click.pass_obj
def worker_command(state: CliState, kinds: tuple[str, ...], name: str) -> None:
    """Run jobs only (no listener): more GPUs, or more machines sharing one catalog and store.

    SIGTERM lets the current job finish, or a finetune checkpoint and go back to the queue.
    """
    from xvr_node.catalog.db import SchemaOutdatedError
    from xvr_node.log import configure_logging
    from xvr_node.worker_process import run_worker_process

    settings = state.settings()
    configure_logging(settings.logging)
    try:
        run_worker_process(settings, list(kinds) or None, name)
    except SchemaOutdatedError as error:
        click.echo(f"worker: {error}", err=True)
        sys.exit(3)


@contextmanager
def _catalog(state: CliState) -> Iterator[tuple[Settings, Session]]:
    """Settings and a catalog session for one command; closed and disposed afterwards.

    A catalog without the current schema is refused in one line (exit 3), not a SQL traceback.
    """
    from xvr_node.catalog.db import (
        SchemaOutdatedError,
        make_engine,
        require_current_schema,
        session_factory,
    )

    settings = state.settings()
    try:
        require_current_schema(settings.database_url)
    except SchemaOutdatedError as error:
        click.echo(f"catalog: {error}", err=True)
        sys.exit(3)
    engine = make_engine(settings.database_url)
    try:
        with session_factory(engine)() as session:
            yield settings, session
    finally:
        engine.dispose()


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

    with _catalog(state) as (_, session):
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
        if r["lease_owner"]:
            line += f" on {r['lease_owner']}"
        click.echo(line + (f"  ({r['error']})" if r["error"] else ""))
    click.echo(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no jobs")


def _change_jobs(state: CliState, ids: tuple[int, ...], change, verb: str) -> None:
    from xvr_node.catalog.models import utcnow

    failed = False
    with _catalog(state) as (_, session):
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

    with _catalog(state) as (_, session):
        for _ in range(count):
            enqueue(session, JobKind.NOOP, {"seconds": seconds})
        session.commit()
    click.echo(f"{count} noop job(s) queued")


@cli.command("purge")
@click.option("--days", type=click.IntRange(min=0), default=None, help="Default: from config.")
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@click.pass_obj
def purge_command(state: CliState, days: int | None, dry_run: bool) -> None:
    """Delete received originals past the retention period that no work still needs."""
    from xvr_node.catalog.models import utcnow
    from xvr_node.dicom.storage import FileStore
    from xvr_node.jobs.retention import purge_originals

    with _catalog(state) as (settings, session):
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

    with _catalog(state) as (_, session):
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

    with _catalog(state) as (_, session):
        report = collect_status(session)
    click.echo(json.dumps(report, indent=2) if as_json else format_status(report))


# --- the method (research CLI) ---------------------------------------------------------------


def _load_volume(path: Path):
    """A CT volume from a NIfTI file or a CT DICOM folder (checked like node assembly)."""
    from xvr_node.ct_volume import CtVolume
    from xvr_node.dicom.volume import VolumeRefusedError, assemble_volume, read_series_files

    if path.is_dir():
        try:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "DICOMDIR")
            return assemble_volume(read_series_files(files)).volume
        except VolumeRefusedError as refused:
            raise click.ClickException(f"{path}: {refused.reason}") from refused
    try:
        return CtVolume.from_nifti(path)
    except Exception as error:  # nibabel raises many kinds on a file that is not NIfTI
        raise click.ClickException(
            f"{path}: not a CT volume (a NIfTI file or a CT DICOM folder): "
            f"{type(error).__name__}: {error}"
        ) from None


def _registrar(state: CliState, volume, scales: str | None, orientation: str | None, device: str):
    from xvr_node.xvr.register import RefineSettings, Registrar

    settings = state.settings()
    refine = RefineSettings.from_settings(settings.registration)
    if scales:
        refine = RefineSettings(
            **{**refine.__dict__, "scales": tuple(float(x) for x in scales.split(","))}
        )
    return Registrar(
        volume,
        refine,
        orientation or settings.training.orientation,
        device,
        labels=settings.registration.mask_labels,
    )


_register_options = [
    click.argument("xrays", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path)),
    click.option(
        "--volume",
        "volume_path",
        required=True,
        type=click.Path(exists=True, path_type=Path),
        help="CT as NIfTI, or a CT DICOM series folder.",
    ),
    click.option("--output", required=True, type=click.Path(path_type=Path, file_okay=False)),
    click.option("--scales", default=None, help="Detector downsampling, coarse to fine: 4,2"),
    click.option("--orientation", type=click.Choice(["AP", "PA"]), default=None),
    click.option("--device", default="cpu", show_default=True),
    click.option("--no-tracking", is_flag=True, help="Start every frame of a run afresh."),
]


def _with_register_options(function):
    for option in reversed(_register_options):
        function = option(function)
    return function


def _overlays(volume, written: list[Path]) -> None:
    from xvr_node.xvr.visualize import write_overlays

    for path in write_overlays(volume, written):
        click.echo(f"overlay: {path}")


def _register(
    volume,
    registrar,
    xrays,
    output,
    initializer: str,
    *,
    no_tracking: bool,
    overlay: bool,
    fixed=None,
    starts=None,
) -> list[Path]:
    """What every ``register`` command does once it has its start: run, report, overlay."""
    from xvr_node.xvr.run import register_files, xray_files

    try:
        written = register_files(
            volume,
            xray_files(xrays),
            output,
            registrar,
            initializer,
            fixed,
            track=not no_tracking,
            starts=starts,
            echo=click.echo,
        )
    except ValueError as error:  # e.g. no positioner angles, conventions refused
        raise click.ClickException(str(error)) from error
    if overlay:
        _overlays(volume, written)
    return written


_overlay_option = click.option(
    "--overlay", is_flag=True, help="Also write a PNG of DRR edges over each X-ray."
)


def _fixed_start_options(function):
    """The options of a user-given start: C-arm angles and offsets, or a matrix file."""
    for option in reversed(
        [
            click.option(
                "--primary", type=float, default=0.0, show_default=True, help="LAO+/RAO- deg"
            ),
            click.option(
                "--secondary", type=float, default=0.0, show_default=True, help="CRA+/CAU- deg"
            ),
            click.option(
                "--dsp",
                type=float,
                default=750.0,
                show_default=True,
                help="Source to isocentre, mm",
            ),
            click.option(
                "--offset",
                type=float,
                nargs=3,
                default=(0.0, 0.0, 0.0),
                help="Isocentre offset from the CT centre, LPS mm",
            ),
            click.option(
                "--init-matrix",
                type=click.Path(exists=True, path_type=Path),
                default=None,
                help="JSON 4x4 image-plane -> CT LPS (or an object's final_matrix or matrix).",
            ),
        ]
    ):
        function = option(function)
    return function


def _fixed_start(primary, secondary, dsp, offset, init_matrix):
    """The FixedStart the options describe (a matrix file wins over angles)."""
    from xvr_node.xvr.run import FixedStart

    matrix = None if init_matrix is None else _start_matrix(init_matrix)
    return FixedStart(primary, secondary, dsp, tuple(offset), 0.0, matrix)


@cli.group("register")
def register_group() -> None:
    """Register X-ray frames to a CT; one JSON result per frame."""


@register_group.command("dicom")
@_with_register_options
@_overlay_option
@click.pass_obj
def register_dicom(
    state: CliState,
    xrays,
    volume_path,
    output,
    scales,
    orientation,
    device,
    no_tracking,
    overlay,
) -> None:
    """Start from the C-arm's positioner angles and Distance Source to Patient."""
    volume = _load_volume(volume_path)
    registrar = _registrar(state, volume, scales, orientation, device)
    _register(volume, registrar, xrays, output, "dicom", no_tracking=no_tracking, overlay=overlay)


@register_group.command("fixed")
@_with_register_options
@_fixed_start_options
@_overlay_option
@click.pass_obj
def register_fixed(
    state: CliState,
    xrays,
    volume_path,
    output,
    scales,
    orientation,
    device,
    no_tracking,
    primary,
    secondary,
    dsp,
    offset,
    init_matrix,
    overlay,
) -> None:
    """Start from a pose you give: angles and offsets, or a matrix."""
    fixed = _fixed_start(primary, secondary, dsp, offset, init_matrix)
    volume = _load_volume(volume_path)
    registrar = _registrar(state, volume, scales, orientation, device)
    _register(
        volume,
        registrar,
        xrays,
        output,
        "fixed",
        no_tracking=no_tracking,
        overlay=overlay,
        fixed=fixed,
    )


def _read_json(path: Path):
    """A JSON file's content; unreadable or invalid JSON is a one-line error."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise click.ClickException(f"{path}: not readable JSON ({error})") from None


def _start_matrix(path: Path):
    """A 4x4 start matrix from JSON: a bare matrix, or an object's final_matrix or matrix."""
    import numpy as np

    from xvr_node.geometry import check_rigid

    wanted = (
        "must hold a 4x4 matrix: a JSON array of 4 rows of 4 numbers, or an object with "
        "'final_matrix' or 'matrix'"
    )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise click.ClickException(f"{path}: not readable JSON ({error}); it {wanted}") from None
    if isinstance(data, dict):
        key = next((k for k in ("final_matrix", "matrix") if k in data), None)
        if key is None:
            raise click.ClickException(
                f"{path}: no 'final_matrix' or 'matrix' key; the file {wanted}"
            )
        data = data[key]
    try:
        matrix = np.array(data, dtype=float)
        if matrix.shape != (4, 4):
            raise ValueError(f"shape {matrix.shape}, not (4, 4)")
        check_rigid(matrix)
    except (TypeError, ValueError) as error:
        raise click.ClickException(f"{path}: {error}; the file {wanted}") from None
    return matrix


def _model_initializer(checkpoint: Path | None, device: str):
    """The checkpoint's network as an initializer; its conventions refused cleanly."""
    if checkpoint is None:
        return None
    from xvr_node.xvr.initialize import ModelInitializer

    try:
        return ModelInitializer(checkpoint, device)
    except ValueError as error:
        raise click.ClickException(str(error)) from error


@register_group.command("model")
@_with_register_options
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Trained pose regressor (train / finetune); its conventions are checked.",
)
@_overlay_option
@click.pass_obj
def register_model(
    state: CliState,
    xrays,
    volume_path,
    output,
    scales,
    orientation,
    device,
    no_tracking,
    checkpoint,
    overlay,
) -> None:
    """Start from the pose a trained network predicts from the X-ray itself."""
    model = _model_initializer(checkpoint, device)
    volume = _load_volume(volume_path)
    registrar = _registrar(state, volume, scales, orientation or model.orientation, device)
    _register(
        volume,
        registrar,
        xrays,
        output,
        "model",
        no_tracking=no_tracking,
        overlay=overlay,
        starts=lambda frame: model.matrix_for(frame, volume),
    )


@register_group.command("multistart")
@_with_register_options
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Also try this pose regressor's prediction.",
)
@_fixed_start_options
@_overlay_option
@click.pass_obj
def register_multistart(
    state: CliState,
    xrays,
    volume_path,
    output,
    scales,
    orientation,
    device,
    no_tracking,
    checkpoint,
    primary,
    secondary,
    dsp,
    offset,
    init_matrix,
    overlay,
) -> None:
    """Try every start there is (model, DICOM, fixed, and a local search around the model's
    and the positioner's), refine each briefly at the coarsest level, refine the best fully.

    The result's initializer reads "multistart:<chosen>", with every candidate's scores.
    """
    from xvr_node.xvr.initialize import available_starts
    from xvr_node.xvr.multistart import SearchSettings, choose_start

    fixed = _fixed_start(primary, secondary, dsp, offset, init_matrix)
    model = _model_initializer(checkpoint, device)
    volume = _load_volume(volume_path)
    registrar = _registrar(state, volume, scales, orientation, device)
    search = SearchSettings(**state.settings().registration.multistart_search.model_dump())
    chosen: dict[tuple[str, int | None], tuple[str, dict]] = {}

    def starts(frame):
        candidates = available_starts(registrar, frame, fixed, model)
        choice = choose_start(registrar, frame, candidates, search)
        chosen[(frame.source, frame.frame_number)] = (choice.name, choice.summary())
        margin = "no rival" if choice.margin is None else f"margin {choice.margin:.4f}"
        click.echo(
            f"{frame.name}: {len(choice.candidates)} candidates -> {choice.name} "
            f"at {choice.similarity:.4f} ({margin})"
        )
        return choice.matrix

    written = _register(
        volume,
        registrar,
        xrays,
        output,
        "multistart",
        no_tracking=no_tracking,
        overlay=overlay,
        fixed=fixed,
        starts=starts,
    )
    for path in written:
        result = json.loads(path.read_text())
        key = (result["file"], result["frame_number"])
        if result["initializer"] == "multistart" and key in chosen:
            name, scores = chosen[key]
            result["initializer"] = f"multistart:{name}"
            result["multistart_scores"] = scores
            path.write_text(json.dumps(result, indent=1))


@cli.command("animate")
@click.argument("result", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--volume",
    "volume_path",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="The CT the result was registered to (NIfTI or DICOM folder).",
)
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--every", type=click.IntRange(min=1), default=5, show_default=True, help="Iterations/frame."
)
@click.option("--device", default="cpu", show_default=True)
@click.pass_obj
def animate_command(
    state: CliState, result: Path, volume_path: Path, output: Path, every: int, device: str
) -> None:
    """GIF of a registration: re-run from the result's start with its settings, keeping poses."""
    import numpy as np

    from xvr_node.xvr.register import RefineSettings, Registrar
    from xvr_node.xvr.visualize import animate, frame_of_result

    data = _read_json(result)
    if not isinstance(data, dict) or not all(key in data for key in ("file", "initial_matrix")):
        raise click.ClickException(
            f"{result}: not a registration result (needs 'file' and 'initial_matrix')"
        )
    if not Path(data["file"]).is_file():
        raise click.ClickException(f"{result}: its X-ray {data['file']} is not there")
    names = RefineSettings.__dataclass_fields__
    refine = RefineSettings(
        **{
            key: tuple(value) if isinstance(value, list) else value
            for key, value in data.get("settings", {}).items()
            if key in names
        }
    )
    orientation = data.get("conventions", {}).get("orientation", "PA")
    volume = _load_volume(volume_path)
    registrar = Registrar(
        volume, refine, orientation, device, labels=state.settings().registration.mask_labels
    )
    frame = frame_of_result(data)
    outcome = registrar.register(frame, np.array(data["initial_matrix"]), keep_poses=True)
    animate(frame, volume, outcome.poses, output, every)
    click.echo(
        f"{output}: {outcome.iterations} iterations, similarity {outcome.similarity:.4f} "
        f"(result: {data.get('similarity', float('nan')):.4f})"
    )


_budget_option = click.option(
    "--budget-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop training after this long (the run re-plans its iterations to fit).",
)


def _budget_s(minutes: float | None) -> float | None:
    return None if minutes is None else minutes * 60.0


def _training_options(function):
    for option in reversed(
        [
            click.option(
                "--volume",
                "volume_paths",
                multiple=True,
                required=True,
                type=click.Path(exists=True, path_type=Path),
                help="CT as NIfTI or DICOM folder; repeat for several (pretraining).",
            ),
            click.option(
                "--output", required=True, type=click.Path(path_type=Path, file_okay=False)
            ),
            click.option(
                "--iterations",
                type=int,
                default=None,
                help="Default: training.iterations (de novo) or finetune_iterations.",
            ),
            click.option(
                "--device",
                default="auto",
                show_default=True,
                help="cpu, cuda, cuda:N or auto; its training.profiles entry applies.",
            ),
            click.option("--seed", type=int, default=0, show_default=True),
            _budget_option,
        ]
    ):
        function = option(function)
    return function


@cli.command("train")
@_training_options
@click.pass_obj
def train_command(
    state: CliState, volume_paths, output, iterations, device, seed, budget_minutes
) -> None:
    """Train a pose regressor de novo on one or several CTs (training.* settings).

    Several CTs make a base model that per-patient finetunes start from.
    """
    from xvr_node.xvr.train import train

    device = _training_device(device)
    settings = state.settings().training.for_device(device)
    volumes = [_load_volume(p) for p in volume_paths]
    checkpoint = _with_progress_bar(
        output,
        lambda progress: train(
            volumes,
            settings,
            output,
            iterations=iterations,
            device=device,
            seed=seed,
            progress=progress,
            budget_s=_budget_s(budget_minutes),
        ),
    )
    click.echo(f"checkpoint: {checkpoint}")


def _training_device(device: str) -> str:
    from xvr_node.jobs.worker import resolve_device

    resolved = resolve_device(device)
    if resolved.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException(f"--device {device}: no CUDA device is visible")
    return resolved


def _with_progress_bar(output: Path, run) -> Path:
    """Run ``run(progress)`` under a progress bar (iterations, ETA, loss, validation); then
    say why training stopped."""
    from xvr_node.xvr.train import stop_record

    def describe(update) -> str:
        if update is None:
            return ""
        text = f"loss {update.loss:.3f} dgeo {update.dgeo_mm:.0f} mm"
        if update.validation_mm is not None:
            text += f" validation {update.validation_mm:.0f} mm"
        return text

    with click.progressbar(
        length=1, label="training", show_eta=True, item_show_func=describe, file=sys.stderr
    ) as bar:

        def progress(update) -> bool:
            bar.length = update.total
            bar.update(update.iteration - bar.pos, current_item=update)
            return True

        try:
            checkpoint = run(progress)
        except ValueError as error:  # e.g. a base checkpoint that is none, or other conventions
            raise click.ClickException(str(error)) from None
    stopped = stop_record(output) or {}
    if stopped:
        click.echo(
            f"stopped: {stopped['reason']} at iteration {stopped['iteration']} of "
            f"{stopped['total']} after {stopped['seconds']:.0f} s"
            + (
                ""
                if stopped.get("validation_mm") is None
                else f", held-out pose error {stopped['validation_mm']:.1f} mm"
            )
        )
    return checkpoint


@cli.command("finetune")
@_training_options
@click.option(
    "--base",
    "base_checkpoint",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.pass_obj
def finetune_command(
    state: CliState,
    volume_paths,
    output,
    iterations,
    device,
    seed,
    budget_minutes,
    base_checkpoint,
) -> None:
    """Finetune a base model on this patient's CT (conventions must match)."""
    from xvr_node.xvr.train import finetune

    device = _training_device(device)
    settings = state.settings().training.for_device(device, finetune=True)
    volumes = [_load_volume(p) for p in volume_paths]
    checkpoint = _with_progress_bar(
        output,
        lambda progress: finetune(
            volumes,
            settings,
            output,
            base_checkpoint,
            iterations=iterations,
            device=device,
            seed=seed,
            progress=progress,
            budget_s=_budget_s(budget_minutes),
        ),
    )
    click.echo(f"checkpoint: {checkpoint}")


@cli.command("restart")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--iterations", type=int, default=None, help="New total (default: unchanged).")
@click.option("--device", default="auto", show_default=True)
@_budget_option
def restart_command(checkpoint: Path, output: Path, iterations, device, budget_minutes) -> None:
    """Resume training exactly where a checkpoint stopped."""
    from xvr_node.xvr.train import restart

    device = _training_device(device)
    resumed = _with_progress_bar(
        output,
        lambda progress: restart(
            checkpoint,
            output,
            iterations=iterations,
            device=device,
            progress=progress,
            budget_s=_budget_s(budget_minutes),
        ),
    )
    click.echo(f"checkpoint: {resumed}")


@cli.command("adopt")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--volume", "volume_id", type=int, required=True, help="The CT volume it was trained for."
)
@click.option("--note", default=None, help="Where it comes from (default: the file's name).")
@click.option("--device", default=None, help="Device of the check (default: worker.device).")
@click.pass_obj
def adopt_command(
    state: CliState, checkpoint: Path, volume_id: int, note: str | None, device: str | None
) -> None:
    """Take a model trained elsewhere (a GPU machine) into service for a CT.

    It is stored as the patient's next model and checked on held-out X-rays like a finetuned
    one; it starts registrations only if it passes, and the CT's queued finetune is cancelled.
    """
    from xvr_node.catalog.models import Volume, utcnow
    from xvr_node.dicom.storage import FileStore
    from xvr_node.jobs.pipeline import Pipeline
    from xvr_node.jobs.worker import resolve_device
    from xvr_node.status import describe_model

    with _catalog(state) as (settings, session):
        volume = session.get(Volume, volume_id)
        if volume is None:
            raise click.ClickException(f"adopt: no volume {volume_id} (see `xvr-node status`)")
        store = FileStore(settings.storage_root, settings.storage.min_free_bytes)
        pipeline = Pipeline(settings, store, resolve_device(device or settings.worker.device))
        click.echo(f"checking {checkpoint.name} on held-out X-rays of volume {volume_id} ...")
        try:
            model = pipeline.adopt_model(
                session, volume, checkpoint, utcnow(), note=note or f"adopted: {checkpoint.name}"
            )
        except ValueError as error:
            raise click.ClickException(f"adopt: {error}") from None
        line = describe_model(
            {"state": model.state, "validation": model.validation, "validated": model.validated}
        )
        click.echo(f"model {model.id} v{model.version} ({model.path}): {line}")


@cli.command("evaluate")
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.argument("truth", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def evaluate_command(results: Path, truth: Path) -> None:
    """Metrics (mTRE, mPE, dgeo, success rates) of results against a phantom's truth.json."""
    from xvr_node.xvr.evaluate import evaluate

    try:
        table = evaluate(results, truth)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise click.ClickException(
            f"evaluate: {results} / {truth} are not a results file and a phantom truth.json "
            f"({type(error).__name__}: {error})"
        ) from None
    click.echo(table)


@cli.command("dcm2nii")
@click.argument("series", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
def dcm2nii_command(series: Path, output: Path) -> None:
    """A CT DICOM series folder to NIfTI, with the node's assembly checks."""
    from xvr_node.dicom.volume import (
        VolumeRefusedError,
        assemble_volume,
        read_series_files,
        write_volume_nifti,
    )

    files = sorted(p for p in series.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    try:
        assembled = assemble_volume(read_series_files(files))
    except VolumeRefusedError as refused:
        raise click.ClickException(refused.reason) from refused
    write_volume_nifti(assembled, output)
    shape = "x".join(map(str, assembled.volume.hu.shape))
    click.echo(f"{output}: {shape} voxels from {len(files)} files")


# --- results export --------------------------------------------------------------------------


@cli.group("export")
def export_group() -> None:
    """The outbox of result objects for PACS: list, retry, re-send, deliver."""


@export_group.command("list")
@click.option(
    "--status",
    type=click.Choice(["pending", "sent", "retrying", "parked"]),
    default=None,
    help="Only rows with this status.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def export_list(state: CliState, status: str | None, as_json: bool) -> None:
    """One line per object and destination: status, attempts, next attempt, last error."""
    from xvr_node.jobs.export import export_record, list_exports

    with _catalog(state) as (_, session):
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
    with _catalog(state) as (_, session):
        changed = [row.id for row in retry(session, ids, all_parked=all_parked)]
    _report_requeued("retry", ids, changed, "not found, or already sent (use `export resend`)")


@export_group.command("resend")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.pass_obj
def export_resend(state: CliState, ids: tuple[int, ...]) -> None:
    """Send already delivered rows once more (e.g. the PACS lost them)."""
    from xvr_node.jobs.export import resend

    with _catalog(state) as (_, session):
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
    """Send every due row to its destination now, once, and print what happened."""
    from xvr_node.catalog.models import utcnow
    from xvr_node.dicom.storage import FileStore
    from xvr_node.jobs.export import deliver_configured
    from xvr_node.log import configure_logging

    with _catalog(state) as (settings, session):
        configure_logging(settings.logging)
        store = FileStore(settings.storage_root, settings.storage.min_free_bytes)
        summary = deliver_configured(session, store, settings, utcnow())
    click.echo(
        f"due {summary['due']}: sent {summary['sent']}, retrying {summary['retrying']}, "
        f"parked {summary['parked']}"
    )
    for name, counts in summary["destinations"].items():
        click.echo(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


# --- phantom and demo ----------------------------------------------------------------------


@cli.command("phantom")
@click.argument("outdir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--frames", type=int, default=4, show_default=True, help="Single-frame X-rays.")
@click.option(
    "--size",
    default="128",
    show_default=True,
    help="Detector size in pixels: N (square) or COLSxROWS.",
)
@click.option(
    "--multiframe", type=int, default=0, show_default=True, help="Add one cine run of K frames."
)
@click.option(
    "--motion",
    type=click.Choice(["static", "dynamic"]),
    default="dynamic",
    show_default=True,
    help="Cine run with a still or a rotating C-arm.",
)
@click.option("--orientation", type=click.Choice(["AP", "PA"]), default="PA", show_default=True)
@click.option(
    "--modality", type=click.Choice(["XA", "RF", "both"]), default="XA", show_default=True
)
@click.option("--flip", is_flag=True, help="Store RAO views mirrored, as some C-arms do.")
@click.option("--bead", is_flag=True, help="Insert a dense bead into the CT before rendering.")
@click.option(
    "--ct-downsample",
    type=int,
    default=1,
    show_default=True,
    help="Keep every N-th CT voxel in-plane and between slices (fast tests).",
)
@click.option(
    "--realism",
    type=click.Choice(["full", "clean", "none"]),
    default="full",
    show_default=True,
    help="X-ray formation: full (independent projector, spectrum, scatter, table, devices, "
    "noise, vendor storage), clean (independent, mono-energetic, nothing else) or none (the "
    "registration renderer, as older phantoms).",
)
@click.option("--spectrum/--mono", default=None, help="Polyenergetic beam with water/bone HU.")
@click.option("--scatter/--no-scatter", default=None, help="Scatter (a broad low-pass).")
@click.option("--scatter-to-primary", type=float, default=None, help="Scatter/primary ratio.")
@click.option("--table/--no-table", default=None, help="Carbon-fibre table under the patient.")
@click.option("--blur/--no-blur", default=None, help="Detector blur.")
@click.option("--noise/--no-noise", default=None, help="Quantum noise.")
@click.option("--dose-ngy", type=float, default=None, help="Detector air kerma per frame.")
@click.option("--devices/--no-devices", default=None, help="Guidewire and ECG leads.")
@click.option(
    "--storage",
    type=click.Choice(["lin12", "log8", "log10", "mixed"]),
    default=None,
    help="Pixel storage (mixed: one per X-ray).",
)
@click.option(
    "--field",
    type=click.Choice(["rectangle", "circle", "open", "mixed"]),
    default=None,
    help="Collimated rectangle, image-intensifier circle, open detector, or one per X-ray.",
)
@click.option(
    "--field-header",
    type=click.Choice(["yes", "no", "mixed"]),
    default=None,
    help="Whether collimator / circular shutter attributes describe the field.",
)
@click.option(
    "--ct-crop", type=float, default=None, help="Fraction of CT slices written (X-rays see all)."
)
@click.option(
    "--ct-oblique",
    default="0,0",
    show_default=True,
    help="Tilt the CT series by AX,AY degrees about the patient's x and y axes.",
)
@click.option("--ct-prone", is_flag=True, help="Store the CT as a prone (HFP) scan.")
@click.option("--ct-descending", is_flag=True, help="Number CT instances from the other end.")
def phantom_command(outdir: Path, **options) -> None:
    """Build a test patient: CT series, XA/RF fluoroscopy and truth.json."""
    from xvr_node.phantom import PhantomSpec, Realism, build_phantom

    scatter = options.pop("scatter")
    blur = options.pop("blur")
    scatter_to_primary = options.pop("scatter_to_primary")
    try:
        realism = Realism.from_preset(
            options.pop("realism"),
            spectrum=options.pop("spectrum"),
            scatter_to_primary=0.0 if scatter is False else scatter_to_primary,
            table=options.pop("table"),
            detector_blur_mm=0.0 if blur is False else None,
            noise=options.pop("noise"),
            detector_dose_ngy=options.pop("dose_ngy"),
            devices=options.pop("devices"),
            storage=options.pop("storage"),
            field=options.pop("field"),
            field_in_header=options.pop("field_header"),
            ct_crop_fraction=options.pop("ct_crop"),
        )
        oblique = tuple(float(x) for x in options.pop("ct_oblique").split(","))
        spec = PhantomSpec.from_cli(realism=realism, ct_oblique_deg=oblique, **options)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    summary = build_phantom(outdir, spec, progress=lambda line: click.echo(line, err=True))
    click.echo(summary.describe())


@cli.command("demo")
@click.option(
    "--output",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("demo-output"),
    show_default=True,
)
@click.option(
    "--train",
    is_flag=True,
    help="Train the patient's model here (20 minutes on CPU, 5 on a GPU) instead of "
    "adopting the one shipped with the demo.",
)
@click.option(
    "--iterations",
    type=click.IntRange(min=1),
    default=None,
    help="Train this many iterations of a small model instead (a quick look at the path).",
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="Leave the node and the PACS running after the table, until Ctrl-C.",
)
@click.pass_obj
def demo_command(
    state: CliState, output: Path, train: bool, iterations: int | None, keep_running: bool
) -> None:
    """The main job on embedded defaults: phantom → C-STORE → finetune → register → PACS."""
    from xvr_node.demo import run_demo

    state.settings()  # a broken configuration stops here, in one line per problem
    try:
        run_demo(
            output,
            config_path=state.config_path,
            echo=click.echo,
            train=train,
            iterations=iterations,
            keep_running=keep_running,
        )
    except (RuntimeError, TimeoutError) as error:
        raise click.ClickException(f"demo: {error}") from error


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="xvr-node")


if __name__ == "__main__":
    main()
