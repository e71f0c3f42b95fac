"""Run a real ``xvr-node serve`` process and real DCMTK clients against it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.tools import require_tool
from tests.support.training import environment
from xvr_node.catalog.embedded import catalog_server, embedded_url
from xvr_node.local_pacs import free_port as free_port  # re-exported for the tests
from xvr_node.local_pacs import stop_process


@dataclass
class NodeProcess:
    """A node started by a test: its port, store, catalog URL and process."""

    root: Path
    port: int
    env: dict[str, str]
    process: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "node.log"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def database_url(self) -> str:
        """The catalog the node uses: the configured one, else its embedded server's."""
        return self.env.get("XVR_NODE__DATABASE__URL") or embedded_url(self.store)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``xvr-node ARGS`` as the node's user would; ``check`` fails with its output."""
        result = subprocess.run(
            [sys.executable, "-m", "xvr_node", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"xvr-node {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def start(self) -> None:
        self._log_start = len(self.log_text())
        self.log_handle = open(self.log, "a")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "xvr_node", "serve"],
            env=self.env,
            stdout=self.log_handle,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Wait for the node's own word: a probing TCP connection would count as an association.
        deadline = time.monotonic() + 60
        while "event=listening" not in self.log_text()[self._log_start :]:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"node exited with {self.process.returncode}:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"node did not start listening:\n{self.log_text()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: what a power cut does to the process."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        if hasattr(self, "log_handle"):
            self.log_handle.close()

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@contextmanager
def running_node(root: Path, **overrides: str) -> Iterator[NodeProcess]:
    """Upgrade a fresh catalog under ``root`` and serve on a free loopback port.

    The test holds the node's embedded catalog server as well (the node starts it and would
    stop it on exit): the test can read the catalog after stopping or killing the node, and
    a server left by a killed node is stopped when the test lets go.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XVR_NODE")}
    env.update(
        {
            "XVR_NODE__STORAGE__ROOT": str(root / "store"),
            "XVR_NODE__NODE__PORT": str(port),
            "XVR_NODE__MONITORING__PORT": str(free_port()),
            "XVR_NODE__NODE__HOST": "127.0.0.1",
            "XVR_NODE__SCHEDULER__POLL_INTERVAL_S": "0.5",
            "XVR_NODE__STORAGE__MIN_FREE_BYTES": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(environment(overrides))
    node = NodeProcess(root, port, env)
    with catalog_server(env.get("XVR_NODE__DATABASE__URL"), node.store):
        node.cli("db", "upgrade")
        node.start()
        try:
            yield node
        finally:
            node.stop()


# --- DCMTK -----------------------------------------------------------------------------


def dcmtk(tool: str) -> str:
    """A DCMTK tool by full path (pynetdicom installs same-named scripts into the venv)."""
    return require_tool(tool, f"/usr/bin/{tool}", f"/usr/local/bin/{tool}")


def dcmtk_env() -> dict[str, str]:
    # Without TCP_NODELAY, DCMTK waits on Nagle's algorithm (~20 instances/s).
    return {**os.environ, "TCP_NODELAY": "1"}


def echoscu(
    port: int, calling: str = "CARM1", called: str = "XVRNODE", extra: Sequence[str] = ()
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=60,
        check=False,
    )


def storescu(
    port: int,
    files: Sequence[Path],
    calling: str = "CARM1",
    called: str = "XVRNODE",
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """Send files in one association, verbosely, so acknowledgements can be read back."""
    return subprocess.run(
        [
            dcmtk("storescu"),
            "-v",
            "-aet",
            calling,
            "-aec",
            called,
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=300,
        check=False,
    )


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response(?: \(([^)]*)\))?")


def acknowledged_files(output: str) -> list[Path]:
    """Files for which storescu's verbose log shows a Success store response."""
    acknowledged, current = [], None
    for line in output.splitlines():
        if match := _SENDING.search(line):
            current = Path(match.group(1).strip())
        elif (match := _RESPONSE.search(line)) and current is not None:
            if (match.group(1) or "").startswith("Success"):
                acknowledged.append(current)
            current = None
    return acknowledged
