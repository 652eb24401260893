#!/usr/bin/env python3
"""A real systemd (PID 1, D-Bus, journald) booted in a container, for pmlmd's systemd test tier.

The machines this project is developed and tested on are Debian 12 VMs whose PID 1 is not
systemd, with cgroups in hybrid mode. pmlmd's systemd integration (Type=notify, STATUS=,
the journal, transient scopes over the system bus) can still be exercised for real by booting
systemd 252 as PID 1 of a ``systemd-nspawn`` container on a Debian bookworm rootfs.

This module does that with the standard library only:

* ``ensure_rootfs()`` builds the rootfs once with ``mmdebstrap --variant=minbase`` and caches it
  under /var/lib/machines/pmlm-testbed-<hash>, the hash covering the package list and
  FORMAT_VERSION. The archive URIs come from the host's own apt sources (deb822 files), so no
  mirror is named here.
* ``Testbed`` boots a container from that rootfs with ``--volatile=overlay`` (every boot starts
  from the pristine rootfs; nothing is written to the cache), runs commands inside it with
  ``nsenter`` and powers it off again. It is a context manager and also powers off at exit.
* ``build_deb()`` builds pmlmd's Debian package on the host (``make deb``, optionally with a bumped
  revision, for upgrades) and ``install_deb()`` installs it inside with ``apt-get install ./FILE``
  (no network: the rootfs already holds every Depends and Recommends).
* ``install_pmlmd()`` installs the working tree's pmlmd inside without a package (quicker, for
  ``shell``).

Command line (as root)::

    python3 tests/systemd/testbed.py build [--force]   # build (or rebuild) the cached rootfs
    python3 tests/systemd/testbed.py shell             # boot, install pmlmd, bash inside
    python3 tests/systemd/testbed.py shell --deb       # the same with pmlmd from its .deb

Each nspawn flag below was needed on these machines; the comments say what for.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import datetime
import email.utils
import errno
import fcntl
import glob
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# --- what goes into the rootfs -------------------------------------------------------------------
SUITE = "bookworm"

# Everything the tier needs inside, so that nothing has to be fetched after the build: with pmlmd's
# .deb in mind, every package it Depends on (python3, python3-systemd, python3-zmq, python3-jeepney,
# python3-pika, adduser; not python3-psutil, which pmlmd does not use: the tier shows the .deb runs
# without it) and Recommends (bash-completion), and man-db for its man pages.
# (Changing this list changes the cache key: a new rootfs is built next time.)
PACKAGES = (
    "systemd", "systemd-sysv", "dbus",
    "python3", "python3-systemd", "python3-zmq", "python3-jeepney", "python3-pika",
    "procps", "adduser", "bash-completion", "man-db", "less",
)

# Bump when the way the rootfs is built or customised changes, so stale caches are not reused.
FORMAT_VERSION = 1

# Units masked in the rootfs: the timers would grab the dpkg lock right after boot; e2scrub (file
# system checks) has no business in a container; nobody logs in on the read-only console.
MASKED_UNITS = ("apt-daily*.timer", "dpkg-db-backup.timer", "e2scrub*", "console-getty.service")

HOSTNAME = "pmlm-testbed"
MACHINES_DIR = Path("/var/lib/machines")
ROOTFS_PREFIX = "pmlm-testbed"

# Tools the host needs: systemd-nspawn (package systemd-container), mmdebstrap, nsenter (util-linux).
HOST_TOOLS = ("systemd-nspawn", "mmdebstrap", "nsenter")

# A clean environment for every tool we run, on the host and inside: the host's PATH may start
# with pyenv shims, and nothing of the test runner's environment belongs in the container.
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
HOST_ENV = {"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8"}
INSIDE_ENV = ("PATH=" + CLEAN_PATH, "HOME=/root", "LANG=C.UTF-8")

BUILD_TIMEOUT = 1200.0    # seconds for mmdebstrap (about 40 s normally, more on a slow mirror)
BOOT_TIMEOUT = 90.0       # seconds from nspawn's start to `systemctl is-system-running` = running
POWEROFF_TIMEOUT = 30.0   # seconds for a clean poweroff before nspawn gets SIGKILL
LOCK_TIMEOUT = 1800.0     # seconds to wait for another build (or, to rebuild, for running testbeds)


class TestbedError(RuntimeError):
    """The test bed could not be built, booted or used."""


class CommandFailed(subprocess.CalledProcessError):
    """A command inside the container exited non-zero; the message carries its output."""

    def __str__(self) -> str:
        text = super().__str__()
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                if isinstance(data, bytes):
                    data = data.decode(errors="replace")
                text += f"\n--- {label} ---\n{data.rstrip()}"
        return text


def missing_host_tools() -> list[str]:
    """The host tools that cannot be found on the clean PATH."""
    return [tool for tool in HOST_TOOLS if shutil.which(tool, path=CLEAN_PATH) is None]


# --- the cached rootfs ---------------------------------------------------------------------------
def cache_key() -> str:
    """Short hash of the package list, the suite and the format version."""
    text = f"format {FORMAT_VERSION}\nsuite {SUITE}\n" + "\n".join(sorted(PACKAGES))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def rootfs_path() -> Path:
    return MACHINES_DIR / f"{ROOTFS_PREFIX}-{cache_key()}"


def _lock_path(rootfs: Path) -> Path:
    # Not ".#NAME.lck": that name belongs to systemd's own image locking.
    return rootfs.parent / f".{rootfs.name}.lock"


def _parse_deb822(text: str) -> list[dict[str, str]]:
    """Stanzas of a deb822 file as {field (lower case): value}; continuation lines joined by spaces."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue  # comments may sit inside a stanza
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last = {}, None
            continue
        if line[0] in " \t":
            if last is not None:
                current[last] += " " + line.strip()
            continue
        key, sep, value = line.partition(":")
        if sep:
            last = key.strip().lower()
            current[last] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def host_apt_sources(suite: str = SUITE, sources_dir: Path = Path("/etc/apt/sources.list.d")) -> list[str]:
    """One-line apt sources ("deb URI SUITE COMPONENTS") for every ``suite*`` suite the host uses.

    Read from the host's deb822 ``*.sources`` files, so the rootfs is built from whatever archive
    (mirror, proxy, snapshot) this machine is configured for. Disabled stanzas are skipped.
    """
    lines: list[str] = []
    for path in sorted(sources_dir.glob("*.sources")):
        for stanza in _parse_deb822(path.read_text()):
            if stanza.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in stanza.get("types", "").split():
                continue
            suites = [s for s in stanza.get("suites", "").split() if s == suite or s.startswith(suite + "-")]
            components = stanza.get("components", "").split()
            for uri in stanza.get("uris", "").split():
                for s in suites:
                    line = f"deb {uri} {s} {' '.join(components)}".strip()
                    if line not in lines:
                        lines.append(line)
    if not any(line.split()[2] == suite for line in lines):
        raise TestbedError(f"no '{suite}' entry with URIs in {sources_dir}/*.sources: the rootfs is built from "
                           "the host's own apt sources (deb822), and none were found")
    return lines


