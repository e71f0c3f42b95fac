"""``xvr-node status``: where every patient stands, from the catalog alone."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from xvr_node.catalog.models import (
    Instance,
    Job,
    JobKind,
    ModelState,
    Patient,
    PoseModel,
    Registration,
    Series,
    Study,
    Usability,
    Volume,
)
from xvr_node.dicom.receive import CT_SOP_CLASSES
from xvr_node.xray_geometry import XrayGeometry


def _training_progress(session: Session, model: PoseModel) -> dict | None:
    """The running finetune's last progress record for a model in training, if any."""
    if model.state != ModelState.TRAINING:
        return None
    jobs = session.scalars(
        select(Job).where(Job.kind == JobKind.FINETUNE, Job.progress.is_not(None))
    ).all()
    for job in jobs:
        if (job.payload or {}).get("model_id") == model.id:
            return job.progress
    return None


def describe_model(model: dict) -> str:
    """One line: state, held-out figures and whether the model is used, or its progress."""
    text = str(model["state"])
    progress = model.get("training")
    if progress:
        eta = progress.get("eta_s")
        text += f", iteration {progress['iteration']} of {progress['total']}"
        if eta is not None:
            text += f", about {eta / 60:.0f} min left"
        if progress.get("validation_mm") is not None:
            text += f", held-out pose error {progress['validation_mm']:.1f} mm"
    figures = model.get("validation")
    if figures:
        if "error" in figures:
            text += f"; check failed ({figures['error']})"
        else:
            first = figures.get("initial_mtre_median_mm")
            text += (
                f"; held-out X-rays: first pose {'-' if first is None else f'{first:.1f}'} mm"
                f" (median), {figures['refined_under_2mm']:.0%} under 2 mm refined"
            )
        text += "; used" if model.get("validated") else "; NOT used (below the bar)"
    elif model["state"] == "ready":
        text += "; not validated, NOT used"
    return text


def collect_status(session: Session) -> dict:
    """Per patient: CT series and volumes, X-rays by usability (with reasons), models, jobs."""
    patients = []
    for patient in session.scalars(select(Patient).order_by(Patient.id)):
        series_rows = session.scalars(
            select(Series).join(Study).where(Study.patient_id == patient.id).order_by(Series.id)
        ).all()
        ct_series = [
            {
                "series_instance_uid": s.series_instance_uid,
                "instances": s.instance_count,
                "state": s.state,
            }
            for s in series_rows
            if s.sop_class_uid in CT_SOP_CLASSES
        ]
        volumes = [
            {"id": v.id, "state": v.state, "shape": v.shape, "reason": v.refusal_reason}
            for v in session.scalars(
                select(Volume).where(Volume.patient_id == patient.id).order_by(Volume.id)
            )
        ]
        xrays = session.scalars(
            select(Instance)
            .join(Series)
            .join(Study)
            .where(Study.patient_id == patient.id, Instance.usability != Usability.NOT_XRAY)
        ).all()
        counts = Counter(x.usability for x in xrays)
        unusable = [
            {"sop_instance_uid": x.sop_instance_uid, "reason": x.unusable_reason}
            for x in xrays
            if x.usability == Usability.UNUSABLE
        ]
        verdicts = Counter(
            session.scalars(
                select(Registration.reliable)
                .join(Instance, Registration.instance_id == Instance.id)
                .join(Series)
                .join(Study)
                .where(Study.patient_id == patient.id, Registration.superseded_by_id.is_(None))
            ).all()
        )
        # An estimated pixel spacing scales every result: say so wherever X-rays are listed.
        estimated = [
            {
                "sop_instance_uid": x.sop_instance_uid,
                "spacing": XrayGeometry.from_json(x.geometry).describe_spacing(),
            }
            for x in xrays
            if x.geometry and x.geometry.get("pixel_spacing_estimated")
        ]
        models = [
            {
                "id": m.id,
                "version": m.version,
                "state": m.state,
                "validated": m.validated,
                "validation": m.validation,
                "training": _training_progress(session, m),
            }
            for m in session.scalars(select(PoseModel).where(PoseModel.patient_id == patient.id))
        ]
        patients.append(
            {
                "patient_id": patient.patient_id,
                "issuer": patient.issuer_of_patient_id,
                "ct_series": ct_series,
                "volumes": volumes,
                "xrays": {
                    "usable": counts.get(Usability.USABLE, 0),
                    "waiting": counts.get(Usability.WAITING, 0),
                    "unusable": counts.get(Usability.UNUSABLE, 0),
                    "unusable_reasons": unusable,
                    "estimated_spacing": estimated,
                },
                "registrations": {
                    "reliable": verdicts.get(True, 0),
                    "unreliable": verdicts.get(False, 0),
                    "unassessed": verdicts.get(None, 0),
                },
                "models": models,
            }
        )
    jobs = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    totals = {
        "patients": len(patients),
        "instances": session.scalar(select(func.count(Instance.id))) or 0,
        "volumes": session.scalar(select(func.count(Volume.id))) or 0,
        "jobs": jobs,
    }
    return {"patients": patients, "totals": totals}


def format_status(report: dict) -> str:
    """The report as lines a person reads at a terminal (no patient names exist to show)."""
    lines = []
    for patient in report["patients"]:
        issuer = f" ({patient['issuer']})" if patient["issuer"] else ""
        lines.append(f"patient {patient['patient_id'] or '(no Patient ID)'}{issuer}")
        for series in patient["ct_series"]:
            lines.append(
                f"  CT series {series['series_instance_uid']}: "
                f"{series['instances']} instances, {series['state']}"
            )
        for volume in patient["volumes"]:
            detail = "x".join(map(str, volume["shape"])) if volume["shape"] else volume["reason"]
            lines.append(f"  volume {volume['id']}: {volume['state']} ({detail})")
        xrays = patient["xrays"]
        lines.append(
            f"  X-rays: {xrays['usable']} usable, {xrays['waiting']} waiting, "
            f"{xrays['unusable']} unusable"
        )
        for item in xrays["unusable_reasons"]:
            lines.append(f"    {item['sop_instance_uid']}: {item['reason']}")
        done = patient["registrations"]
        if any(done.values()):
            unassessed = f", {done['unassessed']} unassessed" if done["unassessed"] else ""
            lines.append(
                f"  registered frames: {done['reliable']} reliable, "
                f"{done['unreliable']} NOT reliable{unassessed}"
            )
        for item in xrays.get("estimated_spacing", []):
            lines.append(f"    {item['sop_instance_uid']}: {item['spacing']}")
        for model in patient["models"]:
            lines.append(f"  model v{model['version']}: {describe_model(model)}")
    totals = report["totals"]
    jobs = ", ".join(f"{count} {status}" for status, count in sorted(totals["jobs"].items()))
    lines.append(
        f"total: {totals['patients']} patient(s), {totals['instances']} instance(s), "
        f"{totals['volumes']} volume(s); jobs: {jobs or 'none'}"
    )
    return "\n".join(lines)
