"""Entering a worker's working directory with the permissions of the user it runs as.

The daemon runs as root and starts each worker as its submitter. Were the directory
entered in the child before it drops root (what subprocess does with ``cwd=``), a
member could name any directory root can reach: one inside a root-only directory, a
symlink into one, /root. So the daemon takes on the submitter's effective uid, gid and
groups just long enough to open the directory and change into it, which is the check
the user's own ``cd`` makes, and switches back; the worker, forked right after, starts
in the directory it inherits. No path of a request is walked with root's permissions,
and no extra process is started per worker.

The directory is opened with openat2(2) and RESOLVE_NO_MAGICLINKS: /proc/PID/cwd,
/proc/PID/root and /proc/self/fd/N do not follow a path but jump into another
process's view of the file system (another mount namespace, a deleted directory), so
they are refused even where the user could follow them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import stat
from typing import Iterator

log = logging.getLogger("pmlmd.workdir")

SYS_OPENAT2 = 437  # on every architecture but alpha: syscalls added since Linux 5.1 share their numbers
AT_FDCWD = -100
RESOLVE_NO_MAGICLINKS = 0x02
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


class DirectoryError(Exception):
    """A worker's working directory cannot be entered; the message says which and why."""

    def __init__(self, path: str, why: str):
        super().__init__(f"cannot enter working directory {path}: {why}")
        self.path = path
        self.why = why


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(path: str, resolve: int, flags: int = _DIR_FLAGS, mode: int = 0) -> int:
    how = _OpenHow(flags, mode, resolve)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(os.fsencode(path)),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


_openat2_works: bool | None = None


def _have_openat2() -> bool:
    """Whether the kernel offers openat2 (Linux 5.6) and no seccomp filter hides it."""
    global _openat2_works
    if _openat2_works is None:
        try:
            os.close(_openat2("/", 0))
            _openat2_works = True
        except OSError as e:
            _openat2_works = e.errno not in (errno.ENOSYS, errno.EPERM)
            if not _openat2_works:
                log.warning("openat2 is not available (%s): working directories are opened plainly and checked "
                            "for /proc magic links afterwards", e.strerror)
    return _openat2_works


def _through_magic_link(path: str) -> bool:
    """After openat2 refused ``path`` with ELOOP: was it a magic link, or a plain symlink loop?

    Opened again without the refusal, a symlink loop still gives ELOOP; anything else means
    the walk got past the point where the magic link stopped it. Only classifies an error:
    the descriptor, if any, is closed at once.
    """
    try:
        os.close(_openat2(path, 0))
    except OSError as e:
        return e.errno != errno.ELOOP
    return True


