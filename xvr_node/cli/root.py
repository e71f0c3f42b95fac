"""The ``xvr-node`` group, its shared state and the catalog session every command opens."""

from __future__ import annotations

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

    def catalog_url(self, settings: Settings) -> str:
        """The catalog's URL, its embedded server (if it is ours) held until the command ends.

        A server that cannot start is refused in one line (exit 3), not a traceback.
        """
        from xvr_node.catalog.embedded import EmbeddedPostgresError, catalog_server

        try:
            return click.get_current_context().with_resource(
                catalog_server(settings.database.url, settings.storage_root)
            )
        except EmbeddedPostgresError as error:
            click.echo(f"catalog: {error}", err=True)
            sys.exit(3)
        except OSError as error:  # the storage root cannot hold the embedded catalog
            click.echo(f"catalog: cannot use {settings.storage_root}: {error}", err=True)
            sys.exit(3)


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


@contextmanager
def open_catalog(state: CliState) -> Iterator[tuple[Settings, Session]]:
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
    url = state.catalog_url(settings)
    try:
        require_current_schema(url)
    except SchemaOutdatedError as error:
        click.echo(f"catalog: {error}", err=True)
        sys.exit(3)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            yield settings, session
    finally:
        engine.dispose()


def load_volume(path: Path):
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
