"""The durable outbox: store result objects, then deliver them to each PACS until it has them.

Rows are the outbox's ledger (status, attempts, last error); engine jobs do the sending,
one ``deliver`` task per destination (:func:`xvr_node.jobs.engine.ensure_delivery`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session

from xvr_node.catalog.models import Export, ExportKind, ExportStatus, utcnow
from xvr_node.config import Destination, Settings
from xvr_node.dicom import scu
from xvr_node.dicom.storage import FileStore, is_valid_uid
from xvr_node.jobs import engine
from xvr_node.jobs.engine import backoff_seconds

LOG = logging.getLogger(__name__)

#: Rows a delivery sends: never ``sent`` (no duplicates) nor ``parked`` (needs a person).
DUE_STATUSES = (ExportStatus.PENDING, ExportStatus.RETRYING)
#: Rows still to deliver (not ``parked``): a destination with any has a delivery queued or
#: running.
TO_DELIVER = (ExportStatus.PENDING, ExportStatus.SENDING, ExportStatus.RETRYING)

#: Rows ``export retry`` sends back to the queue (not ``sent``: that is ``resend``; not
#: ``sending``: a deliverer is on it, or the next one asks the destination first).
RETRYABLE = (ExportStatus.PENDING, ExportStatus.RETRYING, ExportStatus.PARKED)

#: Files sent per association; keeps each lost association small.
BATCH_SIZE = 64

#: What a delivery run reports it did (``export deliver``, the ``delivery_done`` log line).
DELIVERY_COUNTS = ("due", "confirmed", "sent", "retrying", "parked")

#: A delivery that finds another one sending to its destination looks again this much later.
BUSY_RETRY_S = 2.0

Backoff = Callable[[int], timedelta]


def exponential_backoff(attempts: int) -> timedelta:
    """Wait after the ``attempts``-th failure: the job engine's back-off."""
    return timedelta(seconds=backoff_seconds(attempts))


def result_path(ds: Dataset) -> PurePosixPath:
    """Where a result object lives in the store, built from its validated UIDs."""
    uids = {
        "Study Instance UID": ds.get("StudyInstanceUID"),
        "Series Instance UID": ds.get("SeriesInstanceUID"),
        "SOP Instance UID": ds.get("SOPInstanceUID"),
    }
    for name, uid in uids.items():
        if not is_valid_uid(uid):
            raise ValueError(f"{name} {uid!r} of a result object is not a valid UID")
    study, series, sop = uids.values()
    return PurePosixPath("results", study, series, f"{sop}.dcm")


