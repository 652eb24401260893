"""What a daemon worker inherits from its submitter, and what it may not get.

A worker started by pmlmd gets the umask and the resource limits of the process that ran
``pmlmctl submit``, as a worker of ``pmlmctl run`` gets those of its shell; each limit is
lowered to what the owner's login gets from pam_limits' configuration (limits.conf and
limits.d) and to pmlmd's own. The daemon tests run a real root pmlmd and real users (made
with useradd for the module, as in test_daemon_auth); a member's ``pmlmctl submit`` runs in a
forked child that has taken on the member's uid, groups, umask and limits (the interpreter
cannot be exec'ed as the member: it lives under /root). The parser of pam_limits'
configuration and the way the limits are combined are tested on their own, without root.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pmlmd.client import ctl

from pmlmd.core import protocol
from support import proc_limit
from test_daemon_auth import accounts, as_user, outdir, run_as, submitted, wait_event  # noqa: F401 (fixtures)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and changes uid")

INF = resource.RLIM_INFINITY
FOUR_GIB = 4 << 30
UNLIMITED = "[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n"
# What the worker reports, one file each, in its working directory; and a file it creates.
REPORT = ("umask > umask; ulimit -Sn > nofile_soft; ulimit -Hn > nofile_hard; ulimit -Sv > as_soft; "
          "ulimit -Hv > as_hard; ulimit -Su > nproc_soft; ulimit -Hu > nproc_hard; : > created")


def loginlimits():
    # Imported here, not at the top: on a pmlmd without it each test fails on its own.
    from pmlmd.node import loginlimits as module
    return module


# --- the daemon --------------------------------------------------------------------------------------

def start_daemon(daemon_factory, accounts, limits_dir: Path | None = None):
    config = f'[daemon]\ngroup = "{accounts.group}"\nsocket_mode = "0666"\n'
    if limits_dir is not None:
        config += f'limits_conf_dir = "{limits_dir}"\n'
    return daemon_factory(config + UNLIMITED).start()


@pytest.fixture
def limits_dir():
    """A directory laid out like /etc/security, for limits.conf and limits.d."""
    path = Path(tempfile.mkdtemp(prefix="pmlmt-limits-"))
    (path / "limits.d").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def submit_as(daemon, username: str, workdir: Path, argv: list[str], *, umask: int | None = None,
              limits: dict[int, tuple[int, int]] | None = None, extra: tuple[str, ...] = ()) -> tuple[str, str]:
    """``pmlmctl submit`` run by ``username`` from a process with that umask and those limits;
    (batch id, what pmlmctl wrote on stderr)."""
    socket_path = daemon.socket

    def submit():
        # ctl is imported already: the member could not read the interpreter's modules under /root.
        if umask is not None:
            os.umask(umask)
        for resource_id, pair in (limits or {}).items():
            resource.setrlimit(resource_id, pair)
        os.chdir(workdir)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = ctl.main(["--socket", socket_path, "submit", *extra, "--", *argv])
        assert code == 0, err.getvalue()
        return [out.getvalue().strip(), err.getvalue()]

    batch, err = run_as(username, submit)
    return batch, err


def reported(workdir: Path) -> dict[str, str]:
    return {path.name: path.read_text().strip() for path in workdir.iterdir() if path.name != "created"}


def worker_dir(outdir: Path, name: str) -> Path:
    path = outdir / name
    path.mkdir()
    path.chmod(0o777)
    return path


@needs_root
def test_a_members_umask_and_limits_reach_the_worker(daemon_factory, accounts, outdir):
    daemon = start_daemon(daemon_factory, accounts)
    workdir = worker_dir(outdir, "a")
    batch, _ = submit_as(daemon, accounts.a, workdir, ["/bin/bash", "-c", REPORT], umask=0o077,
                         limits={resource.RLIMIT_NOFILE: (256, 256), resource.RLIMIT_AS: (FOUR_GIB, FOUR_GIB)})
    assert wait_event(daemon, batch, "finished")["exit_status"] == 0
    got = reported(workdir)
    assert got["umask"] == "0077"
    assert (got["nofile_soft"], got["nofile_hard"]) == ("256", "256")
    assert (got["as_soft"], got["as_hard"]) == (str(FOUR_GIB // 1024),) * 2
    created = os.stat(workdir / "created")
    assert stat.S_IMODE(created.st_mode) == 0o600 and created.st_uid == accounts.uid(accounts.a)


@needs_root
def test_roots_umask_and_limits_reach_a_batch_it_submits_for_a_member(daemon_factory, accounts, outdir):
    # pmlmctl itself, started through prlimit with umask 077, as an admin's shell would start it.
    daemon = start_daemon(daemon_factory, accounts)
    workdir = worker_dir(outdir, "root")
    result = subprocess.run(["prlimit", "--nofile=256:256", f"--as={FOUR_GIB}:{FOUR_GIB}", "--",
                             sys.executable, "-m", "pmlmd.client.ctl", "--socket", daemon.socket, "submit", "--user",
                             accounts.a, "--", "/bin/bash", "-c", REPORT],
                            capture_output=True, text=True, timeout=60, umask=0o077, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert wait_event(daemon, result.stdout.strip(), "finished")["exit_status"] == 0
    got = reported(workdir)
    assert got["umask"] == "0077" and got["nofile_soft"] == "256" and got["as_soft"] == str(FOUR_GIB // 1024)
    assert stat.S_IMODE(os.stat(workdir / "created").st_mode) == 0o600


@pytest.mark.parametrize("lowered", [
    # Only soft limits pmlmd can take on for the start (procctl.SELF_SETTABLE): no gate.
    ["--nofile=300:{nofile}", "--core=0:{core}"],
    # A hard limit lowered: the gate sets it, as the worker.
    ["--nofile=300:{nofile}", f"--as={FOUR_GIB}:{FOUR_GIB}"],
], ids=["soft-only", "hard-lowered"])
def test_a_submitters_own_limits_reach_the_worker_and_pmlmd_keeps_its_own(daemon_factory, accounts, outdir,
                                                                        lowered):
    daemon = start_daemon(daemon_factory, accounts)
    before = proc_limit(daemon.proc.pid, "Max open files"), proc_limit(daemon.proc.pid, "Max core file size")
    nofile, core = resource.getrlimit(resource.RLIMIT_NOFILE)[1], resource.getrlimit(resource.RLIMIT_CORE)[1]
    workdir = worker_dir(outdir, "own")
    words = [word.format(nofile=nofile, core="unlimited" if core == INF else core) for word in lowered]
    result = subprocess.run(["prlimit", *words, "--", sys.executable, "-m", "pmlmd.client.ctl", "--socket",
                             daemon.socket, "submit", "-n", "3", "--", "/bin/bash", "-c",
                             REPORT + "; ulimit -Sc > core_soft"],
                            capture_output=True, text=True, timeout=60, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert wait_event(daemon, result.stdout.strip(), "finished")["exit_status"] == 0
    got = reported(workdir)
    assert (got["nofile_soft"], got["nofile_hard"]) == ("300", str(nofile))
    if "--core=0:{core}" in lowered:
        assert got["core_soft"] == "0"
    else:
        assert got["as_hard"] == str(FOUR_GIB // 1024)
    # pmlmd took the limits on only for each start: its own are as they were.
    assert (proc_limit(daemon.proc.pid, "Max open files"), proc_limit(daemon.proc.pid, "Max core file size")) == before


def test_a_command_is_found_through_the_submitters_path_not_pmlmds(daemon_factory, accounts, outdir):
    # The daemon's PATH does not hold the directory; the submitter's does. Its workers start
    # without the gate (only a soft limit differs from pmlmd's): found as the gate's shell found it.
    daemon = start_daemon(daemon_factory, accounts)
    bin_dir = worker_dir(outdir, "bin")
    (bin_dir / "pmlm-own-tool").write_text("echo found > found\n")  # no "#!", run by sh as a shell would
    (bin_dir / "pmlm-own-tool").chmod(0o755)
    workdir = worker_dir(outdir, "tool")
    result = subprocess.run([sys.executable, "-m", "pmlmd.client.ctl", "--socket", daemon.socket, "submit", "--",
                             "pmlm-own-tool"], capture_output=True, text=True, timeout=60, cwd=workdir,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', os.defpath)}"})
    assert result.returncode == 0, result.stderr
    assert wait_event(daemon, result.stdout.strip(), "finished")["exit_status"] == 0
    assert (workdir / "found").read_text() == "found\n"


@needs_root
def test_login_limits_cap_what_a_member_asks_for(daemon_factory, accounts, outdir, limits_dir):
    (limits_dir / "limits.conf").write_text(f"# as an administrator writes it\n"
                                            f"{accounts.a}  hard  nproc  64\n"
                                            f"this line is not one pam_limits can read\n")
    (limits_dir / "limits.d" / "50-site.conf").write_text(f"@{accounts.group}  -  nofile  300\n")
    daemon = start_daemon(daemon_factory, accounts, limits_dir)
    many = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    assert many == INF or many > 64  # what the submitter asks for is more than its login gets

    # The member asks for more processes than their login gets: the hard limit is the login's.
    workdir = worker_dir(outdir, "member")
    batch, err = submit_as(daemon, accounts.a, workdir, ["/bin/bash", "-c", REPORT],
                           limits={resource.RLIMIT_NOFILE: (1000, 1000)})
    assert wait_event(daemon, batch, "finished")["exit_status"] == 0
    got = reported(workdir)
    assert got["nproc_hard"] == "64" and int(got["nproc_soft"]) <= 64
    # A group's line in limits.d lowers the open files too, soft and hard ("-").
    assert (got["nofile_soft"], got["nofile_hard"]) == ("300", "300")
    assert "nproc" in err and "nofile 300:300" in err  # pmlmctl says which limits were lowered

    # An older pmlmctl sends no limits: the login's apply just the same.
    workdir = worker_dir(outdir, "old")
    batch = submitted(as_user(daemon, accounts.a, "submit", command=["/bin/bash", "-c", REPORT], cwd=str(workdir),
                              env={"PATH": "/usr/bin:/bin"}))
    assert wait_event(daemon, batch, "finished")["exit_status"] == 0
    assert reported(workdir)["nproc_hard"] == "64" and reported(workdir)["nofile_hard"] == "300"

    # root submitting for the member: the member's login limits, not root's.
    workdir = worker_dir(outdir, "for-member")
    result = daemon.ctl("submit", "--user", accounts.a, "--", "/bin/bash", "-c", REPORT, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert wait_event(daemon, result.stdout.strip(), "finished")["exit_status"] == 0
    assert reported(workdir)["nproc_hard"] == "64"

    # The line naming member a does not reach member b.
    workdir = worker_dir(outdir, "other")
    batch, _ = submit_as(daemon, accounts.b, workdir, ["/bin/bash", "-c", REPORT])
    assert wait_event(daemon, batch, "finished")["exit_status"] == 0
    assert reported(workdir)["nproc_hard"] == ("unlimited" if many == INF else str(many))

    # The line it cannot read cost a warning naming it, and nothing else.
    assert f"{limits_dir / 'limits.conf'}:3: skipped" in daemon.logs()
    assert daemon.logs().count(f"{limits_dir / 'limits.conf'}:3") == 1
    assert daemon.proc.poll() is None


# --- pam_limits' configuration, parsed (no root needed) ---------------------------------------------

GROUPS = {"staff": 50, "users": 100, "root": 0}
ALICE = dict(name="alice", uid=1000, gid=100, groups=frozenset({100, 50}))  # primary users, also in staff
BOB = dict(name="bob", uid=1001, gid=1001, groups=frozenset({1001}))
ROOT = dict(name="root", uid=0, gid=0, groups=frozenset({0}))
NPROC, NOFILE = resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE


def evaluate(directory: Path, text: str, who: dict, **files: str):
    (directory / "limits.conf").write_text(text)
    drop_ins = directory / "limits.d"
    drop_ins.mkdir(exist_ok=True)
    for name, content in files.items():
        (drop_ins / name.replace("_", "-")).write_text(content)
    module = loginlimits()
    return module.LoginLimits(str(directory), group_gid=GROUPS.get).limits_for(module.Account(**who))


CASES = [
    # (limits.conf, whom, resource, expected (soft, hard))
    ("* hard nproc 64\n", ALICE, NPROC, (None, 64)),
    ("* soft nproc 32\n* hard nproc 64\n", ALICE, NPROC, (32, 64)),
    ("* - nofile 512\n", ALICE, NOFILE, (512, 512)),
    ("* HARD NPROC 33\n", ALICE, NPROC, (None, 33)),  # type and item in any case
    # A user's own line beats a group's, which beats "*", whatever their order.
    ("alice hard nproc 70\n* hard nproc 64\n", ALICE, NPROC, (None, 70)),
    ("* hard nproc 64\nalice hard nproc 70\n", ALICE, NPROC, (None, 70)),
    ("@staff hard nproc 80\n* hard nproc 64\n", ALICE, NPROC, (None, 80)),
    ("alice hard nproc 70\n@staff hard nproc 80\n", ALICE, NPROC, (None, 70)),
    # Of lines of one rank, the later one wins.
    ("* hard nproc 64\n* hard nproc 90\n", ALICE, NPROC, (None, 90)),
    ("@staff hard nproc 50\n@users hard nproc 55\n", ALICE, NPROC, (None, 55)),
    # Domains: supplementary groups count for @name and @:gid, the primary one only for gid ranges.
    ("@staff hard nproc 61\n", ALICE, NPROC, (None, 61)),
    ("@:50 hard nproc 62\n", ALICE, NPROC, (None, 62)),
    ("@40:60 hard nproc 63\n", ALICE, NPROC, (None, None)),
    ("@100: hard nproc 64\n", ALICE, NPROC, (None, 64)),
    ("1000:2000 hard nproc 65\n", ALICE, NPROC, (None, 65)),
    (":1000 hard nproc 66\n", ALICE, NPROC, (None, 66)),
    ("1001: hard nproc 67\n", ALICE, NPROC, (None, None)),
    ("@staff hard nproc 80\n1000: hard nproc 68\n", ALICE, NPROC, (None, 68)),  # a uid range ranks as a user
    ("bob hard nproc 69\n@staff hard nproc 70\n", BOB, NPROC, (None, 69)),
    ("ALICE hard nproc 71\n", ALICE, NPROC, (None, None)),  # names are case-sensitive
    ("%staff hard nproc 72\n%:50 hard nproc 73\n", ALICE, NPROC, (None, None)),  # counts logins only
    # Root: "*" and "@group" lines pass it over, its name and the numeric forms do not.
    ("* hard nproc 64\n@root hard nproc 65\n", ROOT, NPROC, (None, None)),
    ("root hard nproc 77\n* hard nproc 5\n", ROOT, NPROC, (None, 77)),
    (":0 hard nproc 82\n", ROOT, NPROC, (None, 82)),
    ("@:0 hard nproc 83\n", ROOT, NPROC, (None, 83)),
    # Values and units.
    ("* hard nproc unlimited\n", ALICE, NPROC, (None, INF)),
    ("* hard nproc infinity\n* soft nproc -1\n", ALICE, NPROC, (INF, INF)),
    ("* hard nproc 12abc\n", ALICE, NPROC, (None, 12)),  # as pam_limits reads it
    ("* hard nproc +68\n", ALICE, NPROC, (None, 68)),
    ("* soft nproc 100\n* hard nproc 50\n", ALICE, NPROC, (50, 50)),  # soft never above hard
    ("* hard core 10\n", ALICE, resource.RLIMIT_CORE, (None, 10 * 1024)),
    ("* - as 4194304\n", ALICE, resource.RLIMIT_AS, (4 << 30, 4 << 30)),
    ("* hard fsize 1\n* hard stack 8192\n", ALICE, resource.RLIMIT_STACK, (None, 8 << 20)),
    ("* hard cpu 2\n", ALICE, resource.RLIMIT_CPU, (None, 120)),  # minutes
    ("* hard cpu 99999999999999999999\n", ALICE, resource.RLIMIT_CPU, (None, INF)),
    ("* hard nice -5\n", ALICE, resource.RLIMIT_NICE, (None, 25)),
    ("* hard rtprio 10\n", ALICE, resource.RLIMIT_RTPRIO, (None, 10)),
    # A "-" line whose soft limit was set by a line of higher rank changes neither limit.
    ("alice soft nproc 50\n* - nproc 60\n", ALICE, NPROC, (50, None)),
    ("alice hard nproc 70\n* - nproc 60\n", ALICE, NPROC, (60, 70)),
    # Lines that are not limits, or cannot be read, change nothing.
    ("* hard maxlogins 4\n* - priority 5\n* - nonewprivs 1\nftp - chroot /ftp\n", ALICE, NPROC, (None, None)),
    ("* hard nproc\n* bogus nproc 5\n* hard bogus 5\n1x:2 hard nproc 5\n* hard nproc abc\n* hard nproc -5\n",
     ALICE, NPROC, (None, None)),
    ("* hard nproc 64 # a comment\n*# hard nproc 5\n", ALICE, NPROC, (None, 64)),
    ("\t*\t-\tnproc\t44  trailing words\n", ALICE, NPROC, (44, 44)),
]


@pytest.mark.parametrize("text, who, resource_id, expected", CASES)
def test_limits_conf_is_read_as_pam_limits_reads_it(tmp_path, text, who, resource_id, expected):
    limits = evaluate(tmp_path, text, who)
    assert limits.get(resource_id, (None, None)) == expected


def test_a_line_lifting_a_users_limits_lifts_them_all(tmp_path):
    # "<domain> -" with no item: that login gets none of these files' limits; "*" cannot do it.
    assert evaluate(tmp_path, "* hard nproc 64\nalice -\n* hard nofile 100\n", ALICE) is None
    assert evaluate(tmp_path, "@staff -\n* hard nproc 64\n", ALICE) is None
    assert evaluate(tmp_path, "* -\n* hard nproc 65\n", ALICE)[NPROC] == (None, 65)
    assert evaluate(tmp_path, "alice -\n* hard nproc 64\n", BOB)[NPROC] == (None, 64)


def test_limits_d_is_read_after_limits_conf_in_the_order_of_names(tmp_path):
    limits = evaluate(tmp_path, "* hard nproc 10\n* hard nofile 100\n", ALICE,
                      **{"20_b.conf": "* hard nproc 30\n", "10_a.conf": "* hard nproc 20\n* hard nofile 200\n",
                         "30_c.conf.disabled": "* hard nproc 99\n", ".hidden.conf": "* hard nproc 98\n"})
    assert limits[NPROC] == (None, 30) and limits[NOFILE] == (None, 200)
    # A user's line in limits.conf still beats "*" lines that come after it.
    assert evaluate(tmp_path, "alice hard nproc 5\n", ALICE)[NPROC] == (None, 5)


def test_each_unreadable_line_is_one_warning_naming_file_and_line(tmp_path, caplog):
    text = "* hard nproc 64\nnonsense\n* soft nproc many\n* hard nofile 7k\n"
    with caplog.at_level(logging.WARNING, logger="pmlmd.loginlimits"):
        limits = evaluate(tmp_path, text, ALICE)
    path = tmp_path / "limits.conf"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert messages[0].startswith(f"{path}:2: skipped") and messages[1].startswith(f"{path}:3: skipped")
    assert messages[2].startswith(f"{path}:4: '7k' read as 7")
    assert limits[NPROC] == (None, 64) and limits[NOFILE] == (None, 7)


def test_binary_junk_and_missing_files_never_raise(tmp_path):
    module = loginlimits()
    assert module.LoginLimits(str(tmp_path / "absent")).limits_for(module.Account(**ALICE)) == {}
    (tmp_path / "limits.conf").write_bytes(b"\xff\xfe\x00* hard nproc 9\n\x00\x01\x02\n" + os.urandom(512))
    (tmp_path / "limits.d").mkdir()
    (tmp_path / "limits.d" / "x.conf").mkdir()  # a directory where a file should be
    module.LoginLimits(str(tmp_path)).limits_for(module.Account(**ALICE))


def test_files_are_read_again_only_when_they_change(tmp_path, monkeypatch):
    module = loginlimits()
    (tmp_path / "limits.conf").write_text("* hard nproc 64\n")
    reads = []
    parse = module.parse
    monkeypatch.setattr(module, "parse", lambda text, path: reads.append(path) or parse(text, path))
    limits = module.LoginLimits(str(tmp_path))
    alice = module.Account(**ALICE)
    for _ in range(3):
        assert limits.limits_for(alice)[NPROC] == (None, 64)
    assert len(reads) == 1
    (tmp_path / "limits.conf").write_text("* hard nproc 128\n")
    assert limits.limits_for(alice)[NPROC] == (None, 128)
    (tmp_path / "limits.d").mkdir()
    (tmp_path / "limits.d" / "x.conf").write_text("* hard nproc 16\n")
    assert limits.limits_for(alice)[NPROC] == (None, 16)
    # Once per change: limits.conf at the first and second look, both files at the third.
    assert reads == [str(tmp_path / "limits.conf")] * 3 + [str(tmp_path / "limits.d" / "x.conf")]


# --- how the limits combine ---------------------------------------------------------------------------

OWN = {NPROC: (1000, 2000), NOFILE: (1024, 4096)}


@pytest.mark.parametrize("carried, login, expected", [
    # Nothing sent, nothing in limits.conf: the engine's own defaults (None).
    (None, {}, None),
    # The submitter's limits, within pmlmd's.
    ({NOFILE: (256, 256)}, {}, {NOFILE: (256, 256)}),
    ({NOFILE: (INF, INF)}, {}, {NOFILE: (4096, 4096)}),
    ({NOFILE: (2048, 8192)}, {}, {NOFILE: (2048, 4096)}),
    # The login's hard limit caps what is sent; its soft limit does not (a shell may raise it).
    ({NPROC: (INF, INF)}, {NPROC: (None, 64)}, {NPROC: (64, 64)}),
    ({NPROC: (100, 500)}, {NPROC: (50, 600)}, {NPROC: (100, 500)}),
    # Nothing sent (an older pmlmctl): the login's limits, else pmlmd's own.
    (None, {NPROC: (None, 64)}, {NPROC: (64, 64)}),
    (None, {NPROC: (32, 64)}, {NPROC: (32, 64)}),
    (None, {NOFILE: (2048, None)}, {NOFILE: (2048, 4096)}),
    (None, {NOFILE: (INF, INF)}, {NOFILE: (4096, 4096)}),
    # A "-" line lifted the login's limits: only pmlmd's own cap.
    ({NPROC: (INF, INF)}, None, {NPROC: (2000, 2000)}),
])
def test_worker_limits_are_the_lowest_of_submitter_login_and_pmlmd(carried, login, expected):
    from pmlmd.daemon.service import worker_rlimits

    assert worker_rlimits(carried, login, OWN) == expected


def test_submit_carries_every_limit_the_gate_can_set():
    from pmlmd.node.gate import ULIMIT_FLAGS

    assert set(protocol.RLIMITS.values()) == set(ULIMIT_FLAGS)
    assert all(loginlimits().ITEMS[name][0] == resource_id for name, resource_id in protocol.RLIMITS.items())


# --- the submit request ---------------------------------------------------------------------------------

def submit_frame(**args) -> bytes:
    return protocol.encode_request("submit", command=["/bin/true"], cwd="/tmp", **args)


def test_submit_takes_umask_and_limits_and_an_older_client_may_leave_them_out():
    args = protocol.parse_request(submit_frame(umask=0o077, rlimits={"nofile": [256, 256], "as": ["unlimited",
                                                                                                 "unlimited"]})).args
    assert args["umask"] == 0o077 and args["rlimits"] == {"nofile": [256, 256], "as": ["unlimited", "unlimited"]}
    args = protocol.parse_request(submit_frame()).args
    assert args["umask"] is None and args["rlimits"] is None
    assert "``umask``" in protocol.__doc__ and "``rlimits``" in protocol.__doc__


@pytest.mark.parametrize("field, value, fragment", [
    ("umask", 0o1000, "'umask' must be an integer from 0 to 511"),
    ("umask", -1, "'umask'"),
    ("umask", "077", "'umask'"),
    ("rlimits", [], "'rlimits' must be an object"),
    ("rlimits", {"nofle": [1, 2]}, "did you mean 'nofile'?"),
    ("rlimits", {"nofile": [3, 2]}, "above the hard limit"),
    ("rlimits", {"nofile": ["unlimited", 2]}, "above the hard limit"),
    ("rlimits", {"nofile": [1]}, "must be [soft, hard]"),
    ("rlimits", {"nofile": [True, 2]}, "must be [soft, hard]"),
    ("rlimits", {"nofile": [-1, 2]}, "must be [soft, hard]"),
    ("rlimits", {"nofile": [1, 2 ** 64]}, "must be [soft, hard]"),
    ("rlimits", {"nofile": [1.0, 2]}, "must be [soft, hard]"),
])
def test_submit_refuses_bad_umasks_and_limits(field, value, fragment):
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.parse_request(submit_frame(**{field: value}))
    assert caught.value.code == protocol.BAD_FIELD and fragment in caught.value.message, caught.value.message
