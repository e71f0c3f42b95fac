"""From a linked X-ray instance to registration rows: the body of a register job."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from xvr_node import __version__
from xvr_node.catalog.models import Initializer, Instance, Registration, Usability, Volume
from xvr_node.config import RegistrationSettings
from xvr_node.ct_volume import CtVolume
from xvr_node.dicom.storage import FileStore
from xvr_node.geometry import reverse_x_axis_for
from xvr_node.xvr.initialize import ModelInitializer
from xvr_node.xvr.multistart import SearchSettings, StartChoice, choose_start
from xvr_node.xvr.quality import GateSettings, assess
from xvr_node.xvr.register import Outcome, RefineSettings, Registrar
from xvr_node.xvr.run import FixedStart, initial_matrix
from xvr_node.xvr.xray import XrayFrame, read_xray_frames

LOG = logging.getLogger(__name__)


#: Registrars (each holds a CT and its pyramids) a worker keeps; the least recently used
#: goes first, so a worker's memory follows the patients in flight, not all it has seen.
KEEP_REGISTRARS = 3


class Registrars:
    """One registrar per CT volume, the ``keep`` most recently used kept (they are costly
    to build: CT read, pyramids)."""

    def __init__(
        self,
        store: FileStore,
        settings: RefineSettings,
        orientation: str = "PA",
        device: str = "cpu",
        labels: list[int] | None = None,
        keep: int = KEEP_REGISTRARS,
    ) -> None:
        self.store = store
        self.keep = keep
        self.settings = settings
        self.orientation = orientation
        self.device = device
        self.labels = labels
        self._by_volume: OrderedDict[int, Registrar] = OrderedDict()
        self._lock = threading.Lock()

    def for_volume(self, volume: Volume) -> Registrar:
        with self._lock:
            if volume.id in self._by_volume:
                self._by_volume.move_to_end(volume.id)
            else:
                ct = CtVolume.from_nifti(self.store.absolute(volume.path))
                self._by_volume[volume.id] = Registrar(
                    ct, self.settings, self.orientation, self.device, labels=self.labels
                )
                while len(self._by_volume) > self.keep:
                    self._by_volume.popitem(last=False)
            return self._by_volume[volume.id]


def _supersede_earlier(session: Session, row: Registration) -> None:
    """A frame registered again (say with a newer model): earlier results give way to it.

    Their DICOM objects stay in PACS as sent; the catalog says which result is current.
    """
    earlier = session.scalars(
        select(Registration).where(
            Registration.instance_id == row.instance_id,
            Registration.frame_index.is_(None)
            if row.frame_index is None
            else Registration.frame_index == row.frame_index,
            Registration.id != row.id,
            Registration.superseded_by_id.is_(None),
        )
    ).all()
    for previous in earlier:
        previous.superseded_by_id = row.id


@dataclass
class StartPolicy:
    """Where a frame's pose search starts (XVR.md "Initialise"; config ``registration``).

    ``order`` is tried first to last — the patient's model, the C-arm's positioner angles,
    the configured fixed pose — and the first that applies wins; with ``multistart`` every
    applicable start is scored on the X-ray and the best one is refined. Later frames of a
    cine run start from the previous frame's result (tracking).
    """

    order: Sequence[str] = ("model", "dicom", "fixed")
    fixed: FixedStart = field(default_factory=FixedStart)
    model: ModelInitializer | None = None
    model_id: int | None = None
    multistart: bool = False
    search: SearchSettings = field(default_factory=SearchSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    tracking_levels: int = 1

    @classmethod
    def from_settings(
        cls,
        registration: RegistrationSettings,
        model: ModelInitializer | None = None,
        model_id: int | None = None,
    ) -> StartPolicy:
        pose = registration.fixed_pose
        fixed = FixedStart(
            pose.primary_deg,
            pose.secondary_deg,
            pose.source_isocenter_mm,
            tuple(pose.offsets_mm),
            pose.inplane_deg,
        )
        order = tuple(registration.initializers)
        search = SearchSettings(**registration.multistart_search.model_dump())
        gate = GateSettings(**registration.quality.model_dump())
        return cls(
            order,
            fixed,
            model,
            model_id,
            registration.multistart,
            search,
            gate,
            registration.tracking_levels,
        )

    def choose(self, registrar: Registrar, frame: XrayFrame) -> StartChoice:
        """The start to refine: with multi-start, the best after a short coarse refinement."""
        candidates: dict[str, np.ndarray] = {}
        for name in self.order:
            try:
                if name == "model" and self.model is not None:
                    candidates[name] = self.model.matrix_for(frame, registrar.volume)
                elif name == "dicom" and frame.carm is not None:
                    candidates[name] = registrar.dicom_pose(frame)
                elif name == "fixed":
                    candidates[name] = initial_matrix(registrar, frame, "fixed", self.fixed)
            except ValueError as error:  # e.g. the X-ray covers too little of the model's view
                LOG.warning("%s: %s start skipped: %s", frame.name, name, error)
        if not candidates:
            raise ValueError(f"{frame.name}: none of the initializers {list(self.order)} applies")
        if self.multistart:
            return choose_start(registrar, frame, candidates, self.search)
        name = next(iter(candidates))
        return StartChoice(name, candidates[name], float("nan"), None, refined_levels=0)

    def track(
        self,
        registrar: Registrar,
        frame: XrayFrame,
        previous_frame: XrayFrame,
        previous_matrix: np.ndarray,
    ) -> StartChoice:
        """A cine frame's start (:meth:`Registrar.tracked_pose`), refined at the
        ``tracking_levels`` finest levels only: it starts close, the coarse ones cost time."""
        matrix = registrar.tracked_pose(frame, previous_frame, previous_matrix)
        levels = len(registrar.settings.scales_for(frame.intrinsics))
        skipped = 0 if self.tracking_levels == 0 else max(0, levels - self.tracking_levels)
        return StartChoice(Initializer.TRACKING, matrix, float("nan"), None, skipped)


def register_instance(
    session: Session,
    registrars: Registrars,
    instance_id: int,
    policy: StartPolicy | None = None,
    job_id: int | None = None,
) -> list[Registration]:
    """Register every frame of a usable, linked X-ray; cine frames are tracked.

    Each row keeps what reproduces it (start, intrinsics, conventions, model) and how long
    each step took: ``metrics["timings"]`` = read, initialise and refine seconds.
    """
    policy = policy or StartPolicy()
    instance = session.get(Instance, instance_id)
    if instance is None or instance.usability != Usability.USABLE:
        raise ValueError(f"instance {instance_id} is not a usable, linked X-ray")
    volume = instance.linked_volume
    registrar = registrars.for_volume(volume)
    geometry = instance.geometry or {}
    spacing = geometry.get("pixel_spacing_mm")
    began = time.perf_counter()
    frames = read_xray_frames(
        registrars.store.absolute(instance.path),
        sid_mm=geometry.get("sid_mm"),
        pixel_spacing_mm=None if spacing is None else tuple(spacing),
    )
    read_s = (time.perf_counter() - began) / len(frames)
    rows: list[Registration] = []
    previous: Outcome | None = None
    for index, frame in enumerate(frames):
        began = time.perf_counter()
        if previous is not None:
            choice = policy.track(registrar, frame, frames[index - 1], previous.final_matrix)
            initializer = Initializer.TRACKING
        else:
            choice = policy.choose(registrar, frame)
            initializer = Initializer.MULTISTART if policy.multistart else choice.name
        initialise_s = time.perf_counter() - began
        outcome = registrar.register(
            frame, choice.matrix, first_level=choice.refined_levels, warm=previous
        )
        refined_s = time.perf_counter() - began - initialise_s
        verdict = assess(registrar, frame, outcome, choice.margin, policy.gate)
        previous = outcome
        scores = choice.summary() if choice.candidates else {}
        used_model = choice.name.startswith(Initializer.MODEL)
        row = Registration(
            instance_id=instance.id,
            frame_index=index if len(frames) > 1 else None,
            volume_id=volume.id,
            model_id=policy.model_id if used_model else None,
            job_id=job_id,
            initializer=initializer,
            initial_matrix=outcome.initial_matrix.tolist(),
            final_matrix=outcome.final_matrix.tolist(),
            intrinsics=frame.intrinsics.to_json(),
            conventions={
                "orientation": registrar.orientation,
                "reverse_x_axis": reverse_x_axis_for(registrar.orientation),
                "matrix": "image-plane mm -> CT LPS mm",
            },
            similarity=outcome.similarity,
            iterations=outcome.iterations,
            wall_time_s=outcome.wall_time_s,
            reliable=verdict.reliable,
            confidence=verdict.confidence,
            metrics={
                "timings": {
                    "read_s": round(read_s, 4),
                    "initialise_s": round(initialise_s, 4),
                    "refine_s": round(outcome.wall_time_s, 4),
                    "gate_s": round(time.perf_counter() - began - initialise_s - refined_s, 4),
                },
                "start_scores": scores,
                "quality": verdict.to_json(),
                "field_of_view": {
                    "sources": list(frame.field_sources),
                    "open_fraction": round(float(frame.open_field().mean()), 4),
                },
                # With the start matrix, intrinsics and CT volume: enough to run it again.
                "refine": {
                    key: list(value) if isinstance(value, tuple) else value
                    for key, value in asdict(registrar.settings).items()
                },
                "software_version": __version__,
            },
        )
        session.add(row)
        session.flush()
        _supersede_earlier(session, row)
        # One commit per frame: no transaction is held open across a refinement.
        session.commit()
        rows.append(row)
        LOG.info(
            "registered",
            extra={
                "event": "registered",
                "instance": instance.id,
                "frame": index,
                "initializer": str(initializer),
                "similarity": round(outcome.similarity, 4),
                "reliable": verdict.reliable,
                "confidence": round(verdict.confidence, 3),
                "seconds": round(outcome.wall_time_s, 1),
            },
        )
    return rows
