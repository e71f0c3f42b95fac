"""``xvr-node config`` and ``xvr-node db``: check the settings, migrate the catalog."""

from __future__ import annotations

import json
import sys

import click

from xvr_node.cli.root import CliState, cli


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
    url = state.catalog_url(settings)
    upgrade(url, revision)
    click.echo(f"catalog at revision {current_revision(url)} ({settings.database_url_redacted})")


@db_group.command("current")
@click.pass_obj
def db_current(state: CliState) -> None:
    """Print the catalog's schema revision and the newest one this version knows."""
    from xvr_node.catalog.db import current_revision, head_revision

    url = state.catalog_url(state.settings())
    click.echo(f"current: {current_revision(url) or 'none'}; head: {head_revision()}")
