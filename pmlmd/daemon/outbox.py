"""What the daemon sends its clients, queued per client when a client does not read fast enough.

The control socket is a ROUTER with ROUTER_MANDATORY: a send to a client whose ZeroMQ queue
is full (its send high-water mark, 1000 messages) fails with EAGAIN, and one to a client that
is gone fails with EHOSTUNREACH. ``Outboxes`` keeps what could not be sent yet, per client and
in order, and sends it as the client reads (``flush``, called every loop turn and at least
every ``RETRY`` seconds while something waits):

- a reply (every request's, and the reply that closes an ``events`` stream) is never dropped
  while its client is connected;
- events are: a client may have ``EVENTS_PER_CLIENT`` of them waiting, and those beyond are
  counted per request; the next message of that request (an event or its closing reply) is
  preceded by ``{"event": "dropped", "count": N}``, so a reader knows what it missed;
- a client that is gone is forgotten (``on_gone`` lets the daemon forget its followers), and
  so is one that lets more than ``BYTES_PER_CLIENT`` of replies pile up unread (it sends
  requests and reads nothing: keeping them would let it fill the daemon's memory).
"""

from __future__ import annotations

import errno
import logging
import time
from collections import deque
from typing import Callable

import zmq

from ..core import events, protocol

log = logging.getLogger("pmlmd.outbox")

EVENTS_PER_CLIENT = 1000  # events waiting for one client, beyond what ZeroMQ holds for it
BYTES_PER_CLIENT = 64 << 20  # of replies waiting for one client; beyond, the client is forgotten
RETRY = 0.02  # seconds between tries to send to a client that was not reading


class _Box:
    __slots__ = ("items", "events", "nbytes")

    def __init__(self):
        self.items: deque[tuple[bytes, bool]] = deque()  # (frame, is an event)
        self.events = 0
        self.nbytes = 0


class Outboxes:
    def __init__(self, sock: zmq.Socket, on_gone: Callable[[bytes], None] = lambda client: None,
                 events_per_client: int = EVENTS_PER_CLIENT, bytes_per_client: int = BYTES_PER_CLIENT):
        self.sock = sock
        self.on_gone = on_gone
        self.events_per_client = events_per_client
        self.bytes_per_client = bytes_per_client
        self.boxes: dict[bytes, _Box] = {}
        self.dropped: dict[tuple[bytes, object], int] = {}  # (client, request id) -> events not sent

    # --- sending ---------------------------------------------------------------------------
    def event(self, client: bytes, request_id, event: dict) -> None:
        """One event of the stream answering ``request_id``; dropped (and counted) if too many wait."""
        box = self.boxes.get(client)
        key = (client, request_id)
        missed = self.dropped.get(key, 0)
        if box is not None and box.events + 1 + bool(missed) > self.events_per_client:
            self.dropped[key] = missed + 1
            return
        self._missed(client, request_id)
        self._put(client, protocol.encode_event(event, request_id), True)

    def reply(self, client: bytes, request_id, payload: bytes) -> None:
        """A reply: sent after whatever waits for the client, never dropped while the client is there."""
        self._missed(client, request_id)
        self._put(client, payload, False)

    def _missed(self, client: bytes, request_id) -> None:
        missed = self.dropped.pop((client, request_id), 0)
        if missed:
            marker = {"time": round(time.time(), 3), **events.Dropped(missed).wire()}
            self._put(client, protocol.encode_event(marker, request_id), True)

    def _put(self, client: bytes, frame: bytes, is_event: bool) -> None:
        box = self.boxes.get(client)
        if box is None:
            if self._try(client, frame) is not None:
                return  # sent, or the client is gone
            box = self.boxes[client] = _Box()
        box.items.append((frame, is_event))
        box.events += is_event
        box.nbytes += 0 if is_event else len(frame)
        if box.nbytes > self.bytes_per_client:
            log.warning("a client of the control socket has %d bytes of replies unread: forgetting it",
                        box.nbytes)
            self.forget(client)

    def _try(self, client: bytes, frame: bytes) -> bool | None:
        """True if sent, False if the client is gone (now forgotten), None if it cannot take it now."""
        try:
            self.sock.send_multipart([client, frame], zmq.NOBLOCK)
            return True
        except zmq.Again:
            return None
        except zmq.ZMQError as e:
            if e.errno != errno.EHOSTUNREACH:
                log.warning("cannot send to a client of the control socket: %s; forgetting it", e)
            self.forget(client)
            return False

    # --- the loop's part -------------------------------------------------------------------
    def next_retry(self) -> float:
        """When ``flush`` should run again (monotonic time): soon while something waits, else never."""
        return time.monotonic() + RETRY if self.boxes else float("inf")

    def flush(self) -> None:
        """Send what waits, in order, for as long as each client takes it."""
        for client in list(self.boxes):
            box = self.boxes.get(client)
            while box is not None and box.items:
                frame, is_event = box.items[0]
                sent = self._try(client, frame)
                if not sent:
                    break  # not now, or forgotten
                box.items.popleft()
                box.events -= is_event
                box.nbytes -= 0 if is_event else len(frame)
            if box is not None and not box.items and self.boxes.get(client) is box:
                del self.boxes[client]

    def forget(self, client: bytes) -> None:
        """The client is gone: drop what waits for it, and let the daemon forget its requests."""
        self.boxes.pop(client, None)
        for key in [key for key in self.dropped if key[0] == client]:
            del self.dropped[key]
        self.on_gone(client)
