"""Structured log lines (text ``key=value`` or JSON) that never carry patient names.

Log an event name as the message and its facts as ``extra``::

    log.info("store_ok", extra={"sop": sop_uid, "calling_ae": "CARM1"})

gives ``2026-11-24T10:00:00.123Z INFO xvr_node.scp event=store_ok sop=1.2.3 calling_ae=CARM1``.
Keys that name a patient (``patient_name``, ``PatientName``…) are dropped, and any pydicom
``PersonName`` value, in ``extra`` or in the message arguments, is replaced by ``***``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xvr_node.config import LoggingSettings

REDACTED = "***"
# Normalised (lower case, no "_"): patient_name, PatientName, patients_name, OtherPatientNames…
_NAME_KEYS = frozenset(
    {
        "patientname",
        "patientsname",
        "otherpatientnames",
        "patientbirthname",
        "patientmothersbirthname",
    }
)
# Everything a bare LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
# Chatty libraries, held at WARNING even at DEBUG: pynetdicom's and pydicom's debug output can
# dump dataset values; APScheduler and procrastinate log every run of every job (the node
# logs its own job_* lines).
_QUIET_LIBRARIES = ("pynetdicom", "pydicom", "apscheduler", "procrastinate")


def _is_name_key(key: str) -> bool:
    return key.replace("_", "").lower() in _NAME_KEYS


def _is_person_name(value: Any) -> bool:
    # By class name: this module must not import pydicom.
    return type(value).__name__ == "PersonName"


class PatientNameFilter(logging.Filter):
    """Drop patient-name keys from a record and mask PersonName values; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key in [key for key in vars(record) if key not in _STANDARD]:
            if _is_name_key(key):
                delattr(record, key)
            elif _is_person_name(getattr(record, key)):
                setattr(record, key, REDACTED)
        if isinstance(record.args, tuple):
            record.args = tuple(REDACTED if _is_person_name(a) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: REDACTED if _is_person_name(v) else v
                for k, v in record.args.items()
                if not _is_name_key(str(k))
            }
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_") and not _is_name_key(key)
    }


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not any(ch in text for ch in ' ="\n\t'):
        return text
    return json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger> event=<message> key=value…`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {"event": record.getMessage(), **_extras(record)}
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        line = f"{_timestamp(record)} {record.levelname} {record.name} {pairs}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, the extras, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return json.dumps(fields, ensure_ascii=False, default=str)


def configure_logging(settings: LoggingSettings) -> logging.Handler:
    """Route every log record through one handler as configured; safe to call again."""
    if settings.file is not None:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        # Watched: a file moved away by logrotate is reopened instead of written into the void.
        handler: logging.Handler = logging.handlers.WatchedFileHandler(
            settings.file, encoding="utf-8"
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    handler.addFilter(PatientNameFilter())
    handler._xvr_node = True  # type: ignore[attr-defined]

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_xvr_node", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(settings.level)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # A periodic check still running at its next tick is skipped by design (coalesce): not news.
    scheduler = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(f, _SkippedRunFilter) for f in scheduler.filters):
        scheduler.addFilter(_SkippedRunFilter())
    return handler


class _SkippedRunFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()
