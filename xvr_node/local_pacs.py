"""A PACS on this machine for the demo and the tests: Orthanc when installed, else our own.

:class:`OrthancServer` runs the Debian package's ``Orthanc`` with its storage, index and log
in one folder, on loopback ports. :class:`ReceivingScp` is the fallback for machines without
Orthanc: a pynetdicom Storage SCP that writes what it receives to a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

ORTHANC_PATHS = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM, wait up to ``timeout_s`` for a clean exit, then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def find_orthanc() -> str | None:
    """The Orthanc binary on PATH or where the Debian package puts it."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return next((path for path in ORTHANC_PATHS if os.access(path, os.X_OK)), None)


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
    name: str = "xvr-node-local-pacs"

    @property
    def log(self) -> Path:
        return self.root / "orthanc.log"

    def configuration(self) -> dict[str, Any]:
        return {
            "Name": self.name,
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            # The node asks by C-FIND whether objects of an interrupted send arrived.
            "DicomAlwaysAllowFind": True,
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
        if self.process is not None:
            stop_process(self.process)
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


class ReceivingScp:
    """A Storage SCP that files every instance it receives under ``folder`` (no Orthanc)."""

    def __init__(self, folder: Path, aet: str, port: int, sop_classes: list[str]) -> None:
        self.folder = Path(folder)
        self.aet = aet
        self.dicom_port = port
        self.sop_classes = sop_classes
        self.received: list[Path] = []
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.aet)
        ae.add_supported_context(Verification)
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(
            ("127.0.0.1", self.dicom_port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received.append(path)
        return 0x0000

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