class _FileLock:
    """flock(2) on a lock file; shared (readers: booted testbeds) or exclusive (a build).

    The descriptor is opened O_CLOEXEC and never passed to a child: if systemd-nspawn inherited
    it, the lock would live as long as the container and a build waiting for it would deadlock
    against our own teardown.
    """

    def __init__(self, path: Path, exclusive: bool, timeout: float = LOCK_TIMEOUT, what: str = ""):
        self.path, self.exclusive, self.timeout, self.what = path, exclusive, timeout, what
        self.fd: int | None = None

    def acquire(self) -> "_FileLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + self.timeout
        told = False
        while True:
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.release()
                    raise TestbedError(f"timed out after {self.timeout:.0f}s waiting for {self.path}"
                                       f" ({self.what or 'another test bed'})") from None
                if not told:
                    print(f"testbed: waiting for {self.path} ({self.what or 'held by another process'})",
                          file=sys.stderr)
                    told = True
                time.sleep(0.5)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _mounts_under(path: Path) -> list[str]:
    """Mount points (in our mount namespace) at or below ``path``."""
    prefix = str(path).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)  # \040 etc.
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _remove_tree(path: Path) -> None:
    """rm -rf for a (partial) rootfs, never reaching through a mount into the host.

    mmdebstrap mounts /proc, /sys and /dev inside the tree while it builds; if it was killed,
    those mounts may still be there, and a plain rmtree would delete the host's /dev.
    """
    if not path.exists() and not path.is_symlink():
        return
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], env=HOST_ENV, check=False)
    left = _mounts_under(path)
    if left:
        raise TestbedError(f"not removing {path}: still mounted there: {', '.join(left)}")
    shutil.rmtree(path)


