"""Receiving one instance: validate, store durably, catalogue, then answer with a DICOM status.

The SCP's C-STORE handler and ``xvr-node import`` both call :meth:`Receiver.receive`, so a
file imported from disk goes through exactly the code a C-arm's C-STORE does.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from xvr_node.catalog.models import (
    CarmProfile,
    IngestEvent,
    IngestEventKind,
    Instance,
    Patient,
    ProfileSource,
    Series,
    SeriesState,
    Study,
    Usability,
    Volume,
    VolumeState,
    utcnow,
)
from xvr_node.dicom.storage import FileStore, StorageFullError, StoredFile, is_valid_uid
from xvr_node.xray_geometry import (
    XRAY_SOP_CLASSES,
    UnsupportedGeometryError,
    XrayGeometry,
    XrayGeometryError,
    read_xray_geometry,
)

LOG = logging.getLogger(__name__)

# DICOM statuses of a C-STORE (PS3.4 Table B.2-1); their meanings live here, in one place.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

#: A series that receives a new instance in one of these states is receiving again.
_REOPENED_STATES = (SeriesState.STABLE.value, SeriesState.ASSEMBLED.value, SeriesState.FAILED.value)

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
}
#: Every SOP class the node stores; others are refused at association negotiation.
STORAGE_SOP_CLASSES = {**CT_SOP_CLASSES, **XRAY_SOP_CLASSES}


@dataclass(frozen=True)
class CarmFallback:
    """A configured detector geometry for a device whose images lack SID or pixel spacing."""

    manufacturer: str
    model_name: str
    station_name: str
    sid_mm: float | None
    pixel_spacing_mm: tuple[float, float] | None

    def matches(self, geometry: XrayGeometry) -> bool:
        wanted = (self.manufacturer, self.model_name, self.station_name)
        have = (geometry.manufacturer, geometry.model_name, geometry.station_name)
        return all(w in ("", h) for w, h in zip(wanted, have, strict=True))


@dataclass(frozen=True)
class ReceiveOutcome:
    """The status to answer with, and what happened (for logs, import and tests)."""

    status: int
    reason: str = ""
    instance_id: int | None = None
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


class RefusedError(Exception):
    """An instance we answer with a failure status; nothing of it is kept."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Receiver:
    """Validate → store (fsync, rename) → catalogue (commit) → only then Success."""

    def __init__(
        self,
        store: FileStore,
        sessions: sessionmaker[Session],
        max_pixel_bytes: int,
        on_usable_xray: Callable[[Session, int], object],
        fallbacks: list[CarmFallback] | None = None,
        on_stored: Callable[[int], None] | None = None,
    ) -> None:
        """``on_usable_xray(session, instance_id)`` is told of each X-ray catalogued usable
        and linked to a volume, inside the transaction that records it: the pipeline queues
        its work there, so a crash never leaves one without the other. ``on_stored`` hears of
        each instance after its commit."""
        self.store = store
        self.on_usable_xray = on_usable_xray
        self.sessions = sessions
        self.max_pixel_bytes = max_pixel_bytes
        self.fallbacks = fallbacks or []
        self.on_stored = on_stored
        self._series_ids: dict[str, tuple[int, int]] = {}
        self._learned: dict[tuple, tuple] = {}

    def receive(
        self,
        part10: bytes,
        calling_ae: str | None,
        peer: str | None = None,
        context_sop_class: str | None = None,
        affected_sop_class: str | None = None,
    ) -> ReceiveOutcome:
        """Handle one encoded instance (DICOM file format bytes); never raises.

        ``context_sop_class`` is the abstract syntax of the presentation context it came on,
        ``affected_sop_class`` the Affected SOP Class UID of the C-STORE request: the data
        set's SOP Class UID must equal both (0xA900 otherwise).
        """
        try:
            ds = self._parse(part10)
            self._validate(ds, context_sop_class, affected_sop_class)
            return self._store_and_catalog(ds, part10, calling_ae)
        except RefusedError as refused:
            sop_uid = _safe_sop_uid(part10)
            LOG.warning(
                "store refused",
                extra={
                    "event": "store_failed",
                    "calling_ae": calling_ae,
                    "status": f"0x{refused.status:04X}",
                    "sop": sop_uid,
                    "reason": refused.reason,
                },
            )
            self.record_event(
                IngestEventKind.STORE_FAILED,
                calling_ae,
                peer,
                refused.status,
                sop_uid,
                refused.reason,
            )
            return ReceiveOutcome(refused.status, refused.reason)
        except Exception as error:  # the node never dies on one instance
            LOG.exception("store failed", extra={"event": "store_failed", "calling_ae": calling_ae})
            reason = f"internal error: {type(error).__name__}: {error}"
            self.record_event(
                IngestEventKind.STORE_FAILED,
                calling_ae,
                peer,
                OUT_OF_RESOURCES,
                _safe_sop_uid(part10),
                reason,
            )
            return ReceiveOutcome(OUT_OF_RESOURCES, reason)

    # --- steps ---------------------------------------------------------------------------

    def _parse(self, part10: bytes) -> pydicom.Dataset:
        try:
            ds = pydicom.dcmread(BytesIO(part10), defer_size=4096)
        except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, TypeError) as error:
            raise RefusedError(CANNOT_UNDERSTAND, f"cannot parse the data set: {error}") from error
        self._check_pixel_data(ds, len(part10))
        try:
            # Decode every element now, so that a malformed one is refused, not stored.
            for element in ds.iterall():
                _ = element.value
        except Exception as error:
            raise RefusedError(CANNOT_UNDERSTAND, f"cannot decode the data set: {error}") from error
        if "SOPClassUID" not in ds:
            raise RefusedError(CANNOT_UNDERSTAND, "no SOP Class UID: not a DICOM composite object")
        return ds

    def _check_pixel_data(self, ds: pydicom.Dataset, stream_length: int) -> None:
        """Refuse pixel data over the limit or cut short, before reading it into memory."""
        if "PixelData" not in ds:
            return
        raw = ds.get_item("PixelData", keep_deferred=True)  # declared length, not read yet
        length = getattr(raw, "length", None)
        offset = getattr(raw, "value_tell", None)
        if length is None or length == 0xFFFFFFFF:  # encapsulated (compressed): no length
            return
        if length > self.max_pixel_bytes:
            raise RefusedError(
                OUT_OF_RESOURCES,
                f"pixel data of {length} bytes exceeds the limit of {self.max_pixel_bytes}",
            )
        if offset is not None and offset + length > stream_length:
            raise RefusedError(
                CANNOT_UNDERSTAND,
                f"pixel data is truncated: {length} bytes "
                f"declared, {stream_length - offset} received",
            )
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        needed = (
            int(ds.get("Rows", 0))
            * int(ds.get("Columns", 0))
            * int(ds.get("SamplesPerPixel", 1))
            * int(ds.get("BitsAllocated", 16))
            // 8
            * frames
        )
        if length < needed:
            raise RefusedError(
                CANNOT_UNDERSTAND,
                f"pixel data holds {length} bytes but Rows, Columns and frames need {needed}",
            )

    def _validate(
        self,
        ds: pydicom.Dataset,
        context_sop_class: str | None,
        affected_sop_class: str | None = None,
    ) -> None:
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in STORAGE_SOP_CLASSES:
            raise RefusedError(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOP Class {sop_class or '(missing)'} is not stored here",
            )
        for claimed, where in (
            (affected_sop_class, "a C-STORE request whose Affected SOP Class is"),
            (context_sop_class, "a presentation context for"),
        ):
            if claimed and sop_class != claimed:
                raise RefusedError(
                    DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    f"data set is {STORAGE_SOP_CLASSES[sop_class]} ({sop_class}) but was sent "
                    f"on {where} {STORAGE_SOP_CLASSES.get(claimed, claimed)} ({claimed})",
                )
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = str(ds.get(keyword, ""))
            if not is_valid_uid(value):
                raise RefusedError(
                    DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    f"{keyword} {value!r} is missing or not a valid UID",
                )
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            raise RefusedError(DATASET_DOES_NOT_MATCH_SOP_CLASS, "image has no Pixel Data")

    def _store_and_catalog(
        self, ds: pydicom.Dataset, part10: bytes, calling_ae: str | None
    ) -> ReceiveOutcome:
        sop_uid = str(ds.SOPInstanceUID)
        digest = hashlib.sha256(part10).hexdigest()
        with self.sessions() as session:  # a read: no writer lock needed (WAL / MVCC)
            existing = session.execute(
                select(Instance.id, Instance.version, Instance.sha256).where(
                    Instance.sop_instance_uid == sop_uid
                )
            ).all()
        for row in existing:
            if row.sha256 == digest:
                return ReceiveOutcome(SUCCESS, "duplicate of a stored instance", row.id, True)
        version = max((row.version for row in existing), default=0) + 1
        usability, reason, geometry = self._usability(ds)
        relative = self.store.instance_path(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop_uid, version
        )
        # The durable write happens outside the writer lock, so concurrent associations
        # overlap their fsyncs; the catalogue commit that follows is short.
        try:
            stored = self.store.write(relative, part10, sha256=digest)
        except StorageFullError as error:
            raise RefusedError(OUT_OF_RESOURCES, f"cannot store: {error.strerror}") from error
        if version > 1:
            LOG.warning(
                "new version of an instance",
                extra={
                    "event": "store_new_version",
                    "sop": sop_uid,
                    "version": version,
                    "calling_ae": calling_ae,
                },
            )
        with self.sessions() as session:
            try:
                instance_id = self._catalogue(
                    session, ds, stored, version, calling_ae, usability, reason, geometry
                )
            except IntegrityError as error:  # a race on the same instance, or a stale cache
                session.rollback()
                self._series_ids.clear()
                raise RefusedError(
                    OUT_OF_RESOURCES, "concurrent store of the same instance; please resend"
                ) from error
        LOG.info(
            "stored",
            extra={
                "event": "store_ok",
                "sop": sop_uid,
                "calling_ae": calling_ae,
                "usability": str(usability),
            },
        )
        if self.on_stored is not None:
            self.on_stored(instance_id)
        return ReceiveOutcome(SUCCESS, "", instance_id)

    def _catalogue(
        self,
        session: Session,
        ds: pydicom.Dataset,
        stored: StoredFile,
        version: int,
        calling_ae: str | None,
        usability: str,
        reason: str | None,
        geometry: XrayGeometry | None,
    ) -> int:
        """One INSERT and one UPDATE in the common case; commits."""
        series_id, patient_pk = self._series_row(session, ds)
        if geometry is not None:
            self._learn_profile(session, geometry)
        linked_volume_id = None
        if usability == Usability.WAITING:
            volume = newest_usable_volume(session, patient_pk)
            if volume is not None:
                usability, reason, linked_volume_id = Usability.USABLE, None, volume.id
        instance = Instance(
            series_id=series_id,
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            version=version,
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            path=str(stored.path),
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
            number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
            calling_ae=calling_ae,
            geometry=None if geometry is None else geometry.to_json(),
            usability=usability,
            unusable_reason=reason,
            linked_volume_id=linked_volume_id,
        )
        session.add(instance)
        if usability == Usability.USABLE:
            session.flush()
            self.on_usable_xray(session, instance.id)
        session.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(
                instance_count=Series.instance_count + 1,
                last_received_at=utcnow(),
                # More slices after assembly: the series is receiving again, to be re-assembled.
                state=case(
                    (Series.state.in_(_REOPENED_STATES), SeriesState.RECEIVING.value),
                    else_=Series.state,
                ),
            )
        )
        session.commit()
        return instance.id

    def _series_row(self, session: Session, ds: pydicom.Dataset) -> tuple[int, int]:
        """(series id, patient id) for this instance, from a cache after the first time."""
        series_uid = str(ds.SeriesInstanceUID)
        cached = self._series_ids.get(series_uid)
        if cached is not None:
            return cached
        series = self._series_for(session, ds)
        session.flush()
        ids = (series.id, series.study.patient_id)
        self._series_ids[series_uid] = ids
        return ids

    def _usability(self, ds: pydicom.Dataset) -> tuple[str, str | None, XrayGeometry | None]:
        """Whether an X-ray can be registered (and why not); CT slices are not X-rays.

        The geometry is read (and kept) before anything else is judged: an X-ray without a
        Patient ID still teaches the node its C-arm, and registers once an operator links it.
        """
        if str(ds.SOPClassUID) not in XRAY_SOP_CLASSES:
            return Usability.NOT_XRAY, None, None
        reasons = []
        if not str(ds.get("PatientID", "")).strip():
            reasons.append(
                "Patient ID is empty: cannot find the patient's CT; link it with `xvr-node link`"
            )
        try:
            geometry = read_xray_geometry(ds)
        except UnsupportedGeometryError as error:
            reasons.append(f"geometry cannot be applied: {error}")
            return Usability.UNUSABLE, "; ".join(reasons), None
        except XrayGeometryError as error:
            reasons.append(f"inconsistent geometry: {error}")
            return Usability.UNUSABLE, "; ".join(reasons), None
        if not geometry.usable():
            geometry = self._fill_from_profiles(geometry)
        if not geometry.usable():
            reasons.append(
                "missing geometry and no C-arm profile for this device: "
                + geometry.explain_missing()
            )
        # An estimated spacing scales the result: the reason says so while it is shown.
        estimate = [geometry.describe_spacing()] if geometry.pixel_spacing_estimated else []
        if reasons:
            return Usability.UNUSABLE, "; ".join(reasons + estimate), geometry
        waiting = "waiting for a CT volume of this patient"
        return Usability.WAITING, "; ".join([waiting, *estimate]), geometry

    def _fill_from_profiles(self, geometry: XrayGeometry) -> XrayGeometry:
        """Learned profile of this device and zoom, then configuration, then an estimate."""
        with self.sessions() as session:
            learned = _device_profile(session, geometry)
            if learned is not None and learned.source != ProfileSource.LEARNED:
                learned = None
        if learned is not None:
            spacing = None
            if learned.pixel_spacing_row_mm and learned.pixel_spacing_col_mm:
                spacing = (learned.pixel_spacing_row_mm, learned.pixel_spacing_col_mm)
            geometry = geometry.with_profile(learned.sid_mm, spacing, "profile")
        for fallback in self.fallbacks:
            if geometry.usable():
                break
            if fallback.matches(geometry):
                geometry = geometry.with_profile(
                    fallback.sid_mm, fallback.pixel_spacing_mm, "config"
                )
        return geometry.with_field_size_estimate()

    def _learn_profile(self, session: Session, geometry: XrayGeometry) -> None:
        """Remember a device's detector geometry from an image that states it in full."""
        stated = geometry.sid_source == "DistanceSourceToDetector" and (
            geometry.pixel_spacing_source in ("ImagerPixelSpacing", "PixelSpacing")
        )
        if not stated:
            return
        known = (geometry.sid_mm, geometry.pixel_spacing_mm)
        if self._learned.get(geometry.device_key()) == known:
            return  # nothing new about this device
        self._learned[geometry.device_key()] = known
        manufacturer, model, station, rows, columns, zoom = geometry.device_key()
        profile = _device_profile(session, geometry)
        if profile is None:
            profile = CarmProfile(
                manufacturer=manufacturer,
                model_name=model,
                station_name=station,
                detector_rows=rows,
                detector_columns=columns,
                zoom=zoom,
                source=ProfileSource.LEARNED,
            )
            session.add(profile)
        profile.sid_mm = geometry.sid_mm
        profile.pixel_spacing_row_mm, profile.pixel_spacing_col_mm = geometry.pixel_spacing_mm
        profile.source = ProfileSource.LEARNED
        profile.updated_at = utcnow()

    def _series_for(self, session: Session, ds: pydicom.Dataset) -> Series:
        patient_key = (
            str(ds.get("PatientID", "")).strip(),
            str(ds.get("IssuerOfPatientID", "")).strip(),
        )
        patient = session.scalars(
            select(Patient).where(
                Patient.patient_id == patient_key[0], Patient.issuer_of_patient_id == patient_key[1]
            )
        ).first()
        if patient is None:
            patient = Patient(patient_id=patient_key[0], issuer_of_patient_id=patient_key[1])
            session.add(patient)
        study_uid = str(ds.StudyInstanceUID)
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if study is None:
            study = Study(
                patient=patient,
                study_instance_uid=study_uid,
                study_date=str(ds.get("StudyDate", "") or "") or None,
                accession=str(ds.get("AccessionNumber", "") or "") or None,
            )
            session.add(study)
        series_uid = str(ds.SeriesInstanceUID)
        series = session.scalars(
            select(Series).where(Series.series_instance_uid == series_uid)
        ).first()
        if series is None:
            is_xray = str(ds.SOPClassUID) in XRAY_SOP_CLASSES
            series = Series(
                study=study,
                series_instance_uid=series_uid,
                modality=str(ds.get("Modality", "") or "OT"),
                sop_class_uid=str(ds.SOPClassUID),
                frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or "") or None,
                body_part=str(ds.get("BodyPartExamined", "") or "") or None,
                manufacturer=str(ds.get("Manufacturer", "") or "") or None,
                model_name=str(ds.get("ManufacturerModelName", "") or "") or None,
                station_name=str(ds.get("StationName", "") or "") or None,
                state=SeriesState.XRAY if is_xray else SeriesState.RECEIVING,
                instance_count=0,
            )
            session.add(series)
        return series

    def record_event(
        self,
        kind: str,
        calling_ae: str | None,
        peer: str | None,
        status: int | None,
        sop_uid: str | None,
        reason: str,
    ) -> None:
        """Leave a catalogue record of a refusal; a broken catalogue only costs the record."""
        try:
            with self.sessions() as session:
                session.add(
                    IngestEvent(
                        event=kind,
                        calling_ae=(calling_ae or "")[:16] or None,
                        peer_address=peer,
                        status_code=status,
                        sop_instance_uid=sop_uid,
                        reason=reason,
                    )
                )
                session.commit()
        except Exception:
            LOG.exception("could not record an ingest event", extra={"event": "record_failed"})


