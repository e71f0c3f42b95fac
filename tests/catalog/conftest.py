"""Catalog fixtures: each test gets a fresh database on the session's PostgreSQL.

``catalog_url`` comes from ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.support.postgres import new_postgres_database
from xvr_node.catalog.db import make_engine, session_factory
from xvr_node.catalog.models import Patient, Series, SeriesState, Study


@pytest.fixture
def empty_catalog_url(postgres_url: str) -> Iterator[str]:
    """URL of an empty database for one test."""
    with new_postgres_database(postgres_url) as url:
        yield url


@pytest.fixture
def engine(catalog_url: str) -> Iterator[Engine]:
    engine = make_engine(catalog_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with session_factory(engine)() as session:
        yield session


@pytest.fixture
def ct_series(session: Session) -> Series:
    """A committed patient with one CT study and series (no instances yet)."""
    patient = Patient(patient_id="PHANTOM-001")
    study = Study(patient=patient, study_instance_uid="1.2.826.0.1.3680043.10.1.1")
    series = Series(
        study=study,
        series_instance_uid="1.2.826.0.1.3680043.10.1.1.1",
        modality="CT",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        frame_of_reference_uid="1.2.826.0.1.3680043.10.1.1.9",
        state=SeriesState.RECEIVING,
    )
    session.add(series)
    session.commit()
    return series
