#!/usr/bin/env python3
"""A throwaway qemu VM with a pure cgroup2 hierarchy, for pmlmd's VM test tier.

What pmlmd does with the kernel's memory controller (memory.current, memory.high, memory.max,
memory.events) and with pressure stall information per cgroup (memory.pressure, PSI triggers)
can only be seen where the memory and cpu controllers are on the cgroup2 hierarchy. The
machines this project is developed and tested on bind them to cgroup v1 (hybrid mode), so a
container cannot show them; a VM with its own kernel can. KVM is not available there, so the
VM runs under qemu's software emulation (TCG): several times slower than the host, enough
for a handful of tests in one boot.

This module does that with the standard library only:

* ``ensure_image()`` builds a bootable image once and caches it under /var/lib/pmlm-vm/
  pmlm-vm-<hash>/ (the hash covers the package list, the init script and FORMAT_VERSION):
  a Debian bookworm rootfs from ``mmdebstrap --variant=minbase`` with Debian's kernel and
  the Python packages pmlmd and pytest need, written into ``disk.img`` (ext4) with
  ``mkfs.ext4 -d``, and the kernel and initrd taken out of it next to the image. The archive
  URIs come from the host's own apt sources (tests/systemd/testbed.py reads them).
* ``run_guest()`` boots that image with ``-snapshot`` (the cached image never changes), the
  repository shared read-only at /mnt/src and a fresh output directory at /mnt/out. The
  image's init (no systemd: INIT_SCRIPT below) mounts cgroup2 alone at /sys/fs/cgroup, runs
  ``sh /mnt/src/tests/vm/guest.sh`` (pytest over tests/vm/guest), writes its exit status to
  /mnt/out/rc and powers off. The result is that exit status and the console log.

Command line (as root)::

    python3 tests/vm/vm.py build [--force]                  # build (or rebuild) the cached image
    python3 tests/vm/vm.py run [--timeout S] [--] [PYTEST ARGS]
                                                            # boot, run the guest tests, power off

``run`` with no pytest arguments runs all of tests/vm/guest; with a test path (relative to the
repository, to the current directory, or absolute) just that, e.g.
``python3 tests/vm/vm.py run -x tests/vm/guest/test_guest_kernel.py::test_pure_cgroup2_with_memory_and_cpu``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent

# The systemd tier's test bed already reads the host's apt sources, runs and removes mmdebstrap
# trees safely and locks its cache; the same code serves here.
if str(HERE.parent / "systemd") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "systemd"))
import testbed  # noqa: E402

# --- what goes into the image ----------------------------------------------------------------------
SUITE = testbed.SUITE

# Everything the guest needs, so that nothing is fetched at boot (the VM has no network): Debian's
# kernel, Python with every module pmlmd imports and the test modules use, and the tools tests
# run (ps and friends, util-linux's mount/nsenter/setpriv, perl for pmlmd's exec of odd names).
# iproute2: the init brings the loopback interface up for sockets on 127.0.0.1.
# (Changing this list changes the cache key: a new image is built next time.)
PACKAGES = (
    "linux-image-amd64",
    "python3", "python3-pytest", "python3-hypothesis",
    "python3-zmq", "python3-psutil", "python3-jeepney", "python3-systemd", "python3-pika",
    "procps", "util-linux", "perl-base", "iproute2",
)

# Bump when the way the image is built changes, so stale caches are not reused.
FORMAT_VERSION = 1

CACHE_DIR = Path("/var/lib/pmlm-vm")
IMAGE_PREFIX = "pmlm-vm"
DISK, KERNEL, INITRD = "disk.img", "vmlinuz", "initrd.img"
DISK_SIZE = "4G"  # a sparse file: about 0.7 GB of it is used; the rest is room for the guest's writes
HOSTNAME = "pmlm-vm"

# 9p mount tags, and where the guest mounts them.
SRC_TAG, OUT_TAG = "pmlm-src", "pmlm-out"
GUEST_SRC, GUEST_OUT = "/mnt/src", "/mnt/out"
GUEST_SCRIPT = "tests/vm/guest.sh"   # relative to the repository: edited without rebuilding the image
GUEST_TESTS = "tests/vm/guest"       # what runs when no test path is given
ARGS_FILE = "pytest-args"            # in the output share: one pytest argument a line
RC_FILE = "rc"                       # in the output share: guest.sh's exit status, written by the init

INIT_PATH = "/sbin/pmlm-vm-init"
# PID 1 of the guest. No systemd: nothing else touches the cgroup hierarchy, so the tests see it as
# the kernel made it. Its root's cgroup.subtree_control is left empty (pmlmd enables what it needs).
# cgroup2 is mounted with the options systemd 252 uses on a Debian 12 host (nsdelegate,
# memory_recursiveprot), so pmlmd meets the semantics it meets in production. The initramfs hands
# over /proc, /sys, /dev and /run mounted already; the rest is mounted here. The 9p transport
# modules are loaded by hand: there is no udev to load them for the devices. If anything here
# fails the init exits, the kernel panics (panic=-1 reboots at once) and qemu (-no-reboot) exits:
# the host never waits for a hung guest longer than its timeout.
INIT_SCRIPT = f"""\
#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mountpoint -q /proc || mount -t proc -o nosuid,nodev,noexec proc /proc
mountpoint -q /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mountpoint -q /dev || mount -t devtmpfs -o nosuid,mode=755 devtmpfs /dev
mountpoint -q /run || mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=000 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate,memory_recursiveprot cgroup2 /sys/fs/cgroup
echo {HOSTNAME} > /proc/sys/kernel/hostname
ip link set lo up
modprobe -q 9pnet_virtio
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro {SRC_TAG} {GUEST_SRC}
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 {OUT_TAG} {GUEST_OUT}
HOME=/root LANG=C.UTF-8 sh {GUEST_SRC}/{GUEST_SCRIPT}
echo $? > {GUEST_OUT}/{RC_FILE}
sync
echo o > /proc/sysrq-trigger
sleep 30
"""

# The kernel's command line. init= replaces systemd. Pressure stall information needs no psi=1:
# Debian's kernel has CONFIG_PSI=y without CONFIG_PSI_DEFAULT_DISABLED (a guest test checks that
# /proc/pressure/memory is there). cgroup_no_v1=all leaves every controller to cgroup2; panic=-1
# turns a dead init into a reboot, which -no-reboot turns into qemu's exit. mitigations=off:
# the guest runs nothing untrusted, and the page-table switches of the mitigations are costly
# under emulation. rootflags=noinit_itable: ext4 would otherwise zero the image's inode tables in
# the background at every boot, costing emulated CPU and snapshot space for nothing.
KERNEL_ARGS = (f"root=/dev/vda rw rootfstype=ext4 rootflags=noinit_itable console=ttyS0 init={INIT_PATH} "
               "cgroup_no_v1=all "
               "panic=-1 mitigations=off loglevel=4")

# Host tools and the Debian packages that bring them.
HOST_TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs"}

# qemu: software emulation on every core (KVM does not work on these machines), 2 GiB of memory.
QEMU_MEMORY = "2048"
QEMU_CPUS = "2"

BUILD_TIMEOUT = 1200.0   # seconds for mmdebstrap (about 60 s normally, more on a slow mirror)
MKFS_TIMEOUT = 600.0     # seconds for mkfs.ext4 -d (about 20 s)
RUN_TIMEOUT = 900.0      # seconds from qemu's start to its exit: boot, the guest tests, poweroff


class VMError(RuntimeError):
    """The image could not be built, or the VM could not be run."""


def missing_host_packages() -> list[str]:
    """The Debian packages to install for the host tools this tier needs (none: an empty list)."""
    return [pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool, path=testbed.CLEAN_PATH) is None]


# --- the cached image --------------------------------------------------------------------------------
def cache_key() -> str:
    """Short hash of everything baked into the image: format version, suite, packages, the init."""
    text = f"format {FORMAT_VERSION}\nsuite {SUITE}\n" + "\n".join(sorted(PACKAGES)) + "\n" + INIT_SCRIPT
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def image_dir() -> Path:
    return CACHE_DIR / f"{IMAGE_PREFIX}-{cache_key()}"


def _image_lock(image: Path) -> Path:
    return image.parent / f".{image.name}.lock"


def _image_complete(image: Path) -> bool:
    return all((image / name).is_file() for name in (DISK, KERNEL, INITRD))


def _take_kernel(rootfs: Path, out: Path) -> None:
    """Copy the rootfs's one kernel and its initrd out of /boot, as KERNEL and INITRD in ``out``."""
    for pattern, name in (("vmlinuz-*", KERNEL), ("initrd.img-*", INITRD)):
        found = sorted((rootfs / "boot").glob(pattern))
        if len(found) != 1:
            raise VMError(f"expected one {pattern} in the rootfs's /boot, found {[p.name for p in found]}")
        shutil.copyfile(found[0], out / name)


