"""The manager's end of the cooperative stop channel (agent mode); docs/agent-protocol.md has the wire format.

Requests go out on a PUB socket under the worker's own topic and are published again
every RESEND seconds until the worker acknowledges them on the PULL socket or their
deadline passes, so a worker that subscribes late still gets them. An acknowledgement
counts only when the kernel says it comes from the worker's owner (or root).

Each owner has a channel of their own (``AgentChannels``): a socket pair that only that
user and root may connect to, so no other user can read which workers run, send
acknowledgements, or reach a libzmq listener at all. What the owner can send is bounded:
message size, queued messages, connections (pmlmd.node.peerlimit hangs up those past the cap)
and the work done per loop turn; rejected messages are counted and logged as one line per
LOG_EVERY seconds, never one line each.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import stat
import time
from dataclasses import dataclass, field
from typing import Callable

import zmq

from .peerlimit import PeerLimit

log = logging.getLogger("pmlmd.agent")

WIRE_VERSION = 1
RESEND = 0.1  # seconds between copies of an unacknowledged request
LEGACY_KEYS = {"terminate": "Pids_for_terminate", "pause": "Pids_for_pause", "continue": "Pids_for_continue"}
# An ack is about 120 bytes and a subscription a topic of a few dozen: anything larger is not
# the protocol, and libzmq drops the connection that sends it.
MAX_ACK_BYTES = 1024
MAX_SUBSCRIPTION_BYTES = 256
QUEUED_PER_CONNECTION = 16  # messages libzmq buffers per connection before it stops reading it
READS_PER_TURN = 256  # acks (or junk) taken per loop turn: a flood never holds up the governor
BASE_CONNECTIONS = 64  # connections per socket allowed beyond two per worker of the owner
LOG_EVERY = 10.0  # seconds between summary lines about rejected messages
def topic(worker_id: str) -> bytes:
    # The trailing slash keeps worker 1.1.1's subscription from matching 1.1.10 (topics match by prefix).
    return f"pmlm/{worker_id}/".encode()


@dataclass
class Request:
    request_id: str
    worker_id: str
    pid: int
    command: str
    deadline: float  # monotonic: stop re-sending, the caller escalates
    owner_uid: int | None
    body: bytes = b""
    next_send: float = 0.0
    context: object = field(default=None, repr=False)  # the caller's, handed back with the ack


class AgentChannel:
    """One owner's socket pair: PUB for requests, PULL for acknowledgements."""

    def __init__(self, ctx: zmq.Context, pub_path: str, on_ack: Callable[[Request], None],
                 owner: tuple[int, int] | None = None):
        """Bind the PUB socket at ``pub_path`` and the PULL socket beside it (``<name>-ack.sock``).

        The socket files are mode 0600, owned by ``owner`` (uid, gid) when given (the daemon
        runs as root and serves many users), else by the caller. Connecting to a Unix socket
        needs write permission on its file (unix(7)), so only that user and root get in.
        """
        self.pub_path = pub_path
        self.ack_path = os.path.splitext(pub_path)[0] + "-ack.sock"
        self.owner = owner
        self.on_ack = on_ack
        self.pending: dict[str, Request] = {}
        self.workers: set[str] = set()  # ids of the live workers this channel serves
        self.rejected = 0  # messages ignored since the last summary line
        self.next_log = 0.0
        self.pub = ctx.socket(zmq.PUB)
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.MAXMSGSIZE, MAX_ACK_BYTES)
        self.pub.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        self.limits: list[PeerLimit] = []
        for sock, path in ((self.pub, self.pub_path), (self.pull, self.ack_path)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, QUEUED_PER_CONNECTION)
            sock.setsockopt(zmq.BACKLOG, BASE_CONNECTIONS)
            if os.path.lexists(path):
                os.unlink(path)  # a socket file left by an earlier manager
            sock.bind("ipc://" + path)
            self.limits.append(PeerLimit(sock, self._connections_allowed, f"agent channel {path}"))
            # The directory is root's and not writable by the owner, so nobody can swap the file
            # for a link meanwhile. Mode first, owner second: changing the mode of a file pmlmd no
            # longer owns would need CAP_FOWNER, which the unit does not grant.
            os.chmod(path, 0o600, follow_symlinks=False)
            if self.owner is not None and os.geteuid() == 0:
                os.chown(path, self.owner[0], self.owner[1], follow_symlinks=False)

    def _connections_allowed(self, uid: int) -> int | None:
        # Each worker connects once to each socket; a restarted or reconnecting one may briefly hold more.
        return None if uid == 0 else BASE_CONNECTIONS + 2 * len(self.workers)

    @property
    def address(self) -> str:
        return "ipc://" + self.pub_path

    @property
    def ack_address(self) -> str:
        return "ipc://" + self.ack_path

    def environment(self, worker_id: str) -> dict[str, str]:
        self.workers.add(worker_id)
        return {"PMLM_AGENT_ADDRESS": self.address, "PMLM_AGENT_ACK_ADDRESS": self.ack_address,
                "PMLM_WORKER_ID": worker_id}

    def request(self, worker_id: str, pid: int, command: str, timeout: float, owner_uid: int | None,
                context=None) -> Request:
        """Ask a worker to terminate, pause or continue; supersedes what it was asked before."""
        self.forget(worker_id)
        self.workers.add(worker_id)
        now = time.monotonic()
        req = Request(request_id=secrets.token_hex(8), worker_id=worker_id, pid=pid, command=command,
                      deadline=now + timeout, owner_uid=owner_uid, context=context)
        body = {"version": WIRE_VERSION, "request_id": req.request_id, "command": command, "worker_id": worker_id,
                "deadline": round(time.time() + timeout, 3)}
        body.update({key: [pid] if cmd == command else [] for cmd, key in LEGACY_KEYS.items()})
        req.body = json.dumps(body).encode()
        self.pending[req.request_id] = req
        self._publish(req, now)
        return req

    def forget(self, worker_id: str) -> None:
        """Stop re-sending whatever is pending for the worker (a newer request replaces it)."""
        for request_id in [r.request_id for r in self.pending.values() if r.worker_id == worker_id]:
            del self.pending[request_id]

    def worker_gone(self, worker_id: str) -> None:
        """The worker has exited: nothing more to send it, and one fewer to make room for."""
        self.forget(worker_id)
        self.workers.discard(worker_id)

    @property
    def idle(self) -> bool:
        return not self.workers and not self.pending

    def _publish(self, req: Request, now: float) -> None:
        try:
            self.pub.send_multipart([topic(req.worker_id), req.body], zmq.NOBLOCK)
        except zmq.Again:
            pass  # the next resend tries again
        req.next_send = now + RESEND

    def next_deadline(self) -> float:
        return min((min(r.next_send, r.deadline) for r in self.pending.values()), default=float("inf"))

    def expired(self, now: float) -> list[Request]:
        """Re-send what is due; return (and drop) the requests whose deadline passed unacknowledged."""
        gone = [r for r in self.pending.values() if now >= r.deadline]
        for req in gone:
            del self.pending[req.request_id]
        for req in self.pending.values():
            if now >= req.next_send:
                self._publish(req, now)
        return gone

    def read_acks(self) -> None:
        """Take up to READS_PER_TURN messages; the loop's poller calls again while more wait."""
        for _ in range(READS_PER_TURN):
            try:
                frame = self.pull.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                ack = json.loads(frame.bytes)
                req = self.pending.get(ack["request_id"]) if isinstance(ack, dict) else None
            except (ValueError, KeyError, TypeError):
                self.rejected += 1  # not an acknowledgement
                continue
            if req is None or ack.get("worker_id") != req.worker_id:
                continue  # a late copy of an ack already taken, or not for this request: normal
            uid = _peer_uid(frame)
            if req.owner_uid is not None and uid not in (0, req.owner_uid):
                self.rejected += 1
                continue
            del self.pending[req.request_id]
            self.on_ack(req)
        self._log_rejected(time.monotonic())

    def _log_rejected(self, now: float) -> None:
        if self.rejected and now >= self.next_log:
            log.warning("agent channel %s: ignored %d messages that were no acknowledgement of a pending request "
                        "from the worker's owner", self.ack_path, self.rejected)
            self.rejected = 0
            self.next_log = now + LOG_EVERY

    def close(self) -> None:
        for limit in self.limits:
            limit.close()
        self.pub.close()
        self.pull.close()
        for path in (self.pub_path, self.ack_path):
            if os.path.lexists(path):
                os.unlink(path)


