"""Engines: PostgreSQL pings before use, sessions that stay readable."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select

from xvr_node.catalog.db import make_engine, session_factory
from xvr_node.catalog.models import Patient


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
