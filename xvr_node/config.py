"""The one typed settings object: ``config.yaml`` + ``XVR_NODE__…`` environment overrides.

Loading rules (what other code may rely on):

- ``load_settings(path)`` reads ``path``; with ``path=None`` it reads ``./config.yaml`` when that
  exists, else uses the built-in defaults. A missing explicit path is an error.
- Every key has a default; unknown keys are errors (``extra="forbid"`` everywhere).
- ``XVR_NODE__SECTION__KEY=value`` overrides any key (nested further with ``__``); the value is
  read as YAML (``true``, ``11113``, ``[24, 12]``); a key typed as text keeps the raw string.
- Relative paths written in the file resolve against the file's folder; relative paths from
  the environment or the built-in defaults resolve against the working directory. After
  ``load_settings`` every path in the settings is absolute, so later ``chdir`` calls change nothing.
- Problems are collected, not raised one by one: ``ConfigError.problems`` names each dotted
  key and why; ``check_config`` adds the checks that touch the filesystem.
"""

from __future__ import annotations

import difflib
import ipaddress
import itertools
import os
import re
import ssl
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from datetime import time as Time
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

ENV_PREFIX = "XVR_NODE__"
DEFAULT_CONFIG_FILE = "config.yaml"


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` says where and why, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- value types ---------------------------------------------------------------------------


def _in_range(low: float, high: float) -> Callable[[float], float]:
    def check(value: float) -> float:
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range {low}–{high}")
        return value

    return check


def _fixed_length(count: int, shape: str) -> Callable[[Any], Any]:
    # Checked before item validation: pydantic's own message for a short tuple is "y.2: missing".
    def check(value: Any) -> Any:
        if isinstance(value, list | tuple) and len(value) != count:
            raise ValueError(f"expected {count} numbers {shape}, got {list(value)}")
        return value

    return check


def _ordered_pair(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] > value[1]:
        raise ValueError(f"expected [low, high] with low ≤ high, got {list(value)}")
    return value


def _ae_title(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    # DICOM PS3.5 AE VR: default repertoire without backslash or control characters, ≤ 16.
    if len(value) > 16:
        raise ValueError(f"AE title {value!r} is longer than 16 characters")
    if not value.strip():
        raise ValueError("AE title must not be empty or only spaces")
    if any(not " " <= ch <= "~" or ch == "\\" for ch in value):
        raise ValueError(f"AE title {value!r} may only hold printable ASCII without backslash")
    return value.strip()


def _hh_mm(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        # PyYAML reads an unquoted 20:00 as the base-60 integer 1200.
        raise ValueError(f'expected a time "HH:MM" in quotes, got the number {value}')
    if isinstance(value, str):
        match = re.fullmatch(r"(\d{2}):(\d{2})", value)
        if not match or int(match[1]) > 23 or int(match[2]) > 59:
            raise ValueError(f'expected a time "HH:MM" between 00:00 and 23:59, got {value!r}')
    return value


def _ip_or_cidr(value: str | None) -> str | None:
    if value is not None:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
    return value


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone (e.g. 'Europe/Berlin')") from None
    return value


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    return value


def _euler_convention(value: str) -> str:
    if not re.fullmatch(r"[XYZ]{3}", value) or value[0] == value[1] or value[1] == value[2]:
        raise ValueError(f"expected three axes like 'ZXY' (no axis twice in a row), got {value!r}")
    return value


def _log_level(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


AeTitle = Annotated[str, BeforeValidator(_ae_title)]
Port = Annotated[int, AfterValidator(_in_range(1, 65535))]
Probability = Annotated[float, AfterValidator(_in_range(0, 1))]
Positive = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
ClockTime = Annotated[str, BeforeValidator(_hh_mm)]
Triple = Annotated[tuple[float, float, float], BeforeValidator(_fixed_length(3, "[x, y, z]"))]
Range = Annotated[
    tuple[float, float],
    BeforeValidator(_fixed_length(2, "[low, high]")),
    AfterValidator(_ordered_pair),
]


class Section(BaseModel):
    """Shared rules: unknown keys are errors, and defaults pass the same checks as input."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# --- node: the DICOM listener -------------------------------------------------------------


class AllowedCaller(Section):
    """One peer allowed to open associations (calling AE title, optionally from an address)."""

    ae_title: AeTitle
    address: Annotated[str | None, AfterValidator(_ip_or_cidr)] = None


class TlsSettings(Section):
    """DICOM TLS for the listener (PS3.15 Annex B)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: list[Path] = Field(default_factory=list)
    require_client_certificate: bool = False

    @field_validator("certificate", "private_key")
    @classmethod
    def _needed_when_enabled(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None and info.data.get("enabled"):
            raise ValueError("required when node.tls.enabled is true")
        return value

    @field_validator("require_client_certificate")
    @classmethod
    def _needs_a_ca(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("enabled") and not info.data.get("ca_certificates"):
            raise ValueError("needs node.tls.ca_certificates to verify clients against")
        return value


class NodeSettings(Section):
    """The SCP: who we are, where we listen, whom we accept, and the limits we enforce."""

    ae_title: AeTitle = "XVRNODE"
    host: str = "127.0.0.1"
    port: Port = 11112
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    max_associations: PositiveInt = 10
    max_pdu_bytes: NonNegativeInt = 1_048_576
    acse_timeout_s: Positive = 30.0
    dimse_timeout_s: Positive = 30.0
    network_timeout_s: Positive = 60.0
    max_pixel_bytes: PositiveInt = 2_147_483_648


# --- storage and catalog -------------------------------------------------------------------


class StorageSettings(Section):
    """Where received instances, volumes, models and results live."""

    root: Path = Path("var/xvr-node")
    min_free_bytes: NonNegativeInt = 1_073_741_824


class DatabaseSettings(Section):
    """The catalog database (PostgreSQL); ``url=None`` means the node's own embedded server."""

    url: str | None = None

    @field_validator("url")
    @classmethod
    def _known_dialect(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            backend = make_url(value).get_backend_name()
        except (ArgumentError, ValueError):
            raise ValueError(f"{_redact_url(value)!r} is not a database URL") from None
        if backend == "sqlite":
            raise ValueError(
                "SQLite catalogs are no longer supported: leave database.url unset for the "
                "node's embedded PostgreSQL, or give a postgresql+psycopg:// URL"
            )
        if backend != "postgresql":
            raise ValueError(f"dialect {backend!r} is not supported (use postgresql)")
        return value


# --- scheduler and workers -----------------------------------------------------------------


class OvernightWindow(Section):
    """Daily window in which finetune jobs may start; it may wrap past midnight."""

    start: ClockTime = "20:00"
    end: ClockTime = "06:00"

    @property
    def start_time(self) -> Time:
        return Time.fromisoformat(self.start)

    @property
    def end_time(self) -> Time:
        return Time.fromisoformat(self.end)

    def contains(self, moment: Time) -> bool:
        """True when ``moment`` (local wall-clock time) falls in [start, end).

        ``start == end`` is a window that never closes (a GPU kept for finetuning).
        """
        start, end = self.start_time, self.end_time
        if start == end:
            return True
        if start <= end:
            return start <= moment < end
        return moment >= start or moment < end

    def seconds_left(self, moment: datetime) -> float | None:
        """Seconds from ``moment`` (aware, local) to the window's end; None if it never
        closes, 0 outside it."""
        if self.start_time == self.end_time:
            return None
        if not self.contains(moment.timetz().replace(tzinfo=None)):
            return 0.0
        end = moment.replace(
            hour=self.end_time.hour, minute=self.end_time.minute, second=0, microsecond=0
        )
        if end <= moment:
            end += timedelta(days=1)
        return (end - moment).total_seconds()

    def next_start(self, moment: datetime) -> datetime:
        """The window's next opening after ``moment`` (aware, local)."""
        start = moment.replace(
            hour=self.start_time.hour, minute=self.start_time.minute, second=0, microsecond=0
        )
        return start if start > moment else start + timedelta(days=1)


class RetentionSettings(Section):
    """What may be deleted, and when (un-exported results are never purged)."""

    purge_originals_after_days: NonNegativeInt | None = None


class SchedulerSettings(Section):
    """Time-driven work: stable-series detection, retries and the overnight window."""

    overnight_window: OvernightWindow = Field(default_factory=OvernightWindow)
    timezone: Annotated[str, AfterValidator(_timezone)] = "UTC"
    stable_series_seconds: Positive = 30.0
    poll_interval_s: Positive = 5.0
    retention: RetentionSettings = Field(default_factory=RetentionSettings)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class WorkerSettings(Section):
    """One worker process: its device, and how its silence is noticed (the job engine's
    heartbeats: ``lease_seconds`` without one and its job runs elsewhere)."""

    device: Annotated[str, AfterValidator(_device)] = "auto"
    concurrency: PositiveInt = 1
    lease_seconds: Positive = 300.0
    heartbeat_seconds: Positive = 30.0
    max_attempts: PositiveInt = 3

    @field_validator("heartbeat_seconds")
    @classmethod
    def _beats_before_expiry(cls, value: float, info: ValidationInfo) -> float:
        lease = info.data.get("lease_seconds")
        if lease is not None and value >= lease:
            raise ValueError(f"must be shorter than worker.lease_seconds ({lease})")
        return value


# --- the XVR method ------------------------------------------------------------------------


class PoseRanges(Section):
    """Training poses: uniform in ± these ranges around the nominal view."""

    primary_deg: Annotated[float, Field(ge=0)] = 45.0
    secondary_deg: Annotated[float, Field(ge=0)] = 45.0
    inplane_deg: Annotated[float, Field(ge=0)] = 15.0
    offsets_mm: Triple = (150.0, 0.0, 150.0)
    source_isocenter_sdd_fraction: Range = (0.45, 1.0)


def _growing(value: list[int]) -> list[int]:
    if not value:
        raise ValueError("needs at least one level")
    if any(a >= b for a, b in itertools.pairwise(value)):
        raise ValueError(f"levels must grow coarse to fine (smallest first), got {value}")
    return value


class ModelCheckSettings(Section):
    """Held-out validation of a trained model (xvr_node.jobs.model_check) and its bar."""

    # Only models that pass start registrations; false: every ready model does (as before).
    required: bool = True
    views: PositiveInt = 8
    size_px: Annotated[int, Field(ge=32)] = 256
    levels_px: Annotated[list[Annotated[int, Field(ge=8)]], AfterValidator(_growing)] = Field(
        default_factory=lambda: [32, 64]
    )
    max_initial_mtre_mm: Positive = 50.0
    min_refined_under_2mm: Probability = 0.75


class TrainingProfile(Section):
    """What one kind of device can afford; overrides the training settings.

    Unset values keep the settings' own. A finetune keeps its base model's network,
    detector and learning rates: only :data:`FINETUNE_PROFILE_KEYS` apply to it.
    """

    detector_size_px: PositiveInt | None = None
    pixel_spacing_mm: Positive | None = None
    batch_size: PositiveInt | None = None
    backbone: str | None = None
    lr: Positive | None = None
    warmup_iterations: NonNegativeInt | None = None
    gradient_accumulation: PositiveInt | None = None
    w_ncc: Annotated[float, Field(ge=0)] | None = None
    w_geo: Annotated[float, Field(ge=0)] | None = None
    bank_views: NonNegativeInt | None = None
    bank_reuse: Positive | None = None
    pose_ranges: PoseRanges | None = None


#: Profile values that apply to a finetune too (the rest describe the network it inherits).
FINETUNE_PROFILE_KEYS = frozenset(
    {"batch_size", "gradient_accumulation", "w_ncc", "w_geo", "bank_views", "bank_reuse"}
)


def _default_profiles() -> dict[str, TrainingProfile]:
    """What each device learns within its budget (measured in docs/benchmarks.md).

    Both use a pose loss alone and the views a C-arm takes around the CT centre. CPU: a
    quarter of the pixels over the same field of view, a small network, a bank of reused
    views. CUDA: the full detector and network, every batch rendered afresh.
    """
    carm_views = PoseRanges(
        primary_deg=45.0,
        secondary_deg=30.0,
        inplane_deg=10.0,
        offsets_mm=(50.0, 0.0, 50.0),
        source_isocenter_sdd_fraction=(0.55, 0.95),
    )
    return {
        "cpu": TrainingProfile(
            detector_size_px=64,
            pixel_spacing_mm=4.352875,
            batch_size=64,
            backbone="resnet10t",
            lr=1.0e-3,
            warmup_iterations=200,
            gradient_accumulation=1,
            w_ncc=0.0,
            w_geo=1.0,
            bank_views=8192,
            bank_reuse=16.0,
            pose_ranges=carm_views,
        ),
        "cuda": TrainingProfile(
            lr=1.0e-3,
            warmup_iterations=200,
            gradient_accumulation=1,
            w_ncc=0.0,
            w_geo=1.0,
            pose_ranges=carm_views,
        ),
    }


class TrainingSettings(Section):
    """Pose-regressor training and finetuning (XVR.md, "Training a pose regressor")."""

    backbone: str = "resnet18"
    norm: Literal["group", "batch", "instance"] = "group"
    parameterization: Literal[
        "euler_angles", "quaternion", "rotation_6d", "quaternion_adjugate"
    ] = "quaternion_adjugate"
    convention: Annotated[str, AfterValidator(_euler_convention)] = "ZXY"
    orientation: Literal["AP", "PA"] = "PA"
    detector_size_px: PositiveInt = 128
    sdd_mm: Positive = 1020.0
    pixel_spacing_mm: Positive = 2.1764375
    batch_size: PositiveInt = 116
    lr: Positive = 2.0e-4
    finetune_lr: Positive = 5.0e-3
    warmup_iterations: NonNegativeInt = 1000
    finetune_warmup_iterations: NonNegativeInt = 50
    iterations: PositiveInt = 30000
    finetune_iterations: PositiveInt = 500
    gradient_accumulation: PositiveInt = 4
    gradient_clip: Positive = 0.01
    contrast_range: Range = (1.0, 10.0)
    augmentation_probability: Probability = 0.333
    min_foreground_fraction: Probability = 0.1
    w_ncc: Annotated[float, Field(ge=0)] = 1.0
    w_geo: Annotated[float, Field(ge=0)] = 0.01
    # Views rendered once and reused (0: every batch rendered afresh); each is shown about
    # bank_reuse times. Needs w_ncc 0 (see xvr_node/xvr/view_bank.py).
    bank_views: NonNegativeInt = 0
    bank_reuse: Positive = 16.0
    pose_ranges: PoseRanges = Field(default_factory=PoseRanges)
    checkpoint_every: PositiveInt = 500
    base_model: Path | None = None
    finetune_immediately_when_xray_waiting: bool = True
    finetune_immediately: bool = False
    # Per-device overrides, by device type (cpu, cuda): see TrainingProfile.
    profiles: dict[str, TrainingProfile] = Field(default_factory=_default_profiles)
    # Time budgets: an urgent finetune (an X-ray waits) trains this long at most; others
    # train until the overnight window closes, and do not start with less than
    # min_budget_minutes of it left.
    urgent_budget_minutes: Positive = 30.0
    min_budget_minutes: Positive = 10.0
    # Held-out validation: every validate_every iterations (0: never), the median pose error
    # on validation_views fixed views; validation_patience checks without a 1 % gain stop.
    validate_every: NonNegativeInt = 100
    validation_views: PositiveInt = 96
    validation_patience: PositiveInt = 5
    model_check: ModelCheckSettings = Field(default_factory=ModelCheckSettings)

    @field_validator("profiles", mode="before")
    @classmethod
    def _complete_profiles(cls, value: Any) -> Any:
        """Profiles given in part keep the built-in values of what they do not name
        (``profiles: {cpu: {lr: 0.01}}`` changes the CPU's learning rate, not its network,
        and keeps the GPU's profile). A key given as null means "the value above"; an empty
        mapping means no profiles at all."""
        if not isinstance(value, dict) or not value:
            return value
        defaults = _default_profiles()
        completed: dict[str, Any] = dict(defaults)
        for device, given in value.items():
            if isinstance(given, dict) and device in defaults:
                given = defaults[device].model_dump(exclude_unset=True) | given
            completed[device] = given
        return completed

    def for_device(self, device: str, finetune: bool = False) -> TrainingSettings:
        """These settings with the profile of ``device``'s type applied (``cuda:1`` → cuda)."""
        profile = self.profiles.get(str(device).split(":")[0])
        if profile is None:
            return self
        changes = {
            key: getattr(profile, key)  # sections stay models, not dicts
            for key in profile.model_dump(exclude_none=True)
            if not finetune or key in FINETUNE_PROFILE_KEYS
        }
        return self.model_copy(update=changes)


class FixedPose(Section):
    """The pose the ``fixed`` initializer starts from."""

    primary_deg: float = 0.0
    secondary_deg: float = 0.0
    inplane_deg: float = 0.0
    source_isocenter_mm: Positive = 750.0
    offsets_mm: Triple = (0.0, 0.0, 0.0)


class MultistartSearch(Section):
    """The local search multi-start adds around the positioner's and the model's start."""

    samples: NonNegativeInt = 32
    rotation_deg: Annotated[float, Field(ge=0, le=45)] = 15.0
    translation_mm: Annotated[float, Field(ge=0, le=200)] = 50.0
    keep: NonNegativeInt = 4
    iterations: NonNegativeInt = 30
    distinct_mm: Positive = 5.0


class QualityGate(Section):
    """Thresholds below which a result is marked unreliable (calibrated: docs/benchmarks.md)."""

    min_similarity: Annotated[float, Field(ge=-1, le=1)] = 0.72
    min_margin: Annotated[float, Field(ge=0, le=2)] = 0.0
    min_overlap: Probability = 0.6
    require_convergence: bool = False
    max_positioner_distance_mm: Annotated[float, Field(ge=0)] = 60.0
    threshold: Probability = 0.5


def _coarse_to_fine(value: list[float]) -> list[float]:
    if not value:
        raise ValueError("needs at least one scale")
    if any(a < b for a, b in itertools.pairwise(value)):
        raise ValueError(f"divisors must go coarse to fine (largest first), got {value}")
    return value


def _distinct(value: list[Any]) -> list[Any]:
    if not value:
        raise ValueError("needs at least one entry")
    if len(set(value)) != len(value):
        raise ValueError(f"lists an entry twice: {value}")
    return value


class RegistrationSettings(Section):
    """Registering one X-ray: initialise, then refine over detector scales (XVR.md)."""

    levels_px: Annotated[list[Annotated[int, Field(ge=8)]], AfterValidator(_growing)] = Field(
        default_factory=lambda: [32, 64, 128]
    )
    scales: (
        Annotated[list[Annotated[float, Field(ge=1)]], AfterValidator(_coarse_to_fine)] | None
    ) = None
    similarity: Literal["robust", "mncc_gncc"] = "robust"
    step_voxels: float = Field(default=2.0, gt=0, le=4)
    # When a patient's model becomes usable, their X-rays of the last this many hours whose
    # results were unreliable or did not start from a model are registered again.
    reregister_hours: Annotated[float, Field(ge=0)] = 24.0
    max_iterations_per_scale: PositiveInt = 500
    optimizer: Literal["adam", "lbfgs"] = "lbfgs"
    lbfgs_iterations: PositiveInt = 30
    lbfgs_tolerance: Annotated[float, Field(ge=0)] = 1.0e-6
    lbfgs_max_step: Positive = 10.0
    beta: Probability = 0.5
    lr_rotation: Positive = 1.0e-2
    lr_translation: Positive = 1.0
    lr_shrink: Annotated[float, Field(gt=0, le=1)] = 0.5
    plateau_factor: Annotated[float, Field(gt=0, lt=1)] = 0.1
    patience: PositiveInt = 10
    threshold: Annotated[float, Field(ge=0)] = 1.0e-4
    max_plateaus: PositiveInt = 2
    patch_size_ncc: PositiveInt = 9
    patch_size_gradncc: PositiveInt = 11
    initializers: Annotated[list[Literal["model", "dicom", "fixed"]], AfterValidator(_distinct)] = (
        Field(default_factory=lambda: ["model", "dicom", "fixed"])
    )
    multistart: bool = True
    multistart_search: MultistartSearch = Field(default_factory=MultistartSearch)
    quality: QualityGate = Field(default_factory=QualityGate)
    send_unreliable: bool = False
    fixed_pose: FixedPose = Field(default_factory=FixedPose)
    crop_px: NonNegativeInt = 0
    linearize: bool = True
    subtract_background: bool = False
    equalize: bool = False
    # The one way multi-frame X-rays are registered so far; kept so configurations name it.
    multiframe: Literal["track"] = "track"
    tracking_levels: NonNegativeInt = 1
    mask_labels: list[int] | None = None


# --- output and operation ------------------------------------------------------------------


class Destination(Section):
    """A PACS (or viewer) that receives our results by C-STORE."""

    name: Annotated[str, Field(min_length=1)]
    ae_title: AeTitle
    host: Annotated[str, Field(min_length=1)]
    port: Port = 104
    tls: bool = False


class CarmProfileSettings(Section):
    """Detector geometry of a device whose images lack SID or pixel spacing.

    Empty manufacturer/model/station match any value. Used only for what an image and the
    profile learned from the same device's earlier images both leave missing.
    """

    manufacturer: str = ""
    model_name: str = ""
    station_name: str = ""
    sid_mm: Positive | None = None
    pixel_spacing_mm: tuple[Positive, Positive] | None = None


class MonitoringSettings(Section):
    """``GET /healthz`` and Prometheus ``GET /metrics`` of ``serve``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 9118


class LoggingSettings(Section):
    """Log level, line format and target (stderr when ``file`` is null)."""

    level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_log_level)
    ] = "INFO"
    format: Literal["text", "json"] = "text"
    file: Path | None = None


def _unique_names(value: list[Destination]) -> list[Destination]:
    names = [destination.name for destination in value]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"destination names must be unique; repeated: {', '.join(twice)}")
    return value


class Settings(Section):
    """Everything xvr-node can be told; one instance per process, passed down explicitly."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    registration: RegistrationSettings = Field(default_factory=RegistrationSettings)
    destinations: Annotated[list[Destination], AfterValidator(_unique_names)] = Field(
        default_factory=list
    )
    carm_profiles: list[CarmProfileSettings] = Field(default_factory=list)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @property
    def storage_root(self) -> Path:
        """The storage root as an absolute path."""
        return self.storage.root.expanduser().absolute()

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL: ``database.url``, else the embedded server's under the root.

        The embedded server runs only while someone holds it (``catalog_server``).
        """
        if self.database.url is not None:
            return self.database.url
        from xvr_node.catalog.embedded import embedded_url

        return embedded_url(self.storage_root)

    @property
    def database_url_redacted(self) -> str:
        """``database_url`` fit for logs: any password replaced by ``***``."""
        return _redact_url(self.database_url)

    def ensure_storage_root(self) -> Path:
        """Create the storage root (and parents) if missing; return it."""
        root = self.storage_root
        root.mkdir(parents=True, exist_ok=True)
        return root


def _redact_url(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        # Unquoted for people: a socket folder reads /var/lib/..., not %2Fvar%2Flib%2F...
        return unquote(make_url(url).render_as_string(hide_password=True))
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


# --- loading -------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice (PyYAML silently keeps the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError([f"{path}: file not found"])
    if not path.is_file():
        raise ConfigError([f"{path}: not a file"])
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        reason = getattr(error, "problem", None) or str(error)
        raise ConfigError([f"{path}: invalid YAML{line}: {reason}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected sections (key: value) at the top level"])
    return data


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``| None`` down to the type that carries the structure."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _field_type(keys: tuple[str | int, ...]) -> Any:
    """The (unwrapped) annotation at ``keys`` below ``Settings``, or None when unknown."""
    current: Any = Settings
    for key in keys:
        if _is_model(current) and isinstance(key, str) and key in current.model_fields:
            current = _unwrap(current.model_fields[key].annotation)
        elif isinstance(key, int) and typing.get_origin(current) is list:
            current = _unwrap(typing.get_args(current)[0])
        else:
            return None
    return current


def _path_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple]:
    """Dotted keys (as tuples) of every Path or list-of-Path field below ``model``."""
    for name, field in model.model_fields.items():
        annotation = _unwrap(field.annotation)
        if annotation is Path or (
            typing.get_origin(annotation) is list
            and _unwrap(typing.get_args(annotation)[0]) is Path
        ):
            yield (*prefix, name)
        elif _is_model(annotation):
            yield from _path_fields(annotation, (*prefix, name))


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, str | Path) and str(value):
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else Path(os.path.normpath(base / path)))
    return value


def _resolve_file_paths(data: dict[str, Any], base: Path) -> None:
    """Make the relative paths written in the file relative to the file's folder."""
    for keys in _path_fields(Settings):
        parent: Any = data
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or keys[-1] not in parent:
            continue
        value = parent[keys[-1]]
        if isinstance(value, list):
            parent[keys[-1]] = [_absolute(item, base) for item in value]
        else:
            parent[keys[-1]] = _absolute(value, base)


def _resolve_remaining_paths(model: BaseModel, base: Path) -> None:
    """Anchor what is still relative (defaults, environment) at the working directory."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path):
            setattr(model, name, Path(_absolute(value, base)))
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            setattr(model, name, [Path(_absolute(v, base)) for v in value])
        elif isinstance(value, BaseModel):
            _resolve_remaining_paths(value, base)


def _is_text(annotation: Any) -> bool:
    return annotation in (str, Path) or (
        typing.get_origin(annotation) is Literal
        and all(isinstance(arg, str) for arg in typing.get_args(annotation))
    )


def _apply_environment(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[tuple[str, ...], str], list[str]]:
    """Merge ``XVR_NODE__A__B=value`` into ``data``; return {keys: variable} and problems."""
    origins: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    # Shorter names first, so XVR_NODE__NODE='{...}' cannot undo XVR_NODE__NODE__PORT.
    names = sorted((n for n in environ if n.startswith(ENV_PREFIX)), key=lambda n: (len(n), n))
    for name in names:
        keys = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        if not all(keys):
            problems.append(f"{name}: malformed variable name (expected XVR_NODE__SECTION__KEY)")
            continue
        raw = environ[name]
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        target = _field_type(keys)
        nullish = raw.strip() in ("", "~", "null", "Null", "NULL")
        if _is_text(target) and not isinstance(value, str) and not nullish:
            value = raw  # "XVR_NODE__NODE__AE_TITLE=NO" is the AE title NO, not false
        parent = data
        for depth, key in enumerate(keys[:-1]):
            child = parent.setdefault(key, {})
            if not isinstance(child, dict):
                dotted = ".".join(keys[: depth + 1])
                problems.append(f"{dotted}: is not a section, so {name} cannot set a key in it")
                break
            parent = child
        else:
            _merge(parent, keys[-1], value)
            origins[keys] = name
    return origins, problems


def _merge(parent: dict[str, Any], key: str, value: Any) -> None:
    """Set ``parent[key]``; a mapping is merged into a mapping already there, key by key.

    An empty mapping replaces it: ``XVR_NODE__TRAINING__PROFILES={}`` means no profiles,
    not "no change" to the file's.
    """
    current = parent.get(key)
    if isinstance(value, dict) and value and isinstance(current, dict):
        for child_key, child_value in value.items():
            _merge(current, child_key, child_value)
    else:
        parent[key] = value


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dotted(keys: tuple[str | int, ...]) -> str:
    text = ""
    for key in keys:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else key)
    return text or "(top level)"


def _clean_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Drop pydantic's union/validator tags so only real keys and list indices remain."""
    kept: list[str | int] = []
    current: Any = Settings
    for key in loc:
        if _is_model(current) and isinstance(key, str):
            kept.append(key)
            field = current.model_fields.get(key)
            current = _unwrap(field.annotation) if field else None
        elif isinstance(key, int) and typing.get_origin(current) in (list, tuple):
            kept.append(key)
            args = typing.get_args(current)
            current = _unwrap(args[0]) if args else None
        elif current is None or isinstance(key, int):
            kept.append(key)
    return tuple(kept)


def _message(error: dict[str, Any], keys: tuple[str | int, ...]) -> str:
    kind, given, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _field_type(keys[:-1])
        known = list(parent.model_fields) if _is_model(parent) else []
        close = difflib.get_close_matches(str(keys[-1]), known, n=1, cutoff=0.6)
        if close:
            return f"unknown key (did you mean {close[0]!r}?)"
        return "unknown key" + (f" (known keys: {', '.join(known)})" if known else "")
    simple = {
        "int_parsing": "expected a whole number",
        "int_from_float": "expected a whole number",
        "int_type": "expected a whole number",
        "float_parsing": "expected a number",
        "float_type": "expected a number",
        "bool_parsing": "expected true or false",
        "bool_type": "expected true or false",
        "string_type": "expected text",
        "path_type": "expected a path",
        "list_type": "expected a list",
        "tuple_type": "expected a list",
        "dict_type": "expected a section of keys",
        "model_type": "expected a section of keys",
        "model_attributes_type": "expected a section of keys",
    }
    if kind in simple:
        return f"{simple[kind]}, got {_describe(given)}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {_describe(given)}"
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("greater than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)}, got {_describe(given)}"
    if kind == "missing":
        return "required key is missing"
    if kind in ("too_short", "string_too_short") and not given:
        return "must not be empty"
    message = str(error.get("msg", kind))
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _problems(error: ValidationError, origins: dict[tuple[str, ...], str]) -> list[str]:
    problems: list[str] = []
    for item in error.errors():
        keys = _clean_loc(tuple(item["loc"]))
        line = f"{_dotted(keys)}: {_message(item, keys)}"
        # The variable that set this key, a section above it, or a key below it.
        names = [
            name for k, name in origins.items() if k == keys[: len(k)] or keys == k[: len(keys)]
        ]
        if names:
            line += f" (set by {', '.join(sorted(names))})"
        if line not in problems:
            problems.append(line)
    return problems


def _choose_file(path: Path | None) -> Path | None:
    if path is not None:
        return Path(path)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def _merged_input(
    path: Path | None, environ: Mapping[str, str] | None
) -> tuple[dict[str, Any], dict[tuple[str, ...], str], list[str]]:
    """The raw mapping to validate: file (paths anchored at its folder) + environment."""
    chosen = _choose_file(path)
    data: dict[str, Any] = {}
    if chosen is not None:
        data = _read_file(chosen)
        _resolve_file_paths(data, chosen.expanduser().absolute().parent)
    origins, problems = _apply_environment(data, os.environ if environ is None else environ)
    return data, origins, problems


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load, apply the environment, validate; ``ConfigError`` lists every problem."""
    data, origins, problems = _merged_input(path, environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as error:
        raise ConfigError(problems + _problems(error, origins)) from None
    if problems:
        raise ConfigError(problems)
    _resolve_remaining_paths(settings, Path.cwd())
    return settings


# --- checks that touch the filesystem ------------------------------------------------------


def _folder_problem(key: str, folder: Path) -> str | None:
    """Why ``folder`` could not be used (or created) as a writable folder, or None."""
    if folder.exists():
        if not folder.is_dir():
            return f"{key}: {folder} exists and is not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{key}: folder {folder} is not writable"
        return None
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{key}: cannot create {folder}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{key}: parent folder {parent} is not writable, so {folder} cannot be created"
    return None


def _readable_file_problem(key: str, path: Path) -> str | None:
    if not path.is_file():
        return f"{key}: file not found: {path}"
    if not os.access(path, os.R_OK):
        return f"{key}: file not readable: {path}"
    return None


def _tls_problems(tls: TlsSettings) -> list[str]:
    if not tls.enabled:
        return []
    problems = [
        problem
        for key, path in [
            ("node.tls.certificate", tls.certificate),
            ("node.tls.private_key", tls.private_key),
            *((f"node.tls.ca_certificates[{i}]", p) for i, p in enumerate(tls.ca_certificates)),
        ]
        if path is not None and (problem := _readable_file_problem(key, path))
    ]
    if problems or tls.certificate is None or tls.private_key is None:
        return problems
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
    except (ssl.SSLError, OSError) as error:
        problems.append(f"node.tls.certificate: cannot load with node.tls.private_key: {error}")
    for index, path in enumerate(tls.ca_certificates):
        try:
            context.load_verify_locations(cafile=path)
        except (ssl.SSLError, OSError) as error:
            problems.append(f"node.tls.ca_certificates[{index}]: cannot load: {error}")
    return problems


def _database_problems(settings: Settings) -> list[str]:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = make_url(settings.database_url)
    try:
        url.get_dialect().import_dbapi()
    except (ArgumentError, ValueError):
        return [f"database.url: unknown driver {url.drivername!r}"]
    except ImportError as error:
        return [f"database.url: the driver for {url.drivername!r} is not installed ({error})"]
    if settings.database.url is None:
        from xvr_node.catalog.embedded import EmbeddedPostgresError, binaries

        try:
            binaries()
        except EmbeddedPostgresError as error:
            return [f"database.url: unset, and {error}"]
    return []


def check_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every problem with the configuration, including the filesystem; [] when usable."""
    try:
        settings = load_settings(path, environ)
    except ConfigError as error:
        return error.problems
    try:
        return _filesystem_problems(settings)
    except OSError as error:
        return [f"{error.filename or 'configuration'}: cannot be checked: {error.strerror}"]


def _filesystem_problems(settings: Settings) -> list[str]:
    problems: list[str] = []
    if problem := _folder_problem("storage.root", settings.storage_root):
        problems.append(problem)
    problems += _tls_problems(settings.node.tls)
    problems += _database_problems(settings)
    base_model = settings.training.base_model
    if base_model and (problem := _readable_file_problem("training.base_model", base_model)):
        problems.append(problem)
    log_file = settings.logging.file
    if log_file is not None:
        if log_file.is_dir():
            problems.append(f"logging.file: {log_file} is a folder")
        elif problem := _folder_problem("logging.file", log_file.parent):
            problems.append(problem)
    return problems
