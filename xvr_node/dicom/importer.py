"""``xvr-node import``: files, folders and DICOMDIRs, each through the receiver's one path."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.fileset import FileSet

from xvr_node.dicom.receive import Receiver

IMPORT_AE = "IMPORT"


@dataclass
class ImportReport:
    stored: int = 0
    duplicates: int = 0
    failures: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"imported {self.stored} instance(s), {self.duplicates} already stored, "
            f"{len(self.failures)} failed"
        )


def candidate_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every file named or contained; a DICOMDIR contributes the files it references."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.name.upper() != "DICOMDIR":
                    yield child
        elif path.name.upper() == "DICOMDIR":
            for instance in FileSet(path):
                yield Path(instance.path)
        else:
            yield path


def import_paths(receiver: Receiver, paths: Iterable[Path]) -> ImportReport:
    report = ImportReport()
    seen: set[Path] = set()
    for file in candidate_files(paths):
        file = file.resolve()
        if file in seen:
            continue
        seen.add(file)
        outcome = receiver.receive(file.read_bytes(), calling_ae=IMPORT_AE, peer=str(file))
        if not outcome.ok:
            # The receiver has already left the catalogue record (calling AE "IMPORT").
            report.failures.append(f"{file}: 0x{outcome.status:04X} {outcome.reason}")
        elif outcome.duplicate:
            report.duplicates += 1
        else:
            report.stored += 1
    return report
