"""The worker's end of agent mode: cooperative stop for workers that block SIGTERM.

A worker that must not be cut off by a signal (a queue consumer in the middle of a message, say)
asks the manager at safe points whether to stop, stand still or go on::

    from pmlmd.agent import Agent, TerminationRequested

    with Agent.from_env() as agent:
        try:
            for job in jobs:
                agent.checkpoint()   # blocks while paused; raises when told to stop
                handle(job)
        except TerminationRequested:
            put_back_unfinished_work()
    # leaving the block flushes the last ack; then exit promptly

Without PMLM_AGENT_ADDRESS in the environment the agent does nothing and pyzmq is never imported,
so the same worker runs unchanged under plain signals or by hand. The wire format is described in
docs/agent-protocol.md. An Agent belongs to one thread (ZeroMQ sockets are not thread-safe).
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

PROTOCOL_VERSION = 1
COMMANDS = ("terminate", "pause", "continue")
BROADCAST_ID = "*"

# The manager stops re-sending a request at its deadline; its id is remembered this much longer so
# that a copy still on its way is recognised as a copy and not applied a second time.
_REMEMBER_AFTER_DEADLINE = 60.0
# Long enough for close() to hand the last ack to the manager, short enough not to hold up an
# exit when the manager is gone.
_ACK_LINGER_MS = 1000


class TerminationRequested(Exception):
    """The manager asked this worker to clean up and exit."""

    def __init__(self, request_id: str):
        super().__init__(f"the manager asked this worker to terminate (request {request_id})")
        self.request_id = request_id


def topics(worker_id: str) -> tuple[bytes, bytes]:
    """The worker's own topic and the broadcast topic. The trailing slash ends the id: ZeroMQ
    matches prefixes, and without it worker 1.1.1 would also get 1.1.10's messages."""
    return f"pmlm/{worker_id}/".encode(), f"pmlm/{BROADCAST_ID}/".encode()


class Agent:
    """Receives the manager's requests for one worker, acknowledges and applies them."""

    def __init__(self, address: str | None = None, ack_address: str | None = None,
                 worker_id: str | None = None, *, context=None):
        """Connect to the manager at once: requests published before the subscription reaches the
        manager are lost (it re-sends them, but the earlier the better). Without an address the
        agent is disabled and every call is a no-op. A caller that already has a zmq.Context may
        pass it; it is then not terminated by close()."""
        self.enabled = address is not None
        self.paused = False
        self.worker_id = worker_id
        self._termination: str | None = None  # id of the terminate request that was applied
        self._seen: dict[str, float] = {}  # request id -> deadline: each request is applied once
        self._sub = self._push = self._context = None
        self._owns_context = False
        if not self.enabled:
            return
        if not ack_address or not worker_id:
            raise ValueError("an agent address needs an ack address and a worker id as well")
        import zmq  # here and not at the top: a worker without an agent channel needs no pyzmq

        self._zmq = zmq
        self._owns_context = context is None
        self._context = zmq.Context() if context is None else context
        try:
            self._sub = self._context.socket(zmq.SUB)
            self._sub.setsockopt(zmq.LINGER, 0)
            for topic in topics(worker_id):
                self._sub.setsockopt(zmq.SUBSCRIBE, topic)
            self._sub.connect(address)
            self._push = self._context.socket(zmq.PUSH)
            self._push.setsockopt(zmq.LINGER, _ACK_LINGER_MS)
            self._push.connect(ack_address)
        except Exception:
            self.close()
            raise

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Agent:
        """The agent the manager configured through PMLM_AGENT_ADDRESS, PMLM_AGENT_ACK_ADDRESS and
        PMLM_WORKER_ID; a disabled one when PMLM_AGENT_ADDRESS is unset or empty."""
        return cls(environ.get("PMLM_AGENT_ADDRESS") or None,
                   environ.get("PMLM_AGENT_ACK_ADDRESS") or None,
                   environ.get("PMLM_WORKER_ID") or None)

    def checkpoint(self) -> None:
        """Handle every request that has arrived: ack each, apply them in order. Raise
        TerminationRequested when told to terminate (again on every later call); while paused,
        block until a continue or a terminate arrives."""
        if self._sub is not None:
            self._drain()
            while self.paused:
                self._sub.poll()  # wait for the next message: standing still costs no CPU
                self._drain()
        if self._termination is not None:
            raise TerminationRequested(self._termination)

    def close(self) -> None:
        """Close the sockets, giving a last ack up to a second to reach the manager."""
        for sock in (self._sub, self._push):
            if sock is not None:
                sock.close()
        if self._owns_context and self._context is not None:
            self._context.term()
        self._sub = self._push = self._context = None
        self.paused = False

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _drain(self) -> None:
        zmq = self._zmq
        received = False
        # Reading EVENTS never waits and takes about a microsecond; nothing queued is what a
        # checkpoint finds almost every time.
        while self._sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            received = True
            request = self._parse(self._sub.recv_multipart(zmq.NOBLOCK))
            if request is not None:
                self._ack(request)
                self._apply(request)
        if received:
            self._forget_expired()

    def _parse(self, frames: list[bytes]) -> dict | None:
        """The request in a [topic, body] message, or None when it is not a version 1 request for
        this worker: whatever else arrives must never stop the worker."""
        if len(frames) != 2:
            return None
        try:
            body = json.loads(frames[1].decode("utf-8"))
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            return None
        if not isinstance(body, dict):
            return None
        version, request_id, deadline = body.get("version"), body.get("request_id"), body.get("deadline")
        if type(version) is not int or version != PROTOCOL_VERSION:  # type(): True is not version 1
            return None
        if not isinstance(request_id, str) or not request_id or body.get("command") not in COMMANDS:
            return None
        if body.get("worker_id") not in (self.worker_id, BROADCAST_ID):
            return None  # another worker's, seen through the broadcast topic
        if type(deadline) not in (int, float):
            return None
        return body

    def _ack(self, request: dict) -> None:
        """Acknowledge one copy of a request (every copy: an earlier ack may not have arrived)."""
        ack = {"version": PROTOCOL_VERSION, "request_id": request["request_id"],
               "worker_id": self.worker_id, "pid": os.getpid(), "command": request["command"]}
        try:
            self._push.send(json.dumps(ack).encode(), self._zmq.NOBLOCK)
        except self._zmq.Again:
            pass  # the manager takes no acks (gone, or far behind): it re-sends or escalates anyway

    def _apply(self, request: dict) -> None:
        request_id, command = request["request_id"], request["command"]
        if request_id in self._seen:
            return  # a re-sent copy of a request already applied
        self._seen[request_id] = request["deadline"]
        if self._termination is not None:
            return  # terminate wins over everything that follows it
        if command == "terminate":
            self._termination = request_id
            self.paused = False
        elif command == "pause":
            # A pause past its deadline is not applied: the manager stopped waiting for it and
            # acted without it, so no continue need ever come to end it.
            if time.time() <= request["deadline"]:
                self.paused = True
        else:
            self.paused = False

    def _forget_expired(self) -> None:
        now = time.time()
        for request_id in [rid for rid, deadline in self._seen.items()
                           if deadline + _REMEMBER_AFTER_DEADLINE < now]:
            del self._seen[request_id]
