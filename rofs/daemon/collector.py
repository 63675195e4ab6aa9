"""The daemon's garbage collector: long-lived objects scanned once, not at every full
collection.

Python's cyclic collector pauses the whole process for a full collection, and a full
collection visits every tracked object: with the node table a user can make the kernel
hold (READDIRPLUS of a directory of 200,000 names: three tracked objects a node), each
pause held every request, root's included, for 0.4-0.8 s, and grew with the table.

What survives a full collection is reachable, and the daemon's long-lived objects
(nodes, open files, listings) are freed by reference counting when dropped: none of
them takes part in a reference cycle.  So after each full collection the survivors are
moved out of the collector's generations (`gc.freeze`): the next full collection visits
only what was made since, young cycles (exceptions and their frames, finished
coroutines) are still collected as before, and an object moved out is still freed by
its reference count.  What this gives up: garbage that becomes a cycle only after it
was moved out stays; the daemon makes none (a mount's whole run under the attacks of
benchmarks/attacks.py, collected in full at its end, found none).
"""

from __future__ import annotations

import gc
import time

# A full collection is considered after this many of the middle generation (Python's
# default: 10).  It visits only what was made since the last (the rest is frozen), so
# more often means shorter: under 8 readers of a user's 200,000 names, each takes 7.6 ms
# at the median and 44 ms at most (37.5 and 55 ms after ten), 20% less in all.
FULL_AFTER = 2


class Collector:
    """Installed once in the serving process (`install()`); `stats()` for status."""

    def __init__(self) -> None:
        self.full_collections = 0
        self.longest_ms = 0.0
        self._started = 0.0

    def install(self) -> None:
        gc.set_threshold(gc.get_threshold()[0], gc.get_threshold()[1], FULL_AFTER)
        gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.monotonic()
            return
        self.full_collections += 1
        self.longest_ms = max(self.longest_ms, (time.monotonic() - self._started) * 1000)
        gc.freeze()  # the survivors: reachable now, freed by their counts when dropped

    def stats(self) -> dict:
        return {"full_collections": self.full_collections,
                "longest_full_collection_ms": round(self.longest_ms, 1),
                "objects_out_of_scans": gc.get_freeze_count()}
