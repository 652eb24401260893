"""The manager's end of the cooperative stop channel (agent mode); docs/agent-protocol.md has the wire format.

Requests go out on a PUB socket under the worker's own topic and are published again
every RESEND seconds until the worker acknowledges them on the PULL socket or their
deadline passes, so a worker that subscribes late still gets them. An acknowledgement
counts only when the kernel says it comes from the worker's owner (or root).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import zmq

log = logging.getLogger("pmlmd.agent")

WIRE_VERSION = 1
RESEND = 0.1  # seconds between copies of an unacknowledged request
LEGACY_KEYS = {"terminate": "Pids_for_terminate", "pause": "Pids_for_pause", "continue": "Pids_for_continue"}


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
    def __init__(self, ctx: zmq.Context, pub_path: str, on_ack: Callable[[Request], None], mode: int = 0o666):
        """Bind the PUB socket at ``pub_path`` and the PULL socket beside it (``<name>-ack.sock``).

        The sockets are world-connectable by default: workers run as any submitter. What
        a stranger can do there is read pids and send acks, which are checked.
        """
        self.pub_path = pub_path
        self.ack_path = os.path.splitext(pub_path)[0] + "-ack.sock"
        os.makedirs(os.path.dirname(pub_path), mode=0o755, exist_ok=True)
        self.on_ack = on_ack
        self.pending: dict[str, Request] = {}
        self.pub = ctx.socket(zmq.PUB)
        self.pull = ctx.socket(zmq.PULL)
        for sock, path in ((self.pub, self.pub_path), (self.pull, self.ack_path)):
            sock.setsockopt(zmq.LINGER, 0)
            if os.path.exists(path):
                os.unlink(path)  # a socket file left by an earlier manager
            sock.bind("ipc://" + path)
            os.chmod(path, mode)
        self.pull.setsockopt(zmq.MAXMSGSIZE, 64 << 10)

    @property
    def address(self) -> str:
        return "ipc://" + self.pub_path

    @property
    def ack_address(self) -> str:
        return "ipc://" + self.ack_path

    def environment(self, worker_id: str) -> dict[str, str]:
        return {"PMLM_AGENT_ADDRESS": self.address, "PMLM_AGENT_ACK_ADDRESS": self.ack_address,
                "PMLM_WORKER_ID": worker_id}

    def request(self, worker_id: str, pid: int, command: str, timeout: float, owner_uid: int | None,
                context=None) -> Request:
        """Ask a worker to terminate, pause or continue; supersedes what it was asked before."""
        self.forget(worker_id)
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
        """Stop re-sending whatever is pending for the worker (it exited, or a newer request replaces it)."""
        for request_id in [r.request_id for r in self.pending.values() if r.worker_id == worker_id]:
            del self.pending[request_id]

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
        while True:
            try:
                frame = self.pull.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                ack = json.loads(frame.bytes)
                req = self.pending.get(ack["request_id"]) if isinstance(ack, dict) else None
            except (ValueError, KeyError, TypeError):
                continue  # not an acknowledgement: nothing to do with it
            if req is None or ack.get("worker_id") != req.worker_id:
                continue  # late copy of an ack already taken, or not for this request
            uid = _peer_uid(frame)
            if req.owner_uid is not None and uid not in (0, req.owner_uid):
                log.warning("ignoring an ack for worker %s from uid %s (its owner is uid %d)", req.worker_id, uid,
                            req.owner_uid)
                continue
            del self.pending[req.request_id]
            self.on_ack(req)

    def close(self) -> None:
        self.pub.close()
        self.pull.close()
        for path in (self.pub_path, self.ack_path):
            if os.path.exists(path):
                os.unlink(path)


def _peer_uid(frame: zmq.Frame) -> int | None:
    try:
        return int(frame.get("Peer-Address").rsplit(":", 3)[1])
    except (zmq.ZMQError, ValueError, IndexError):
        return None
