"""The catalog's tables: what was received, what was built from it, and the work queue."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from xvr_node import clock

# Deterministic constraint names: migrations and autogenerate comparisons depend on them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = 64  # DICOM UI value representation: at most 64 characters
AE_TITLE = 16
PATH = 1024
# Spelled as SQL so that autogenerate compares it equal to what the database reports.
EMPTY_STRING = text("''")


def utcnow() -> datetime:
    """The node's clock (:mod:`xvr_node.clock`): aware UTC, the only kind the catalog stores."""
    return clock.now()


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always an aware UTC datetime in Python.

    PostgreSQL returns the session's zone; normalising both ways keeps comparisons
    (``last_received_at < now - N s``) and what the logs print in UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the catalog stores aware UTC datetimes")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSONB on PostgreSQL (comparable, indexable), JSON text elsewhere. Assign a new value to
# change a JSON column: in-place mutation of the dict or list is not tracked.
JSONType = JSON().with_variant(postgresql.JSONB(), "postgresql")


def _one_of(column: str, values: type[StrEnum]) -> str:
    """SQL text of a CHECK that a string column holds one of an enum's values."""
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


# Allowed values of the string status columns; each table CHECKs its column against them.


class SeriesState(StrEnum):
    RECEIVING = "receiving"
    STABLE = "stable"
    ASSEMBLED = "assembled"
    FAILED = "failed"
    XRAY = "xray"


class Usability(StrEnum):
    USABLE = "usable"
    WAITING = "waiting"
    UNUSABLE = "unusable"
    NOT_XRAY = "not_xray"


class VolumeState(StrEnum):
    USABLE = "usable"
    REFUSED = "refused"


class ProfileSource(StrEnum):
    LEARNED = "learned"
    CONFIG = "config"


class ModelState(StrEnum):
    TRAINING = "training"
    READY = "ready"
    SUPERSEDED = "superseded"
    FAILED = "failed"


class JobKind(StrEnum):
    ASSEMBLE = "assemble"
    FINETUNE = "finetune"
    REGISTER = "register"
    EXPORT = "export"
    RETENTION = "retention"
    NOOP = "noop"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Initializer(StrEnum):
    MODEL = "model"
    DICOM = "dicom"
    FIXED = "fixed"
    MULTISTART = "multistart"
    TRACKING = "tracking"


class ExportKind(StrEnum):
    SRO = "sro"
    SR = "sr"
    SC = "sc"


class ExportStatus(StrEnum):
    PENDING = "pending"
    # Handed to an association and not answered yet: after a crash, asked about by C-FIND.
    SENDING = "sending"
    SENT = "sent"
    RETRYING = "retrying"
    PARKED = "parked"


class IngestEventKind(StrEnum):
    ASSOCIATION_REJECTED = "association_rejected"
    STORE_FAILED = "store_failed"
    STORE_WARNING = "store_warning"
    IMPORT_FAILED = "import_failed"


class Base(DeclarativeBase):
    """Declarative base: named constraints, aware UTC timestamps, JSON for dict payloads."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
    }


def _created_at() -> Mapped[datetime]:
    """A creation timestamp, filled in by Python or, for raw SQL inserts, by the database."""
    return mapped_column(default=utcnow, server_default=func.now())


class Patient(Base):
    """A DICOM patient, known only by Patient ID and issuer: names are never stored."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    # '' rather than NULL when absent, so that the unique constraint holds (NULLs are distinct).
    issuer_of_patient_id: Mapped[str] = mapped_column(
        String(64), default="", server_default=EMPTY_STRING
    )
    created_at: Mapped[datetime] = _created_at()

    studies: Mapped[list[Study]] = relationship(
        back_populates="patient", cascade="all, delete-orphan", passive_deletes=True
    )
    volumes: Mapped[list[Volume]] = relationship(
        back_populates="patient", cascade="all, delete-orphan", passive_deletes=True
    )
    models: Mapped[list[PoseModel]] = relationship(
        back_populates="patient", cascade="all, delete-orphan", passive_deletes=True
    )


