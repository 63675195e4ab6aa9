"""The control socket of a live mount: tools ask the daemon to change its state.

/run/rofs/<hash of the mountpoint>.sock (see rofs.store.registry.runtime_path), mode 0600 in a
0700 directory, and only root or the daemon's own user are answered.  One request per
connection, one JSON line each way:

    {"op": "revert", "path": ["ssh", "sshd_config"]}   ->  {"ok": true, "reverted": true}
    {"op": "ping"}                                     ->  {"ok": true, "pid": 1234}
    {"op": "status"}          ->  {"ok": true, "state": ..., "nodes": ..., ...} (rofs status)
    {"op": "restore", "path": [...], "source": "STATE/.rofs/attic/.../tree/..."}
                              ->  {"ok": true}   (rofs attic --restore; rofs.store.attic)

Errors come back as {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
import threading

from rofs._sys import name_this_thread
from rofs.store.layers import open_listable
from rofs.store.quoting import quote_path

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20


class ControlError(Exception):
    """The daemon could not be reached, or refused; `errno` when it said which."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


# ---------------------------------------------------------------- the daemon's side


class Server:
    """The control socket, served by a thread of its own.  What a request changes in
    the overlay runs on the FUSE loop's thread (`session.call_soon_threadsafe`), between
    requests; the kernel's caches are invalidated afterwards from this thread, never the
    loop's (the kernel may wait on the loop meanwhile)."""

    def __init__(self, path: str, overlay, session, describe=dict) -> None:
        self.path, self.overlay, self.session, self.describe = path, overlay, session, describe
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, name="rofs-control", daemon=True)
        self.thread.start()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _serve(self) -> None:
        name_this_thread()
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(30)
                self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        try:
            if _peer_uid(conn) not in (0, os.getuid()):
                reply = {"ok": False, "error": "permission denied"}
            else:
                data = b""
                while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                reply = self._answer(json.loads(data))
        except Exception as e:  # a bad request must not take the mount down
            log.exception("control request failed")
            reply = {"ok": False, "error": str(e) or type(e).__name__}
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass

    def _on_loop(self, fn):
        """fn() on the FUSE loop's thread; its result or exception here."""
        done = threading.Event()
        box: list = []

        def call() -> None:
            try:
                box.append((True, fn()))
            except BaseException as e:
                box.append((False, e))
            done.set()

        self.session.call_soon_threadsafe(call)
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _answer(self, request: dict) -> dict:
        op = request.get("op")
        overlay = self.overlay
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "status":
            return self._on_loop(lambda: {"ok": True, "pid": os.getpid(), **self.describe(),
                                          **overlay.stats()})
        if op == "revert":
            path = tuple(os.fsencode(c) for c in request["path"])
            try:
                entry = self._on_loop(lambda: overlay.revert(path))
            except OSError as e:
                code = e.errno or errno.EIO
                return {"ok": False, "error": os.strerror(code), "errno": code}
            if entry is not None:
                self._invalidate(*entry)
            log.info("reverted %s", quote_path(path))
            return {"ok": True, "reverted": entry is not None}
        if op == "restore":
            path = tuple(os.fsencode(c) for c in request["path"])
            source = os.fsencode(request["source"])
            parent_fd = open_listable(None, os.path.dirname(source))
            try:
                entry = self._on_loop(lambda: overlay.restore(path, parent_fd,
                                                              os.path.basename(source)))
            except OSError as e:
                code = e.errno or errno.EIO
                return {"ok": False, "error": os.strerror(code), "errno": code}
            finally:
                os.close(parent_fd)
            self._invalidate(*entry)
            log.info("restored %s from the attic", quote_path(path))
            return {"ok": True}
        return {"ok": False, "error": "unknown request %r" % op}

    def _invalidate(self, parent_ino: int, name: bytes) -> None:
        code = self.session.invalidate_entry(parent_ino, name)
        if code not in (0, errno.ENOENT):  # ENOENT: the kernel did not know the entry
            raise OSError(code, os.strerror(code))
        # The directory's attributes and its cached listing (FOPEN_CACHE_DIR).
        self.session.invalidate_inode(parent_ino, 0, 0)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


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
