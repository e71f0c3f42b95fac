"""Structured logging: line formats, targets, and no patient names in any line."""

from __future__ import annotations

import json
import logging
import re

import pytest
from pydicom.valuerep import PersonName

from xvr_node.config import LoggingSettings
from xvr_node.log import configure_logging


@pytest.fixture(autouse=True)
def restore_logging():
    """configure_logging changes the root logger; put it back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in ("pynetdicom", "pydicom")}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    for name, value in quiet.items():
        logging.getLogger(name).setLevel(value)


def test_text_lines_are_key_value(capsys):
    configure_logging(LoggingSettings(level="INFO", format="text"))
    logging.getLogger("xvr_node.scp").info(
        "store_ok", extra={"sop": "1.2.3", "calling_ae": "CARM1", "reason": "two words"}
    )
    logging.getLogger("xvr_node.scp").debug("hidden_below_level")
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO xvr_node\.scp "
        r'event=store_ok sop=1\.2\.3 calling_ae=CARM1 reason="two words"',
        line,
    ), line


def test_json_lines_are_one_object_each(capsys):
    configure_logging(LoggingSettings(format="json"))
    log = logging.getLogger("xvr_node.jobs")
    log.warning("retry", extra={"job": 7, "attempt": 2})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("job_failed", extra={"job": 7})
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["event"] == "retry" and first["job"] == 7 and first["attempt"] == 2
    assert first["level"] == "WARNING" and first["logger"] == "xvr_node.jobs"
    assert first["ts"].endswith("Z")
    assert second["event"] == "job_failed" and "RuntimeError: boom" in second["exc"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logs_never_carry_patient_names(capsys, fmt):
    configure_logging(LoggingSettings(format=fmt))
    log = logging.getLogger("xvr_node.scp")
    log.info(
        "store_ok",
        extra={
            "patient_name": "DOE^JOHN",
            "PatientName": "DOE^JOHN",
            "referrer": PersonName("ROE^J"),
        },
    )
    log.info("received for %s", PersonName("DOE^JANE"))
    output = capsys.readouterr().err
    assert "DOE" not in output and "ROE" not in output
    assert "patient_name" not in output and "PatientName" not in output
    assert "***" in output


def test_file_target_and_reconfiguring_does_not_duplicate(tmp_path, capsys):
    log_file = tmp_path / "logs" / "node.log"
    configure_logging(LoggingSettings(file=log_file))
    configure_logging(LoggingSettings(file=log_file))
    logging.getLogger("xvr_node").info("started", extra={"version": "0.1.0"})
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and lines[0].endswith("event=started version=0.1.0")
    assert capsys.readouterr().err == ""


def test_chatty_libraries_are_held_at_warning(capsys):
    configure_logging(LoggingSettings(level="DEBUG"))
    logging.getLogger("pynetdicom.assoc").debug("dataset dump")
    logging.getLogger("pynetdicom.assoc").warning("association aborted")
    output = capsys.readouterr().err
    assert "dataset dump" not in output and "association aborted" in output
