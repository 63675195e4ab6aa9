"""Random data-path calls on one directory, printing each call and what it answered:
run on ext4 and through rofs over ext4, the two outputs must be the same
(tests/test_errnos.py).  Usage: errno_fuzz.py DIR SEED COUNT

The calls are those whose arguments a caller chooses freely: lseek (SEEK_DATA,
SEEK_HOLE), pread, pwrite, fallocate, copy_file_range, setxattr, getxattr and listxattr
with the caller's buffer size, and ioctl (a fixed list: an arbitrary command could be
one that shuts ext4 down).  Offsets, lengths, modes, flags and sizes are drawn from the
edges of their ranges as well as the middle."""

import ctypes
import errno
import fcntl
import os
import random
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
libc.getxattr.restype = ctypes.c_ssize_t
libc.listxattr.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
libc.listxattr.restype = ctypes.c_ssize_t
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.copy_file_range.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int,
                                 ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t,
                                 ctypes.c_uint]
libc.copy_file_range.restype = ctypes.c_ssize_t
libc.lseek.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int]
libc.lseek.restype = ctypes.c_int64

# Not FS_IOC_GETVERSION: kernel overlayfs answers ENOTTY to it, and so does rofs.
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
FIONREAD = 0x541B
UNKNOWN_IOCTL = 0x80047899


def offset(r: random.Random) -> int:
    return r.choice([0, 1, -1, 4095, 4096, 1 << 20, (1 << 22) - 1, 1 << 22, (1 << 22) + 1,
                     1 << 40, (1 << 63) - 1, -(1 << 63), r.randrange(0, 1 << 23)])


def length(r: random.Random) -> int:
    # No length between the filesystem's size and the largest file: ext4 would fill
    # itself allocating it, and what is left for the next call would depend on timing.
    return r.choice([0, 1, 4096, 65536, 1 << 20, (1 << 63) - 1, -1, r.randrange(1, 1 << 21)])


def outcome(fn, *args) -> str:
    try:
        result = fn(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    except (OverflowError, ValueError) as e:
        return type(e).__name__
    return repr(result)


def checked(fn, *args) -> int:
    value = fn(*args)
    if value < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return value


def seek(fd: int, off: int, whence: int) -> str:
    """SEEK_DATA/SEEK_HOLE: the errno, or that the answer lies between the offset and
    the end.  Where ext4 puts a hole over an unwritten extent depends on which of its
    pages are in the page cache (a read puts them there): through rofs, the pages of
    the upper file's, which the kernel reads ahead in its own way."""
    found = checked(libc.lseek, fd, off, whence)
    size = os.fstat(fd).st_size
    return "ok" if off <= found <= size else "out of range: %d" % found


def ioctl(fd: int, cmd: int, arg: bytearray) -> str:
    """What an ioctl answered, and the argument it wrote back."""
    result = fcntl.ioctl(fd, cmd, arg, True)
    return "%d %s" % (result, bytes(arg).hex())


def main() -> None:
    directory, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    r = random.Random(seed)
    path = os.path.join(directory, "fuzzed")
    other = os.path.join(directory, "other")
    with open(path, "wb") as f:  # data, a hole, data
        f.write(os.urandom(1 << 20))
        f.seek(3 << 20)
        f.write(os.urandom(1 << 20))
    with open(other, "wb") as f:
        f.write(os.urandom(1 << 16))
    fds = {"rw": os.open(path, os.O_RDWR), "ro": os.open(path, os.O_RDONLY),
           "app": os.open(path, os.O_WRONLY | os.O_APPEND),
           "other": os.open(other, os.O_RDWR)}
    names = [b"user.a", b"user.b", b"user." + b"n" * 250, b"trusted.t", b"security.s",
             b"other.x", b"user.", b"user." + b"m" * 251]
    bpath = os.fsencode(path)
    for i in range(count):
        call = r.choice(["lseek", "pread", "pwrite", "fallocate", "copy_file_range",
                         "setxattr", "getxattr", "listxattr", "ioctl"])
        which = r.choice(sorted(fds))
        fd = fds[which]
        if call == "lseek":
            off, whence = offset(r), r.choice([os.SEEK_DATA, os.SEEK_HOLE])
            args = (which, off, whence)
            result = outcome(seek, fd, off, whence)
        elif call == "pread":
            off, size = offset(r), r.choice([0, 1, 4096, 1 << 16])
            args = (which, off, size)
            result = outcome(lambda *a: len(os.pread(*a)), fd, size, off)
        elif call == "pwrite":
            off, data = offset(r), b"w" * r.choice([0, 1, 100, 5000])
            args = (which, off, len(data))
            result = outcome(os.pwrite, fd, data, off)
        elif call == "fallocate":
            # FUSE carries keep-size, punch-hole and zero-range only: the kernel answers
            # EOPNOTSUPP for collapse, insert and unshare without asking rofs.
            mode = r.choice([0, 1, 3, 0x10, 0x11, 0x2, 0x4, 0x13, 0x80, 0x1000,
                             r.randrange(0, 256) & ~0x68])
            off, size = offset(r), length(r)
            args = (which, mode, off, size)
            result = outcome(checked, libc.fallocate, fd, mode, off, size)
        elif call == "copy_file_range":
            dst_name = r.choice(sorted(fds))
            off_in, off_out = ctypes.c_int64(offset(r)), ctypes.c_int64(offset(r))
            # A length past the data only with flags the call refuses: copying up to
            # the end of a file made a terabyte long by a pwrite would fill the disk.
            flags = r.choice([0, 0, 0, 1])
            size = r.choice([0, 1, 4096, 1 << 20] + ([(1 << 64) - 1, 1 << 63] if flags
                                                      else []))
            args = (which, dst_name, off_in.value, off_out.value, size, flags)
            result = outcome(checked, libc.copy_file_range, fd, ctypes.byref(off_in),
                             fds[dst_name], ctypes.byref(off_out), size, flags)
        elif call == "setxattr":
            name = r.choice(names)
            value = b"v" * r.choice([0, 1, 100, 4000, 65536, 65537])
            flags = r.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE, 3, 4, 1 << 31])
            args = (name, len(value), flags)
            result = outcome(os.setxattr, path, name, value, flags)
        elif call == "getxattr":
            name, size = r.choice(names), r.choice([0, 1, 50, 4096, 65536, 1 << 20])
            args = (name, size)
            buf = ctypes.create_string_buffer(max(size, 1))
            result = outcome(checked, libc.getxattr, bpath, name, buf, size)
        elif call == "listxattr":
            size = r.choice([0, 1, 10, 4096, 65536])
            args = (size,)
            buf = ctypes.create_string_buffer(max(size, 1))
            result = outcome(checked, libc.listxattr, bpath, buf, size)
        else:
            cmd = r.choice([FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FIONREAD, UNKNOWN_IOCTL])
            # Flags as chattr sets them: what the file has (ext4's extents flag) and
            # more.  No immutable or append-only: for those the VFS checks some calls
            # (fallocate's range, a copy's length) before the filesystem, and FUSE
            # inodes never carry them (test_hostile.py holds rofs to ext4 there).
            arg = bytearray(struct.pack("<q", 0x80000 | r.choice([0, 0x40, 0x80, 0x8])))
            args = (which, hex(cmd), bytes(arg).hex())
            result = outcome(ioctl, fd, cmd, arg)
        print(i, call, args, result)
    print("size", os.stat(path).st_size, "xattrs", sorted(os.listxattr(path)))


if __name__ == "__main__":
    main()
