"""The control socket and the agent channel against hostile local users and lying workers, on a
real root pmlmd.

No user but root may hold more than a bounded number of connections to any socket pmlmd
listens on, and a flood of requests never starves root. Each owner's agent sockets are files
only that user (and root) may connect to; what the owner can send is bounded (connections,
message size, work per loop turn, log lines); and a worker that acknowledges a pause but keeps
working is stopped by signal. The users are real (made for
the module with useradd, removed afterwards); clients act as them from forked children.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import select
import socket
import stat
import sys
import threading
import time

import pytest
import zmq

from pmlmd.core import protocol
from support import group_states, wait_for
from test_daemon_auth import accounts, as_user, connect_errno, run_as, submitted, wait_event  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and changes uid")

UNLIMITED = "[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n"


def agent_daemon(daemon_factory, accounts):
    # socket_mode 0666: members reach the daemon's own checks (the control socket is not under test).
    return daemon_factory(f'[daemon]\ngroup = "{accounts.group}"\nsocket_mode = "0666"\n' + UNLIMITED).start()


def member_agent_batch(daemon, accounts) -> tuple[str, str, str]:
    """A batch of member a in agent mode (its worker just sleeps); (batch, PUB path, ack path)."""
    batch = submitted(as_user(daemon, accounts.a, "submit", command=["/bin/sleep", "60"], cwd="/tmp",
                              env={"PATH": "/usr/bin:/bin"}, term_mode="agent", agent_timeout=0.2, term_grace=0.5))
    wait_event(daemon, batch, "start")
    directory = os.path.splitext(daemon.socket)[0] + "-agent.d"
    uid = accounts.uid(accounts.a)
    return batch, os.path.join(directory, f"{uid}.sock"), os.path.join(directory, f"{uid}-ack.sock")


def ping_time(daemon) -> float:
    started = time.monotonic()
    with daemon.client() as client:
        client.call("ping")
    return time.monotonic() - started


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_only_the_owner_may_reach_an_agent_channel(daemon_factory, accounts):
    daemon = agent_daemon(daemon_factory, accounts)
    _, pub, ack = member_agent_batch(daemon, accounts)
    for path in (pub, ack):
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == accounts.uid(accounts.a), path
        # Not a member, another member: refused by the kernel, before libzmq ever sees them.
        assert run_as(accounts.out, lambda p=path: connect_errno(p)) == errno.EACCES
        assert run_as(accounts.b, lambda p=path: connect_errno(p)) == errno.EACCES
        assert run_as(accounts.a, lambda p=path: connect_errno(p)) == 0
    # Nobody but root lists which users have channels.
    directory = os.path.dirname(pub)
    assert run_as(accounts.out, lambda: _list_errno(directory)) == errno.EACCES


def _list_errno(directory: str) -> int:
    try:
        os.listdir(directory)
        return 0
    except OSError as e:
        return e.errno


def open_connections(sockets: list[socket.socket]) -> int:
    """How many of the connections the other end has not hung up."""
    poller = select.poll()
    for s in sockets:
        poller.register(s, select.POLLRDHUP)
    return len(sockets) - len(poller.poll(0))


def test_a_flood_of_connections_cannot_abort_the_daemon(daemon_factory, accounts):
    daemon = agent_daemon(daemon_factory, accounts)
    _, _, ack = member_agent_batch(daemon, accounts)
    # Few fds: on a daemon that accepted every connection, libzmq would hit EMFILE and abort. (libzmq
    # accepts on its own thread while pmlmd hangs up on its loop: the limit leaves room for a busy
    # loop to catch up, as the unit's 524288 does in earnest.)
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))

    def flood():
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
        held = []
        for _ in range(1500):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(s)
            try:
                s.connect(ack)
            except OSError:  # the listen backlog is full while the daemon catches up
                pass
        # Past the owner's limit (64 + 2 per worker) the daemon hangs up at once.
        left = wait_for(lambda: (n := open_connections(held)) <= 66 and (n,), timeout=20,
                        what="the connections over the limit hung up")[0]
        for s in held:
            s.close()
        return left

    assert run_as(accounts.a, flood, timeout=60) <= 66
    assert daemon.proc.poll() is None, daemon.logs()
    assert ping_time(daemon) < 2.0
    # The connections are gone: the owner's workers may connect again.
    assert run_as(accounts.a, lambda: connect_errno(ack)) == 0
    assert "which already held 66 (its limit)" in daemon.logs()


def test_junk_on_the_agent_channel_neither_stalls_nor_bloats_the_daemon(daemon_factory, accounts):
    daemon = agent_daemon(daemon_factory, accounts)
    _, pub, ack = member_agent_batch(daemon, accounts)
    rss_before = rss_kib(daemon.proc.pid)
    control = daemon.socket

    def flood():
        ctx = zmq.Context()
        done = threading.Event()

        def send_junk():
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.setsockopt(zmq.SNDTIMEO, 100)
            push.connect("ipc://" + ack)
            big = ctx.socket(zmq.PUSH)  # 64 KiB messages: over the size any ack has; libzmq drops the sender
            big.setsockopt(zmq.LINGER, 0)
            big.connect("ipc://" + ack)
            sub = ctx.socket(zmq.SUB)  # subscriptions of 1 KiB: no topic is that long
            sub.setsockopt(zmq.LINGER, 0)
            for i in range(200):
                sub.setsockopt(zmq.SUBSCRIBE, b"%04d" % i + b"x" * 1020)
            sub.connect("ipc://" + pub)
            forged = json.dumps({"version": 1, "request_id": "0" * 16, "worker_id": "1.0.1"}).encode()
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                for body in (b"\xff junk", forged):
                    try:
                        push.send(body)
                    except zmq.Again:
                        pass
                try:
                    big.send(b"x" * 65536, zmq.NOBLOCK)
                except zmq.Again:
                    pass
            for s in (push, big, sub):
                s.close()
            done.set()

        thread = threading.Thread(target=send_junk)
        thread.start()
        worst = 0.0
        while not done.is_set():
            req = ctx.socket(zmq.DEALER)
            req.setsockopt(zmq.LINGER, 0)
            req.connect("ipc://" + control)
            started = time.monotonic()
            req.send(protocol.encode_request("ping", request_id="p"))
            answered = req.poll(5000)
            worst = max(worst, time.monotonic() - started if answered else 5.0)
            req.close()
        thread.join()
        ctx.term()
        return worst

    worst_ping = run_as(accounts.a, flood, timeout=60)
    assert worst_ping < 1.0, f"a member's ping waited {worst_ping:.3f}s during the flood"
    assert daemon.proc.poll() is None
    assert rss_kib(daemon.proc.pid) - rss_before < 32 << 10, "the daemon grew by more than 32 MiB"
    # One summary line per interval, not one per message.
    ignored = [line for line in daemon.logs().splitlines() if "ignored" in line and "agent channel" in line]
    assert 1 <= len(ignored) <= 2, ignored


# A worker that acknowledges every request and goes on burning CPU all the same (bounded: 60 s).
LIAR = r"""
import json, os, sys, time, zmq
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB); sub.setsockopt(zmq.SUBSCRIBE, f"pmlm/{os.environ['PMLM_WORKER_ID']}/".encode())
sub.connect(os.environ["PMLM_AGENT_ADDRESS"])
push = ctx.socket(zmq.PUSH); push.connect(os.environ["PMLM_AGENT_ACK_ADDRESS"])
open(sys.argv[1], "w").close()
end = time.monotonic() + 60
while time.monotonic() < end:
    while sub.poll(0):
        _, body = sub.recv_multipart()
        req = json.loads(body)
        push.send(json.dumps({"version": 1, "request_id": req["request_id"], "worker_id": req["worker_id"],
                              "pid": os.getpid(), "command": req["command"]}).encode())
    sum(range(20000))
