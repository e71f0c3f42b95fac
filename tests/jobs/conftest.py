"""Job fixtures: sessions on a migrated catalog (``catalog_url``: SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from xvr_node.catalog.db import make_engine, session_factory


@pytest.fixture
def sessions(catalog_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(catalog_url)
    yield session_factory(engine)
    engine.dispose()
