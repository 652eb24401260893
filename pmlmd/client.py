"""The client side of the control socket: connect to pmlmd, ask, and read the answers."""

from __future__ import annotations

import errno
import itertools
import os
import socket
from typing import Iterator

import zmq

from . import protocol

DEFAULT_SOCKET = "/run/pmlmd/control.sock"


class Unreachable(Exception):
    """pmlmd cannot be reached; the message says why and what to do."""


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
        while True:
            if not self.sock.poll(None if timeout is None else int(timeout * 1000)):
                raise Unreachable(f"pmlmd did not answer on {self.path} within {timeout:g}s; see "
                                  "'journalctl -u pmlmd'")
            reply = protocol.decode_reply(self.sock.recv())
            # An error pmlmd found before it could read the request's id (too large, not JSON)
            # comes without one: it answers the one request this client has in flight.
            if reply.get("request_id") == request_id or (reply.get("request_id") is None and not reply.get("ok")):
                return reply

    def call(self, name: str, /, **args) -> dict:
        """Send one request and return its result; raises RemoteError for an error reply."""
        reply = self._receive(self._send(name, args), self.timeout)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise RemoteError(error.get("code", "internal"), error.get("message", "unknown error"))
        return reply.get("result", {})

    def stream(self, name: str, /, **args) -> Iterator[dict]:
        """Yield the events of a streaming request until its closing reply (or for ever)."""
        request_id = self._send(name, args)
        while True:
            reply = self._receive(request_id, None if args.get("follow") else self.timeout)
            if not reply.get("ok"):
                error = reply.get("error") or {}
                raise RemoteError(error.get("code", "internal"), error.get("message", "unknown error"))
            if "event" not in reply:
                return
            yield reply["event"]

