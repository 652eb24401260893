"""Per-user connection limits on a listening ZeroMQ socket.

libzmq accepts every connection its listener sees, and aborts the whole process when
accept() fails with EMFILE (libzmq 4.3's ipc listener asserts on it). So no user may hold
an unbounded number of connections to any socket pmlmd listens on. A socket monitor
reports each accepted connection with its file descriptor; the kernel tells whose it is
(SO_PEERCRED, unix(7)); a connection past its user's limit is shut down at once, which
libzmq sees as the peer leaving and cleans up by itself. Root is never limited.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import socket
import struct
import time
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("pmlmd.peers")

EVENTS_PER_TURN = 512  # monitor events taken per loop turn: a flood never holds up the governor
LOG_EVERY = 10.0  # seconds between summary lines about refused connections
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(fd: int) -> int | None:
    """The uid of the process at the other end of the Unix socket ``fd`` (None: not one, or gone)."""
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        _, uid, _ = _UCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        return uid
    except OSError:
        return None
    finally:
        probe.close()  # closes the duplicate only


def hang_up(fd: int) -> None:
    """Shut the connection down; libzmq, which owns ``fd``, then closes it as if the peer had left."""
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        probe.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        probe.close()


class PeerLimit:
    """Counts the connections of one listening socket per uid and hangs up those over the limit."""

    def __init__(self, sock: zmq.Socket, limit: Callable[[int], int | None], name: str):
        """``limit(uid)`` is how many connections that user may hold (None: no limit)."""
        # A monitor socket of our own rather than pyzmq's get_monitor_socket: with no receive
        # high-water mark set before it connects, libzmq's inproc pipe to it is unbounded, so no
        # event is dropped in a flood of connections (an ACCEPTED dropped is a connection never
        # counted, never hung up).
        address = f"inproc://pmlmd-peers-{id(self):x}-{secrets.token_hex(4)}"
        sock.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.monitor = sock.context.socket(zmq.PAIR)
        self.monitor.setsockopt(zmq.RCVHWM, 0)
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.monitor.connect(address)
        self.sock = sock
        self.limit = limit
        self.name = name
        self.owner_of: dict[int, int] = {}  # fd of a counted connection -> its uid
        self.held: collections.Counter = collections.Counter()  # uid -> connections
        self.refused: collections.Counter = collections.Counter()  # uid -> hung up since the last log line
        self.lost = False  # whether monitor events were lost: counts may include connections long gone
        self.next_log = 0.0

    def read(self) -> None:
        for _ in range(EVENTS_PER_TURN):
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            except (RuntimeError, ValueError, KeyError):
                # Not an event (libzmq with a bounded monitor queue can drop one frame of an event):
                # the counts are checked again before anyone is hung up.
                self.lost = True
                continue
            fd = event["value"]
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._accepted(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                uid = self.owner_of.pop(fd, None)
                if uid is not None:
                    self.held[uid] -= 1
        self._log(time.monotonic())

    def _accepted(self, fd: int) -> None:
        uid = peer_uid(fd)
        if uid is None:
            return  # already gone
        earlier = self.owner_of.pop(fd, None)
        if earlier is not None:  # the number was free again: its earlier connection is gone, unreported
            self.held[earlier] -= 1
        allowed = self.limit(uid)
        if allowed is not None and self.held[uid] >= allowed and self.lost:
            self._recount(uid)
        if allowed is not None and self.held[uid] >= allowed:
            hang_up(fd)
            self.refused[uid] += 1
            return
        self.owner_of[fd] = uid
        self.held[uid] += 1

    def _recount(self, uid: int) -> None:
        """Drop the connections of ``uid`` that are gone, after monitor events were lost."""
        for fd in [fd for fd, owner in self.owner_of.items() if owner == uid]:
            if peer_uid(fd) != uid:
                del self.owner_of[fd]
                self.held[uid] -= 1

    def _log(self, now: float) -> None:
        if self.refused and now >= self.next_log:
            for uid, count in self.refused.items():
                log.warning("%s: hung up %d connections of uid %d, which already held %d (its limit)", self.name,
                            count, uid, self.held[uid])
            self.refused.clear()
            self.next_log = now + LOG_EVERY

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close()