def _build(tmp: Path, verbose: bool) -> None:
    """Build the image's three files into the empty directory ``tmp``."""
    rootfs = tmp / "rootfs"
    # Documentation, man pages and translations are of no use in the guest: leaving them out
    # makes the image smaller and mkfs quicker.
    excludes = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")]
    cmd = ["mmdebstrap", "--variant=minbase", "--format=directory", "--mode=root", *excludes,
           "--include=" + ",".join(PACKAGES), SUITE, str(rootfs), *testbed.host_apt_sources(SUITE)]
    testbed._run_logged(cmd if verbose else [cmd[0], "--quiet", *cmd[1:]], BUILD_TIMEOUT, verbose)
    init = rootfs / INIT_PATH.lstrip("/")
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    for mount_point in (GUEST_SRC, GUEST_OUT):
        (rootfs / mount_point.lstrip("/")).mkdir(parents=True, exist_ok=True)
    # mmdebstrap copies the host's /etc/hostname; the guest gets its own name.
    (rootfs / "etc/hostname").write_text(HOSTNAME + "\n")
    _take_kernel(rootfs, tmp)
    # No journal: the image is only ever booted with -snapshot, so nothing written needs to survive
    # a crash, and the guest's writes cost less.
    testbed._run_logged(["mkfs.ext4", "-q", "-F", "-L", HOSTNAME, "-O", "^has_journal", "-E", "nodiscard",
                         "-d", str(rootfs), str(tmp / DISK), DISK_SIZE], MKFS_TIMEOUT, verbose)
    testbed._remove_tree(rootfs)


