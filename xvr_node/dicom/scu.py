"""C-STORE SCU: send stored DICOM files to one destination and say, per file, what happened;
C-FIND SCU: ask it which of them it already holds (after an interrupted send)."""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from xvr_node.config import Destination, TlsSettings

LOG = logging.getLogger(__name__)

#: Warnings after which the SCP has stored the object (PS3.4 B.2.3): delivered, with a note.
STORE_WARNINGS = {
    0x0001: "warning",
    0x0107: "attribute list error",
    0x0116: "attribute value out of range",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}

#: Most presentation contexts one association may propose (PS3.8 9.3.2.2: odd IDs 1-255).
MAX_CONTEXTS = 128

# pynetdicom only logs why a TCP connection failed; the lock keeps one association's
# log lines apart from another's while we listen for them.
_CONNECT_LOCK = threading.Lock()
_TRANSPORT_LOGGER = "pynetdicom.transport"


@dataclass(frozen=True)
class SendOutcome:
    """What became of one file: delivered, worth retrying (transient) or not (permanent)."""

    path: Path
    sop_instance_uid: str | None
    delivered: bool
    transient: bool
    status: int | None
    reason: str


#: Told each outcome as soon as the destination answered (``paths`` index, outcome).
OutcomeListener = Callable[[int, SendOutcome], None]


@dataclass(frozen=True)
class StoredObject:
    """What a C-FIND at IMAGE level needs to ask a destination for one object."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def status_outcome(status: int) -> tuple[bool, bool, str]:
    """(delivered, transient, reason) of a C-STORE response status (PS3.4 B.2.3, PS3.7 C)."""
    if status == 0x0000:
        return True, False, "stored"
    if status in STORE_WARNINGS:
        return True, False, f"stored with warning 0x{status:04X} ({STORE_WARNINGS[status]})"
    if 0xB000 <= status <= 0xBFFF:
        return True, False, f"stored with warning 0x{status:04X}"
    if 0xA700 <= status <= 0xA7FF:
        return False, True, f"refused 0x{status:04X}: out of resources"
    if status in (0x0110, 0x0213):
        # The SCP failed while storing or is short of resources; the object itself is fine.
        return False, True, f"refused 0x{status:04X}: processing failure at the destination"
    if 0xA900 <= status <= 0xA9FF:
        return False, False, f"refused 0x{status:04X}: data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return False, False, f"refused 0x{status:04X}: cannot understand"
    if status == 0x0122:
        return False, False, "refused 0x0122: SOP class not supported"
    if status == 0x0124:
        return False, False, "refused 0x0124: not authorised"
    return False, False, f"refused 0x{status:04X}"


def send_datasets(
    destination: Destination,
    paths: Sequence[Path],
    calling_ae: str,
    timeout_s: float,
    tls_context: ssl.SSLContext | None = None,
    on_outcome: OutcomeListener | None = None,
) -> list[SendOutcome]:
    """C-STORE ``paths`` to ``destination`` in one association; one outcome per path, in order.

    Presentation contexts are proposed for exactly the SOP classes and transfer syntaxes the
    files hold, so a destination that cannot take one kind of object refuses only that kind.
    ``tls_context`` is used when ``destination.tls`` is set (default: the system's CAs).
    ``on_outcome`` hears each answer as it comes, so the caller can record it at once: a
    sender killed mid-association then leaves at most one object it cannot vouch for.
    """
    tell = on_outcome or (lambda _index, _outcome: None)
    outcomes: dict[int, SendOutcome] = {}
    files: dict[int, _File] = {}
    for index, path in enumerate(paths):
        try:
            files[index] = _read_meta(Path(path))
        except (OSError, InvalidDicomError, AttributeError, ValueError) as error:
            outcomes[index] = SendOutcome(
                Path(path), None, False, False, None, f"cannot read {path}: {error}"
            )
            tell(index, outcomes[index])
    contexts = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in files.values()})
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(
            f"{len(contexts)} SOP class / transfer syntax pairs exceed the {MAX_CONTEXTS} "
            "presentation contexts of one association; send fewer files per call"
        )
    if files:
        outcomes.update(
            _send(destination, files, contexts, calling_ae, timeout_s, tls_context, tell)
        )
    return [outcomes[index] for index in range(len(paths))]


def client_tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """A client TLS context: the system's CAs plus ``node.tls``'s, our certificate if any."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    for ca in tls.ca_certificates:
        context.load_verify_locations(cafile=str(ca))
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context


def _read_meta(path: Path) -> _File:
    meta = read_file_meta_info(path)
    return _File(
        path,
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
    )


def _send(
    destination: Destination,
    files: dict[int, _File],
    contexts: list[tuple[str, str]],
    calling_ae: str,
    timeout_s: float,
    tls_context: ssl.SSLContext | None,
    tell: OutcomeListener,
) -> dict[int, SendOutcome]:
    ae = _client_ae(calling_ae, timeout_s)
    for sop_class, transfer_syntax in contexts:
        ae.add_requested_context(sop_class, [transfer_syntax])
    assoc, failure = _associate(ae, destination, tls_context)
    if failure is not None:
        transient, reason = failure
        LOG.warning("export to %s failed: %s", _where(destination), reason)
        outcomes = {
            index: SendOutcome(f.path, f.sop_instance_uid, False, transient, None, reason)
            for index, f in files.items()
        }
        for index, outcome in outcomes.items():
            tell(index, outcome)
        return outcomes

    where = _where(destination)
    outcomes = {}
    try:
        for index, file in files.items():
            if not assoc.is_established:
                outcomes[index] = SendOutcome(
                    file.path,
                    file.sop_instance_uid,
                    False,
                    True,
                    None,
                    f"association with {where} ended before this object was sent",
                )
            else:
                outcomes[index] = _store_one(assoc, file, where)
            tell(index, outcomes[index])
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def find_stored(
    destination: Destination,
    objects: Sequence[StoredObject],
    calling_ae: str,
    timeout_s: float,
    tls_context: ssl.SSLContext | None = None,
) -> set[str] | None:
    """The SOP Instance UIDs of ``objects`` that ``destination`` holds, by C-FIND (Study Root,
    IMAGE level); None when it cannot tell (no C-FIND for us, unreachable, a failed query).

    After a sender died mid-association this tells which objects arrived, so they are not
    sent a second time.
    """
    ae = _client_ae(calling_ae, timeout_s)
    ae.add_requested_context(
        StudyRootQueryRetrieveInformationModelFind, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    )
    assoc, failure = _associate(ae, destination, tls_context)
    if failure is not None:
        LOG.info("cannot ask %s what it holds: %s", _where(destination), failure[1])
        return None
    held: set[str] = set()
    try:
        for item in objects:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = item.study_instance_uid
            query.SeriesInstanceUID = item.series_instance_uid
            query.SOPInstanceUID = item.sop_instance_uid
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                code = int(status.Status) if "Status" in status else None
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    held.add(str(identifier.get("SOPInstanceUID", "")))
                elif code != 0x0000:
                    LOG.info(
                        "C-FIND at %s answered %s; cannot tell what it holds",
                        _where(destination),
                        "nothing" if code is None else f"0x{code:04X}",
                    )
                    return None
    except (OSError, ValueError, RuntimeError) as error:
        LOG.info("C-FIND at %s failed: %s", _where(destination), error)
        return None
    finally:
        if assoc.is_established:
            assoc.release()
    return held & {item.sop_instance_uid for item in objects}


def _where(destination: Destination) -> str:
    return f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"


def _client_ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    return ae


def _associate(
    ae: AE, destination: Destination, tls_context: ssl.SSLContext | None
) -> tuple[Association, tuple[bool, str] | None]:
    """An association with ``destination``, or why not: (transient, reason)."""
    tls_args = None
    if destination.tls:
        tls_args = (tls_context or ssl.create_default_context(), destination.host)
    connected = threading.Event()
    connect_errors = _LogCollector("TCP Initialisation Error")
    transport_log = logging.getLogger(_TRANSPORT_LOGGER)
    with _CONNECT_LOCK:
        transport_log.addHandler(connect_errors)
        try:
            assoc = ae.associate(
                destination.host,
                destination.port,
                ae_title=destination.ae_title,
                tls_args=tls_args,
                evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.set())],
            )
        finally:
            transport_log.removeHandler(connect_errors)
    if assoc.is_established:
        return assoc, None
    where = _where(destination)
    return assoc, _association_failure(assoc, where, connected.is_set(), connect_errors.messages)