def _open_plain(path: str) -> int:
    """Without openat2: open, then refuse a directory that its own path does not lead to.

    A magic link jumps somewhere no path walk reaches (another mount namespace, a
    deleted directory); such a directory is not the one the kernel's name for it names.
    """
    if os.path.normpath(path) == "/proc" or os.path.normpath(path).startswith("/proc/"):
        raise DirectoryError(path, f"refused, {path} goes through a /proc magic link")
    fd = os.open(path, _DIR_FLAGS)
    try:
        opened = os.fstat(fd)
        try:
            named = os.stat(os.readlink(f"/proc/self/fd/{fd}"))
            same = (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)
        except OSError:
            same = False
        if not same:
            raise DirectoryError(path, f"refused, {path} goes through a /proc magic link")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _why(path: str, e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ENOENT:
        return "no such directory"
    if e.errno == errno.ENOTDIR:
        return "not a directory"
    if e.errno == errno.ELOOP:
        if _have_openat2() and _through_magic_link(path):
            return f"refused, {path} goes through a /proc magic link"
        return "too many levels of symbolic links"
    text = e.strerror or os.strerror(e.errno)
    return text[:1].lower() + text[1:]


def _open_directory(path: str) -> int:
    """An O_PATH descriptor of the directory, resolved with the permissions we have now."""
    try:
        if "\0" in path:  # a C string would end there and name another directory
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        if _have_openat2():
            return _openat2(path, RESOLVE_NO_MAGICLINKS)
        return _open_plain(path)
    except OSError as e:
        raise DirectoryError(path, _why(path, e)) from None


@contextlib.contextmanager
def _acting_as(credentials) -> Iterator[None]:
    """Take on the user's effective uid, gid and groups for the duration; root's come back after.

    Effective ids only: the real and saved uid stay 0, so the way back is open and the user
    cannot signal or trace pmlmd meanwhile. glibc applies each change to every thread, so
    libzmq's threads hold no root credentials either while this lasts.
    """
    euid, egid, groups = os.geteuid(), os.getegid(), os.getgroups()
    # A change of effective ids makes the process undumpable; pmlmd's own setting comes back after.
    dumpable = _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    try:
        # Groups and gid first: once the euid is not 0, changing them is no longer allowed.
        os.setgroups(list(credentials.groups))
        os.setegid(credentials.gid)
        os.seteuid(credentials.uid)
        yield
    finally:
        try:
            os.seteuid(euid)  # first: root's euid is what allows the rest
            os.setegid(egid)
            os.setgroups(groups)
        except OSError:
            # Going on would serve every later request with the user's credentials.
            log.critical("cannot take back pmlmd's own credentials after acting as uid %d: aborting",
                         credentials.uid, exc_info=True)
            os.abort()
        if dumpable in (0, 1):
            _libc.prctl(PR_SET_DUMPABLE, dumpable, 0, 0, 0)


@contextlib.contextmanager
def entered(path: str, credentials=None) -> Iterator[None]:
    """Stand in ``path`` for the duration, entered with the permissions of ``credentials``.

    ``credentials`` (uid, gid, groups) are taken on to open and enter the directory; None
    means with the process's own. Raises DirectoryError when that fails. A process forked
    inside the ``with`` starts in the directory; on leaving, the process is back in the
    directory it stood in before. Not for threads: the working directory is the process's.
    """
    home = os.open(".", _DIR_FLAGS)
    try:
        try:
            with _acting_as(credentials) if credentials is not None else contextlib.nullcontext():
                fd = _open_directory(path)
                try:
                    # As the user: fchdir checks search permission on the directory, as cd does.
                    os.fchdir(fd)
                except OSError as e:
                    raise DirectoryError(path, _why(path, e)) from None
                finally:
                    os.close(fd)
        except OSError as e:  # only taking on the user's credentials raises it here
            who = credentials.uid if credentials is not None else os.geteuid()
            raise DirectoryError(path, f"cannot act as uid {who}: {e.strerror}") from None
        yield
    finally:
        os.fchdir(home)
        os.close(home)


def check(path: str, credentials=None) -> None:
    """Raise DirectoryError unless ``credentials`` could enter ``path`` now (see ``entered``)."""
    with entered(path, credentials):
        pass


def open_file(path: str, flags: int, mode: int = 0o666, credentials=None) -> int:
    """A descriptor of the file at the absolute ``path``, opened as ``credentials`` (uid, gid,
    groups) would open it: created by them, owned by them, with their permissions checked.

    For files pmlmd writes on a user's behalf (``--results``, ``--joblog``): root's
    permissions are never used to reach them. ``flags`` are os.open's (O_CLOEXEC is added);
    ``mode`` is filtered by pmlmd's umask as usual. Paths through a /proc magic link
    (/proc/self/fd/N would be one of pmlmd's own files) are refused, and so is anything but a
    regular file: opening a FIFO waits for a reader (a user could hold pmlmd's loop there, acting
    as them), and a device or socket is no file to write. Raises OSError, with ``filename``
    set, when the file cannot be opened.
    """
    # O_NONBLOCK: a FIFO without a reader fails at once (ENXIO) instead of blocking the open;
    # it changes nothing for a regular file (open(2)).
    flags |= os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        with _acting_as(credentials) if credentials is not None else contextlib.nullcontext():
            fd = _open_as_is(path, flags, mode)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise OSError(errno.ENXIO, NOT_REGULAR, path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, NOT_REGULAR, path)
    return fd


NOT_REGULAR = "not a regular file (a FIFO, a device or a socket)"


def _open_as_is(path: str, flags: int, mode: int) -> int:
    """open_file's open, with the credentials it acts as already taken on."""
    if "\0" in path:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
    if _have_openat2():
        try:
            return _openat2(path, RESOLVE_NO_MAGICLINKS, flags, mode)
        except OSError as e:
            if e.errno == errno.ELOOP and _through_magic_link(path):
                raise OSError(errno.ELOOP, "refused, the path goes through a /proc magic link", path) from None
            raise
    normal = os.path.normpath(path)
    if normal == "/proc" or normal.startswith("/proc/"):
        raise OSError(errno.EPERM, "refused, files under /proc are not written for a user", path)
    return os.open(path, flags, mode)


def make_directories(path: str, credentials=None, mode: int = 0o777) -> None:
    """``mkdir -p path`` as ``credentials`` would run it (see ``open_file``); raises OSError."""
    with _acting_as(credentials) if credentials is not None else contextlib.nullcontext():
        normal = os.path.normpath(path)
        if normal == "/proc" or normal.startswith("/proc/"):
            raise OSError(errno.EPERM, "refused, directories under /proc are not made for a user", path)
        os.makedirs(path, mode, exist_ok=True)
