"""Job fixtures: a migrated catalog on SQLite and on a real PostgreSQL, and settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.support.postgres import new_postgres_database
from xvr_node.catalog.db import make_engine, session_factory, upgrade


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A catalog at the head revision, for one test."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
        upgrade(url)
        yield url
        return
    template = request.getfixturevalue("migrated_postgres_template")
    with new_postgres_database(request.getfixturevalue("postgres_url"), template) as url:
        yield url


@pytest.fixture
def sessions(catalog_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(catalog_url)
    yield session_factory(engine)
    engine.dispose()
