"""Shared fixtures: the phantom patient, built once per test session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy import make_url

from tests.support.clock_shift import shift_wall_clock
from tests.support.postgres import new_postgres_database, running_postgres
from xvr_node.catalog.db import upgrade
from xvr_node.catalog.embedded import catalog_server
from xvr_node.config import Settings
from xvr_node.phantom import PhantomSpec, build_phantom


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--clock-at",
        metavar="DATE",
        help="run with the wall clock moved to DATE (ISO 8601), child processes too: "
        "the date-bomb guard .ci/run runs",
    )


def pytest_configure(config: pytest.Config) -> None:
    instant = config.getoption("--clock-at")
    if instant:
        moved = shift_wall_clock(instant)
        config.stash[CLOCK_AT] = moved.isoformat()


def pytest_report_header(config: pytest.Config) -> str | None:
    moved = config.stash.get(CLOCK_AT, None)
    return None if moved is None else f"wall clock moved to {moved} (--clock-at)"


CLOCK_AT = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small phantom with every feature: bead, RAO mirroring, non-square, XA+RF, cine."""
    outdir = tmp_path_factory.mktemp("phantom")
    spec = PhantomSpec(
        seed=3,
        frames=4,
        columns=128,
        rows=112,
        multiframe=3,
        motion="dynamic",
        orientation="PA",
        modality="both",
        flip=True,
        bead=True,
        ct_downsample=2,
    )
    build_phantom(outdir, spec)
    return outdir


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One throw-away PostgreSQL server (the embedded one) for the whole session."""
    with running_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def migrated_postgres_template(postgres_url: str) -> Iterator[str]:
    """Name of a database migrated once to head; copying it is faster than migrating."""
    with new_postgres_database(postgres_url) as url:
        upgrade(url)
        yield make_url(url).database


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory) -> Path:
    """64-pixel X-rays of a 4x downsampled CT: the method's and the jobs' tests."""
    outdir = tmp_path_factory.mktemp("small-phantom")
    build_phantom(
        outdir,
        PhantomSpec(
            seed=7, frames=2, columns=64, rows=64, multiframe=3, motion="dynamic", ct_downsample=4
        ),
    )
    return outdir


@pytest.fixture
def catalog_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a database at the head revision, for one test (a copy of the migrated one)."""
    template = request.getfixturevalue("migrated_postgres_template")
    with new_postgres_database(request.getfixturevalue("postgres_url"), template) as url:
        yield url


@pytest.fixture
def hold_catalog() -> Iterator[Callable[[Settings], str]]:
    """``hold_catalog(settings)``: the catalog of those settings (by default the node's own
    embedded server under their storage root), held and migrated until the test ends."""
    with ExitStack() as holds:

        def hold(settings: Settings) -> str:
            settings.ensure_storage_root()
            url = holds.enter_context(catalog_server(settings.database.url, settings.storage_root))
            upgrade(url)
            return url

        yield hold
