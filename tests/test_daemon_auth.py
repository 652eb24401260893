"""Authorisation against a live pmlmd: who may submit, as whom the workers run, and who may act
on whose batch.

The daemon learns a client's uid and gid from the kernel (SO_PEERCRED on the Unix socket), so
the clients here really run as other users: a forked child of the test process drops to a
temporary user's uid, gid and groups and then talks to the daemon. (Exec'ing a new interpreter
as that user is not possible: the interpreter lives under /root, mode 0700.)

The users and the group are created for this module and deleted afterwards, also on failure.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from pmlmd.core import protocol
from pmlmd.client.connection import Client, Unreachable

from support import Daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and changes uid")

REPLY_TIMEOUT = 10.0  # seconds a client (also a forked one) waits for one reply
BATCH_TIMEOUT = 30.0  # seconds for a batch of trivial workers to start or finish
SH_PATH = {"PATH": "/usr/bin:/bin"}


# --- temporary users -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Accounts:
    group: str  # the daemon's group
    a: str  # members of the group
    b: str
    out: str  # not a member

    def uid(self, user: str) -> int:
        return pwd.getpwnam(user).pw_uid

    def groups(self, user: str) -> set[int]:
        return set(os.getgrouplist(user, pwd.getpwnam(user).pw_gid))


@pytest.fixture(scope="module")
def accounts():
    suffix = secrets.token_hex(3)  # several runs (and engineers) on one machine must not collide
    names = Accounts(group=f"pmlmt-grp-{suffix}", a=f"pmlmt-a-{suffix}", b=f"pmlmt-b-{suffix}",
                     out=f"pmlmt-out-{suffix}")
    made_group, made_users = False, []
    try:
        subprocess.run(["groupadd", "--system", names.group], check=True, capture_output=True)
        made_group = True
        for user, member in ((names.a, True), (names.b, True), (names.out, False)):
            cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
            if member:
                cmd += ["-G", names.group]
            subprocess.run(cmd + [user], check=True, capture_output=True)
            made_users.append(user)
        yield names
    finally:
        # userdel also removes each user's private group.
        for user in made_users:
            subprocess.run(["userdel", user], capture_output=True)
        if made_group:
            subprocess.run(["groupdel", names.group], capture_output=True)


# --- acting as another user ------------------------------------------------------------------------

def run_as(username: str, action, timeout: float = REPLY_TIMEOUT + 10) -> object:
    """Run ``action()`` in a forked child with the user's uid, gid and groups; return its JSON result.

    The child exits with os._exit, so nothing of pytest (atexit, buffered output) runs twice.
    The child is always reaped, and killed if it outlives the timeout.
    """
    entry = pwd.getpwnam(username)
    groups = os.getgrouplist(username, entry.pw_gid)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(read_end)
            # Groups first: once the uid is dropped, setgroups and setgid are no longer allowed.
            os.setgroups(groups)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            result = {"result": action()}
            code = 0
        except BaseException:
            result = {"child_error": traceback.format_exc()}
        try:
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    chunks, done = [], False
    try:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([read_end], [], [], max(remaining, 0))
            if not ready:
                raise AssertionError(f"the child acting as {username} did not finish within {timeout}s")
            chunk = os.read(read_end, 65536)
            if not chunk:  # the child has written everything and is exiting
                done = True
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        if not done:
            os.kill(pid, signal.SIGKILL)  # hung, or we failed while reading: it must not outlive the test
        os.waitpid(pid, 0)
    outcome = json.loads(b"".join(chunks))
    if "child_error" in outcome:
        raise AssertionError(f"the child acting as {username} failed:\n{outcome['child_error']}")
    return outcome["result"]


def connect_errno(path: str) -> int:
    """0 if a plain connect to the Unix socket succeeds, else its errno."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return 0
    except OSError as e:
        return e.errno
    finally:
        probe.close()


def as_user(daemon: Daemon, username: str, request_name: str, **args) -> dict:
    """Send one request as ``username`` on a fresh connection; return the decoded reply."""
    path = daemon.socket

    def ask():
        # A fresh context: the parent's sockets and I/O threads do not survive a fork.
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect("ipc://" + path)
        sock.send(protocol.encode_request(request_name, request_id="as-user", **args))
        if not sock.poll(int(REPLY_TIMEOUT * 1000)):
            raise TimeoutError(f"pmlmd did not answer {request_name} within {REPLY_TIMEOUT}s")
        return protocol.decode_reply(sock.recv())

    reply = run_as(username, ask)
    assert reply["request_id"] == "as-user", reply
    return reply


