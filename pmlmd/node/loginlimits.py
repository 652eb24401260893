"""The resource limits a user's login gets from pam_limits' configuration.

A worker of the daemon is started by pmlmd, not by a login, so pam_limits never sets its
limits. pmlmd reads the same files and caps each worker's limits by what the owner's login
would get, so that no member can raise a limit the administrator set for them by
submitting a batch instead of running it in their shell.

The files are those pam_limits reads: ``limits.conf`` in the directory (normally
/etc/security), then ``limits.d/*.conf`` in the byte order of their names. Each line is
``<domain> <type> <item> <value>``; ``#`` starts a comment. How a line is matched and which
one wins is what Debian 12's pam_limits (Linux-PAM 1.5.2) does, checked against the module
itself:

* domains: a user name, a uid range (``1000:2000``, ``1000:``, ``:1000``), ``@group`` (the
  user's groups, supplementary ones included), ``@:gid`` (likewise), a gid range
  (``@1000:2000``, ``@1000:``: the primary group only), and ``*``. ``%`` domains count logins
  only and set no limit. A user name or uid range beats a group, a group beats ``*``; among
  lines of equal rank the later one wins, over every file. ``*`` and ``@group`` lines do not
  apply to root (uid 0); the numeric group forms do (limits.conf(5) says group limits do not
  apply to root, but the module applies ``@:0`` and ``@0:`` to it).
* types: ``soft``, ``hard``, or ``-`` for both. A ``-`` line whose soft limit was already
  set by a line of higher rank sets neither (the module's order of checks).
* values: a whole number, or ``unlimited``, ``infinity``, ``-1`` or ``-``; trailing
  characters after the digits are ignored as the module ignores them (with a warning here).
  core, data, fsize, memlock, rss, stack and as count KiB, cpu minutes, nice runs from -20 to
  19 (the kernel's ceiling is 20 - nice); the rest are plain numbers (msgqueue: bytes).
* a line ``<domain> -`` with no item that matches the user means "no limits": the login gets
  none of these files' limits at all.
* maxlogins, maxsyslogins, priority, nonewprivs and Debian's chroot are not resource limits
  and are passed over.

Deviations, each towards a user's own shell: a soft limit above the hard one is lowered to
it (the module does the same when it sets them); ``nofile unlimited`` is read as unlimited
rather than fs.nr_open (pmlmd's own limit, which is below nr_open, caps it anyway); a
negative value other than -1, which the module reads as a huge number, sets no limit. A line
that cannot be read is skipped with one warning naming the file and the line; nothing in
these files can stop the daemon.
"""

from __future__ import annotations

import grp
import logging
import os
import re
import resource
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("pmlmd.loginlimits")

INFINITY = resource.RLIM_INFINITY
_KERNEL_INFINITY = (1 << 64) - 1  # rlim_t's infinity: anything at or above it is no limit

RLIMIT_LOCKS = getattr(resource, "RLIMIT_LOCKS", 10)  # Python's resource module lacks it; 10 on every Linux

# item -> (resource, how many of the kernel's units one unit of the file is)
ITEMS: dict[str, tuple[int, int]] = {
    "cpu": (resource.RLIMIT_CPU, 60),
    "fsize": (resource.RLIMIT_FSIZE, 1024),
    "data": (resource.RLIMIT_DATA, 1024),
    "stack": (resource.RLIMIT_STACK, 1024),
    "core": (resource.RLIMIT_CORE, 1024),
    "rss": (resource.RLIMIT_RSS, 1024),
    "memlock": (resource.RLIMIT_MEMLOCK, 1024),
    "as": (resource.RLIMIT_AS, 1024),
    "nproc": (resource.RLIMIT_NPROC, 1),
    "nofile": (resource.RLIMIT_NOFILE, 1),
    "locks": (RLIMIT_LOCKS, 1),
    "sigpending": (resource.RLIMIT_SIGPENDING, 1),
    "msgqueue": (resource.RLIMIT_MSGQUEUE, 1),
    "nice": (resource.RLIMIT_NICE, 1),
    "rtprio": (resource.RLIMIT_RTPRIO, 1),
}
NOT_LIMITS = frozenset({"maxlogins", "maxsyslogins", "priority", "nonewprivs", "chroot"})
TYPES = {"soft": (True, False), "hard": (False, True), "-": (True, True)}
UNLIMITED = frozenset({"unlimited", "infinity", "-1", "-"})

