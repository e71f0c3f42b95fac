"""Engines: SQLite pragmas on every connection, PostgreSQL pings, sessions that stay readable."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from xvr_node.catalog.db import make_engine, session_factory
from xvr_node.catalog.models import Patient


def test_sqlite_connections_get_wal_foreign_keys_and_a_busy_timeout(tmp_path: Path) -> None:
    database = tmp_path / "not" / "yet" / "there" / "catalog.sqlite"
    engine = make_engine(f"sqlite:///{database}")
    try:
        # Two connections at once: the pragmas are set on each, not only on the first.
        with engine.connect() as first, engine.connect() as second:
            for connection in (first, second):
                pragma = connection.exec_driver_sql
                assert pragma("PRAGMA journal_mode").scalar() == "wal"
                assert pragma("PRAGMA foreign_keys").scalar() == 1
                assert pragma("PRAGMA busy_timeout").scalar() == 30_000
                assert pragma("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        engine.dispose()
    assert database.is_file()


def test_postgresql_engines_ping_before_use(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        assert engine.pool._pre_ping
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.usefixtures("catalog_url")
def test_objects_stay_readable_after_commit(engine: Engine) -> None:
    make_session = session_factory(engine)
    with make_session() as session:
        patient = Patient(patient_id="P-7")
        session.add(patient)
        session.commit()
    # Detached after the session closed, yet its loaded attributes are still there.
    assert patient.patient_id == "P-7"
    assert patient.id is not None
    with make_session() as session:
        assert session.scalars(select(Patient.patient_id)).all() == ["P-7"]