def _store_one(assoc: Association, file: _File, where: str) -> SendOutcome:
    try:
        response = assoc.send_c_store(file.path)
    except ValueError as error:
        # No accepted context for this SOP class / transfer syntax: the PACS will not take it.
        return SendOutcome(
            file.path,
            file.sop_instance_uid,
            False,
            False,
            None,
            f"{where} accepts no presentation context for SOP class {file.sop_class_uid} "
            f"in {file.transfer_syntax_uid}: {error}",
        )
    except (OSError, AttributeError) as error:
        return SendOutcome(
            file.path, file.sop_instance_uid, False, False, None, f"cannot send: {error}"
        )
    if "Status" not in response:
        reason = (
            f"no C-STORE response from {where} (timed out or aborted)"
            if not assoc.is_aborted
            else f"association with {where} aborted during C-STORE"
        )
        return SendOutcome(file.path, file.sop_instance_uid, False, True, None, reason)
    status = int(response.Status)
    delivered, transient, reason = status_outcome(status)
    comment = response.get("ErrorComment")
    if comment:
        reason += f": {comment}"
    return SendOutcome(file.path, file.sop_instance_uid, delivered, transient, status, reason)


def _association_failure(
    assoc: Association, where: str, connected: bool, connect_errors: list[str]
) -> tuple[bool, str]:
    """(transient, reason) for an association that was never established."""
    if not connected:
        detail = "no TCP connection"
        if connect_errors:
            detail = connect_errors[-1].removeprefix("TCP Initialisation Error: ")
        return True, f"cannot connect to {where}: {detail}"
    response = getattr(assoc.acceptor, "primitive", None)
    result = getattr(response, "result", None)
    if assoc.is_rejected and response is not None:
        words = f"{response.result_str}, source: {response.source_str}, {response.reason_str}"
        if result == 0x01:
            return False, f"association rejected by {where} ({words})"
        return True, f"association rejected by {where} ({words})"
    if result == 0x00 and assoc.rejected_contexts:
        # Accepted, but with no presentation context we proposed: it takes none of our objects.
        return False, f"{where} accepts none of the SOP classes / transfer syntaxes proposed"
    if response is None and assoc.is_aborted:
        return True, f"no answer from {where} to the association request (timed out or aborted)"
    return True, f"association with {where} aborted"


class _LogCollector(logging.Handler):
    """Keeps the messages of log records that start with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__(level=logging.DEBUG)
        self.prefix = prefix
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.prefix):
            self.messages.append(message)