def _mask_units(root: Path) -> list[str]:
    """Mask MASKED_UNITS in the rootfs (symlinks to /dev/null in /etc/systemd/system)."""
    unit_dirs = [root / "usr/lib/systemd/system", root / "lib/systemd/system", root / "etc/systemd/system"]
    names: set[str] = set()
    for pattern in MASKED_UNITS:
        for unit_dir in unit_dirs:
            names.update(Path(p).name for p in glob.glob(str(unit_dir / pattern)))
    target_dir = root / "etc/systemd/system"
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted(names):
        link = target_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    return sorted(names)


def _customise(root: Path) -> None:
    """What the rootfs needs beyond the packages."""
    _mask_units(root)
    # mmdebstrap copies the host's /etc/hostname; the container gets its own name.
    (root / "etc/hostname").write_text(HOSTNAME + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"
                                    "::1\tlocalhost ip6-localhost ip6-loopback\n")
    # The rootfs is the lower layer of an overlay and readable by any container user; the temp dir
    # it was built in was 0700.
    root.chmod(0o755)


def _run_logged(cmd: list[str], timeout: float, verbose: bool) -> None:
    """Run a build step; on failure (or timeout) raise with the tail of its output."""
    out = None if verbose else subprocess.PIPE
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None,
                            env=HOST_ENV, text=True, errors="replace")
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: mmdebstrap then unmounts what it mounted in the tree.
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise TestbedError(f"{cmd[0]} did not finish within {timeout:.0f}s") from None
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    if proc.returncode != 0:
        tail = "\n".join((output or "").splitlines()[-40:])
        raise TestbedError(f"{cmd[0]} failed with exit status {proc.returncode}\n{tail}")


def ensure_rootfs(force: bool = False, verbose: bool = False) -> Path:
    """The cached rootfs, built first if it is missing (or ``force``).

    Built into a temp dir next to its final place and renamed there atomically, under an
    exclusive lock: a reader never sees a half-built tree, and two runs never build at once.
    """
    final = rootfs_path()
    if final.is_dir() and not force:
        return final  # fast path; the rename made it complete
    missing = missing_host_tools()
    if missing:
        raise TestbedError(f"missing host tools: {', '.join(missing)} (`.ci/run` installs them: "
                           "apt-get install --no-install-recommends systemd-container mmdebstrap)")
    MACHINES_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _FileLock(_lock_path(final), exclusive=True,
                   what="another build, or booted test beds when rebuilding"):
        if final.is_dir() and not force:
            return final  # someone else built it while we waited
        # Leftovers of a build that was killed: only ours (same name prefix), and only now that we
        # hold the lock, so no other build is using them.
        for stale in MACHINES_DIR.glob(f".{final.name}.tmp-*"):
            _remove_tree(stale)
        for stale in MACHINES_DIR.glob(f".{final.name}.old-*"):
            _remove_tree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=MACHINES_DIR))
        try:
            started = time.monotonic()
            cmd = ["mmdebstrap", "--variant=minbase", "--format=directory", "--mode=root",
                   "--include=" + ",".join(PACKAGES), SUITE, str(tmp), *host_apt_sources()]
            if not verbose:
                cmd.insert(1, "--quiet")
            _run_logged(cmd, BUILD_TIMEOUT, verbose)
            _customise(tmp)
            if final.exists():  # --force: swap the new tree in, then remove the old one
                old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
                os.rename(final, old)
                os.rename(tmp, final)
                _remove_tree(old)
            else:
                os.rename(tmp, final)
            if verbose:
                print(f"testbed: built {final} in {time.monotonic() - started:.1f}s", file=sys.stderr)
        except BaseException:
            _remove_tree(tmp)
            raise
    return final


