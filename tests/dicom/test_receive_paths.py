"""Compressed transfer syntaxes kept as sent; ``import``; assembly refusals via the catalog."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import select

from tests.support.node import acknowledged_files, dcmtk, running_node, storescu
from xvr_node.catalog.db import make_engine, session_factory
from xvr_node.catalog.models import Instance, Series, SeriesState, VolumeState, utcnow
from xvr_node.dicom.storage import FileStore
from xvr_node.jobs.assemble import queue_stable_series, run_assemble

pytestmark = pytest.mark.slow

#: DCMTK compressor and options, the syntax it writes, lossless?, storescu's proposal flag.
COMPRESSORS = {
    "jpeg-lossless": ("dcmcjpeg", ["+e1"], JPEGLosslessSV1, True, "-xs"),
    "jpeg-extended": ("dcmcjpeg", ["+ee"], JPEGExtended12Bit, False, "-xx"),
    "jpeg-ls": ("dcmcjpls", ["+el"], JPEGLSLossless, True, "-xt"),
    "rle": ("dcmcrle", [], RLELossless, True, "-xr"),
}


def test_compressed_syntaxes_are_stored_as_sent_and_decodable(tmp_path, phantom_dir):
    source = sorted((phantom_dir / "xray").glob("IMG_*.dcm"))[0]
    original = pydicom.dcmread(source).pixel_array
    compressed = {}
    for name, (tool, options, *_) in COMPRESSORS.items():
        target = tmp_path / f"{name}.dcm"
        subprocess.run(
            [dcmtk(tool), *options, str(source), str(target)], check=True, capture_output=True
        )
        ds = pydicom.dcmread(target)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(target)
        compressed[name] = target
    j2k = tmp_path / "jpeg2000.dcm"
    ds = pydicom.dcmread(source)
    ds.compress(pydicom.uid.JPEG2000Lossless)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(j2k)
    compressed["jpeg2000"] = j2k

    with running_node(tmp_path / "node") as node:
        for name, path in compressed.items():
            # Like a PACS forwarding a compressed study: propose the file's own syntax.
            flag = COMPRESSORS[name][4] if name in COMPRESSORS else "-xv"
            sent = storescu(node.port, [path], extra=[flag])
            assert len(acknowledged_files(sent.stdout + sent.stderr)) == 1, (name, sent.stdout)
        engine = make_engine(node.database_url)
        with session_factory(engine)() as session:
            stored = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
        engine.dispose()

    expected = {name: spec[2] for name, spec in COMPRESSORS.items()}
    expected["jpeg2000"] = pydicom.uid.JPEG2000Lossless
    lossless = {name: spec[3] for name, spec in COMPRESSORS.items()} | {"jpeg2000": True}
    for name, path in compressed.items():
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        instance = stored[uid]
        assert instance.transfer_syntax_uid == expected[name], name  # not re-encoded
        pixels = pydicom.dcmread(node.store / instance.path).pixel_array
        if lossless[name]:
            np.testing.assert_array_equal(pixels, original, err_msg=name)
        else:
            assert np.abs(pixels.astype(int) - original).mean() < 0.01 * original.max()


def test_import_files_folders_and_dicomdir(tmp_path, phantom_dir):
    from click.testing import CliRunner

    from xvr_node.cli import cli

    # A DICOMDIR made by DCMTK over a copy of the X-rays (8-character upper-case names).
    media = tmp_path / "media"
    media.mkdir()
    xrays = sorted((phantom_dir / "xray").glob("*.dcm"))
    for index, file in enumerate(xrays):
        shutil.copy(file, media / f"IM{index:06d}")
    subprocess.run(
        [dcmtk("dcmmkdir"), "+r", "-Pgp", "+I", "+id", str(media), "+D", str(media / "DICOMDIR")],
        cwd=media,
        check=True,
        capture_output=True,
    )
    env = {"XVR_NODE__STORAGE__ROOT": str(tmp_path / "store")}
    runner = CliRunner()
    assert runner.invoke(cli, ["db", "upgrade"], env=env).exit_code == 0

    result = runner.invoke(cli, ["import", str(media / "DICOMDIR")], env=env)
    assert result.exit_code == 0, result.output
    assert f"imported {len(xrays)} instance(s), 0 already stored, 0 failed" in result.output
    ct_folder = phantom_dir / "ct"
    one_slice = sorted(ct_folder.glob("*.dcm"))[0]
    again = runner.invoke(cli, ["import", str(ct_folder), str(one_slice), str(xrays[0])], env=env)
    assert again.exit_code == 0, again.output
    n_ct = len(list(ct_folder.glob("*.dcm")))
    assert f"imported {n_ct} instance(s), 1 already stored, 0 failed" in again.output

    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM at all")
    failed = runner.invoke(cli, ["import", str(junk)], env=env)
    assert failed.exit_code == 1
    assert "0xC000" in failed.output

    status = json.loads(runner.invoke(cli, ["status", "--json"], env=env).output)
    assert status["totals"]["instances"] == len(xrays) + n_ct


def test_a_series_with_a_missing_slice_is_refused_with_the_reason(
    tmp_path, phantom_dir, hold_catalog
):
    from xvr_node.config import load_settings
    from xvr_node.node import make_receiver

    settings = load_settings(None, environ={"XVR_NODE__STORAGE__ROOT": str(tmp_path / "s")})
    hold_catalog(settings)
    receiver, store = make_receiver(settings)
    slices = sorted((phantom_dir / "ct").glob("*.dcm"))
    del slices[20]  # the 21st of 67 slices never arrives
    for file in slices:
        assert receiver.receive(file.read_bytes(), calling_ae="PACS").ok
    with receiver.sessions() as session:
        (job,) = queue_stable_series(session, utcnow() + timedelta(minutes=5), 30.0)
        volume = run_assemble(session, FileStore(store.root), job.payload["series_id"])
        assert volume.state == VolumeState.REFUSED
        assert volume.refusal_reason.startswith("slice 21 missing between z=")
        series = session.get(Series, job.payload["series_id"])
        assert series.state == SeriesState.FAILED
        # The late slice arrives: the series is receiving again and will be re-assembled.
        late = sorted((phantom_dir / "ct").glob("*.dcm"))[20]
    assert receiver.receive(late.read_bytes(), calling_ae="PACS").ok
    with receiver.sessions() as session:
        (job2,) = queue_stable_series(session, utcnow() + timedelta(minutes=5), 30.0)
        volume2 = run_assemble(session, FileStore(store.root), job2.payload["series_id"])
        assert volume2.state == VolumeState.USABLE, volume2.refusal_reason
        assert volume2.path.endswith("2.nii.gz")
    assert isinstance(Path(store.root), Path)


def test_missing_geometry_comes_from_the_learned_or_configured_profile(
    tmp_path, phantom_dir, hold_catalog
):
    from xvr_node.config import load_settings
    from xvr_node.node import make_receiver

    environ = {
        "XVR_NODE__STORAGE__ROOT": str(tmp_path / "s"),
        "XVR_NODE__CARM_PROFILES": '[{"station_name": "MOBILE2", "sid_mm": 1000, '
        '"pixel_spacing_mm": [0.5, 0.5]}]',
    }
    settings = load_settings(None, environ=environ)
    hold_catalog(settings)
    receiver, _ = make_receiver(settings)
    first, second = sorted((phantom_dir / "xray").glob("IMG_*.dcm"))[:2]
    assert receiver.receive(first.read_bytes(), calling_ae="CARM1").ok  # learns the device

    def without_sid(path: Path, **changes) -> bytes:
        ds = pydicom.dcmread(path)
        del ds.DistanceSourceToDetector
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        out = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(out)
        return out.read_bytes()

    learned = receiver.receive(without_sid(second), calling_ae="CARM1")
    configured = receiver.receive(without_sid(second, StationName="MOBILE2"), calling_ae="C2")
    unknown = receiver.receive(without_sid(second, StationName="UNKNOWN"), calling_ae="C3")
    with receiver.sessions() as session:
        rows = {i.id: i for i in session.scalars(select(Instance))}
    expected_sid = pydicom.dcmread(first, stop_before_pixels=True).DistanceSourceToDetector
    assert rows[learned.instance_id].geometry["sid_source"] == "profile"
    assert rows[learned.instance_id].geometry["sid_mm"] == pytest.approx(float(expected_sid))
    assert rows[configured.instance_id].geometry["sid_source"] == "config"
    assert rows[configured.instance_id].geometry["sid_mm"] == 1000
    assert rows[unknown.instance_id].usability == "unusable"
    assert "Distance Source to Detector" in rows[unknown.instance_id].unusable_reason
