"""A throw-away PostgreSQL server for tests: the node's own embedded cluster, in /tmp.

The same server code the node runs with ``database.url`` unset (``xvr_node.catalog.embedded``),
with durability traded for speed: nothing here has to survive a power cut.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from sqlalchemy import make_url, text

from xvr_node.catalog.embedded import EmbeddedCluster

FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """Start a private embedded PostgreSQL; yield a SQLAlchemy URL to its empty database."""
    # Under /tmp (not pytest's tmp_path): short socket paths, and no test's folder holds it.
    root = Path(tempfile.mkdtemp(prefix="xvr-pg-", dir="/tmp"))
    cluster = EmbeddedCluster(root, extra_settings=FAST_SETTINGS)
    try:
        url = cluster.acquire()
        try:
            yield url
        finally:
            cluster.release()
    finally:
        cluster.stop_if_unused()  # also when it started but could not be used
        shutil.rmtree(root, ignore_errors=True)


def admin_connection(server_url: str) -> psycopg.Connection:
    """An autocommit connection to the server's ``postgres`` database (to create and drop)."""
    url = make_url(server_url).set(drivername="postgresql", database="postgres")
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


@contextlib.contextmanager
def new_postgres_database(server_url: str, template: str | None = None) -> Iterator[str]:
    """A new database on the test server (a copy of ``template`` if given), dropped after."""
    name = f"catalog_{uuid.uuid4().hex[:12]}"
    copy = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
    with admin_connection(server_url) as connection:
        connection.execute(f"CREATE DATABASE {name}{copy}")
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin_connection(server_url) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def make_due(sessions) -> None:
    """What waiting does: every engine job scheduled for later is due now (by the database's
    clock, the one the job engine compares with)."""
    with sessions() as session:
        session.execute(text("UPDATE procrastinate_jobs SET scheduled_at = now()"))
        session.commit()
