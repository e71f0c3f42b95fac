"""Linking an X-ray to a patient's CT by hand, when its own header cannot (no Patient ID)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from xvr_node.catalog.models import Instance, Job, Patient, Usability, Volume, VolumeState
from xvr_node.dicom.receive import newest_usable_volume
from xvr_node.jobs.triggers import queue_register
from xvr_node.xray_geometry import XrayGeometry


class LinkError(ValueError):
    """The link cannot be made; the message says why in one line."""


@dataclass(frozen=True)
class LinkOutcome:
    """What was linked to what, and the register job queued for it."""

    instance: Instance
    volume: Volume
    job: Job
    previous_reason: str | None


def link_xray(
    session: Session,
    xray: str,
    *,
    patient_id: str | None = None,
    issuer: str = "",
    volume_id: int | None = None,
) -> LinkOutcome:
    """Link an X-ray (SOP Instance UID or catalog id) to a CT volume and queue its register job.

    The volume is ``volume_id``, or the newest usable volume of the patient ``patient_id``
    (with ``issuer``). The register job is queued exactly as when the pipeline links an X-ray
    itself (:func:`queue_register`); the caller commits.
    """
    instance = _find_instance(session, xray)
    if instance.usability == Usability.NOT_XRAY:
        raise LinkError(f"instance {xray} is not an X-ray (SOP Class {instance.sop_class_uid})")
    if instance.geometry is None:
        raise LinkError(
            f"X-ray {xray} has no readable geometry: {instance.unusable_reason or 'unknown'}"
        )
    geometry = XrayGeometry.from_json(instance.geometry)
    if not geometry.usable():
        raise LinkError(
            f"X-ray {xray} cannot be registered: missing {geometry.explain_missing()}; "
            "add a carm_profiles entry and import it again"
        )
    volume = _find_volume(session, patient_id, issuer, volume_id)
    previous = instance.unusable_reason
    instance.linked_volume = volume
    instance.usability = Usability.USABLE
    instance.unusable_reason = None
    session.flush()
    job = queue_register(session, instance.id)
    return LinkOutcome(instance, volume, job, previous)


def _find_instance(session: Session, xray: str) -> Instance:
    """The newest version of a SOP Instance UID, or the row with that catalog id."""
    query = select(Instance).order_by(Instance.version.desc())
    if xray.isdigit():
        instance = session.get(Instance, int(xray))
        if instance is not None:
            return instance
    instance = session.scalars(query.where(Instance.sop_instance_uid == xray)).first()
    if instance is None:
        raise LinkError(f"no instance {xray!r} in the catalog (give a SOP Instance UID or an id)")
    return instance


def _find_volume(
    session: Session, patient_id: str | None, issuer: str, volume_id: int | None
) -> Volume:
    if (patient_id is None) == (volume_id is None):
        raise LinkError("give exactly one of --patient-id or --volume")
    if volume_id is not None:
        volume = session.get(Volume, volume_id)
        if volume is None:
            raise LinkError(f"no volume {volume_id} in the catalog")
        if volume.state != VolumeState.USABLE:
            raise LinkError(f"volume {volume_id} is {volume.state}: {volume.refusal_reason}")
        return volume
    patient = session.scalars(
        select(Patient).where(
            Patient.patient_id == patient_id, Patient.issuer_of_patient_id == issuer
        )
    ).first()
    who = f"{patient_id!r}" + (f" (issuer {issuer!r})" if issuer else "")
    if patient is None:
        raise LinkError(f"no patient {who} in the catalog")
    volume = newest_usable_volume(session, patient.id)
    if volume is None:
        raise LinkError(f"patient {who} has no usable CT volume yet; link once it is assembled")
    return volume
