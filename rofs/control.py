"""The control socket of a live mount: tools ask the daemon to change its state.

/run/rofs/<hash of the mountpoint>.sock (see rofs.tools.runtime_path), mode 0600 in a
0700 directory, and only root or the daemon's own user are answered.  One request per
connection, one JSON line each way:

    {"op": "revert", "path": ["ssh", "sshd_config"]}   ->  {"ok": true, "reverted": true}
    {"op": "ping"}                                     ->  {"ok": true, "pid": 1234}
    {"op": "status"}          ->  {"ok": true, "state": ..., "nodes": ..., ...} (rofs status)
    {"op": "restore", "path": [...], "source": "STATE/.rofs/attic/.../tree/..."}
                              ->  {"ok": true}   (rofs attic --restore; rofs.attic)

Errors come back as {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct

import pyfuse3
import trio

from rofs.layers import open_listable
from rofs.names import quote_path

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20


class ControlError(Exception):
    """The daemon could not be reached, or refused; `errno` when it said which."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


# ---------------------------------------------------------------- the daemon's side


async def serve(path: str, overlay, describe=dict) -> None:
    """Answer control requests until cancelled.  `describe()`: the mount's settings and
    counters for `status`."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(8)
    try:
        await trio.serve_listeners(lambda stream: _handle(stream, overlay, describe),
                                   [trio.SocketListener(sock)])
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _peer_uid(stream) -> int:
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                     struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


async def _handle(stream, overlay, describe) -> None:
    async with stream:
        try:
            if _peer_uid(stream) not in (0, os.getuid()):
                reply = {"ok": False, "error": "permission denied"}
            else:
                data = b""
                while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
                reply = await _answer(json.loads(data), overlay, describe)
        except Exception as e:  # a bad request must not take the mount down
            log.exception("control request failed")
            reply = {"ok": False, "error": str(e) or type(e).__name__}
        try:
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except trio.BrokenResourceError:
            pass


async def _answer(request: dict, overlay, describe) -> dict:
    op = request.get("op")
    if op == "ping":
        return {"ok": True, "pid": os.getpid()}
    if op == "status":
        return {"ok": True, "pid": os.getpid(), **describe(), **overlay.stats()}
    if op == "revert":
        path = tuple(os.fsencode(c) for c in request["path"])
        try:
            entry = overlay.revert(path)
        except OSError as e:
            code = e.errno or errno.EIO
            return {"ok": False, "error": os.strerror(code), "errno": code}
        if entry is not None:
            # In a thread: the kernel may need this daemon to answer requests first.
            await trio.to_thread.run_sync(_invalidate, *entry)
        log.info("reverted %s", quote_path(path))
        return {"ok": True, "reverted": entry is not None}
    if op == "restore":
        path = tuple(os.fsencode(c) for c in request["path"])
        source = os.fsencode(request["source"])
        parent_fd = open_listable(None, os.path.dirname(source))
        try:
            entry = overlay.restore(path, parent_fd, os.path.basename(source))
        except OSError as e:
            code = e.errno or errno.EIO
            return {"ok": False, "error": os.strerror(code), "errno": code}
        finally:
            os.close(parent_fd)
        await trio.to_thread.run_sync(_invalidate, *entry)
        log.info("restored %s from the attic", quote_path(path))
        return {"ok": True}
    return {"ok": False, "error": "unknown request %r" % op}


def _invalidate(parent_ino: int, name: bytes) -> None:
    try:
        pyfuse3.invalidate_entry(parent_ino, name)
    except OSError as e:
        if e.errno != errno.ENOENT:  # the kernel did not know the entry: nothing to do
            raise
    try:
        pyfuse3.invalidate_inode(parent_ino, attr_only=True)
    except OSError:
        pass


# ---------------------------------------------------------------- the tools' side


def request(path: str, message: dict, timeout: float = 60.0) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise ControlError("cannot reach the rofs daemon at %s: %s" % (path, e)) from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError("no answer from the rofs daemon at %s" % path) from None
    if not reply.get("ok"):
        code = reply.get("errno")
        raise ControlError(reply.get("error", "failed"), code if isinstance(code, int) else None)
    return reply