def encode(ds: Dataset) -> bytes:
    """The Part 10 file of a result object (its file meta says Explicit VR Little Endian)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def store_result_objects(
    session: Session,
    store: FileStore,
    datasets: Sequence[tuple[str, Dataset]],
    destinations: Sequence[Destination],
    registration_id: int | None = None,
    *,
    now: datetime | None = None,
) -> list[Export]:
    """Write each ``(kind, dataset)`` durably, then queue it for every destination; commit.

    Files first, rows second: after the commit both are on disk, so a restart loses nothing,
    and a crash before it leaves only files that the next call overwrites. An object already
    queued for a destination (same SOP Instance UID) keeps its row, whatever its status.
    Each destination's delivery is queued in the same transaction.
    """
    now = now or utcnow()
    kinds = {str(kind) for kind in ExportKind}
    written: list[tuple[str, str, PurePosixPath]] = []
    for kind, ds in datasets:
        if kind not in kinds:
            raise ValueError(f"object kind must be one of {', '.join(sorted(kinds))}, not {kind!r}")
        relative = result_path(ds)
        store.write(relative, encode(ds))
        written.append((kind, str(ds.SOPInstanceUID), relative))
    if not destinations:
        LOG.warning("no destinations configured: %d result object(s) stored only", len(written))
    rows: list[Export] = []
    for kind, sop_uid, relative in written:
        for destination in destinations:
            row = session.scalar(
                select(Export).where(
                    Export.sop_instance_uid == sop_uid, Export.destination == destination.name
                )
            )
            if row is None:
                row = Export(
                    registration_id=registration_id,
                    object_kind=kind,
                    sop_instance_uid=sop_uid,
                    path=str(relative),
                    destination=destination.name,
                    status=ExportStatus.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                )
                session.add(row)
            rows.append(row)
    session.flush()
    for name in sorted({row.destination for row in rows if row.status in DUE_STATUSES}):
        engine.ensure_delivery(session, name)
    session.commit()
    return rows


def deliver(
    session: Session,
    store: FileStore,
    settings: Settings,
    name: str,
    now: datetime,
    backoff: Backoff = exponential_backoff,
) -> dict[str, Any]:
    """Send destination ``name``'s due rows, then queue its next delivery; commit.

    One deliverer per destination at a time (a PostgreSQL advisory lock, which the server
    drops with a deliverer's connection when its process dies). Rows left ``sending`` by a
    deliverer that died are first looked up at the destination by C-FIND, so an object that
    arrived is not sent twice. Each answer is committed as it comes: delivered rows become
    ``sent`` and are never selected again; a transient failure (PACS down, busy, timed out)
    is retried after ``backoff(attempts)``; a permanent one (refused AE title, SOP class not
    supported, object rejected) is ``parked`` until a person acts.
    """
    summary: dict[str, Any] = {"destination": name, "busy": False, "confirmed": 0, "due": 0}
    summary |= {"sent": 0, "retrying": 0, "parked": 0}
    with destination_lock(session, name) as held:
        if not held:  # another deliverer is on it; look again shortly
            summary["busy"] = True
            engine.ensure_delivery(session, name, BUSY_RETRY_S)
            session.commit()
            return summary
        destination = {d.name: d for d in settings.destinations}.get(name)
        if destination is None:
            _park_unconfigured(session, name, now, summary)
        else:
            sender = _Sender(session, store, destination, settings, now, backoff, summary)
            sender.confirm_interrupted()
            tried: set[int] = set()
            while batch := _due_batch(session, name, now, tried):
                tried.update(row.id for row in batch)
                summary["due"] += len(batch)
                sender.send(batch)
        _queue_next(session, name, now)
        session.commit()
    return summary


def deliver_all(
    session: Session, store: FileStore, settings: Settings, now: datetime
) -> list[dict[str, Any]]:
    """:func:`deliver` to every destination that has rows to deliver (``export deliver``)."""
    names = session.scalars(
        select(Export.destination).where(Export.status.in_(TO_DELIVER)).distinct()
    ).all()
    return [deliver(session, store, settings, name, now) for name in sorted(names)]


def queue_due_deliveries(session: Session, now: datetime) -> int:
    """Make sure every destination with rows to deliver has a delivery queued; commit.

    The node runs this every ``scheduler.poll_interval_s``: it starts the outbox after a
    restart and after a deliverer died. Rows left ``sending`` count as due unless their
    deliverer is alive (it holds the destination's lock). Returns the destinations seen.
    """
    pending = session.execute(
        select(Export.destination, func.min(Export.next_attempt_at))
        .where(Export.status.in_(DUE_STATUSES))
        .group_by(Export.destination)
    ).all()
    due: dict[str, float] = {name: (when - now).total_seconds() for name, when in pending}
    interrupted = session.scalars(
        select(Export.destination).where(Export.status == ExportStatus.SENDING).distinct()
    ).all()
    for name in interrupted:
        if _lock_is_free(session, name):
            due[name] = 0.0
    for name, delay_s in sorted(due.items()):
        engine.ensure_delivery(session, name, delay_s)
    session.commit()
    return len(due)


@contextmanager
def destination_lock(session: Session, name: str) -> Iterator[bool]:
    """Hold the destination's advisory lock on a connection of its own; yields whether held."""
    with session.get_bind().connect() as connection:
        key = {"key": _lock_name(name)}
        held = connection.execute(
            text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"), key
        ).scalar_one()
        connection.commit()
        try:
            yield bool(held)
        finally:
            if held:
                connection.execute(
                    text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), key
                )
                connection.commit()


def _lock_is_free(session: Session, name: str) -> bool:
    """Is no deliverer sending to ``name``? (Asked inside the caller's transaction.)"""
    return bool(
        session.execute(
            text("SELECT pg_try_advisory_xact_lock(hashtextextended(:key, 0))"),
            {"key": _lock_name(name)},
        ).scalar_one()
    )


def _lock_name(name: str) -> str:
    return f"xvr_node.deliver:{name}"


def _due_batch(session: Session, name: str, now: datetime, tried: set[int]) -> list[Export]:
    query = (
        select(Export)
        .where(
            Export.destination == name,
            Export.status.in_(DUE_STATUSES),
            Export.next_attempt_at <= now,
        )
        .order_by(Export.id)
        .limit(BATCH_SIZE)
    )
    if tried:
        query = query.where(Export.id.not_in(tried))
    return list(session.scalars(query.execution_options(populate_existing=True)).all())


def _queue_next(session: Session, name: str, now: datetime) -> None:
    """The destination's next delivery, when its earliest waiting row is due."""
    earliest = session.scalar(
        select(func.min(Export.next_attempt_at)).where(
            Export.destination == name, Export.status.in_(DUE_STATUSES)
        )
    )
    if earliest is not None:
        engine.ensure_delivery(session, name, (earliest - now).total_seconds())


class _Sender:
    """Sends batches of one destination's rows and records each answer as it comes."""

    def __init__(
        self,
        session: Session,
        store: FileStore,
        destination: Destination,
        settings: Settings,
        now: datetime,
        backoff: Backoff,
        summary: dict[str, Any],
    ) -> None:
        self.session, self.store, self.destination = session, store, destination
        self.calling_ae = settings.node.ae_title
        self.timeout_s = settings.node.dimse_timeout_s
        self.tls = scu.client_tls_context(settings.node.tls) if destination.tls else None
        self.now, self.backoff, self.summary = now, backoff, summary

    def confirm_interrupted(self) -> None:
        """Rows a dead deliverer left ``sending``: ``sent`` if the destination has them."""
        rows = self.session.scalars(
            select(Export)
            .where(
                Export.destination == self.destination.name, Export.status == ExportStatus.SENDING
            )
            .order_by(Export.id)
        ).all()
        if not rows:
            return
        known = [item for item in map(self._stored_object, rows) if item is not None]
        held = scu.find_stored(self.destination, known, self.calling_ae, self.timeout_s, self.tls)
        unknown = (
            "not at the destination"
            if held is not None
            else "the destination could not say (no C-FIND answer): it may get a second copy"
        )
        for row in rows:
            if held is not None and row.sop_instance_uid in held:
                row.status, row.sent_at = ExportStatus.SENT, self.now
                row.last_error = "confirmed at the destination by C-FIND after an interrupted send"
                self.summary["confirmed"] += 1
            else:
                row.status, row.next_attempt_at = ExportStatus.PENDING, self.now
                row.last_error = f"interrupted during a send; {unknown}"
        self.session.commit()
        LOG.warning(
            "interrupted send to %s: %d of %d object(s) had arrived",
            self.destination.name,
            self.summary["confirmed"],
            len(rows),
            extra={
                "event": "export_interrupted",
                "destination": self.destination.name,
                "confirmed": self.summary["confirmed"],
                "rows": len(rows),
                "queried": held is not None,
            },
        )

    def _stored_object(self, row: Export) -> scu.StoredObject | None:
        """The UIDs a C-FIND needs, from the stored file's header; None if it cannot be read."""
        try:
            ds = pydicom.dcmread(
                self.store.absolute(row.path),
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "SeriesInstanceUID"],
            )
            return scu.StoredObject(
                str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), row.sop_instance_uid
            )
        except (OSError, InvalidDicomError, AttributeError) as error:
            LOG.warning("cannot read export %s (%s): %s", row.id, row.path, error)
            return None

    def send(self, rows: list[Export]) -> None:
        """One association for ``rows``: each is ``sending`` (committed) until answered."""
        paths = [self.store.absolute(row.path) for row in rows]
        for row in rows:
            row.status = ExportStatus.SENDING
            row.attempts += 1
        self.session.commit()
        try:
            scu.send_datasets(
                self.destination,
                paths,
                self.calling_ae,
                self.timeout_s,
                self.tls,
                on_outcome=lambda index, outcome: self.record(rows[index], outcome),
            )
        except Exception as error:  # whatever went wrong, no row may stay ``sending``
            self.session.rollback()
            LOG.exception("export to %s failed unexpectedly", self.destination.name)
            for row, path in zip(rows, paths, strict=True):
                self.session.refresh(row)
                if row.status == ExportStatus.SENDING:
                    failure = scu.SendOutcome(
                        path, row.sop_instance_uid, False, True, None, f"send failed: {error}"
                    )
                    self.record(row, failure)

    def record(self, row: Export, outcome: scu.SendOutcome) -> None:
        """Commit what became of ``row`` the moment the destination answered."""
        if outcome.delivered:
            row.status, row.sent_at = ExportStatus.SENT, self.now
            row.last_error = None if outcome.status == 0x0000 else outcome.reason
        elif outcome.transient:
            row.status = ExportStatus.RETRYING
            row.next_attempt_at = self.now + self.backoff(row.attempts)
            row.last_error = outcome.reason
        else:
            row.status, row.next_attempt_at = ExportStatus.PARKED, self.now
            row.last_error = outcome.reason
        self.session.commit()
        self.summary[str(row.status)] += 1
        LOG.log(
            logging.INFO if row.status == ExportStatus.SENT else logging.WARNING,
            "export %s",
            row.status,
            extra={
                "event": f"export_{row.status}",
                "export": row.id,
                "kind": row.object_kind,
                "sop": row.sop_instance_uid,
                "destination": self.destination.name,
                "attempt": row.attempts,
                "reason": outcome.reason,
            },
        )


