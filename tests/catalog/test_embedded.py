"""The node's own PostgreSQL: shared by its processes, stopped by the last, refused clearly."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from xvr_node.catalog import embedded
from xvr_node.catalog.db import make_engine
from xvr_node.catalog.embedded import EmbeddedCluster, EmbeddedPostgresError, catalog_server
from xvr_node.cli import cli

HOLD_IN_CHILD = """
import sys, time
from pathlib import Path
from xvr_node.catalog.embedded import EmbeddedCluster
cluster = EmbeddedCluster(Path(sys.argv[1]))
cluster.acquire()
print("held", flush=True)
if sys.argv[2] == "release":
    cluster.release()
else:
    time.sleep(600)
"""


def hold_in_child(root: Path, then: str) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_IN_CHILD, str(root), then],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"
    return child


def count_rows(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM notes")).scalar_one()
    finally:
        engine.dispose()


def test_the_first_user_starts_the_server_and_the_last_stops_it(tmp_path: Path) -> None:
    root = tmp_path / "store"
    cluster = EmbeddedCluster(root)
    url = cluster.acquire()
    try:
        assert cluster.is_running()
        engine = make_engine(url)
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE notes (id int)"))
            connection.execute(text("INSERT INTO notes VALUES (1)"))
        engine.dispose()
        # Another process uses it and lets go: the server stays up for us.
        hold_in_child(root, "release").wait(timeout=60)
        assert cluster.is_running()
        assert count_rows(url) == 1
    finally:
        cluster.release()
    assert not cluster.is_running()
    # Started again from the same data: what was committed is there.
    with catalog_server(None, root) as again:
        assert again == url
        assert count_rows(again) == 1
    assert not cluster.is_running()


def test_a_holder_killed_with_sigkill_is_forgotten(tmp_path: Path) -> None:
    root = tmp_path / "store"
    child = hold_in_child(root, "sleep")
    cluster = EmbeddedCluster(root)
    assert cluster.is_running()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    # Its server outlives it and is used again; letting go stops it, the dead one forgotten.
    with catalog_server(None, root) as url:
        engine = make_engine(url)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT current_database()")).scalar_one() == "xvr_node"
        engine.dispose()
    assert not cluster.is_running()


def test_a_server_left_by_a_killed_node_is_stopped_when_unused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    child = hold_in_child(root, "sleep")
    cluster = EmbeddedCluster(root)
    assert not cluster.stop_if_unused()  # someone alive holds it
    child.kill()
    child.wait(timeout=30)
    assert cluster.stop_if_unused()
    assert not cluster.is_running()


def test_a_cluster_of_another_postgresql_version_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with catalog_server(None, root):
        pass
    (root / "postgres" / "PG_VERSION").write_text("16\n")
    with pytest.raises(EmbeddedPostgresError) as refused:
        EmbeddedCluster(root).acquire()
    message = str(refused.value)
    assert "made by PostgreSQL 16" in message
    assert f"bundles PostgreSQL {embedded.server_major_version()}" in message
    assert "pg_upgrade" in message
    # The command line says it in one line, exit 3, without a traceback.
    result = CliRunner().invoke(cli, ["db", "upgrade"], env={"XVR_NODE__STORAGE__ROOT": str(root)})
    assert result.exit_code == 3
    assert result.output.startswith("catalog: ") and "PostgreSQL 16" in result.output
    assert "Traceback" not in result.output


def test_a_cluster_of_another_user_is_refused(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "store"
    with catalog_server(None, root):
        pass
    owner = pwd.getpwuid((root / "postgres").stat().st_uid).pw_name
    stranger = next(
        entry for entry in pwd.getpwall() if entry.pw_uid not in (0, os.geteuid())
        and entry.pw_name != owner
    )  # fmt: skip
    monkeypatch.setattr(embedded, "_server_account", lambda: stranger)
    with pytest.raises(EmbeddedPostgresError, match=f"belongs to user {owner}, but PostgreSQL "
                       f"would run as {stranger.pw_name}"):  # fmt: skip
        EmbeddedCluster(root).acquire()


def test_a_folder_that_is_no_cluster_is_not_initialised_over(tmp_path: Path) -> None:
    root = tmp_path / "store"
    (root / "postgres").mkdir(parents=True)
    (root / "postgres" / "notes.txt").write_text("someone's files")
    with pytest.raises(EmbeddedPostgresError, match="is not empty and holds no PostgreSQL"):
        EmbeddedCluster(root).acquire()
    assert (root / "postgres" / "notes.txt").read_text() == "someone's files"


def test_a_deep_storage_root_gets_a_short_private_socket_folder(tmp_path: Path) -> None:
    root = tmp_path.joinpath(*["a-rather-long-folder-name"] * 4, "store")
    cluster = EmbeddedCluster(root)
    assert cluster.sockets.parent == Path("/tmp")
    with catalog_server(None, root) as url:
        assert f"host={cluster.sockets}&" in url
        assert cluster.sockets.stat().st_mode & 0o077 == 0
        engine = make_engine(url)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
        engine.dispose()
    assert not cluster.is_running()