# How a line's domain matched, best first; NONE: no line has set the limit yet.
USER, GROUP, DEFAULT, NONE = 0, 1, 2, 3

_DIGITS = re.compile(r"\+?(\d+)")
_RANGE = re.compile(r"(\d*):(\d*)")


@dataclass(frozen=True)
class Account:
    """Whom a login is for: the passwd entry's name, uid and primary gid, and every group."""

    name: str | None  # None: a uid with no passwd entry (only its numeric domains can match)
    uid: int
    gid: int
    groups: frozenset[int]  # the primary gid among them


@dataclass(frozen=True)
class _Line:
    where: str  # "FILE:LINE", for the log
    domain: str
    soft: bool
    hard: bool
    resource: int | None  # None: a "<domain> -" line (no limits at all for whom it matches)
    value: int = 0


class LoginLimits:
    """pam_limits' configuration under ``directory``, read again only when a file changes."""

    def __init__(self, directory: str = "/etc/security",
                 group_gid: Callable[[str], int | None] | None = None):
        self.directory = directory
        self.group_gid = group_gid or _group_gid
        self._signature: tuple | None = None
        self._lines: list[_Line] = []

    def limits_for(self, account: Account) -> dict[int, tuple[int | None, int | None]] | None:
        """resource.RLIMIT_* -> (soft, hard) the account's login gets; None where no line sets it,
        INFINITY for no limit. Resources no line sets are left out. None: a ``<domain> -`` line
        exempts the account from every limit of these files."""
        found: dict[int, list[int]] = {}  # resource -> [soft, soft rank, hard, hard rank]
        for line in self._read():
            rank = self._rank(line.domain, account)
            if rank is None:
                continue
            if line.resource is None:
                if line.domain == "*":
                    continue  # the module lifts limits for users and groups only
                return None
            entry = found.setdefault(line.resource, [0, NONE, 0, NONE])
            # Soft is looked at first, and a soft limit of better rank stops the whole line.
            if line.soft:
                if entry[1] < rank:
                    continue
                entry[0], entry[1] = line.value, rank
            if line.hard:
                if entry[3] < rank:
                    continue
                entry[2], entry[3] = line.value, rank
        limits = {}
        for resource_id, (soft, soft_rank, hard, hard_rank) in found.items():
            if soft_rank == hard_rank == NONE:
                continue
            soft_value = soft if soft_rank != NONE else None
            hard_value = hard if hard_rank != NONE else None
            if soft_value is not None and hard_value is not None:
                soft_value = lower(soft_value, hard_value)
            limits[resource_id] = (soft_value, hard_value)
        return limits

    def _rank(self, domain: str, account: Account) -> int | None:
        """How well a line's domain matches the account (USER, GROUP, DEFAULT), or None if it does not."""
        if account.name is not None and domain == account.name:
            return USER
        if domain.startswith("%"):
            return None  # counts logins; limits nothing
        if domain == "*":
            return DEFAULT if account.uid != 0 else None
        group = domain.startswith("@")
        body = domain[1:] if group else domain
        span = _RANGE.fullmatch(body)
        if span is None:
            if not group or account.uid == 0:
                return None  # another user's name; or a named group, which never applies to root
            gid = self.group_gid(body)
            return GROUP if gid is not None and gid in account.groups else None
        low, high = span[1], span[2]
        if not low:  # ":N" or "@:N": exactly that id (for a gid, any of the user's groups)
            if group:
                return GROUP if int(high) in account.groups else None
            return USER if account.uid == int(high) else None
        number = account.gid if group else account.uid
        if number < int(low) or (high and number > int(high)):
            return None
        return GROUP if group else USER

    # --- reading the files ----------------------------------------------------------------
    def files(self) -> list[str]:
        """limits.conf, then limits.d/*.conf by name, as pam_limits reads them."""
        paths = [os.path.join(self.directory, "limits.conf")]
        drop_ins = os.path.join(self.directory, "limits.d")
        try:
            names = os.listdir(drop_ins)
        except OSError:
            names = []
        # glob(3)'s "*.conf" leaves out hidden files; the module sorts by the bytes of the name.
        names = sorted((n for n in names if n.endswith(".conf") and not n.startswith(".")), key=os.fsencode)
        return paths + [os.path.join(drop_ins, n) for n in names]

    def _read(self) -> list[_Line]:
        paths = self.files()
        signature = tuple((path, _stamp(path)) for path in paths)
        if signature != self._signature:
            lines: list[_Line] = []
            for path, stamp in signature:
                if stamp is not None:
                    lines.extend(self._parse_file(path))
            self._signature, self._lines = signature, lines
        return self._lines

    def _parse_file(self, path: str) -> list[_Line]:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []  # removed between the listing and now: the next spawn sees it gone
        except OSError as e:
            log.warning("%s: cannot read it (%s): its limits are not applied to workers", path,
                        e.strerror or e)
            return []
        return parse(data.decode("utf-8", "replace"), path)