# --- cgroups of our own, and the launcher -------------------------------------------------------
def _cgroup_mounts() -> dict[str, str]:
    """Where the cgroup2 hierarchy and the v1 name=systemd hierarchy are mounted (host view)."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            point = before.split()[4]
            fstype, _source, options = (after.split() + ["", "", ""])[:3]
            if fstype == "cgroup2":
                mounts.setdefault("unified", point)
            elif fstype == "cgroup" and "name=systemd" in options.split(","):
                mounts.setdefault("systemd", point)
    return mounts


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path in the cgroup2 ('unified') and name=systemd hierarchies."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if hid == "0" and controllers == "":
                paths["unified"] = path
            elif "name=systemd" in controllers.split(","):
                paths["systemd"] = path
    return paths


def make_cgroups(name: str) -> list[Path]:
    """Create cgroup NAME below our own in the cgroup2 and name=systemd hierarchies.

    nspawn creates its /payload and /supervisor cgroups next to itself: started from a cgroup of
    its own, they land inside it instead of at the top of the host's hierarchy.
    """
    mounts, own = _cgroup_mounts(), _own_cgroups()
    made: list[Path] = []
    try:
        for hierarchy in ("unified", "systemd"):
            if hierarchy in mounts and hierarchy in own:
                parent = Path(mounts[hierarchy]) / own[hierarchy].lstrip("/")
                _sweep_stale_cgroups(parent)
                path = parent / name
                path.mkdir()  # never an existing one: we remove only what we made
                made.append(path)
    except BaseException:
        remove_cgroups(made)
        raise
    if not made:
        raise TestbedError("found no cgroup2 or name=systemd hierarchy to start the container in")
    return made


CGROUP_NAME = re.compile(r"pmlm-tb-(\d+)-[0-9a-f]{6}")


def _sweep_stale_cgroups(parent: Path) -> None:
    """Remove cgroups a test bed made and could not remove because its process was killed.

    Only our own naming (pmlm-tb-PID-XXXXXX) with a PID that no longer exists, and only by rmdir:
    a cgroup with processes in it stays.
    """
    for entry in parent.iterdir():
        m = CGROUP_NAME.fullmatch(entry.name)
        if m and entry.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
            remove_cgroups([entry], timeout=0)


def remove_cgroups(cgroups: list[Path], timeout: float = 10.0) -> list[str]:
    """rmdir our cgroups and whatever nspawn made below them, deepest first; returns what is left."""
    left: list[str] = []
    for top in cgroups:
        if not top.is_dir():
            continue
        # Bottom-up walk: children before parents. rmdir only (cgroupfs files cannot be unlinked).
        dirs = [Path(d) for d, _, _ in os.walk(top, topdown=False)]
        for d in dirs:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        left.append(f"{d} ({e.strerror})")
                        break
                    time.sleep(0.1)  # the last processes are still leaving
    return left


PR_SET_PDEATHSIG = 1


def _launcher_setup(cgroups: list[Path]):
    """preexec_fn for the child that becomes nspawn: our cgroups, and SIGTERM if we die.

    SIGTERM makes nspawn halt the container in order; so if the test run is killed outright
    (SIGKILL, no finally, no atexit), the container still goes away.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def setup():
        pid = str(os.getpid())
        for cg in cgroups:
            with open(cg / "cgroup.procs", "w") as f:
                f.write(pid)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return setup


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --- the container ---------------------------------------------------------------------------------
def _sweep_stale_workdirs() -> None:
    """Remove work dirs (console log, host dir) of test beds whose process was killed outright."""
    for entry in Path(tempfile.gettempdir()).glob("pmlm-tb-*"):
        m = re.fullmatch(r"pmlm-tb-(\d+)-[0-9a-f]{6}-\w+", entry.name)
        if m and entry.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
            try:
                _remove_tree(entry)
            except (OSError, TestbedError):
                pass  # not ours to fight over


def _proc_status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
    except (FileNotFoundError, ProcessLookupError):
        return {}