def _prune_stale_images(keep: Path) -> None:
    """Remove cached images of other keys that no VM is booted from (their lock is free)."""
    for old in CACHE_DIR.glob(f"{IMAGE_PREFIX}-*"):
        if old == keep or not old.is_dir():
            continue
        try:
            with testbed._FileLock(_image_lock(old), exclusive=True, timeout=0, what="a VM booted from it"):
                testbed._remove_tree(old)
            _image_lock(old).unlink(missing_ok=True)
        except (testbed.TestbedError, OSError):
            pass  # in use, or not ours to fight over: it stays until the next build


def ensure_image(force: bool = False, verbose: bool = False) -> Path:
    """The cached image directory (DISK, KERNEL, INITRD), built first if missing (or ``force``).

    The build happens in a temp dir beside the final one, which is renamed into place: a VM never
    boots a half-written image. An exclusive lock keeps two builds apart, and a rebuild waits for
    the VMs booted from the old image (they hold the lock shared).
    """
    final = image_dir()
    if _image_complete(final) and not force:
        return final
    missing = missing_host_packages()
    if missing:
        raise VMError(f"the VM tier needs these host packages: {' '.join(missing)} (`.ci/run` installs them: "
                      f"apt-get install --no-install-recommends {' '.join(missing)})")
    CACHE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with testbed._FileLock(_image_lock(final), exclusive=True, what="another image build, or VMs booted from it"):
        if not force and _image_complete(final):
            return final  # built by someone else while we waited
        # What a killed build left: ours alone (our name), and unused now that we hold the lock.
        for stale in CACHE_DIR.glob(f".{final.name}.*-*"):
            testbed._remove_tree(stale)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=CACHE_DIR))
        try:
            _build(tmp, verbose)
            tmp.chmod(0o755)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
                os.rename(final, old)
                os.rename(tmp, final)
                testbed._remove_tree(old)
            else:
                os.rename(tmp, final)
        except BaseException:
            testbed._remove_tree(tmp)
            raise
        if verbose:
            print(f"vm: built {final} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    _prune_stale_images(final)
    return final


# --- running the guest -------------------------------------------------------------------------------
@dataclass
class GuestRun:
    """What one boot of the VM gave.

    ``returncode``: guest.sh's exit status (pytest's: 0 passed, 1 failed, 5 none collected, ...),
    or None when the guest never wrote it (it crashed, or qemu was killed at the timeout).
    ``console``: the guest's whole serial console (kernel messages and pytest's output), text.
    ``seconds``: wall time from qemu's start to its exit. ``timed_out``: qemu was killed.
    """

    returncode: int | None
    console: str
    seconds: float
    timed_out: bool = False

    def tail(self, lines: int = 80) -> str:
        """The last lines of the console: pytest's summary on a normal run, the panic on a crash."""
        return "\n".join(self.console.splitlines()[-lines:])

    def uptime_at(self, event: str) -> float | None:
        """Guest uptime (seconds) that guest.sh printed for ``event`` ("start" or "end"), or None."""
        m = re.search(rf"^vm: pytest {event} at uptime ([0-9.]+)s", self.console, re.M)
        return float(m.group(1)) if m else None


def guest_args(args: list[str], cwd: Path | None = None) -> list[str]:
    """The pytest arguments as the guest sees them; tests/vm/guest when none names a test path.

    An argument whose path part (before "::") exists on the host inside the repository is
    rewritten relative to the repository, where the guest runs pytest; the others stay as they are.
    """
    cwd = Path.cwd() if cwd is None else cwd
    out, named = [], False
    for arg in args:
        path, sep, rest = arg.partition("::")
        full = (cwd / path).resolve() if path and not path.startswith("-") else None
        if full is not None and full.exists() and (full == REPO_ROOT or REPO_ROOT in full.parents):
            arg, named = str(full.relative_to(REPO_ROOT)) + sep + rest, True
        out.append(arg)
    return out if named else [*out, GUEST_TESTS]


PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child between fork and exec only calls it


def _die_with_parent() -> None:
    """In qemu's child process: SIGKILL when we die, so even a SIGKILL of ours leaves no VM behind."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _sweep_stale_workdirs() -> None:
    """Remove the work dirs of runs whose process is gone (killed outright, no finally)."""
    for entry in Path(tempfile.gettempdir()).glob(f"{IMAGE_PREFIX}-run-*"):
        owner = entry.name.split("-")[3]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(entry, ignore_errors=True)


def qemu_argv(image: Path, src: Path, out: Path, console: Path) -> list[str]:
    """qemu-system-x86_64's command line for one boot of ``image``."""
    return [
        "qemu-system-x86_64",
        "-nodefaults", "-no-user-config",          # only the devices below
        "-accel", "tcg,thread=multi", "-cpu", "max",  # software emulation, a thread per vCPU
        "-smp", QEMU_CPUS, "-m", QEMU_MEMORY,
        "-display", "none", "-monitor", "none",
        "-serial", f"file:{console}",
        "-no-reboot",                               # a guest reboot (panic=-1) ends qemu
        "-kernel", str(image / KERNEL), "-initrd", str(image / INITRD), "-append", KERNEL_ARGS,
        "-drive", f"file={image / DISK},format=raw,if=virtio,snapshot=on",  # writes go to a temp overlay
        "-virtfs", f"local,path={src},mount_tag={SRC_TAG},security_model=none,readonly=on",
        "-virtfs", f"local,path={out},mount_tag={OUT_TAG},security_model=none",
        "-nic", "none",
    ]


def run_guest(pytest_args: list[str] | tuple[str, ...] = (), timeout: float = RUN_TIMEOUT,
              verbose: bool = False) -> GuestRun:
    """Boot the VM once, run the guest tests (``pytest_args``, see guest_args) and power it off.

    Builds the image first if it is not cached. qemu is our child in a session of its own, and
    it is killed (it alone) when it overruns ``timeout``, on any error and on KeyboardInterrupt;
    the work dir (console log, output share, qemu's snapshot overlay) is removed in every case.
    """
    image = ensure_image(verbose=verbose)
    _sweep_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"{IMAGE_PREFIX}-run-{os.getpid()}-"))
    qemu: subprocess.Popen | None = None
    try:
        out, console = workdir / "out", workdir / "console.log"
        out.mkdir()
        (out / ARGS_FILE).write_text("".join(a + "\n" for a in guest_args(list(pytest_args))))
        # Shared: a rebuild (exclusive) waits until this VM is gone instead of replacing its image.
        with testbed._FileLock(_image_lock(image), exclusive=False, what="an image build"):
            started = time.monotonic()
            # TMPDIR: qemu puts the -snapshot overlay there, so it goes with the work dir.
            qemu = subprocess.Popen(qemu_argv(image, REPO_ROOT, out, console), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=dict(testbed.HOST_ENV, TMPDIR=str(workdir)),
                                    start_new_session=True, preexec_fn=_die_with_parent)
            timed_out = False
            try:
                qemu_output, _ = qemu.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                qemu.kill()
                qemu_output, _ = qemu.communicate()
            seconds = time.monotonic() - started
        text = console.read_bytes().decode(errors="replace") if console.exists() else ""
        # The serial tty ends lines with CR LF; pytest redraws its progress line with a lone CR.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if qemu.returncode != 0 or timed_out:
            text += (f"\n--- qemu exited with status {qemu.returncode}"
                     f"{f' (killed after {timeout:.0f}s)' if timed_out else ''} ---\n"
                     f"{qemu_output.decode(errors='replace')}")
        rc_file = out / RC_FILE
        rc_text = rc_file.read_text().strip() if rc_file.exists() else ""
        returncode = int(rc_text) if rc_text.isdigit() else None
        return GuestRun(returncode, text, seconds, timed_out)
    finally:
        if qemu is not None and qemu.returncode is None:
            qemu.kill()  # our own child, not yet reaped: its pid cannot belong to anyone else
            qemu.wait()
        shutil.rmtree(workdir, ignore_errors=True)


