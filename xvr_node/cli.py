"""The one command-line entry point: ``xvr-node``."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click


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
@click.pass_obj
def serve_command(state: CliState) -> None:
    """Run the node: DICOM listener and scheduler, until SIGTERM."""
    from xvr_node.catalog.db import SchemaOutdatedError
    from xvr_node.log import configure_logging
    from xvr_node.node import Node

    settings = state.settings()
    configure_logging(settings.logging)
    try:
        Node(settings).run_forever()
    except SchemaOutdatedError as error:
        click.echo(f"serve: {error}", err=True)
        sys.exit(3)
    except OSError as error:
        click.echo(
            f"serve: cannot listen on {settings.node.host}:{settings.node.port}: {error}", err=True
        )
        sys.exit(4)


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


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status_command(state: CliState, as_json: bool) -> None:
    """Per patient: CT series and volumes, X-rays, models and jobs; and totals."""
    from xvr_node.catalog.db import make_engine, session_factory
    from xvr_node.status import collect_status, format_status

    settings = state.settings()
    engine = make_engine(settings.database_url)
    try:
        with session_factory(engine)() as session:
            report = collect_status(session)
    finally:
        engine.dispose()
    click.echo(json.dumps(report, indent=2) if as_json else format_status(report))


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
def phantom_command(outdir: Path, **options) -> None:
    """Build a test patient: CT series, XA/RF fluoroscopy and truth.json."""
    from xvr_node.phantom import PhantomSpec, build_phantom

    spec = PhantomSpec.from_cli(**options)
    summary = build_phantom(outdir, spec, progress=lambda line: click.echo(line, err=True))
    click.echo(summary.describe())


@cli.command("demo")
@click.option(
    "--output",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("demo-output"),
    show_default=True,
)
@click.pass_obj
def demo_command(state: CliState, output: Path) -> None:
    """Run the main job on embedded defaults (grows with the project)."""
    from xvr_node.demo import run_demo

    run_demo(output, config_path=state.config_path, echo=click.echo)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="xvr-node")


if __name__ == "__main__":
    main()