def as_root(daemon: Daemon, request_name: str, **args) -> dict:
    with daemon.client() as client:
        return client.call(request_name, **args)


def assert_denied(reply: dict, *fragments: str) -> None:
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == protocol.PERMISSION_DENIED, reply
    for fragment in fragments:
        assert fragment in reply["error"]["message"], reply


def submitted(reply: dict) -> str:
    assert reply["ok"] is True, reply
    return reply["result"]["batch"]


def wait_event(daemon: Daemon, batch: str, kind: str, timeout: float = BATCH_TIMEOUT) -> dict:
    """Follow the batch's events (those recorded so far come first) until one of ``kind`` arrives."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect("ipc://" + daemon.socket)
        sock.send(protocol.encode_request("events", request_id="wait", batch=batch, follow=True))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000)):
                raise AssertionError(f"batch {batch} sent no {kind!r} event within {timeout}s:\n{daemon.logs()}")
            message = protocol.decode_reply(sock.recv())
            assert message["ok"] is True, message
            if message.get("event", {}).get("event") == kind:
                return message["event"]
    finally:
        sock.close()  # the daemon forgets a follower whose connection is gone
        ctx.term()


def batch_ids(daemon: Daemon) -> set[str]:
    return {b["batch"] for b in as_root(daemon, "list")["batches"]}


@pytest.fixture
def outdir():
    """A directory every test user may write to (under /tmp, so its parents are traversable)."""
    path = Path(tempfile.mkdtemp(prefix="pmlmt-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_ids(outdir: Path) -> list[str]:
    """A command that records the worker's uid and groups, one file pair per task."""
    return ["/bin/sh", "-c", f"id -u > {outdir}/uid-$PMLM_TASK_INDEX; id -G > {outdir}/groups-$PMLM_TASK_INDEX"]


SLEEPER = dict(command=["/bin/sleep", "30"], cwd="/tmp", env=SH_PATH)


# --- the daemon ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(accounts):
    """One pmlmd for the module, with the test group as its group.

    The socket is 0666 so that the outsider's requests reach the daemon's own check instead of
    being stopped by the file's permissions (test_socket_file_keeps_outsiders_out covers those).
    The node is shared with other tests that load CPU and memory; these tests are about who may
    do what, not about the governor, so its limits never hold a worker back.
    """
    base = Path(tempfile.mkdtemp(prefix="pmlm-"))
    base.chmod(0o755)  # the test users must reach the socket inside
    daemon = Daemon(base, f'[daemon]\ngroup = "{accounts.group}"\nsocket_mode = "0666"\n'
                          '[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n')
    try:
        yield daemon.start()  # its notify messages are read all along, as systemd does
    finally:
        daemon.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_batch_outlives_the_test(request):
    """Every worker a test started ends with that test: cancel what is still active, wait for it."""
    yield
    if "served" not in request.fixturenames:
        return
    daemon = request.getfixturevalue("served")
    if daemon.proc.poll() is not None:
        return
    for summary in as_root(daemon, "status")["batches"]:
        as_root(daemon, "cancel", batch=summary["batch"])
        wait_event(daemon, summary["batch"], "finished")


# --- the tests -------------------------------------------------------------------------------------

def test_outsider_may_not_submit(served, accounts):
    before = batch_ids(served)
    reply = as_user(served, accounts.out, "submit", command=["/bin/true"], cwd="/tmp")
    # The message names the group to join, so the user knows what to ask the admin for.
    assert_denied(reply, str(accounts.uid(accounts.out)), repr(accounts.group))
    assert batch_ids(served) == before


def test_member_batch_runs_as_the_member(served, accounts, outdir):
    batch = submitted(as_user(served, accounts.a, "submit", command=write_ids(outdir), tasks=2, cwd="/tmp",
                              env=SH_PATH))
    assert wait_event(served, batch, "finished")["exit_status"] == 0
    status = as_root(served, "status", batch=batch)
    assert status["state"] == "finished" and status["counts"]["succeeded"] == 2, status
    for index in (0, 1):
        uid = int((outdir / f"uid-{index}").read_text())
        groups = {int(g) for g in (outdir / f"groups-{index}").read_text().split()}
        assert uid == accounts.uid(accounts.a) != 0
        # The member's own groups, the daemon's group among them, and none of root's.
        assert groups == accounts.groups(accounts.a)
        assert grp.getgrnam(accounts.group).gr_gid in groups and 0 not in groups


