"""A throw-away PostgreSQL server for tests: private data directory, loopback port, trust auth."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import make_url

from tests.support.tools import in_ci, require_tool

DATABASE = "xvr_test"
START_TIMEOUT_S = 30.0
INITDB_OPTIONS = (
    "--auth=trust",
    "--encoding=UTF8",
    "--no-locale",
    "--no-sync",
    "--no-instructions",
)
SERVICE_USER = "postgres"  # created by the Debian package; initdb and postgres refuse root


def _initdb() -> str:
    """initdb of the newest PostgreSQL installed (Debian keeps each major under its own bin)."""

    def major(path: str) -> int:
        found = re.search(r"/postgresql/(\d+)/bin/", path)
        return int(found.group(1)) if found else -1

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(on_path)
    return require_tool("initdb", *candidates)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_service_user() -> list[str]:
    """Command prefix that drops root to the postgres user; empty when not root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        message = f"running as root and there is no {SERVICE_USER!r} user to run PostgreSQL as"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.fail("running as root and runuser is missing: cannot drop privileges")
    return [runuser, "-u", SERVICE_USER, "--"]


def _run(command: list[str], workdir: Path) -> None:
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


def _wait_until_ready(dsn: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2):
                return
        except psycopg.OperationalError as error:
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"PostgreSQL did not start: {error}\n{tail}") from error
            time.sleep(0.1)


def _stop(as_user: list[str], pg_ctl: str, data: Path, workdir: Path) -> None:
    """Stop the server we started; if pg_ctl cannot, kill its postmaster."""
    try:
        _run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], workdir)
    except RuntimeError:
        with contextlib.suppress(OSError, ValueError, IndexError):
            postmaster = int((data / "postmaster.pid").read_text().splitlines()[0])
            os.kill(postmaster, signal.SIGKILL)


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """Start a private PostgreSQL server; yield a SQLAlchemy URL to its empty ``xvr_test``."""
    initdb = _initdb()
    bindir = Path(initdb).resolve().parent
    pg_ctl = str(bindir / "pg_ctl")
    as_user = _as_service_user()

    # Under /tmp (not pytest's 0700 tmp_path) so the unprivileged server can reach it.
    root = Path(tempfile.mkdtemp(prefix="xvr-pg-", dir="/tmp"))
    root.chmod(0o755)
    if as_user:
        shutil.chown(root, user=SERVICE_USER, group=SERVICE_USER)
    data, log = root / "data", root / "server.log"
    port = _free_port()
    started = False
    try:
        _run(
            [*as_user, initdb, "-D", str(data), "-U", "postgres", *INITDB_OPTIONS],
            root,
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        _run([*as_user, pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "start"], root)
        started = True
        admin_dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        _wait_until_ready(admin_dsn, log)
        with psycopg.connect(admin_dsn, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {DATABASE}")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started:
            _stop(as_user, pg_ctl, data, root)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def new_postgres_database(server_url: str, template: str | None = None) -> Iterator[str]:
    """A new database on the test server (a copy of ``template`` if given), dropped after."""
    server = make_url(server_url)
    name = f"catalog_{uuid.uuid4().hex[:12]}"
    copy = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
    admin = f"host={server.host} port={server.port} user={server.username} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}{copy}")
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
