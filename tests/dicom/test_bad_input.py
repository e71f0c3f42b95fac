"""Bad input gets a precise status or record, and never costs the other instances."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import (
    CTImageStorage,
    XRayAngiographicImageStorage,
    XRayRadiofluoroscopicImageStorage,
)
from sqlalchemy import select

from tests.support.node import running_node
from xvr_node.catalog.db import make_engine, session_factory
from xvr_node.catalog.models import IngestEvent, Instance, Usability
from xvr_node.dicom.receive import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
)

pytestmark = pytest.mark.slow


@pytest.fixture()
def raw_sending():
    """Let pynetdicom send files as they are on disk, without decoding them first."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = before


def single_frame_xa(phantom_dir: Path) -> Path:
    for path in sorted((phantom_dir / "xray").glob("IMG_*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.Modality == "XA":
            return path
    raise AssertionError("the phantom has no single-frame XA")


def variant(source: Path, target: Path, **changes) -> Path:
    """A copy of ``source`` with new UIDs and the given attributes changed (None deletes)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(target, enforce_file_format=True)
    return target


def send_all(port: int, files: list[Path]) -> list[int]:
    """Send every file in ONE association and return each C-STORE status."""
    ae = AE(ae_title="BADCARM")
    for sop_class in (
        CTImageStorage,
        XRayAngiographicImageStorage,
        XRayRadiofluoroscopicImageStorage,
    ):
        ae.add_requested_context(sop_class, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="XVRNODE")
    assert assoc.is_established
    try:
        statuses = []
        for file in files:
            status = assoc.send_c_store(file)
            statuses.append(int(status.Status))
    finally:
        assoc.release()
    return statuses


def test_bad_input_corpus(tmp_path, phantom_dir, raw_sending):
    source = single_frame_xa(phantom_dir)
    raw = source.read_bytes()
    corpus = tmp_path / "corpus"
    corpus.mkdir()

    good = variant(source, corpus / "good.dcm")
    truncated = corpus / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) - 4000])
    garbage = corpus / "garbage.dcm"
    with pydicom.dcmread(source, stop_before_pixels=True) as ds:
        meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    garbage.write_bytes(raw[:meta_end] + os.urandom(3000))
    # XA data whose file meta says XRF: pynetdicom sends it on the XRF context. The two UIDs
    # have the same length, so the meta can be patched in place.
    wrong_context = variant(source, corpus / "wrong_context.dcm")
    data = wrong_context.read_bytes()
    meta = data[:meta_end].replace(
        XRayAngiographicImageStorage.encode(), XRayRadiofluoroscopicImageStorage.encode(), 1
    )
    wrong_context.write_bytes(meta + data[meta_end:])
    no_patient = variant(source, corpus / "no_patient.dcm", PatientID=None)
    # pydicom warns about the invalid UI value it is told to write: that is the point here.
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        path_uid = variant(source, corpus / "path_uid.dcm", SeriesInstanceUID="1.2.3/../../../etc")
    bad_geometry = variant(
        source,
        corpus / "bad_geometry.dcm",
        DistanceSourceToDetector=None,
        StationName="NOPROFILE",
        ImagerPixelSpacing=None,
    )
    big = variant(source, corpus / "big.dcm")
    good_too = variant(source, corpus / "good_too.dcm")

    files = [
        good,
        truncated,
        garbage,
        wrong_context,
        no_patient,
        path_uid,
        bad_geometry,
        big,
        good_too,
    ]
    pixel_bytes = len(pydicom.dcmread(source).PixelData)
    with running_node(tmp_path / "node", NODE__MAX_PIXEL_BYTES=str(pixel_bytes)) as node:
        # Make "big" exceed the limit by one column of pixels.
        ds = pydicom.dcmread(big)
        ds.Columns += 1
        ds.PixelData = bytes(pixel_bytes + 2 * ds.Rows)
        ds.save_as(big, enforce_file_format=True)
        statuses = dict(zip([f.name for f in files], send_all(node.port, files), strict=True))

        assert statuses == {
            "good.dcm": SUCCESS,
            "truncated.dcm": CANNOT_UNDERSTAND,
            "garbage.dcm": CANNOT_UNDERSTAND,
            "wrong_context.dcm": DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "no_patient.dcm": SUCCESS,  # kept: nothing accepted is lost, but it is unusable
            "path_uid.dcm": DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "bad_geometry.dcm": SUCCESS,
            "big.dcm": OUT_OF_RESOURCES,
            "good_too.dcm": SUCCESS,
        }
        assert node.process.poll() is None  # the node lives on

        engine = make_engine(node.database_url)
        with session_factory(engine)() as session:
            instances = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
            events = session.scalars(select(IngestEvent).order_by(IngestEvent.id)).all()
        engine.dispose()

    def uid(path: Path) -> str:
        return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID

    assert set(instances) == {uid(good), uid(no_patient), uid(bad_geometry), uid(good_too)}
    assert instances[uid(good)].usability == Usability.WAITING
    assert instances[uid(no_patient)].usability == Usability.UNUSABLE
    assert "Patient ID is empty" in instances[uid(no_patient)].unusable_reason
    assert instances[uid(bad_geometry)].usability == Usability.UNUSABLE
    assert "Distance Source to Detector" in instances[uid(bad_geometry)].unusable_reason
    # Every refusal left a record with the caller and a reason.
    refusals = [(e.status_code, e.calling_ae) for e in events if e.event == "store_failed"]
    assert sorted(refusals) == sorted(
        [
            (CANNOT_UNDERSTAND, "BADCARM"),
            (CANNOT_UNDERSTAND, "BADCARM"),
            (DATASET_DOES_NOT_MATCH_SOP_CLASS, "BADCARM"),
            (DATASET_DOES_NOT_MATCH_SOP_CLASS, "BADCARM"),
            (OUT_OF_RESOURCES, "BADCARM"),
        ]
    )
    assert all(e.reason for e in events)
    # Nothing escaped the store through a UID with path characters.
    assert not list((tmp_path / "node").rglob("etc"))
    assert not list((node.store / "incoming").iterdir())
