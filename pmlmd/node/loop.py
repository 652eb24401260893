"""The event loop of pmlmd and ``pmlmctl run``: one epoll set over descriptors (pidfds, PSI
triggers, cgroup files, eventfds) and ZeroMQ sockets, plus signals delivered from the loop.

epoll(7); a ZeroMQ socket's notification descriptor: zmq_getsockopt(3), ZMQ_FD and ZMQ_EVENTS.
"""

from __future__ import annotations

import math
import os
import select
import signal
from typing import Callable

import zmq


class Loop:
    """One epoll set over file descriptors and ZeroMQ sockets, plus signal delivery.

    A ZeroMQ socket is in the set by its notification descriptor (ZMQ_FD, zmq_getsockopt(3)),
    which becomes readable when the socket's state may have changed, not when a message waits:
    each turn asks every socket's ZMQ_EVENTS, before blocking (a socket that still holds
    messages a callback left makes the turn not wait) and after. So a turn costs one
    epoll_wait and a getsockopt per socket, with 1,000 workers as with one; zmq.Poller would
    build and poll its whole list of items on every call.

    A file whose poll consumes the event it reports (a PSI trigger, kernel doc
    accounting/psi.rst) is polled once per report here, as epoll_wait checks a ready item once."""

    def __init__(self, on_error: Callable[[Exception], None] | None = None):
        """With ``on_error``, an exception raised by a callback is handed to it (called inside the
        except block, so it can log the traceback) and the loop goes on; without, it propagates."""
        self.on_error = on_error
        self.epoll = select.epoll(flags=select.EPOLL_CLOEXEC)
        self.callbacks: dict = {}
        self.sockets: dict[int, object] = {}  # ZMQ_FD -> its ZeroMQ socket
        self._signals: list[int] = []
        self._restore: list[Callable[[], None]] = []

    def watch(self, source, callback: Callable[[], None], events: int = select.EPOLLIN) -> None:
        """Call ``callback`` whenever ``source`` (a ZeroMQ socket or a descriptor) is readable, or
        for a descriptor, has one of ``events`` (select.EPOLL*: EPOLLPRI alone for a cgroup file
        whose change the kernel signals, which always polls readable)."""
        if not isinstance(source, int):
            fd = source.getsockopt(zmq.FD)
            self.sockets[fd] = source
            source, events = fd, select.EPOLLIN
        if source in self.callbacks:
            self.epoll.modify(source, events)
        else:
            self.epoll.register(source, events)
        self.callbacks[source] = callback

    def unwatch(self, source) -> None:
        if not isinstance(source, int):  # found by identity: it may be closed by now
            source = next(fd for fd, sock in self.sockets.items() if sock is source)
            del self.sockets[source]
        try:
            self.epoll.unregister(source)
        except OSError:
            pass  # closed already: the kernel took it out of the set
        del self.callbacks[source]

    def _readable_sockets(self) -> list[int]:
        return [fd for fd, sock in self.sockets.items() if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN]

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds (inf: until something happens) and call back what is ready."""
        ready = self._readable_sockets()
        wait = 0 if ready else -1 if timeout == math.inf else max(0.0, timeout)
        fired = [fd for fd, _ in self.epoll.poll(wait)]
        if self.sockets:
            ready = self._readable_sockets()
        ready += [fd for fd in fired if fd not in self.sockets]
        for source in ready:
            callback = self.callbacks.get(source)  # an earlier callback may have unwatched it
            if callback is None:
                continue
            if self.on_error is None:
                callback()
                continue
            try:
                callback()
            except Exception as e:  # one bad event must not end the service that watches every worker
                self.on_error(e)

    def handle_signals(self, signals, handler: Callable[[int], None]) -> None:
        """Deliver ``signals`` to ``handler`` from the loop, not from inside whatever code was running."""
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = {sig: signal.signal(sig, lambda signum, frame: self._signals.append(signum)) for sig in signals}
        previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

        def dispatch():
            try:
                while os.read(read_end, 512):
                    pass
            except BlockingIOError:
                pass
            while self._signals:
                handler(self._signals.pop(0))

        def restore():
            signal.set_wakeup_fd(previous_wakeup)
            for sig, old in previous.items():
                signal.signal(sig, old)
            self.unwatch(read_end)
            os.close(read_end)
            os.close(write_end)

        self.watch(read_end, dispatch)
        self._restore.append(restore)

    def close(self) -> None:
        while self._restore:
            self._restore.pop()()
