"""The command line: catalog commands and the demo's job, on small data."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from PIL import Image
from pydicom import dcmread
from pynetdicom import AE

from tests.support.training import TINY_TRAINING, environment
from xvr_node import demo
from xvr_node.catalog.db import head_revision
from xvr_node.catalog.embedded import EmbeddedCluster
from xvr_node.cli import cli
from xvr_node.local_pacs import ReceivingScp, free_port
from xvr_node.phantom import PhantomSpec


def test_db_upgrade_creates_the_catalog_under_the_storage_root(tmp_path):
    env = {"XVR_NODE__STORAGE__ROOT": str(tmp_path / "store")}
    runner = CliRunner()
    before = runner.invoke(cli, ["db", "current"], env=env)
    assert before.exit_code == 0, before.output
    assert "current: none" in before.output
    result = runner.invoke(cli, ["db", "upgrade"], env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "store" / "postgres" / "PG_VERSION").is_file()
    assert not EmbeddedCluster(tmp_path / "store").is_running()  # stopped with the command
    after = runner.invoke(cli, ["db", "current"], env=env)
    assert f"current: {head_revision()}; head: {head_revision()}" in after.output


def test_bad_config_stops_db_upgrade_with_the_key_named(tmp_path):
    result = CliRunner().invoke(cli, ["db", "upgrade"], env={"XVR_NODE__NODE__PORT": "70000"})
    assert result.exit_code == 2
    assert "node.port" in result.output


def test_config_show_prints_effective_settings(tmp_path):
    result = CliRunner().invoke(cli, ["config", "show"], env={"XVR_NODE__NODE__PORT": "11199"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["node"]["port"] == 11199


def test_demo_runs_the_pipeline_end_to_end(tmp_path, monkeypatch):
    """The demo's whole path on a tiny phantom: C-STORE → assemble → finetune → register → PACS."""
    small = PhantomSpec(
        seed=2, frames=1, columns=48, rows=40, multiframe=2, bead=True, ct_downsample=4
    )
    monkeypatch.setattr(demo, "DEMO_PHANTOM", small)
    monkeypatch.delenv("XVR_NODE__STORAGE__ROOT", raising=False)
    for name, value in environment(TINY_TRAINING).items():  # a tiny model, a quick check
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("XVR_NODE__REGISTRATION__SCALES", "[2]")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["demo", "--output", str(out), "--iterations", "3"])
    assert result.exit_code == 0, result.output
    truth = json.loads((out / "phantom/truth.json").read_text())
    assert len(truth["xrays"]) == 3
    assert (out / "store/postgres/PG_VERSION").is_file()
    assert not EmbeddedCluster(out / "store").is_running()  # the demo stopped its catalog
    assert f"schema revision {head_revision()}" in result.output
    assert "ct: 34 of 34 stored" in result.output  # sent by C-STORE, all acknowledged
    assert "volume 1: usable" in result.output
    assert "model 1 v1: ready (models/patient-1/v1/checkpoints/iter_000003.pt)" in result.output
    assert (out / "store/models/patient-1/v1/checkpoints/iter_000003.pt").is_file()
    # The per-frame table: multi-start picks a start for each X-ray, the cine is tracked.
    assert "IMG_000.dcm (multistart: " in result.output
    assert "CINE_001.dcm#2 (tracking; " in result.output
    summary = result.output.split("| n |")[1].splitlines()[2]
    assert summary.startswith("| 3 |")
    # SR and SC per X-ray (the cine run's two frames share theirs) reached the local PACS,
    # and an SRO for each X-ray with a frame the gate let through; one picture per frame.
    verdicts = re.findall(r"\| (\S+?\.dcm)(?:#\d+)? \([^;|]+; ([^)|]+)\)", result.output)
    assert len(verdicts) == 3, result.output
    with_sro = {name for name, verdict in verdicts if verdict != "NOT RELIABLE"}
    assert f"outbox: {2 * 2 + len(with_sro)} sent" in result.output
    # Named as the table names the X-rays, at a size a person can read.
    pictures = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert pictures == ["CINE_001-frame1.png", "CINE_001-frame2.png", "IMG_000.png"]
    with Image.open(out / "overlays" / "IMG_000.png") as picture:
        assert min(picture.size) >= 512


def test_by_default_the_demo_adopts_the_shipped_model_after_its_check(tmp_path, monkeypatch):
    """The morning after: no training; the shipped model, labelled as such, is checked on
    held-out X-rays and starts the registrations when it passes."""
    small = PhantomSpec(seed=2, frames=1, columns=64, rows=64, multiframe=2, ct_downsample=4)
    monkeypatch.setattr(demo, "DEMO_PHANTOM", small)
    monkeypatch.delenv("XVR_NODE__STORAGE__ROOT", raising=False)
    monkeypatch.setenv("XVR_NODE__REGISTRATION__SCALES", "[2]")
    for name, value in environment(TINY_TRAINING).items():
        if name.startswith("XVR_NODE__TRAINING__MODEL_CHECK__"):  # a quick check of the model
            monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["demo", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "takes the patient's model into service" in result.output
    assert "the morning after: a model trained ahead of time for this phantom patient" in (
        result.output
    )
    assert "model 1 v1: ready (models/patient-1/v1/adopted.pt)" in result.output
    assert "model check on 2 held-out realistic X-rays: first pose" in result.output
    assert not (out / "store/models/patient-1/v1/checkpoints").exists()  # nothing trained
    assert "finetune" not in result.output.split("[5/6]")[1]  # no job trained or failed
    summary = result.output.split("| n |")[1].splitlines()[2]
    assert summary.startswith("| 3 |")


def test_without_orthanc_the_demo_pacs_is_a_receiving_scp(tmp_path, monkeypatch, phantom_dir):
    """Machines without Orthanc still get a PACS: our SCP files the result objects it receives."""
    monkeypatch.setattr(demo, "find_orthanc", lambda: None)
    port = free_port()
    lines: list[str] = []
    image = dcmread(next((phantom_dir / "xray").glob("*.dcm")))
    secondary_capture = "1.2.840.10008.5.1.4.1.1.7"
    with demo.local_pacs(tmp_path, port, lines.append) as pacs:
        assert isinstance(pacs, ReceivingScp)
        ae = AE(ae_title="XVRNODE")
        ae.add_requested_context(image.SOPClassUID)  # an image class: not what results use
        ae.add_requested_context(secondary_capture)
        assoc = ae.associate("127.0.0.1", port, ae_title=demo.PACS_AET)
        assert assoc.is_established
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_store(image)
        image.SOPClassUID = image.file_meta.MediaStorageSOPClassUID = secondary_capture
        assert assoc.send_c_store(image).Status == 0x0000
        assoc.release()
    assert "no Orthanc here" in lines[0]
    (received,) = pacs.received
    back = dcmread(received)
    assert back.SOPInstanceUID == image.SOPInstanceUID
    assert back.PixelData == image.PixelData