class Study(Base):
    """A DICOM study of one patient."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), index=True
    )
    study_instance_uid: Mapped[str] = mapped_column(String(UID), unique=True)
    study_date: Mapped[str | None] = mapped_column(String(8))  # DICOM DA, YYYYMMDD
    accession: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = _created_at()

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True
    )


class Series(Base):
    """A DICOM series; its state says where a CT is on its way to a volume."""

    __tablename__ = "series"
    __table_args__ = (CheckConstraint(_one_of("state", SeriesState), name="state"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID), unique=True)
    modality: Mapped[str] = mapped_column(String(16))
    sop_class_uid: Mapped[str] = mapped_column(String(UID))  # of the first instance received
    frame_of_reference_uid: Mapped[str | None] = mapped_column(String(UID))
    body_part: Mapped[str | None] = mapped_column(String(64))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(64))
    station_name: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(default=0, server_default="0")
    # The stable-series check scans for series with no new instance for N seconds.
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING)
    created_at: Mapped[datetime] = _created_at()

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(
        back_populates="series", cascade="all, delete-orphan", passive_deletes=True
    )
    volumes: Mapped[list[Volume]] = relationship(
        back_populates="series", cascade="all, delete-orphan", passive_deletes=True
    )


class Instance(Base):
    """One stored SOP instance; a re-sent UID with different bytes is a new version."""

    __tablename__ = "instances"
    __table_args__ = (
        # Its index also serves lookups by sop_instance_uid alone (leading column).
        UniqueConstraint("sop_instance_uid", "version"),
        CheckConstraint("version >= 1", name="version_positive"),
        CheckConstraint(_one_of("usability", Usability), name="usability"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID))
    sop_class_uid: Mapped[str] = mapped_column(String(UID))
    version: Mapped[int] = mapped_column(default=1, server_default="1")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID))
    path: Mapped[str] = mapped_column(String(PATH))  # relative to the storage root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    number_of_frames: Mapped[int] = mapped_column(default=1, server_default="1")
    received_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    purged_at: Mapped[datetime | None]  # retention deleted the file; the record stays
    calling_ae: Mapped[str | None] = mapped_column(String(AE_TITLE))
    # X-ray geometry as read (sid_mm, dsp_mm, pixel_spacing, principal point, angles,
    # per-frame values) and where each value came from; NULL for CT.
    geometry: Mapped[dict[str, Any] | None]
    usability: Mapped[str] = mapped_column(String(16))
    unusable_reason: Mapped[str | None] = mapped_column(Text)
    linked_volume_id: Mapped[int | None] = mapped_column(
        ForeignKey("volumes.id", ondelete="SET NULL"), index=True
    )

    series: Mapped[Series] = relationship(back_populates="instances")
    linked_volume: Mapped[Volume | None] = relationship(back_populates="linked_instances")
    registrations: Mapped[list[Registration]] = relationship(
        back_populates="instance", cascade="all, delete-orphan", passive_deletes=True
    )


class Volume(Base):
    """A CT series assembled into a 3D volume (NIfTI cache), or the reason it was refused."""

    __tablename__ = "volumes"
    __table_args__ = (
        # "Newest usable volume of the patient".
        Index("ix_volumes_patient_id_created_at", "patient_id", "created_at"),
        CheckConstraint(_one_of("state", VolumeState), name="state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    # Denormalised from series -> study -> patient so the linking query needs no joins.
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"))
    path: Mapped[str | None] = mapped_column(String(PATH))  # NIfTI, relative; NULL if refused
    shape: Mapped[list[int] | None] = mapped_column(JSONType)
    spacing: Mapped[list[float] | None] = mapped_column(JSONType)  # mm
    affine: Mapped[list[list[float]] | None] = mapped_column(JSONType)  # 4x4, voxel -> LPS mm
    state: Mapped[str] = mapped_column(String(16))
    refusal_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()

    series: Mapped[Series] = relationship(back_populates="volumes")
    patient: Mapped[Patient] = relationship(back_populates="volumes")
    linked_instances: Mapped[list[Instance]] = relationship(
        back_populates="linked_volume", passive_deletes=True
    )


class CarmProfile(Base):
    """Geometry of one C-arm and detector mode, learned from its images or configured."""

    __tablename__ = "carm_profiles"
    __table_args__ = (
        UniqueConstraint(
            "manufacturer",
            "model_name",
            "station_name",
            "detector_rows",
            "detector_columns",
            "zoom",
            name="uq_carm_profiles_device",
        ),
        CheckConstraint(_one_of("source", ProfileSource), name="source"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # '' rather than NULL when the device does not say, so that the unique constraint holds.
    manufacturer: Mapped[str] = mapped_column(String(64), default="", server_default=EMPTY_STRING)
    model_name: Mapped[str] = mapped_column(String(64), default="", server_default=EMPTY_STRING)
    station_name: Mapped[str] = mapped_column(String(64), default="", server_default=EMPTY_STRING)
    detector_rows: Mapped[int]
    detector_columns: Mapped[int]
    # The field-of-view mode as the images state it (XrayGeometry.zoom_key: Field of View
    # Dimensions, Intensifier Size); Imager Pixel Spacing changes with it at the same matrix.
    zoom: Mapped[str] = mapped_column(String(64), default="", server_default=EMPTY_STRING)
    sid_mm: Mapped[float | None] = mapped_column(Float)
    pixel_spacing_row_mm: Mapped[float | None] = mapped_column(Float)
    pixel_spacing_col_mm: Mapped[float | None] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=func.now()
    )


class PoseModel(Base):
    """A pose-regression network: a base model (no patient) or one finetuned for a patient."""

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("patient_id", "version"),
        CheckConstraint(_one_of("state", ModelState), name="state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"))
    volume_id: Mapped[int | None] = mapped_column(
        ForeignKey("volumes.id", ondelete="SET NULL"), index=True
    )
    # NO ACTION: a base model cannot be deleted while finetuned models derive from it.
    base_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"), index=True)
    version: Mapped[int] = mapped_column(default=1, server_default="1")
    path: Mapped[str | None] = mapped_column(String(PATH))  # checkpoint, relative
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    conventions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default=ModelState.TRAINING)
    # Figures on held-out X-rays formed independently of the training renderer (see
    # xvr_node.jobs.model_check), and whether they pass the bar: only then is it used.
    validation: Mapped[dict[str, Any] | None]
    validated: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = _created_at()

    patient: Mapped[Patient | None] = relationship(back_populates="models")
    volume: Mapped[Volume | None] = relationship()
    base_model: Mapped[PoseModel | None] = relationship(remote_side=[id])


class Job(Base):
    """One unit of pipeline work: the node's ledger row; the engine job that runs it now is
    ``engine_job_id`` (a ``procrastinate_jobs`` row)."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_one_of("kind", JobKind), name="kind"),
        CheckConstraint(_one_of("status", JobStatus), name="status"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    priority: Mapped[int] = mapped_column(default=0, server_default="0")  # higher runs first
    # A finetune that may start outside the overnight window (an X-ray is waiting for it).
    urgent: Mapped[bool] = mapped_column(default=False, server_default=false())
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    # worker.max_attempts of the worker that last took the job (3 until one has).
    max_attempts: Mapped[int] = mapped_column(default=3, server_default="3")
    next_attempt_at: Mapped[datetime] = mapped_column(
        default=utcnow, server_default=func.now(), index=True
    )
    worker: Mapped[str | None] = mapped_column(String(255))  # who runs it now
    engine_job_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]
    # A long job's latest progress (a finetune: iteration, total, ETA), for status and metrics.
    progress: Mapped[dict[str, Any] | None]
    # e.g. "assemble:series:42": at most one row per key, whatever its status.
    dedupe_key: Mapped[str | None] = mapped_column(String(255), unique=True)


