"""The node's one wall clock: every "now" the catalog, queue, worker and exports read.

Code that stamps or compares times takes ``now`` or a ``clock`` where it can; where it cannot
(column defaults, the receiver), it calls :func:`now`. Tests pin this clock with
:func:`pinned` so that no test depends on the day it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

#: A source of aware UTC datetimes.
Clock = Callable[[], datetime]


def system_now() -> datetime:
    """The system's time as an aware UTC datetime (the only kind the catalog stores)."""
    return datetime.now(UTC)


_source: Clock = system_now


def now() -> datetime:
    """The current time by the node's clock: the system's unless a test pinned it."""
    return _source()


@contextmanager
def pinned(clock: Clock | datetime) -> Iterator[Clock]:
    """Use ``clock`` (or a fixed instant) as the node's clock inside the block.

    A test that drives time itself passes a callable it can move; a fixed instant suits a
    test that only needs every stamp to agree.
    """
    global _source
    source = clock if callable(clock) else (lambda: clock)
    if source().tzinfo is None:
        raise ValueError("the node's clock must return aware datetimes (UTC)")
    previous, _source = _source, source
    try:
        yield source
    finally:
        _source = previous