# --- command line ------------------------------------------------------------------------------------
USAGE = """usage: vm.py build [--force]
       vm.py run [--timeout SECONDS] [--] [PYTEST ARGS...]

build: build the cached VM image if missing (--force: rebuild it, e.g. for newer packages).
run:   boot the VM, run the guest tests (tests/vm/guest, or the tests named) and print the console;
       the exit status is pytest's inside the guest (1 if it never finished)."""


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    # SIGTERM would end Python without finally: turn it into KeyboardInterrupt, which kills qemu.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if command == "build" and rest in ([], ["--force"]):
            started = time.monotonic()
            path = ensure_image(force=bool(rest), verbose=True)
            print(f"{path} ready ({time.monotonic() - started:.1f}s)")
            return 0
        if command == "run":
            timeout = RUN_TIMEOUT
            if rest[:1] == ["--timeout"] and len(rest) > 1:
                timeout, rest = float(rest[1]), rest[2:]
            if rest[:1] == ["--"]:
                rest = rest[1:]
            ensure_image(verbose=True)
            run = run_guest(rest, timeout=timeout)
            print(run.console)
            uptimes = [run.uptime_at(event) for event in ("start", "end")]
            start, end = ("?" if t is None else f"{t:.1f}s" for t in uptimes)
            print(f"vm: qemu ran {run.seconds:.1f}s; guest uptime at pytest's start {start}, at its end {end}; "
                  f"guest exit status {run.returncode}", file=sys.stderr)
            return 1 if run.returncode is None else run.returncode
    except (VMError, testbed.TestbedError) as e:
        print(f"vm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(USAGE, file=sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