def _park_unconfigured(session: Session, name: str, now: datetime, summary: dict[str, Any]) -> None:
    rows = session.scalars(
        select(Export).where(Export.destination == name, Export.status.in_(TO_DELIVER))
    ).all()
    for row in rows:
        row.status = ExportStatus.PARKED
        row.last_error = f"destination {name} not configured"
        row.next_attempt_at = now
    summary["parked"] += len(rows)
    session.commit()
    LOG.warning(
        "%d export(s) parked: destination %s is not configured",
        len(rows),
        name,
        extra={"event": "export_parked", "destination": name, "rows": len(rows)},
    )


def retry(
    session: Session,
    export_ids: Iterable[int] = (),
    *,
    all_parked: bool = False,
    now: datetime | None = None,
) -> list[Export]:
    """Put parked or waiting rows back to ``pending``, due now, with a fresh back-off; commit.

    Rows already ``sent`` are left alone (a deliberate second copy is :func:`resend`).
    """
    now = now or utcnow()
    ids = set(export_ids)
    conditions = []
    if ids:
        conditions.append(Export.id.in_(ids))
    if all_parked:
        conditions.append(Export.status == ExportStatus.PARKED)
    if not conditions:
        return []
    rows = session.scalars(
        select(Export).where(or_(*conditions), Export.status.in_(RETRYABLE)).order_by(Export.id)
    ).all()
    for row in rows:
        row.status = ExportStatus.PENDING
        row.attempts = 0
        row.next_attempt_at = now
    _queue_now(session, rows)
    return list(rows)


