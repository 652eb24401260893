"""How a worker starts: through a gate, a tiny shell that sets the worker's resource limits as
its own user, waits for pmlmd's "go" (once it is in its cgroup or scope), takes on the
variables pmlmd hands it on a memfd, and becomes the command.

Nothing of the gate forks, so under a process limit it still becomes the command; no variable
the dynamic loader acts on reaches the gate's own shell (see ``gated``).
"""

from __future__ import annotations

import fcntl
import os
import re
import resource

from . import procctl


# How dash's ulimit builtin names each limit and the unit it counts in (bytes per unit, or 1).
ULIMIT_FLAGS = {resource.RLIMIT_CPU: ("t", 1), resource.RLIMIT_FSIZE: ("f", 512), resource.RLIMIT_DATA: ("d", 1024),
                resource.RLIMIT_STACK: ("s", 1024), resource.RLIMIT_CORE: ("c", 512), resource.RLIMIT_RSS: ("m", 1024),
                resource.RLIMIT_MEMLOCK: ("l", 1024), resource.RLIMIT_NPROC: ("p", 1), resource.RLIMIT_NOFILE: ("n", 1),
                resource.RLIMIT_AS: ("v", 1024), resource.RLIMIT_RTPRIO: ("r", 1)}


_SHELL_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*\Z")
# dash refuses an OPTIND that is not a number, and the gate would end there.
_SHELL_REFUSES = frozenset({b"OPTIND"})


def open_gate(gate_w: int) -> None:
    """Let a gated worker go on (it is in its scope, or logged why not), and close the gate's
    write end. Three bytes into a pipe nobody else writes always fit, however small its owner
    made it: this never waits."""
    try:
        os.write(gate_w, b"go\n")
    except BrokenPipeError:
        pass  # the gate is gone already: its exit is seen through its pidfd
    os.close(gate_w)


def gated(rlimits: dict[int, tuple[int, int]], argv: list[bytes], env: dict[bytes, bytes], *, carry: bool = False
          ) -> tuple[list[bytes], dict[bytes, bytes], bytes]:
    """(command, environment, variables): what starts ``argv`` through the gate (see ``gate``).

    ``variables`` (empty: none) go to the gate on its descriptor ENV_FD, a memfd pmlmd writes
    before the start (procctl.spawn's ``env_fd``): never in an argv, which every user may read
    in /proc/PID/cmdline, and never through a pipe pmlmd would have to wait on. They are:

    - the variables the dynamic loader acts on (LD_PRELOAD, GCONV_PATH, ...; see
      _loader_variable), as export lines the gate sources just before it becomes the command:
      its own code runs before it has set the limits and before pmlmd has placed it in its scope,
      and could fork a process that has neither;
    - with ``carry``, every variable, and the gate starts with no environment at all: for a gate
      started through setpriv(1), which runs as root until it has taken on the worker's
      credentials (procctl.spawn starts it so only with an empty environment);
    - where a name is one the shell cannot hold or refuses (``A-B``, a non-UTF-8 byte, a
      non-numeric OPTIND), every variable as NAME=VALUE entries ending in NUL, which perl
      (perl-base, Essential in Debian) reads, makes its whole environment and becomes the command.
    """
    if all(_SHELL_NAME.match(name) and name not in _SHELL_REFUSES for name in env):
        carried = env if carry else {name: value for name, value in env.items() if _loader_variable(name)}
        exports = _exports(carried)
        if carry and b"PWD" not in env:
            exports += b"unset PWD\n"  # the shell sets one of its own: the command gets exactly ``env``
        return gate(rlimits, source=bool(exports)) + argv, {n: v for n, v in env.items() if n not in carried}, exports
    entries = b"".join(name + b"=" + value + b"\0" for name, value in env.items())
    return gate(rlimits, source=False) + [procctl.PERL, b"-e", ENV_FROM_FD, b"--", *argv], {}, entries


def memfd(name: str, data: bytes) -> int:
    """A close-on-exec memfd holding ``data``, sealed against change, at offset 0."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _exports(env: dict[bytes, bytes]) -> bytes:
    """Shell lines that export ``env`` exactly (single quotes: nothing in a value is expanded)."""
    return b"".join(b"export " + name + b"='" + value.replace(b"'", b"'\\''") + b"'\n" for name, value in env.items())


ENV_FD = procctl.ENV_FD  # where the worker's variables reach the gate (gated)
# perl: the environment exactly as the NAME=VALUE\0 entries on ENV_FD say (then closed), then argv.
ENV_FROM_FD = (rb'open(my $f, "<&=", %d) or die "pmlm-gate: $!\n"; my $d = do { local $/; <$f> }; close $f; '
               rb'%%ENV = (); for (split /\0/, $d) { my ($n, $v) = split /=/, $_, 2; $ENV{$n} = $v } '
               % ENV_FD) + procctl.EXEC_ARGV

# What glibc ignores for set-user-ID programs, because it changes what the loader or libc load
# and run (glibc's sysdeps/generic/unsecvars.h), and everything named LD_*.
LOADER_VARIABLES = frozenset({b"GCONV_PATH", b"GETCONF_DIR", b"GLIBC_TUNABLES", b"HOSTALIASES", b"LOCALDOMAIN",
                              b"LOCPATH", b"MALLOC_TRACE", b"NIS_PATH", b"NLSPATH", b"RESOLV_HOST_CONF",
                              b"RES_OPTIONS", b"TMPDIR", b"TZDIR", b"MALLOC_ARENA_MAX", b"MALLOC_PERTURB_"})


def _loader_variable(name: bytes) -> bool:
    return name.startswith(b"LD_") or name in LOADER_VARIABLES


def gate(rlimits: dict[int, tuple[int, int]], source: bool = False) -> list[bytes]:
    """The command a worker starts through: set its limits, wait for "go" on stdin, take on the
    variables on ENV_FD with ``source``, exec the command (which with perl reads ENV_FD itself).

    The limits are set by the worker itself, as its user, after pmlmd's credentials are
    gone: lowering them needs no capability, and one that would have to be raised above
    what pmlmd has stays as it is (the shell says so on the worker's stderr). No step forks:
    under a process limit the gate still becomes the command.
    """
    steps = []
    for resource_id, (soft, hard) in sorted(rlimits.items()):
        flag, unit = ULIMIT_FLAGS[resource_id]
        values = ["unlimited" if v == resource.RLIM_INFINITY else str(v // unit) for v in (soft, hard)]
        # Soft first: a hard limit may not go below the soft one in force.
        steps.append(f"ulimit -S -{flag} {values[0]}; ulimit -H -{flag} {values[1]}; ")
    steps.append('read -r go || exit 125; [ "$go" = go ] || exit 125; ')
    if source:
        steps.append(f". /dev/fd/{ENV_FD} || exit 125; exec {ENV_FD}<&-; ")
    steps.append('exec "$@" </dev/null')
    return [b"/bin/sh", b"-c", "".join(steps).encode(), b"pmlm-gate"]
