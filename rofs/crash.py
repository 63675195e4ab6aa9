"""Named crash points, for tests: `ROFS_CRASH_AT=site[:n]` makes the daemon kill itself
(SIGKILL, nothing flushed, nothing cleaned up) the n-th time (default: the first) it
reaches `site`, so a test can crash it exactly between two steps of a change and check
what the next mount shows (tests/test_crash_points.py).

Unset, as in production, a crash point is one comparison.  An unknown site name is an
error at mount (`check`), so a typo cannot make a test pass by never crashing.
"""

from __future__ import annotations

import os
import signal

# Every site, and where it is (docs/reliability.md lists what each test checks).
SITES = {
    "copy-up:prepared": "a copy-up's copy is whole in the work dir (and indexed)",
    "copy-up:placed": "a copy-up's copy is in place; other names of a hard link not yet",
    "copy-up:linked": "a copied-up hard link's other known name linked, count not yet",
    "create:prepared": "a new entry is whole in the work dir",
    "mkdir:swapped": "a directory replaced a whiteout; the whiteout in the work dir",
    "whiteout:prepared": "a whiteout is made in the work dir, not yet in place",
    "rename:marked": "a directory about to move got its redirect or opaque marker",
    "rename:across-placed": "a move across classes: the destination holds the copy, the "
                            "source name is still there",
    "materialize:linked": "a lower name of a copied-up hard link linked to the copy, the "
                          "index's count not yet lowered",
}

_at: tuple[str, int] | None = None
_seen = 0


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    site, colon, count = value.rpartition(":")
    if colon and count.isdigit():  # site names have colons too: "copy-up:placed:2"
        return site, int(count)
    return value, 1


def check() -> None:
    """Read $ROFS_CRASH_AT; ValueError for an unknown site or a count of 0."""
    global _at
    _at = _parse(os.environ.get("ROFS_CRASH_AT"))
    if _at is not None and (_at[0] not in SITES or _at[1] < 1):
        raise ValueError("ROFS_CRASH_AT=%s: no such crash point (sites: %s)" % (
            os.environ["ROFS_CRASH_AT"], ", ".join(SITES)))


def point(site: str) -> None:
    """Die here if $ROFS_CRASH_AT names this site (and this is its n-th time)."""
    global _seen
    if _at is None or _at[0] != site:
        return
    _seen += 1
    if _seen == _at[1]:
        os.kill(os.getpid(), signal.SIGKILL)