def resend(
    session: Session, export_ids: Iterable[int], *, now: datetime | None = None
) -> list[Export]:
    """Queue ``sent`` rows once more, e.g. after the PACS lost them; commit."""
    now = now or utcnow()
    rows = session.scalars(
        select(Export)
        .where(Export.id.in_(set(export_ids)), Export.status == ExportStatus.SENT)
        .order_by(Export.id)
    ).all()
    for row in rows:
        row.status = ExportStatus.PENDING
        row.attempts = 0
        row.next_attempt_at = now
        row.sent_at = None
        row.last_error = None
    _queue_now(session, rows)
    return list(rows)


def _queue_now(session: Session, rows: Sequence[Export]) -> None:
    """Deliveries due now for the rows' destinations (a person is waiting); commit."""
    session.flush()
    for name in sorted({row.destination for row in rows}):
        engine.ensure_delivery(session, name)
    session.commit()


def list_exports(session: Session, status: str | None = None) -> list[Export]:
    """Outbox rows, oldest first; only those with ``status`` when given."""
    query = select(Export).order_by(Export.id)
    if status is not None:
        query = query.where(Export.status == status)
    return list(session.scalars(query).all())


def export_record(row: Export) -> dict[str, Any]:
    """One row as plain JSON-ready values (for ``xvr-node export list --json``)."""
    return {
        "id": row.id,
        "registration_id": row.registration_id,
        "object_kind": row.object_kind,
        "sop_instance_uid": row.sop_instance_uid,
        "path": row.path,
        "destination": row.destination,
        "status": row.status,
        "attempts": row.attempts,
        "next_attempt_at": row.next_attempt_at.isoformat() if row.next_attempt_at else None,
        "last_error": row.last_error,
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
    }