class Testbed:
    """A booted container with a real systemd; ``with Testbed() as tb: tb.run([...])``.

    ``host_dir`` (host side) is bound at /mnt/host inside, to pass files in and out. The console
    goes to ``console_log``. Everything is undone by ``poweroff()``: the container, our cgroups,
    the work dir; it also runs at interpreter exit if the caller forgot.
    """

    __test__ = False  # a name starting with "Test" is not a test class here

    def __init__(self, boot_timeout: float = BOOT_TIMEOUT, verbose: bool = False):
        self.boot_timeout = boot_timeout
        self.verbose = verbose
        self.name = f"pmlm-tb-{os.getpid()}-{secrets.token_hex(3)}"
        self.rootfs: Path | None = None
        self.workdir: Path | None = None
        self.host_dir: Path | None = None
        self.console_log: Path | None = None
        self.nspawn: subprocess.Popen | None = None
        self.leader: int | None = None  # host pid of the container's PID 1
        self.cgroups: list[Path] = []
        self.boot_seconds: float | None = None
        self.system_state: str | None = None
        self._reader_lock: _FileLock | None = None
        self._log_file = None
        self._sigterm_installed = False

    # -- boot --
    def start(self) -> "Testbed":
        if os.geteuid() != 0:
            raise TestbedError("the test bed needs root (systemd-nspawn, cgroups)")
        missing = missing_host_tools()
        if missing:
            raise TestbedError(f"missing host tools: {', '.join(missing)} (`.ci/run` installs them)")
        atexit.register(self.poweroff)
        # SIGTERM (a cancelled CI job) would end Python without finally or atexit: turn it into
        # KeyboardInterrupt, which pytest and the CLI unwind through, powering the container off.
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_interrupt)
            self._sigterm_installed = True
        try:
            self._start()
        except BaseException:
            self.poweroff()
            raise
        return self

    def _start(self) -> None:
        self.rootfs = ensure_rootfs(verbose=self.verbose)
        # Shared lock for the container's lifetime: a rebuild (exclusive) waits until we are gone
        # instead of deleting the overlay's lower layer under us. Held by this process only.
        self._reader_lock = _FileLock(_lock_path(self.rootfs), exclusive=False, what="a rootfs build").acquire()
        _sweep_stale_workdirs()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.host_dir = self.workdir / "host"
        self.host_dir.mkdir()
        self.console_log = self.workdir / "console.log"
        self._log_file = open(self.console_log, "wb")
        self.cgroups = make_cgroups(self.name)

        env = dict(HOST_ENV)
        # Pure cgroup2 inside; in the default hybrid mode systemd cannot freeze units.
        env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        cmd = [
            "systemd-nspawn", "--boot",
            f"--directory={self.rootfs}",
            f"--machine={self.name}",
            "--register=no", "--keep-unit",     # no machined and no system bus on the host
            "--settings=no",                    # ignore any .nspawn file
            "--link-journal=no",                # the journal stays inside
            "--console=read-only",              # console output to our stdout, i.e. console_log
            "--volatile=overlay",               # writes go to a tmpfs: every boot starts clean
            f"--bind={self.host_dir}:/mnt/host",
        ]
        started = time.monotonic()
        # setsid (start_new_session): nspawn is not in our session or process group, so a Ctrl-C
        # at the terminal reaches us, and we power the container off properly. close_fds (the
        # default) keeps every descriptor but 0-2 from it, the lock's above all.
        self.nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                                       env=env, start_new_session=True, close_fds=True,
                                       preexec_fn=_launcher_setup(self.cgroups))
        self.leader = self._find_leader(started + self.boot_timeout)
        self._wait_ready(started + self.boot_timeout)
        self.boot_seconds = time.monotonic() - started

    def _find_leader(self, deadline: float) -> int:
        """Host pid of the container's PID 1: nspawn's child that is PID 1 of a new pid namespace,
        once it has become systemd."""
        while True:
            self._check_nspawn_alive("while starting the container")
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                status = _proc_status(int(entry.name))
                if status.get("PPid") == str(self.nspawn.pid) and status.get("NSpid", "").split()[1:] == ["1"]:
                    if status.get("Name") == "systemd":
                        return int(entry.name)
            if time.monotonic() > deadline:
                raise TestbedError(f"the container's PID 1 did not become systemd\n{self.console_tail()}")
            time.sleep(0.05)

    def _wait_ready(self, deadline: float) -> None:
        """Poll `systemctl is-system-running` until the boot is over (running or degraded)."""
        state = ""
        while True:
            self._check_nspawn_alive("while booting")
            try:
                proc = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
                state = proc.stdout.strip()
            except subprocess.TimeoutExpired:
                state = "(systemctl timed out)"
            if state in ("running", "degraded"):
                self.system_state = state
                if state == "degraded" and self.verbose:
                    failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
                    print(f"testbed: system is degraded; failed units:\n{failed}", file=sys.stderr)
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"systemd in the container was not up after {self.boot_timeout:.0f}s "
                                   f"(is-system-running: {state or '?'})\n{self.console_tail()}")
            time.sleep(0.1)

    def _check_nspawn_alive(self, when: str) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            code = None if self.nspawn is None else self.nspawn.returncode
            raise TestbedError(f"systemd-nspawn exited {when} (status {code})\n{self.console_tail()}")

    def console_tail(self, lines: int = 40) -> str:
        """The last lines of the container's console (and nspawn's own messages)."""
        if self.console_log is None or not self.console_log.exists():
            return "(no console log)"
        text = self.console_log.read_bytes().decode(errors="replace")
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", text)  # colours, cursor moves
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- console log {self.console_log} (last {lines} lines) ---\n{tail}"

    # -- use --
    def nsenter_argv(self) -> list[str]:
        """nsenter into every namespace of the container, its root and working directory."""
        if self.leader is None:
            raise TestbedError("the test bed is not running")
        return ["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net", "--pid",
                "--cgroup", "--root", "--wd"]

    def run(self, cmd: list[str] | str, check: bool = True, timeout: float | None = 60.0,
            input: str | bytes | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside as root with a clean environment; a str runs via ``sh -c``.

        Output is captured (text, unless ``input`` is bytes). With ``check`` a non-zero exit
        raises CommandFailed, whose message includes stdout and stderr.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full = self._inside(argv)
        binary = isinstance(input, bytes)
        kwargs = {} if binary else {"text": True, "encoding": "utf-8", "errors": "replace"}
        if input is None:
            kwargs["stdin"] = subprocess.DEVNULL
        proc = subprocess.run(full, input=input, capture_output=True, timeout=timeout, env=HOST_ENV, **kwargs)
        proc.args = argv  # report what ran inside, not the nsenter wrapping
        if check and proc.returncode != 0:
            raise CommandFailed(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def background(self, argv: list[str]) -> subprocess.Popen:
        """``argv`` inside as ``run`` runs it, in the background: its stdout and stderr piped (text)."""
        return subprocess.Popen(self._inside(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=HOST_ENV)

    def _inside(self, argv: list[str]) -> list[str]:
        return [*self.nsenter_argv(), "env", "-i", *INSIDE_ENV, *argv]

    def shell(self) -> int:
        """An interactive bash inside, on our terminal."""
        term = os.environ.get("TERM", "xterm")
        argv = [*self.nsenter_argv(), "env", "-i", *INSIDE_ENV, f"TERM={term}", "bash", "-l"]
        # Ctrl-C at the prompt is bash's business: it must not interrupt us and end the session.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return subprocess.call(argv, env=HOST_ENV, restore_signals=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        finally:
            signal.signal(signal.SIGINT, previous)

    # -- teardown --
    def poweroff(self, timeout: float = POWEROFF_TIMEOUT) -> None:
        """Power the container off and undo everything start() did. Safe to call more than once."""
        atexit.unregister(self.poweroff)
        problems: list[str] = []
        if self.nspawn is not None:
            clean = self.nspawn.poll() is None and self.leader is not None
            if clean:
                try:
                    # systemd's "poweroff" signal: a clean shutdown, after which nspawn exits.
                    os.kill(self.leader, signal.SIGRTMIN + 4)
                except ProcessLookupError:
                    pass
            try:
                # Without a booted systemd to ask (the boot failed early) go straight to SIGKILL.
                self.nspawn.wait(timeout=timeout if clean else 0)
            except subprocess.TimeoutExpired:
                if clean:
                    problems.append(f"no clean poweroff within {timeout:.0f}s: SIGKILL to systemd-nspawn")
                # Our own nspawn only: its container dies with it (PID 1 of the container gets
                # SIGKILL when nspawn dies, which ends the whole pid namespace).
                self.nspawn.kill()
                self.nspawn.wait()
            if self.leader is not None and _proc_status(self.leader).get("PPid") == str(self.nspawn.pid):
                problems.append(f"container PID 1 (host pid {self.leader}) still there after nspawn exited")
            self.nspawn = None
        self.leader = None
        if self.cgroups:
            left = remove_cgroups(self.cgroups)
            if left:
                problems.append("cgroups left behind: " + ", ".join(left))
            self.cgroups = []
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.workdir is not None:
            try:
                _remove_tree(self.workdir)
            except (OSError, TestbedError) as e:
                problems.append(f"work dir {self.workdir} not removed: {e}")
            self.workdir = self.host_dir = None
        if self._reader_lock is not None:
            self._reader_lock.release()
            self._reader_lock = None
        if self._sigterm_installed and signal.getsignal(signal.SIGTERM) is _raise_interrupt:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._sigterm_installed = False
        for problem in problems:
            print(f"testbed {self.name}: {problem}", file=sys.stderr)

    def __enter__(self) -> "Testbed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.poweroff()


# --- pmlmd inside ----------------------------------------------------------------------------------
ENTRY_SCRIPT = """#!/usr/bin/python3
# {name}: installed by tests/systemd/testbed.py from the working tree.
import sys

from {module} import main

sys.exit(main())
"""

INSTALL_SCRIPT = r"""
set -eu
src=/mnt/host/pmlmd-install
rm -rf /usr/lib/python3/dist-packages/pmlmd
cp -r "$src/pmlmd" /usr/lib/python3/dist-packages/pmlmd
install -m 0755 "$src/pmlmd.sbin" /usr/sbin/pmlmd
install -m 0755 "$src/pmlmctl.bin" /usr/bin/pmlmctl
install -m 0644 "$src/pmlmd.service" "$src/pmlm.slice" /etc/systemd/system/
install -d -m 0755 /etc/pmlmd
install -m 0644 "$src/pmlmd.toml" /etc/pmlmd/pmlmd.toml
install -m 0644 "$src/pmlmctl.bash" /usr/share/bash-completion/completions/pmlmctl
getent group pmlm >/dev/null || groupadd --system pmlm
systemctl daemon-reload
# Fail here, with Python's own message, if pmlmd does not import with Debian's Python and modules.
python3 -c 'import pmlmd.daemon.service, pmlmd.client.ctl'
"""


def install_pmlmd(testbed: Testbed, repo_root: Path | str) -> None:
    """Install the working tree's pmlmd in the container without a package (see install_deb for the .deb).

    The files are staged in the host dir and copied inside, so the cached rootfs is never
    touched (and the container's overlay gets them like any install would).
    """
    repo = Path(repo_root)
    stage = testbed.host_dir / "pmlmd-install"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    shutil.copytree(repo / "pmlmd", stage / "pmlmd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (stage / "pmlmd.sbin").write_text(ENTRY_SCRIPT.format(name="pmlmd", module="pmlmd.daemon.service"))
    (stage / "pmlmctl.bin").write_text(ENTRY_SCRIPT.format(name="pmlmctl", module="pmlmd.client.ctl"))
    shutil.copy(repo / "systemd/pmlmd.service", stage / "pmlmd.service")
    shutil.copy(repo / "systemd/pmlm.slice", stage / "pmlm.slice")
    shutil.copy(repo / "etc/pmlmd/pmlmd.toml", stage / "pmlmd.toml")
    shutil.copy(repo / "etc/bash_completion.d/pmlmctl", stage / "pmlmctl.bash")
    testbed.run(INSTALL_SCRIPT, timeout=120)


# --- pmlmd's Debian package ------------------------------------------------------------------------
# Host tools for `make deb` (packages debhelper, dh-python, pybuild-plugin-pyproject, dpkg-dev).
DEB_BUILD_TOOLS = ("make", "dpkg-buildpackage", "dh", "dh_python3")
DEB_BUILD_TIMEOUT = 600.0   # seconds for `make deb` (about 8 s normally)
INSTALL_TIMEOUT = 300.0     # seconds for apt-get inside (about 3 s normally)

# Not copied for a rebuild with a bumped revision (the Makefile makes its own clean copy anyway).
_COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "*.egg-info", ".hypothesis",
                                      ".pytest_cache", ".benchmarks")


def missing_deb_build_tools() -> list[str]:
    return [tool for tool in DEB_BUILD_TOOLS if shutil.which(tool, path=CLEAN_PATH) is None]


def bump_changelog(path: Path, message: str) -> str:
    """Add an entry to the debian/changelog at ``path`` with the revision raised by one; its version.

    0.1.0-1 becomes 0.1.0-2, same upstream version (which `make deb` requires to match pyproject).
    """
    text = path.read_text()
    head = re.match(r"(\S+) \(([^)]+)\) ([^;]+); (.*)\n", text)
    trailer = re.search(r"^ -- (.+?>)  ", text, re.M)
    if not head or not trailer:
        raise TestbedError(f"{path}: cannot read the top entry")
    source, version, distribution, urgency = head.groups()
    upstream, _, revision = version.rpartition("-")
    new_version = f"{upstream}-{int(revision) + 1}"
    date = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0))
    entry = (f"{source} ({new_version}) {distribution}; {urgency}\n\n  * {message}\n\n"
             f" -- {trailer.group(1)}  {date}\n\n")
    path.write_text(entry + text)
    return new_version


def build_deb(repo_root: Path | str, out_dir: Path | str, bump_revision: bool = False) -> Path:
    """Build pmlmd's .deb with the repository's `make deb` into ``out_dir``; its path.

    With ``bump_revision`` it is built from a copy of the tree whose debian/changelog has one more
    entry (revision + 1): an upgrade for the normal build. ``out_dir`` should hold nothing else
    (`make deb` replaces any pmlmd_*.deb there).
    """
    missing = missing_deb_build_tools()
    if missing:
        raise TestbedError(f"missing host tools to build the .deb: {', '.join(missing)} (`.ci/run` installs "
                           "them: debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools "
                           "dpkg-dev)")
    repo, out = Path(repo_root).resolve(), Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pmlm-deb-src-") as tmp:
        src = repo
        if bump_revision:
            src = Path(tmp) / "pmlmd"
            shutil.copytree(repo, src, symlinks=True, ignore=lambda d, names: (
                _COPY_IGNORE(d, names) | ({"dist", "build"} & set(names) if Path(d) == repo else set())))
            bump_changelog(src / "packaging/debian/changelog", "Rebuilt with a higher revision (upgrade test).")
        env = dict(HOST_ENV, HOME=os.environ.get("HOME", "/root"))
        proc = subprocess.run(["make", "-C", str(src), "--no-print-directory", "deb", f"DIST={out}"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              env=env, timeout=DEB_BUILD_TIMEOUT)
        if proc.returncode != 0:
            raise TestbedError(f"make deb failed with exit status {proc.returncode}\n{proc.stdout}{proc.stderr}")
    debs = sorted(out.glob("pmlmd_*.deb"))
    if len(debs) != 1:
        raise TestbedError(f"make deb left {len(debs)} packages in {out}: {[d.name for d in debs]}")
    return debs[0]


def install_deb(testbed: Testbed, deb: Path | str, check: bool = True) -> subprocess.CompletedProcess:
    """`apt-get install -y ./pmlmd_*.deb` inside, as an operator would; the transcript is the result.

    The package is copied into the host dir (/mnt/host inside). Nothing is downloaded: apt only
    checks that what the package depends on is installed already (a missing one fails the install).
    """
    deb = Path(deb)
    shutil.copy(deb, testbed.host_dir / deb.name)
    return testbed.run(f"cd /mnt/host && DEBIAN_FRONTEND=noninteractive apt-get install -y "
                       f"-o Dpkg::Use-Pty=0 ./{deb.name}", check=check, timeout=INSTALL_TIMEOUT)


# --- command line ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pmlmd's systemd test bed (run as root)")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the cached rootfs if missing (--force: rebuild it)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached (newer packages)")
    shell = sub.add_parser("shell", help="boot, install pmlmd from this working tree, and open bash inside")
    shell.add_argument("--deb", action="store_true", help="build pmlmd's .deb (make deb) and install that instead")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            started = time.monotonic()
            path = ensure_rootfs(force=args.force, verbose=True)
            print(f"{path} ready ({time.monotonic() - started:.1f}s)")
            return 0
        repo = Path(__file__).resolve().parent.parent.parent
        with Testbed(verbose=True) as tb:
            print(f"testbed: {tb.name} booted in {tb.boot_seconds:.2f}s ({tb.system_state}); "
                  f"host dir {tb.host_dir} is /mnt/host; console log {tb.console_log}", file=sys.stderr)
            if args.deb:
                deb = build_deb(repo, tb.workdir / "deb")
                print(install_deb(tb, deb).stdout, file=sys.stderr)
                print(f"testbed: {deb.name} installed (pmlmd is running); exit the shell to power off",
                      file=sys.stderr)
            else:
                install_pmlmd(tb, repo)
                print("testbed: pmlmd installed (`systemctl start pmlmd`); exit the shell to power off",
                      file=sys.stderr)
            tb.shell()
        return 0
    except TestbedError as e:
        print(f"testbed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