"""


def test_a_worker_that_acknowledges_a_pause_and_keeps_working_is_stopped(daemon_factory, tmp_path):
    daemon = daemon_factory(UNLIMITED).start()
    ready = tmp_path / "ready"
    batch = daemon.ctl("submit", "--pause-mode", "agent", "--term-grace", "1", "--", sys.executable, "-c", LIAR,
                       str(ready)).stdout.strip()
    wait_for(ready.exists, what="the worker connected")
    (pid, _), = daemon.worker_pids()
    assert daemon.ctl("pause", batch).returncode == 0
    # It acknowledged, so pmlmd counts it as paused; once it is seen working anyway, it gets SIGSTOP.
    wait_for(lambda: group_states(pid) == "T", timeout=15, what="the lying worker stopped by signal")
    assert "acknowledged an agent pause but kept working" in daemon.logs()
    assert daemon.ctl("resume", batch).returncode == 0
    wait_for(lambda: "T" not in group_states(pid), what="the worker continued")
    assert daemon.ctl("cancel", batch).returncode == 0
    wait_for(lambda: json.loads(daemon.ctl("status", "--json", batch).stdout)["state"] == "cancelled",
             what="the batch to end")
    report = json.loads(daemon.ctl("report", batch).stdout)
    (attempt,) = [a for t in report["tasks"] for a in t["attempts"]]
    assert "did not comply with an agent pause" in attempt["reason"], attempt


def test_a_member_cannot_starve_root_or_abort_the_daemon_through_the_control_socket(daemon_factory, accounts):
    daemon = agent_daemon(daemon_factory, accounts)
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))
    path = daemon.socket

    def flood():
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
        held = []
        for _ in range(1500):  # idle connections, as many as it can get
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(s)
            try:
                s.connect(path)
            except OSError:
                pass
        left = wait_for(lambda: (n := open_connections(held)) <= 64 and (n,), timeout=20,
                        what="the connections over the limit hung up")[0]
        for s in held[:8]:
            s.close()
        # Requests as fast as it can send them, from a few connections, never reading a reply.
        ctx = zmq.Context()
        senders = []
        for _ in range(8):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.SNDTIMEO, 0)
            d.connect("ipc://" + path)
            senders.append(d)
        ping = protocol.encode_request("list", request_id="flood")
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            for d in senders:
                try:
                    d.send(ping)
                except zmq.Again:
                    pass
        for s in senders:
            s.close()
        ctx.term()
        for s in held:
            s.close()
        return left

    result = {}
    thread = threading.Thread(target=lambda: result.update(left=run_as(accounts.a, flood, timeout=60)))
    thread.start()
    worst = 0.0
    try:
        while thread.is_alive():
            worst = max(worst, ping_time(daemon))
    finally:
        thread.join()
    assert result["left"] <= 64
    assert daemon.proc.poll() is None, daemon.logs()
    assert worst < 1.0, f"root's ping waited {worst:.3f}s while a member flooded the control socket"
    assert "control socket: hung up" in daemon.logs()
    # Once the member lets go, the member is served as before.
    assert as_user(daemon, accounts.a, "ping")["ok"] is True
