"""Close the current WAL segment and wait until Barman holds it, quickly, even on an idle server.

Shared by every step that needs the newest WAL in Barman's archive: target resolution,
the WAL coverage proof, dr_find_target and the drill.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


@contextmanager
def nudging(write_wal: Any, every_s: float = 1.0) -> Iterator[None]:
    """Write a little WAL every second while `barman switch-wal --archive` waits.

    Barman's streaming archiver always leaves the newest complete segment in its streaming
    directory until pg_receivewal opens the next one, i.e. until the server writes WAL
    again. An idle (or frozen) server may write nothing for up to 15 s (the next
    running-xacts record): the closed segment would sit there and the switch would time
    out. One tiny commit per second makes the next segment start at once.
    """
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                write_wal()
            except Exception:  # noqa: BLE001 - best effort; the switch reports its own failure
                log.debug("WAL nudge failed", exc_info=True)

    t = threading.Thread(target=loop, name="wal-nudge", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=30)