def parse(text: str, path: str = "limits.conf") -> list[_Line]:
    """The lines of one file that set (or lift) limits; each line it cannot use is logged once."""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{path}:{number}"
        content = raw.split("#", 1)[0]
        fields = content.split()
        if not fields:
            continue
        if _bad_range(fields[0]):
            log.warning("%s: skipped: %r is not a valid uid or gid range", where, fields[0])
            continue
        if len(fields) == 2 and fields[1].startswith("-"):
            lines.append(_Line(where, fields[0], True, True, None))
            continue
        if len(fields) < 4:
            log.warning("%s: skipped: expected '<domain> <type> <item> <value>', got %r", where, content.strip())
            continue
        domain, kind, item, value = fields[0], fields[1].lower(), fields[2].lower(), fields[3].lower()
        if item in NOT_LIMITS:
            continue
        if item not in ITEMS:
            log.warning("%s: skipped: unknown item %r", where, item)
            continue
        if kind not in TYPES:
            log.warning("%s: skipped: unknown type %r (expected soft, hard or -)", where, kind)
            continue
        resource_id, unit = ITEMS[item]
        amount = _value(item, value, unit)
        if amount is None:
            log.warning("%s: skipped: %r is not a value for %s", where, fields[3], item)
            continue
        if item != "nice" and value not in UNLIMITED and not _DIGITS.fullmatch(value):
            log.warning("%s: %r read as %s, as pam_limits reads it", where, fields[3], _DIGITS.match(value)[0])
        soft, hard = TYPES[kind]
        lines.append(_Line(where, domain, soft, hard, resource_id, amount))
    return lines


def _value(item: str, value: str, unit: int) -> int | None:
    if item == "nice":
        match = re.match(r"[-+]?\d+", value)
        if match is None:
            return None
        return 20 - max(-20, min(19, int(match[0])))
    if value in UNLIMITED:
        return INFINITY
    match = _DIGITS.match(value)
    if match is None:
        return None
    amount = int(match[1]) * unit
    return INFINITY if amount >= _KERNEL_INFINITY else amount


def _bad_range(domain: str) -> bool:
    """A domain with a ':' that is not one of the module's ranges (which it skips)."""
    body = domain[1:] if domain[:1] in "@%" else domain
    if ":" not in body:
        return False
    span = _RANGE.fullmatch(body)
    return span is None or (not span[1] and not span[2])


def _stamp(path: str) -> tuple | None:
    """What tells a changed file from the one read before; None if it is not there to read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _group_gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def lower(a: int, b: int) -> int:
    """The lower of two limits, INFINITY being above every number."""
    if a == INFINITY:
        return b
    if b == INFINITY:
        return a
    return min(a, b)
