"""The client side of the control socket: connect to pmlmd, ask, and read the answers."""

from __future__ import annotations

import collections
import errno
import itertools
import os
import socket
import time
from typing import Iterator

import zmq

from ..core import protocol

DEFAULT_SOCKET = "/run/pmlmd/control.sock"
READ_TIMEOUT = 3.0  # seconds a read (Client.read) first waits for its answer before it is asked again
READ_PATIENCE = 60.0  # seconds a read waits for an answer in all
RESTART_GRACE = 10.0  # seconds nothing may listen on the socket before a read says pmlmd is not running


class Unreachable(Exception):
    """pmlmd cannot be reached; the message says why and what to do."""


class StreamEnded(Exception):
    """A stream's closing reply came; ``result`` is its result."""

    def __init__(self, result: dict):
        super().__init__("the stream ended")
        self.result = result


class RemoteError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def socket_path(explicit: str | None) -> str:
    return explicit or os.environ.get("PMLM_SOCKET") or DEFAULT_SOCKET


class Client:
    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self._check_reachable()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect("ipc://" + path)
        self._ids = itertools.count(1)
        # Messages of open streams (request id -> those not read yet): a stream's events may come
        # in while the client waits for the reply to another request on the same connection.
        self._held: dict[int, collections.deque] = {}

    def _check_reachable(self) -> None:
        # ZeroMQ connects in the background and would just wait; a plain connect says at once what is wrong.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except PermissionError:
            raise Unreachable(f"permission denied: cannot connect to {self.path}; ask to be added to group "
                              "pmlm (adduser USER pmlm, then log in again) or run as root")
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            if e.errno == errno.EAGAIN:  # the listen queue is full: it runs, but too many connect at once
                raise Unreachable(f"pmlmd is busy: its socket {self.path} accepts no more connections just now "
                                  "(too many clients at once); try again in a moment")
            hint = "start it with systemctl start pmlmd" if self.path == DEFAULT_SOCKET else \
                "check --socket (or PMLM_SOCKET), or start a pmlmd there"
            raise Unreachable(f"pmlmd is not running: cannot connect to {self.path} ({reason}); {hint}")
        finally:
            probe.close()

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, name: str, args: dict) -> int:
        request_id = next(self._ids)
        self.sock.send(protocol.encode_request(name, request_id=request_id, **args))
        return request_id

    def _receive(self, request_id: int, timeout: float | None) -> dict:
        reply = self._next(request_id, timeout)
        if reply is None:
            raise Unreachable(f"pmlmd did not answer on {self.path} within {timeout:g}s; see 'journalctl -u pmlmd'")
        return reply

    def _next(self, request_id: int | set[int], timeout: float | None) -> dict | None:
        """The next message answering ``request_id`` (or any of a set of them); None when none came
        within ``timeout`` seconds."""
        wanted = request_id if isinstance(request_id, set) else {request_id}
        for one in wanted:
            held = self._held.get(one)
            if held:
                return held.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.sock.poll(None if left is None else int(left * 1000)):
                return None
            reply = protocol.decode_reply(self.sock.recv())
            # An error pmlmd found before it could read the request's id (too large, not JSON)
            # comes without one: it answers the one request this client has in flight.
            if reply.get("request_id") in wanted or (reply.get("request_id") is None and not reply.get("ok")):
                return reply
            if reply.get("request_id") in self._held:
                self._held[reply["request_id"]].append(reply)

    def call(self, name: str, /, **args) -> dict:
        """Send one request and return its result; raises RemoteError for an error reply."""
        return _result(self._receive(self._send(name, args), self.timeout))

    def read(self, name: str, /, **args) -> dict:
        """``call`` for a request that only reads (status, log, report, ping), asked again when no
        answer came: a pmlmd that stops (a restart, a package upgrade) leaves unanswered what it
        had received, and the one after it answers the request asked again. The first wait is
        READ_TIMEOUT, each next one twice the one before (a busy pmlmd is not asked the same
        thing over and over), and an answer to any of the asks is taken. Where nothing listens
        on the socket for RESTART_GRACE, pmlmd is not running: Unreachable at once, saying so;
        Unreachable too when READ_PATIENCE has passed."""
        sent: set[int] = set()
        wait, give_up = READ_TIMEOUT, time.monotonic() + READ_PATIENCE
        while True:
            sent.add(self._send(name, args))
            reply = self._next(sent, wait)
            if reply is not None:
                break
            if time.monotonic() >= give_up:
                raise Unreachable(f"pmlmd did not answer on {self.path} within {READ_PATIENCE:g}s; see "
                                  "'journalctl -u pmlmd'")
            self._wait_reachable(RESTART_GRACE)
            wait = min(2 * wait, max(0.1, give_up - time.monotonic()))
        return _result(reply)

    def _wait_reachable(self, grace: float) -> None:
        """Return once something accepts connections on the socket again (a restarting pmlmd);
        Unreachable (why, and what to do) when nothing has for ``grace`` seconds."""
        deadline = time.monotonic() + grace
        while True:
            try:
                self._check_reachable()
                return
            except Unreachable:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(0.2)

    def close_stream(self, request_id: int) -> None:
        """Forget a stream opened with ``open_stream`` (its pmlmd went away): what still comes of it
        is dropped."""
        self._held.pop(request_id, None)

    def open_stream(self, name: str, /, **args) -> int:
        """Send a streaming request whose messages are read with ``take`` (other requests may be
        made meanwhile); its request id."""
        request_id = self._send(name, args)
        self._held[request_id] = collections.deque()
        return request_id

    def take(self, request_id: int, timeout: float | None) -> dict | None:
        """The next event of a stream opened with ``open_stream``; None when none came within
        ``timeout`` seconds. Raises StreamEnded with the closing reply's result, RemoteError for an
        error reply."""
        reply = self._next(request_id, timeout)
        if reply is None:
            return None
        if not reply.get("ok") or "event" not in reply:
            self._held.pop(request_id, None)
            raise StreamEnded(_result(reply))
        return reply["event"]

    def stream(self, name: str, /, **args) -> Iterator[dict]:
        """Yield the events of a streaming request until its closing reply (or for ever)."""
        request_id = self._send(name, args)
        while True:
            reply = self._receive(request_id, None if args.get("follow") else self.timeout)
            if not reply.get("ok") or "event" not in reply:
                _result(reply)  # raises RemoteError for an error reply
                return
            yield reply["event"]


def _result(reply: dict) -> dict:
    """A reply's result; RemoteError for an error reply."""
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise RemoteError(error.get("code", "internal"), error.get("message", "unknown error"))
    return reply.get("result", {})