class AgentChannels:
    """The agent channels of one manager: one per owner, made when first needed.

    The sockets of uid U are ``DIRECTORY/U.sock`` and ``DIRECTORY/U-ack.sock``. DIRECTORY is
    created mode 0711 (``dir_mode``): everyone may pass through it to a socket file whose
    mode lets them in, nobody but its owner (the manager) may list it or change its entries.
    """

    def __init__(self, ctx: zmq.Context, directory: str, on_ack: Callable[[Request], None], loop,
                 dir_mode: int = 0o711):
        self.ctx = ctx
        self.directory = directory
        self.on_ack = on_ack
        self.loop = loop
        os.makedirs(directory, mode=dir_mode, exist_ok=True)
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise OSError(f"the agent socket directory {directory} is not a directory of uid {os.geteuid()}: "
                          "remove it, or set agent_socket in pmlmd.toml elsewhere")
        os.chmod(directory, dir_mode)
        self.channels: dict[int, AgentChannel] = {}

    def channel(self, uid: int | None) -> AgentChannel:
        uid = os.geteuid() if uid is None else uid
        chan = self.channels.get(uid)
        if chan is None:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid if os.geteuid() == 0 else os.getegid()
            chan = AgentChannel(self.ctx, os.path.join(self.directory, f"{uid}.sock"), self.on_ack,
                                owner=(uid, gid) if uid != os.geteuid() else None)
            self.loop.watch(chan.pull, chan.read_acks)
            for limit in chan.limits:
                self.loop.watch(limit.monitor, limit.read)
            self.channels[uid] = chan
        return chan

    def environment(self, worker_id: str, uid: int | None) -> dict[str, str]:
        return self.channel(uid).environment(worker_id)

    def request(self, worker_id: str, pid: int, command: str, timeout: float, owner_uid: int | None,
                context=None) -> Request:
        return self.channel(owner_uid).request(worker_id, pid, command, timeout, owner_uid, context)

    def worker_gone(self, worker_id: str, uid: int | None) -> None:
        chan = self.channels.get(os.geteuid() if uid is None else uid)
        if chan is not None:
            chan.worker_gone(worker_id)

    def next_deadline(self) -> float:
        return min((c.next_deadline() for c in self.channels.values()), default=float("inf"))

    def expired(self, now: float) -> list[Request]:
        gone = []
        for chan in self.channels.values():
            gone += chan.expired(now)
        return gone

    def close_idle(self) -> None:
        """Close the channels of owners who have no agent-mode worker left."""
        for uid, chan in list(self.channels.items()):
            if chan.idle:
                self._close(uid)

    def _close(self, uid: int) -> None:
        chan = self.channels.pop(uid)
        self.loop.unwatch(chan.pull)
        for limit in chan.limits:
            self.loop.unwatch(limit.monitor)
        chan.close()

    def close(self) -> None:
        for uid in list(self.channels):
            self._close(uid)


def _peer_uid(frame: zmq.Frame) -> int | None:
    try:
        return int(frame.get("Peer-Address").rsplit(":", 3)[1])
    except (zmq.ZMQError, ValueError, IndexError):
        return None
