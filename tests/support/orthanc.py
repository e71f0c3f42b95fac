"""Run a real Orthanc (the Debian package) as a throw-away PACS on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.node import free_port
from tests.support.tools import require_tool
from xvr_node.local_pacs import ORTHANC_PATHS
from xvr_node.local_pacs import OrthancServer as _OrthancServer


class OrthancServer(_OrthancServer):
    """The node's Orthanc runner, with what only tests ask of it."""

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
    binary = require_tool("Orthanc", *ORTHANC_PATHS)
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
