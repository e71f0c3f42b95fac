"""Moves the wall clock of every Python process a shifted test run starts (date-bomb guard).

Only on ``PYTHONPATH`` when ``pytest --clock-at`` asked for it (see ``tests/support/clock_shift``):
child processes (``xvr-node serve``, ``xvr-node worker``) then read the same shifted time as
the test process, offset from the real clock by ``XVRTEST_CLOCK_OFFSET_S`` seconds.
"""

import os

_offset = os.environ.get("XVRTEST_CLOCK_OFFSET_S")
if _offset:
    import datetime

    import time_machine

    _now = datetime.datetime.now(datetime.UTC)
    time_machine.travel(_now + datetime.timedelta(seconds=float(_offset)), tick=True).start()