def _device_profile(session: Session, geometry: XrayGeometry) -> CarmProfile | None:
    """The stored profile of the device (manufacturer, model, station, detector size, zoom)."""
    manufacturer, model, station, rows, columns, zoom = geometry.device_key()
    return session.scalars(
        select(CarmProfile).where(
            CarmProfile.manufacturer == manufacturer,
            CarmProfile.model_name == model,
            CarmProfile.station_name == station,
            CarmProfile.detector_rows == rows,
            CarmProfile.detector_columns == columns,
            CarmProfile.zoom == zoom,
        )
    ).first()


def newest_usable_volume(session: Session, patient_id: int) -> Volume | None:
    """The CT volume an X-ray of this patient is registered to: the newest usable one."""
    return session.scalars(
        select(Volume)
        .where(Volume.patient_id == patient_id, Volume.state == VolumeState.USABLE)
        .order_by(Volume.created_at.desc(), Volume.id.desc())
    ).first()


def link_waiting_xrays(session: Session, patient_id: int, volume: Volume) -> list[Instance]:
    """Link a patient's waiting X-rays to a volume that just became usable."""
    waiting = session.scalars(
        select(Instance)
        .join(Series)
        .join(Study)
        .where(Study.patient_id == patient_id, Instance.usability == Usability.WAITING)
    ).all()
    for instance in waiting:
        instance.usability = Usability.USABLE
        instance.unusable_reason = None
        instance.linked_volume = volume
    return list(waiting)


def count_instances(session: Session) -> int:
    return session.scalar(select(func.count(Instance.id))) or 0


def _safe_sop_uid(part10: bytes) -> str | None:
    """The SOP Instance UID for a record, if one can be read at all (and is safe to keep)."""
    try:
        ds = pydicom.dcmread(
            BytesIO(part10), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
        )
        value = str(ds.get("SOPInstanceUID", ""))
    except Exception:
        return None
    return value[:64] if value else None
