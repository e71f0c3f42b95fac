"""Run the suite with the wall clock moved years ahead or back: ``pytest --clock-at DATE``.

A test that only passes on the day it was written (a fixed instant compared with the real
clock) fails under a shifted clock, so ``.ci/run`` replays the time-sensitive tests this way.
``time-machine`` moves what Python reads (``time.time``, ``datetime.now``; monotonic clocks
and timed waits are untouched, unlike Debian's libfaketime 0.9.10, whose ``clock_nanosleep``
answers Python 3.11's ``time.sleep`` with EINVAL and whose timed waits never return).
Child Python processes follow through ``shifted_clock/sitecustomize.py``; external peers
(PostgreSQL, Orthanc, DCMTK) keep the real time, which the node never reads.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import time_machine

SITE = Path(__file__).with_name("shifted_clock")


def shift_wall_clock(instant: str) -> datetime:
    """Move this process's clock, and every Python child's, so that now is ``instant``."""
    target = datetime.fromisoformat(instant)
    if target.tzinfo is None:
        target = target.replace(tzinfo=UTC)
    offset = (target - datetime.now(UTC)).total_seconds()
    os.environ["XVRTEST_CLOCK_OFFSET_S"] = repr(offset)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(SITE), os.environ.get("PYTHONPATH", "")) if part
    )
    time_machine.travel(target, tick=True).start()
    return target