class Registration(Base):
    """The pose of one X-ray (or one frame of it) in its CT, and how it was found."""

    __tablename__ = "registrations"
    __table_args__ = (
        Index("ix_registrations_instance_id_frame_index", "instance_id", "frame_index"),
        CheckConstraint(_one_of("initializer", Initializer), name="initializer"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    frame_index: Mapped[int | None]  # 0-based; NULL: the whole (single-frame) image
    volume_id: Mapped[int] = mapped_column(ForeignKey("volumes.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[int | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL"), index=True
    )
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    initializer: Mapped[str] = mapped_column(String(16))
    initial_matrix: Mapped[list[list[float]] | None] = mapped_column(JSONType)
    final_matrix: Mapped[list[list[float]]] = mapped_column(JSONType)  # image plane mm -> LPS
    intrinsics: Mapped[dict[str, Any]]
    conventions: Mapped[dict[str, Any]]
    similarity: Mapped[float | None] = mapped_column(Float)
    iterations: Mapped[int | None]
    wall_time_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any] | None]
    # The quality gate's verdict (xvr_node.xvr.quality); NULL for results from before it.
    reliable: Mapped[bool | None]
    confidence: Mapped[float | None] = mapped_column(Float)
    superseded_by_id: Mapped[int | None] = mapped_column(
        ForeignKey("registrations.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = _created_at()

    instance: Mapped[Instance] = relationship(back_populates="registrations")
    volume: Mapped[Volume] = relationship()
    model: Mapped[PoseModel | None] = relationship()
    job: Mapped[Job | None] = relationship()
    superseded_by: Mapped[Registration | None] = relationship(remote_side=[id])
    # "all": the ORM must not unlink the outbox rows either; the database refuses the delete.
    exports: Mapped[list[Export]] = relationship(
        back_populates="registration", passive_deletes="all"
    )


class Export(Base):
    """The durable outbox: one DICOM object to deliver to one destination."""

    __tablename__ = "exports"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "destination"),
        Index("ix_exports_status_next_attempt_at", "status", "next_attempt_at"),
        CheckConstraint(_one_of("object_kind", ExportKind), name="object_kind"),
        CheckConstraint(_one_of("status", ExportStatus), name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # NO ACTION: a registration cannot be deleted while an outbox row still names it, so
    # retention has to deal with (sent) exports first and never loses an unsent result.
    registration_id: Mapped[int | None] = mapped_column(ForeignKey("registrations.id"), index=True)
    object_kind: Mapped[str] = mapped_column(String(8))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID))
    path: Mapped[str] = mapped_column(String(PATH))  # relative to the storage root
    destination: Mapped[str] = mapped_column(String(64))  # AE title or configured name
    status: Mapped[str] = mapped_column(String(16), default=ExportStatus.PENDING)
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created_at()

    registration: Mapped[Registration | None] = relationship(back_populates="exports")


class IngestEvent(Base):
    """Audit of what the node refused or failed to take in, and why."""

    __tablename__ = "ingest_events"
    __table_args__ = (CheckConstraint(_one_of("event", IngestEventKind), name="event"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(
        default=utcnow, server_default=func.now(), index=True
    )
    calling_ae: Mapped[str | None] = mapped_column(String(AE_TITLE))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(32))
    status_code: Mapped[int | None]  # DICOM status, e.g. 0xA700
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID))
    reason: Mapped[str] = mapped_column(Text, default="", server_default=EMPTY_STRING)
