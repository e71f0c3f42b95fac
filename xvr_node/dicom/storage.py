"""Durable files under the storage root: write to a temporary name, fsync, rename, fsync."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: A DICOM UID: dot-separated numbers, no leading zeros, at most 64 characters (PS3.5 9.1).
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """Whether ``value`` is a syntactically valid UID, and so safe to use in a path."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


class StorageFullError(OSError):
    """Not enough free space to store an instance (answered with 0xA700)."""


@dataclass(frozen=True)
class StoredFile:
    """Where a file landed (relative to the storage root) and what it holds."""

    path: PurePosixPath
    size_bytes: int
    sha256: str


class FileStore:
    """Files under one root folder; a file is either absent or complete and on disk.

    Partial files only ever exist under ``incoming/`` (same filesystem, so the final
    ``os.replace`` is atomic), which :meth:`discard_partial_files` empties at start-up.
    """

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.incoming = self.root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    def absolute(self, relative: PurePosixPath | str) -> Path:
        return self.root / PurePosixPath(relative)

    def instance_path(
        self, study_uid: str, series_uid: str, sop_uid: str, version: int = 1
    ) -> PurePosixPath:
        """The store path of a received instance, built from validated UIDs only."""
        for name, uid in (("Study", study_uid), ("Series", series_uid), ("SOP Instance", sop_uid)):
            if not is_valid_uid(uid):
                raise ValueError(f"{name} UID {uid!r} is not a valid UID")
        suffix = "" if version == 1 else f".v{version}"
        return PurePosixPath("instances", study_uid, series_uid, f"{sop_uid}{suffix}.dcm")

    def write(
        self, relative: PurePosixPath | str, data: bytes, sha256: str | None = None
    ) -> StoredFile:
        """Write ``data`` durably at ``relative``; raises :class:`StorageFullError`.

        ``sha256`` may be passed when the caller already hashed ``data``.
        """
        self.check_free_space(len(data))
        final = self.absolute(relative)
        temporary = self.incoming / f"{uuid.uuid4().hex}.part"
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temporary, final)
            _fsync_directory(final.parent)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(errno.ENOSPC, "storage is full") from error
            raise
        digest = sha256 or hashlib.sha256(data).hexdigest()
        return StoredFile(PurePosixPath(relative), len(data), digest)

    def write_file(self, relative: PurePosixPath | str, source: Path) -> StoredFile:
        """Move a finished local file (e.g. a NIfTI written beside the store) in durably."""
        return self.write(relative, Path(source).read_bytes())

    def check_free_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - needed < self.min_free_bytes:
            raise StorageFullError(
                errno.ENOSPC,
                f"only {free // 2**20} MiB free, {self.min_free_bytes // 2**20} MiB must stay free",
            )

    def discard_partial_files(self) -> int:
        """Remove what a crash left in ``incoming/``; returns how many files."""
        removed = 0
        for leftover in self.incoming.glob("*.part"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed


def _fsync_directory(folder: Path) -> None:
    """Make a rename durable: fsync the directory that holds the new name."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
