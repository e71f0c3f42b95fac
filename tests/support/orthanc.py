"""Run a real Orthanc (the Debian package) as a throw-away PACS on loopback ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.node import free_port
from tests.support.tools import require_tool

# Straight to 127.0.0.1: a proxy from the environment must not see the test's requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class OrthancServer:
    """One Orthanc with its own storage, index and log under ``root``."""

    root: Path
    binary: str
    aet: str
    dicom_port: int
    http_port: int
    overrides: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.root / "orthanc.log"

    def configuration(self) -> dict[str, Any]:
        return {
            "Name": "xvr-node-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "Plugins": [],
            "LuaScripts": [],
            "SaveJobs": False,
            "StableAge": 3600,
            # A duplicate C-STORE then shows up as a new change, so a test can count sends.
            "OverwriteInstances": True,
            **self.overrides,
        }

    def start(self, timeout_s: float = 30.0) -> None:
        """Start Orthanc and wait until its REST API answers ``/system``."""
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "orthanc.json"
        config.write_text(json.dumps(self.configuration(), indent=2))
        self._log_handle = open(self.log, "a")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [self.binary, str(config)],
            # DCMTK inside Orthanc waits on Nagle's algorithm without it.
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.process.returncode}:\n{self.log.read_text()}"
                )
            try:
                self.rest("/system")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"Orthanc did not answer:\n{self.log.read_text()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM and wait; the ports are free again afterwards."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "_log_handle", None) is not None:
            self._log_handle.close()
            self._log_handle = None

    def kill(self) -> None:
        """SIGKILL: a clean stop takes Orthanc seconds, and a test's Orthanc dies with it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stop()

    def fetch(self, path: str) -> bytes:
        """The raw body of a GET on the REST API."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with _OPENER.open(url, timeout=10) as response:
            return response.read()

    def rest(self, path: str) -> Any:
        """The JSON answer of a GET on the REST API."""
        return json.loads(self.fetch(path))

    def instances(self) -> dict[str, dict[str, Any]]:
        """Stored instances by SOP Instance UID: Orthanc id, study and series UIDs."""
        found = {}
        for item in self.rest("/instances?expand"):
            series = self.rest(f"/series/{item['ParentSeries']}")
            study = self.rest(f"/studies/{series['ParentStudy']}")
            found[item["MainDicomTags"]["SOPInstanceUID"]] = {
                "id": item["ID"],
                "series_instance_uid": series["MainDicomTags"]["SeriesInstanceUID"],
                "study_instance_uid": study["MainDicomTags"]["StudyInstanceUID"],
            }
        return found

    def received_twice(self) -> bool:
        """Whether any instance was stored more than once.

        With ``OverwriteInstances`` a second copy replaces the first, and Orthanc drops the
        replaced instance's changes from its log: the log's length then falls behind the
        sequence number of its last change.
        """
        changes = self.rest("/changes?limit=100000")
        return len(changes["Changes"]) != changes["Last"]


@contextmanager
def running_orthanc(
    tmp_path: Path, aet: str = "ORTHANC", *, start: bool = True, **overrides: Any
) -> Iterator[OrthancServer]:
    """An Orthanc on free loopback ports, stopped afterwards; ``start=False`` leaves it down."""
    binary = require_tool("Orthanc", "/usr/sbin/Orthanc", "/usr/bin/Orthanc")
    dicom_port = free_port()
    http_port = free_port()
    while http_port == dicom_port:
        http_port = free_port()
    server = OrthancServer(Path(tmp_path), binary, aet, dicom_port, http_port, overrides)
    if start:
        server.start()
    try:
        yield server
    finally:
        server.kill()