def test_member_cannot_act_on_another_members_batch(served, accounts):
    batch = submitted(as_user(served, accounts.a, "submit", **SLEEPER))
    wait_event(served, batch, "start")

    for action in ("cancel", "pause", "resume"):
        assert_denied(as_user(served, accounts.b, action, batch=batch), "only its owner or root")
    status = as_root(served, "status", batch=batch)
    assert status["state"] == "running" and status["counts"]["running"] == 1 and status["counts"]["paused"] == 0, \
        status

    # The owner may pause and resume; b may not undo the owner's pause either.
    assert as_user(served, accounts.a, "pause", batch=batch)["result"]["state"] == "held"
    assert_denied(as_user(served, accounts.b, "resume", batch=batch))
    assert as_root(served, "status", batch=batch)["state"] == "paused"
    assert as_user(served, accounts.a, "resume", batch=batch)["result"]["state"] == "active"

    assert as_user(served, accounts.a, "cancel", batch=batch)["result"]["state"] == "cancelling"
    wait_event(served, batch, "finished")
    assert as_root(served, "status", batch=batch)["counts"]["cancelled"] == 1


def test_root_may_cancel_any_batch(served, accounts):
    batch = submitted(as_user(served, accounts.a, "submit", **SLEEPER))
    wait_event(served, batch, "start")
    assert as_root(served, "cancel", batch=batch)["state"] == "cancelling"
    wait_event(served, batch, "finished")
    status = as_root(served, "status", batch=batch)
    assert status["state"] == "cancelled" and status["counts"]["cancelled"] == 1, status


@pytest.mark.parametrize("target", ["root", "b"])
def test_member_may_not_submit_as_another_user(served, accounts, target):
    before = batch_ids(served)
    user = accounts.b if target == "b" else "root"
    reply = as_user(served, accounts.a, "submit", command=["/bin/true"], cwd="/tmp", user=user)
    assert_denied(reply, "only root may submit a batch to run as another user")
    assert batch_ids(served) == before


@pytest.mark.parametrize("by", ["name", "uid"])
def test_root_may_submit_as_a_member(served, accounts, outdir, by):
    user = accounts.a if by == "name" else str(accounts.uid(accounts.a))
    batch = as_root(served, "submit", command=write_ids(outdir), cwd="/tmp", env=SH_PATH, user=user)["batch"]
    assert wait_event(served, batch, "finished")["exit_status"] == 0
    assert int((outdir / "uid-0").read_text()) == accounts.uid(accounts.a)
    assert {int(g) for g in (outdir / "groups-0").read_text().split()} == accounts.groups(accounts.a)


def test_a_member_may_name_themselves_as_the_user(served, accounts, outdir):
    batch = submitted(as_user(served, accounts.a, "submit", command=write_ids(outdir), cwd="/tmp", env=SH_PATH,
                              user=accounts.a))
    assert wait_event(served, batch, "finished")["exit_status"] == 0
    assert int((outdir / "uid-0").read_text()) == accounts.uid(accounts.a)


def test_members_may_read_each_others_batches(served, accounts):
    # status and report are read-only; the daemon lets any member see any batch.
    batch = submitted(as_user(served, accounts.a, "submit", **SLEEPER))
    wait_event(served, batch, "start")
    status = as_user(served, accounts.b, "status", batch=batch)
    assert status["ok"] is True, status
    assert status["result"]["batch"] == batch and status["result"]["owner"] == {"user": accounts.a,
                                                                                 "uid": accounts.uid(accounts.a)}
    report = as_user(served, accounts.b, "report", batch=batch)
    assert report["ok"] is True, report
    assert report["result"]["batch_id"] == batch


def test_socket_file_keeps_outsiders_out(daemon_factory, accounts):
    # The default mode: only root and the group may connect at all.
    daemon = daemon_factory(f'[daemon]\ngroup = "{accounts.group}"\n').start()
    info = os.stat(daemon.socket)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == grp.getgrnam(accounts.group).gr_gid

    path = daemon.socket

    def plain_connect():
        return connect_errno(path)

    def client_error():
        try:
            Client(path).close()
        except Unreachable as e:
            return str(e)
        return None

    assert run_as(accounts.out, plain_connect) == errno.EACCES
    assert "permission denied" in run_as(accounts.out, client_error)
    # A member connects through the group, and is served.
    assert run_as(accounts.a, plain_connect) == 0
    assert as_user(daemon, accounts.a, "ping")["ok"] is True
