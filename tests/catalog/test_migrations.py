"""The Alembic migrations build exactly the schema the models declare."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from xvr_node.catalog.db import (
    SchemaOutdatedError,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    owned_by_the_models,
    require_current_schema,
    upgrade,
)
from xvr_node.catalog.models import Base

REPO = Path(__file__).resolve().parents[2]
#: procrastinate's own tables (migration 0006 runs its schema).
ENGINE_TABLES = {
    "procrastinate_jobs",
    "procrastinate_events",
    "procrastinate_workers",
    "procrastinate_periodic_defers",
}
TABLES = {
    "patients",
    "studies",
    "series",
    "instances",
    "volumes",
    "carm_profiles",
    "models",
    "jobs",
    "registrations",
    "exports",
    "ingest_events",
}


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_models_declare_the_expected_tables() -> None:
    assert set(Base.metadata.tables) == TABLES


def test_upgrade_creates_every_table_and_records_head(empty_catalog_url: str) -> None:
    assert current_revision(empty_catalog_url) is None

    upgrade(empty_catalog_url)

    assert table_names(empty_catalog_url) == TABLES | ENGINE_TABLES | {"alembic_version"}
    assert current_revision(empty_catalog_url) == head_revision()


def test_require_current_schema_refuses_an_empty_catalog(empty_catalog_url: str) -> None:
    with pytest.raises(SchemaOutdatedError, match="xvr-node db upgrade"):
        require_current_schema(empty_catalog_url)

    upgrade(empty_catalog_url)

    require_current_schema(empty_catalog_url)


def test_require_current_schema_refuses_a_revision_it_does_not_know(catalog_url: str) -> None:
    engine = make_engine(catalog_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    engine.dispose()

    with pytest.raises(SchemaOutdatedError, match="does not know"):
        require_current_schema(catalog_url)


def test_downgrade_to_base_and_upgrade_again(catalog_url: str) -> None:
    downgrade(catalog_url, "base")

    assert table_names(catalog_url) <= {"alembic_version"}
    assert current_revision(catalog_url) is None

    upgrade(catalog_url)

    assert table_names(catalog_url) == TABLES | ENGINE_TABLES | {"alembic_version"}
    assert current_revision(catalog_url) == head_revision()


def test_migrated_schema_matches_the_models(catalog_url: str) -> None:
    engine = make_engine(catalog_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "include_name": owned_by_the_models,
                },
            )
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()

    assert differences == []


def test_alembic_command_line_takes_the_url_from_the_environment(empty_catalog_url: str) -> None:
    url = empty_catalog_url
    environment = {**os.environ, "XVR_NODE__DATABASE__URL": url}

    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO,
        env=environment,
        check=True,
        capture_output=True,
    )

    assert current_revision(url) == head_revision()
    assert table_names(url) >= TABLES
