"""From a linked X-ray instance to registration rows: the body of a register job."""

from __future__ import annotations

import logging

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from xvr_node.catalog.models import Initializer, Instance, Registration, Usability, Volume
from xvr_node.ct_volume import CtVolume
from xvr_node.dicom.storage import FileStore
from xvr_node.geometry import reverse_x_axis_for
from xvr_node.xvr.register import RefineSettings, Registrar
from xvr_node.xvr.xray import read_xray_frames

LOG = logging.getLogger(__name__)


class Registrars:
    """One registrar per CT volume, kept while the process runs (renderers are costly)."""

    def __init__(
        self,
        store: FileStore,
        settings: RefineSettings,
        orientation: str = "PA",
        device: str = "cpu",
    ) -> None:
        self.store = store
        self.settings = settings
        self.orientation = orientation
        self.device = device
        self._by_volume: dict[int, Registrar] = {}

    def for_volume(self, volume: Volume) -> Registrar:
        if volume.id not in self._by_volume:
            ct = CtVolume.from_nifti(self.store.absolute(volume.path))
            self._by_volume[volume.id] = Registrar(ct, self.settings, self.orientation, self.device)
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


def register_instance(
    session: Session, registrars: Registrars, instance_id: int, fallback_pose: dict | None = None
) -> list[Registration]:
    """Register every frame of a usable, linked X-ray; cine frames are tracked.

    The start is the C-arm's positioner reading; without one, ``fallback_pose`` (the
    configured fixed pose: primary_deg, secondary_deg, source_isocenter_mm) is used.
    """
    instance = session.get(Instance, instance_id)
    if instance is None or instance.usability != Usability.USABLE:
        raise ValueError(f"instance {instance_id} is not a usable, linked X-ray")
    volume = instance.linked_volume
    registrar = registrars.for_volume(volume)
    geometry = instance.geometry or {}
    spacing = geometry.get("pixel_spacing_mm")
    frames = read_xray_frames(
        registrars.store.absolute(instance.path),
        sid_mm=geometry.get("sid_mm"),
        pixel_spacing_mm=None if spacing is None else tuple(spacing),
    )
    rows: list[Registration] = []
    previous: np.ndarray | None = None
    for index, frame in enumerate(frames):
        if previous is not None:
            start, initializer = previous, Initializer.TRACKING
        elif frame.carm is not None:
            start, initializer = registrar.dicom_pose(frame), Initializer.DICOM
        else:
            pose = fallback_pose or {}
            start = registrar.fixed_pose(
                frame,
                pose.get("primary_deg", 0.0),
                pose.get("secondary_deg", 0.0),
                pose.get("source_isocenter_mm", 750.0),
            )
            initializer = Initializer.FIXED
        outcome = registrar.register(frame, start)
        previous = outcome.final_matrix
        row = Registration(
            instance_id=instance.id,
            frame_index=index if len(frames) > 1 else None,
            volume_id=volume.id,
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
        )
        session.add(row)
        session.flush()
        _supersede_earlier(session, row)
        rows.append(row)
        LOG.info(
            "registered",
            extra={
                "event": "registered",
                "instance": instance.id,
                "frame": index,
                "initializer": str(initializer),
                "similarity": round(outcome.similarity, 4),
                "seconds": round(outcome.wall_time_s, 1),
            },
        )
    session.commit()
    return rows
