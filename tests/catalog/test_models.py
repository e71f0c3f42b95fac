"""Constraints, cascades, relationships and the linking query, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from xvr_node.catalog.models import (
    Export,
    ExportKind,
    Initializer,
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
    VolumeState,
)

IDENTITY = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0, 0, 0, 1.0]]


def make_instance(series: Series, uid: str = "1.2.3.4.1", version: int = 1) -> Instance:
    return Instance(
        series=series,
        sop_instance_uid=uid,
        sop_class_uid=series.sop_class_uid,
        version=version,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"store/{uid}.v{version}.dcm",
        size_bytes=1234,
        sha256="0" * 64,
        usability=Usability.NOT_XRAY,
    )


def make_volume(series: Series, created_at: datetime, state: str = VolumeState.USABLE) -> Volume:
    return Volume(
        series=series,
        patient=series.study.patient,
        path=f"volumes/{series.id}-{created_at:%H%M%S}.nii.gz",
        shape=[64, 64, 32],
        spacing=[1.5, 1.5, 2.0],
        affine=IDENTITY,
        state=state,
        refusal_reason="gap between slices" if state == VolumeState.REFUSED else None,
        created_at=created_at,
    )


def make_registration(instance: Instance, volume: Volume) -> Registration:
    return Registration(
        instance=instance,
        volume=volume,
        initializer=Initializer.MODEL,
        final_matrix=IDENTITY,
        intrinsics={"sid_mm": 1020.0, "pixel_spacing": [0.3, 0.3], "size": [128, 128]},
        conventions={"matrix": "image-plane mm -> CT LPS"},
        similarity=0.93,
    )


def count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model))


def test_a_duplicate_instance_version_is_refused(session: Session, ct_series: Series) -> None:
    session.add_all([make_instance(ct_series), make_instance(ct_series, version=2)])
    session.commit()

    session.add(make_instance(ct_series, version=2))
    with pytest.raises(IntegrityError):
        session.commit()


def test_a_duplicate_patient_is_refused_but_another_issuer_is_not(session: Session) -> None:
    session.add_all([Patient(patient_id="P1"), Patient(patient_id="P1", issuer_of_patient_id="H2")])
    session.commit()

    session.add(Patient(patient_id="P1"))
    with pytest.raises(IntegrityError):
        session.commit()


@pytest.mark.parametrize("values", [{"kind": JobKind.NOOP, "status": "paused"}, {"kind": "defrag"}])
def test_an_unknown_job_status_or_kind_is_refused(session: Session, values: dict) -> None:
    session.add(Job(**values))
    with pytest.raises(IntegrityError):
        session.commit()


def test_a_dedupe_key_is_queued_once(session: Session) -> None:
    session.add(Job(kind=JobKind.ASSEMBLE, dedupe_key="assemble:series:42"))
    session.commit()

    session.add(Job(kind=JobKind.ASSEMBLE, dedupe_key="assemble:series:42"))
    with pytest.raises(IntegrityError):
        session.commit()


def test_enum_members_are_stored_as_their_values(session: Session) -> None:
    session.add(Job(kind=JobKind.REGISTER, priority=100))
    session.commit()

    row = session.execute(text("SELECT kind, status FROM jobs")).one()
    assert tuple(row) == ("register", "queued")


def test_foreign_keys_are_enforced(session: Session) -> None:
    session.add(Study(patient_id=999, study_instance_uid="1.2.3"))
    with pytest.raises(IntegrityError):
        session.commit()


def test_deleting_a_patient_cascades_to_everything_derived(
    session: Session, ct_series: Series
) -> None:
    instance = make_instance(ct_series)
    volume = make_volume(ct_series, datetime(2025, 1, 1, tzinfo=UTC))
    session.add(make_registration(instance, volume))
    session.add(PoseModel(patient=ct_series.study.patient, volume=volume, state=ModelState.READY))
    session.commit()

    # A bulk delete: the database's ON DELETE rules do the work, not the ORM.
    session.execute(delete(Patient))
    session.commit()

    for table in (Study, Series, Instance, Volume, Registration, PoseModel):
        assert count(session, table) == 0, table.__tablename__


def test_an_unsent_export_keeps_its_registration(session: Session, ct_series: Series) -> None:
    registration = make_registration(
        make_instance(ct_series), make_volume(ct_series, datetime(2025, 1, 1, tzinfo=UTC))
    )
    export = Export(
        registration=registration,
        object_kind=ExportKind.SRO,
        sop_instance_uid="1.2.3.99",
        path="exports/1.2.3.99.dcm",
        destination="PACS",
    )
    session.add(export)
    session.commit()

    with pytest.raises(IntegrityError):
        session.execute(delete(Patient))
        session.commit()
    session.rollback()
    assert registration.exports == [export]
    session.delete(registration)  # nor through the ORM, which would otherwise unlink it
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()

    session.execute(delete(Export))
    session.execute(delete(Patient))
    session.commit()
    assert count(session, Registration) == 0


def test_deleting_a_volume_unlinks_its_xrays(session: Session, ct_series: Series) -> None:
    volume = make_volume(ct_series, datetime(2025, 1, 1, tzinfo=UTC))
    xray = make_instance(ct_series, uid="1.2.3.4.77")
    xray.usability, xray.linked_volume = Usability.USABLE, volume
    session.add(xray)
    session.commit()

    session.execute(delete(Volume))
    session.commit()
    session.expire_all()

    assert session.get(Instance, xray.id).linked_volume_id is None


def test_a_base_model_cannot_be_deleted_while_models_derive_from_it(
    session: Session, ct_series: Series
) -> None:
    base = PoseModel(state=ModelState.READY, config={"backbone": "resnet18"})
    session.add(PoseModel(patient=ct_series.study.patient, base_model=base))
    session.commit()

    with pytest.raises(IntegrityError):
        session.execute(delete(PoseModel).where(PoseModel.id == base.id))
        session.commit()


def test_relationships_navigate_both_ways(session: Session, ct_series: Series) -> None:
    instance = make_instance(ct_series)
    registration = make_registration(instance, make_volume(ct_series, datetime.now(UTC)))
    session.add(registration)
    session.commit()
    session.expunge_all()

    patient = session.scalars(select(Patient)).one()
    assert patient.studies[0].series[0].instances[0].registrations[0].id == registration.id
    assert patient.volumes[0].series.study.patient is patient
    reloaded = session.get(Registration, registration.id)
    assert reloaded.instance.series.series_instance_uid == ct_series.series_instance_uid


def test_datetimes_come_back_aware_utc_and_naive_ones_are_refused(session: Session) -> None:
    paris = timezone(timedelta(hours=1))
    session.add(Job(kind=JobKind.NOOP, next_attempt_at=datetime(2025, 3, 1, 13, 0, tzinfo=paris)))
    session.commit()
    session.expunge_all()

    job = session.scalars(select(Job)).one()
    assert job.next_attempt_at == datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert job.next_attempt_at.utcoffset() == timedelta(0)
    assert job.created_at.tzinfo is not None  # server-side or Python default, both aware

    session.add(Job(kind=JobKind.NOOP, next_attempt_at=datetime(2025, 3, 1, 12, 0)))
    with pytest.raises(StatementError, match="naive datetime"):
        session.commit()


def test_json_payloads_round_trip(session: Session, ct_series: Series) -> None:
    geometry = {"sid_mm": 1020.5, "pixel_spacing": [0.308, 0.308], "frames": [{"lao": -30.0}]}
    instance = make_instance(ct_series)
    instance.geometry = geometry
    session.add(instance)
    session.commit()
    session.expunge_all()

    assert session.get(Instance, instance.id).geometry == geometry


def newest_usable_volume(session: Session, patient: Patient) -> Volume | None:
    return session.scalars(
        select(Volume)
        .where(Volume.patient_id == patient.id, Volume.state == VolumeState.USABLE)
        .order_by(Volume.created_at.desc(), Volume.id.desc())
        .limit(1)
    ).first()


def test_newest_usable_volume_of_a_patient_ignores_refused_ones(
    session: Session, ct_series: Series
) -> None:
    patient = ct_series.study.patient
    day = datetime(2025, 5, 1, 8, 0, tzinfo=UTC)
    old = make_volume(ct_series, day)
    newer = make_volume(ct_series, day + timedelta(hours=1))
    newest_refused = make_volume(ct_series, day + timedelta(hours=2), state=VolumeState.REFUSED)
    other = Patient(patient_id="SOMEONE-ELSE")
    other_series = Series(
        study=Study(patient=other, study_instance_uid="9.9"),
        series_instance_uid="9.9.1",
        modality="CT",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )
    session.add_all([old, newer, newest_refused, make_volume(other_series, day + timedelta(3))])
    session.commit()

    assert newest_usable_volume(session, patient).id == newer.id
    assert newest_usable_volume(session, Patient(id=-1)) is None
