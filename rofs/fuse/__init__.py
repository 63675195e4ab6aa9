"""rofs's own FUSE channel: the kernel's protocol spoken directly (no libfuse, no
pyfuse3).  Knows nothing about overlays.

- `rofs.fuse.proto`: the structures and constants of <linux/fuse.h>;
- `rofs.fuse.mount`: mount(2) as root, fusermount3 for other users; unmounting;
- `rofs.fuse.session`: the request loop: reading, decoding, dispatching, replying,
  worker threads for offloaded work, notifications;
- `rofs.fuse.loop`: how a handler waits for slow work (`offload`, `Event`; for a model
  that must not import the protocol, the same as the `LOOP` object handed to it)
  without holding up the others.
"""

from rofs.fuse.loop import LOOP, Event, Loop, offload, run_inline
from rofs.fuse.session import FuseError, Operations, Request, Session, SetAttr

__all__ = ["LOOP", "Event", "FuseError", "Loop", "Operations", "Request", "Session",
           "SetAttr", "offload", "run_inline"]
