"""The Storage SCP: an AE with our presentation contexts, limits and handlers; nothing else."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from xvr_node.config import AllowedCaller, NodeSettings
from xvr_node.dicom.receive import STORAGE_SOP_CLASSES, Receiver

LOG = logging.getLogger(__name__)

#: What we accept, best first. The acceptor's order decides: lossless compressed syntaxes
#: first, so a sender keeps its own encoding; then uncompressed; lossy last, so no sender is
#: ever asked to compress lossily what it holds uncompressed.
TRANSFER_SYNTAXES = [
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLosslessP14,
    RLELossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
]

#: pynetdicom's reason codes of an A-ASSOCIATE-RJ, for the rejection record.
CALLING_AE_NOT_RECOGNISED = "calling AE title or address not in node.allowed_callers"
TOO_MANY_ASSOCIATIONS = "too many associations (node.max_associations)"


class NodeAE(AE):
    """An AE whose calling-AE allowlist depends on the peer's address.

    pynetdicom checks ``require_calling_aet`` inside the association's own thread while it
    negotiates, so the property can look at that association's peer.
    """

    def __init__(self, ae_title: str, allowed: list[AllowedCaller]) -> None:
        super().__init__(ae_title=ae_title)
        self._allowed = allowed

    @property
    def require_calling_aet(self) -> list[str]:  # type: ignore[override]
        if not self._allowed:
            return []
        association = threading.current_thread()
        address = association.requestor.address if isinstance(association, Association) else ""
        titles = [caller.ae_title for caller in self._allowed if _address_allowed(caller, address)]
        # A non-empty list that no title matches rejects every caller from this address.
        return titles or ["\\no caller allowed"]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:  # pragma: no cover
        raise AttributeError("xvr-node sets its allowlist from node.allowed_callers")


def _address_allowed(caller: AllowedCaller, address: str) -> bool:
    if not caller.address:
        return True
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(caller.address, strict=False)
    except ValueError:
        return False


def build_ae(node: NodeSettings) -> NodeAE:
    """The application entity, with contexts, limits and time-outs from ``node``."""
    ae = NodeAE(node.ae_title, list(node.allowed_callers))
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_bytes
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    return ae


def tls_context(node: NodeSettings) -> ssl.SSLContext | None:
    """A server TLS context from ``node.tls``, or None when TLS is off."""
    tls = node.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    for ca in tls.ca_certificates:
        context.load_verify_locations(str(ca))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def handlers(
    receiver: Receiver, on_rejected: Callable[[str, str, str], None]
) -> list[tuple[evt.EventType, Callable]]:
    """Event handlers: each hands what it got to the receiver and returns a status."""

    def handle_echo(event: evt.Event) -> int:
        return 0x0000

    def handle_store(event: evt.Event) -> int:
        requestor = event.assoc.requestor
        outcome = receiver.receive(
            event.encoded_dataset(include_meta=True),
            calling_ae=requestor.ae_title,
            peer=requestor.address,
            context_sop_class=str(event.context.abstract_syntax),
            affected_sop_class=str(event.request.AffectedSOPClassUID or "") or None,
        )
        return outcome.status

    def handle_rejected(event: evt.Event) -> None:
        assoc = event.assoc
        acceptors = [a for a in assoc.ae.active_associations if a.is_acceptor]
        reason = (
            TOO_MANY_ASSOCIATIONS
            if len(acceptors) > assoc.ae.maximum_associations
            else CALLING_AE_NOT_RECOGNISED
        )
        on_rejected(assoc.requestor.ae_title, assoc.requestor.address, reason)

    def handle_accepted(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        LOG.info(
            "association accepted",
            extra={
                "event": "association_accepted",
                "calling_ae": requestor.ae_title,
                "peer": requestor.address,
            },
        )

    def handle_ended(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        LOG.info(
            "association ended",
            extra={
                "event": "association_aborted"
                if event.event is evt.EVT_ABORTED
                else "association_released",
                "calling_ae": requestor.ae_title,
                "peer": requestor.address,
            },
        )

    def handle_open(event: evt.Event) -> None:
        # Small C-STORE responses must not wait for Nagle's algorithm.
        sock = getattr(event.assoc.dul, "socket", None)
        raw = getattr(sock, "socket", None)
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_ACCEPTED, handle_accepted),
        (evt.EVT_RELEASED, handle_ended),
        (evt.EVT_ABORTED, handle_ended),
        (evt.EVT_CONN_OPEN, handle_open),
    ]
