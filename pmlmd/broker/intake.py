"""A batch's intake from an AMQP 0-9-1 queue (RabbitMQ): deliveries in, settlements out.

The broker connection lives on a thread of its own, so the loop that enforces the limits never
waits on the network. The loop and the thread talk through two queues: the loop posts commands
(``set_credit``, ``ack``, ``give_back``, ``send_back``, ``dead_letter``, ``reply``, ``close``) and
the thread answers with ``Event``s, each signalled on an eventfd the loop watches (``fileno``).

Flow control: the loop keeps ``set_credit`` at the number of deliveries the node may hold
unacknowledged (its running tasks plus what the governor admits now). The credit becomes the
channel's basic.qos prefetch count, with ``global`` set: RabbitMQ then limits the channel as a
whole and applies a new count at once (a per-consumer count applies only to consumers made
after it). Prefetch 0 would mean *unlimited* in AMQP, so a credit of 0 cancels the consumer
instead, and the node takes nothing until credit returns.

Settling, once a task's outcome is final (never before: at-least-once):

================  ===========================================================================
``ack``           it succeeded
``give_back``     basic.reject with requeue: unchanged, for any node (a cancelled batch, a
                  delivery the node held but could not start while a limit was breached)
``send_back``     the governor ended it and its budget allows more: published again to the
                  queue with its termination count in the ``x-pmlm-terminations`` header (so
                  every node honours one budget), then acked
``dead_letter``   it failed, or was given up: published to the dead-letter exchange with
                  ``x-pmlm-cause``/``x-pmlm-reason``/``x-pmlm-node`` headers and acked; with no
                  exchange given, basic.nack without requeue (the queue's own
                  x-dead-letter-exchange, if it has one, takes it with an x-death header)
================  ===========================================================================

Publishes use publisher confirms (RabbitMQ's confirm.select) and are mandatory, so a message
is acked only once the broker has taken its replacement. When the broker does not take the
replacement (no queue bound to the exchange, a full queue that rejects publishes, a header it
cannot carry), the original is settled another way and a "settled" event says how: a message
sent back is given back unchanged, a dead-lettered one is rejected without requeue (the queue's
own dead-lettering, if any). Counters count what the broker confirmed, not what was asked.

If the connection drops, the broker redelivers every unacked message (to any node, with
``redelivered`` set); the thread reconnects with backoff (0.5 s doubling to 30 s), settlements
of the lost connection's deliveries are dropped (``Delivery.generation``; counted as lost), and
the state is "waiting for broker". A broker that answers but refuses (the login, the vhost, a
missing queue or dead-letter exchange, a consumer it cancelled) gives the state "refused by
broker": the intake retries in case the broker is put right, and ``pmlmctl run`` gives up at
once. pika (Debian's python3-pika) is imported only here, only when a batch needs it.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# host:port/vhost of connection parameters (never the credentials); pika's nested errors, unwrapped
from .enqueue import connection_reason, where

log = logging.getLogger("pmlmd.intake")
# pika logs every frame at DEBUG and each failed connect with a traceback at ERROR: the intake says
# what went wrong in one line of its own (and pmlmctl -vv is about pmlmd's decisions).
logging.getLogger("pika").setLevel(logging.CRITICAL)

TERMINATIONS_HEADER = "x-pmlm-terminations"  # how often the governor ended this task, on any node
CAUSE_HEADER = "x-pmlm-cause"
REASON_HEADER = "x-pmlm-reason"
NODE_HEADER = "x-pmlm-node"
MAX_TERMINATIONS = 1 << 20  # a larger count in a header reads as this (the budget is spent anyway)
BACKOFF_FIRST = 0.5  # seconds before the first reconnect; doubled up to BACKOFF_MAX
BACKOFF_MAX = 30.0
EMPTY_POLL = 0.5  # seconds between looks at the queue's depth, for --until-empty
HEARTBEAT = 30  # seconds: AMQP heartbeat, so a dead broker is noticed
MAX_URL = 2048
MAX_NAME = 255  # AMQP short strings: queue and exchange names

# The thread's states (the loop shows more: see daemon.intake_status)
CONNECTING = "connecting"
CONNECTED = "connected"
WAITING = "waiting for broker"  # it cannot be reached, or the connection was lost
REFUSED = "refused by broker"  # it answers but will not do what the batch needs
CLOSED = "closed"

# How a delivery was settled (Task.message["settled"])
ACKED = "acked"
GIVEN_BACK = "given back"
SENT_BACK = "sent back"
DEAD_LETTERED = "dead-lettered"
REJECTED = "rejected"  # nack without requeue: to the queue's own dead-letter exchange, if it has one
LOST = "lost with the connection"  # the broker redelivers it


class URLError(ValueError):
    """An --amqp URL that cannot be used; its text says why, without the user or password."""


def check_url(url: str):
    """The connection parameters of an AMQP URL (``amqp://user:password@host:port/vhost``), or
    URLError naming what is wrong (never the user or the password). The parameters carry a
    heartbeat and short timeouts, so a dead broker is noticed (pika's own defaults wait longer)."""
    import pika  # only a batch with --amqp needs it

    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise URLError(f"an AMQP URL of at most {MAX_URL} characters is needed")
    try:
        parts = urlsplit(url)
    except ValueError as e:  # a bad IPv6 literal ("Invalid IPv6 URL": it quotes nothing of the URL)
        raise URLError(f"the URL cannot be used: {e}") from None
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        # A "/", "?" or "#" in the password ends the host part early; the rest would show the password.
        raise URLError("the URL cannot be used: a character of its user or password (/ ? # @) must be "
                       "%-encoded (%2F %3F %23 %40)")
    try:
        parts.port
    except ValueError:  # its text would quote what stands where the port should be
        raise URLError("the URL cannot be used: its port must be a number from 0 to 65535") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise URLError(f"the URL must start with amqp:// or amqps://, not "
                       f"{parts.scheme + '://' if parts.scheme else '(nothing)'}")
    if not parts.hostname:
        raise URLError("the URL names no host (amqp://USER:PASSWORD@HOST:PORT/VHOST)")
    try:
        params = pika.URLParameters(url)
    except Exception as e:  # pika raises ValueError and others for what it cannot parse
        raise URLError(f"the URL cannot be used ({type(e).__name__})") from None
    params.heartbeat = HEARTBEAT
    params.blocked_connection_timeout = 60
    params.socket_timeout = 5
    params.connection_attempts = 1
    return params


def check_name(value: str, what: str) -> None:
    """A queue or exchange name: 1 to 255 bytes of UTF-8 (an AMQP short string)."""
    if not isinstance(value, str) or not value or len(value.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise URLError(f"the {what} name must be 1 to {MAX_NAME} bytes")


@dataclass
class Delivery:
    """One message the node holds: what the broker said of it and what the task needs."""

    tag: int  # the channel's delivery tag
    generation: int  # which connection it came on: settling one of a lost connection is dropped
    body: bytes
    message_id: str  # the message's message_id, or a generated one (uuid4 hex) when it has none
    redelivered: bool  # the broker delivered it before (to this node or another) and got no ack
    terminations: int  # x-pmlm-terminations: the governor ended it that often before, on any node
    reply_to: str | None
    correlation_id: str | None
    properties: Any = None  # pika.BasicProperties as received: republished as they are
    received: float = 0.0  # monotonic, when the thread took it
    task: int | None = None  # the index of its task, once the loop made one


@dataclass
class Event:
    """What the intake thread tells the loop: ``kind`` is "delivery" (``delivery``), "state"
    (``state``, ``detail``), "depth" (``depth``: ready messages in the queue, after every delivery
    before it was handed over), "settled" (``delivery`` was settled otherwise than asked:
    ``state`` says how, ``detail`` why), or "closed"."""

    kind: str
    delivery: Delivery | None = None
    state: str | None = None
    detail: str | None = None
    depth: int | None = None


@dataclass
class Counters:
    """What the broker confirmed so far (status shows them)."""

    consumed: int = 0  # deliveries taken
    acked: int = 0
    returned: int = 0  # given or sent back to the queue
    dead_lettered: int = 0  # published to the dead-letter exchange
    rejected: int = 0  # nacked without requeue: the queue's own dead-letter exchange, if any
    lost: int = 0  # settlements dropped: their connection was gone (the broker redelivers those)
    replies: int = 0  # results published to reply_to


class IntakeTrouble(Exception):
    """The broker is there but will not do what the batch needs (a missing queue, a cancelled
    consumer): the state is REFUSED."""


class Intake:
    """The intake of one batch from ``queue`` at ``url`` (see the module docstring).

    Create, ``start()``, watch ``fileno()`` and call ``events()`` when it is readable. Every
    other method may be called from the loop at any time and never blocks on the network.
    ``counters`` may be given a restored batch's figures before ``start``.
    """

    def __init__(self, url: str, queue: str, *, dead_letter: str | None = None, watch_depth: bool = False,
                 node: str | None = None):
        self.params = check_url(url)
        check_name(queue, "queue")
        if dead_letter is not None:
            check_name(dead_letter, "dead-letter exchange")
        self.url, self.queue, self.exchange = url, queue, dead_letter
        self.where = where(self.params)  # host:port/vhost, for messages
        self.watch_depth = watch_depth
        self.node = node or socket.gethostname()
        self.state, self.detail = CONNECTING, None
        self.counters = Counters()
        self.closed = False  # the thread has ended
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._out: collections.deque[Event] = collections.deque()
        self._commands: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._kick = threading.Event()  # the thread waits on it while it has no connection
        self._connection = None  # pika.BlockingConnection, the thread's
        self._credit = 0
        self._stop = False
        self._busy = False
        self._cancelled_by_broker = False
        self._gen = 0
        self._thread = threading.Thread(target=self._main, name=f"intake {queue}", daemon=True)

    # --- the loop's side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def fileno(self) -> int:
        return self._wake

    def events(self) -> list[Event]:
        """What happened since the last call, in order; updates ``state`` and ``closed``."""
        try:
            os.eventfd_read(self._wake)
        except (BlockingIOError, OSError):
            pass
        out = []
        while self._out:
            event = self._out.popleft()
            if event.kind == "state":
                self.state, self.detail = event.state, event.detail
            elif event.kind == "closed":
                self.state, self.detail, self.closed = CLOSED, None, True
            out.append(event)
        return out

    def set_credit(self, credit: int) -> None:
        """Hold at most ``credit`` unacknowledged deliveries (0: take nothing new)."""
        credit = max(0, int(credit))
        if credit != self._credit:
            self._credit = credit
            self._post(("credit", credit))

    @property
    def credit(self) -> int:
        return self._credit

    def ack(self, d: Delivery) -> None:
        self._post(("ack", d))

    def give_back(self, d: Delivery) -> None:
        self._post(("give_back", d))

    def send_back(self, d: Delivery, terminations: int) -> None:
        self._post(("send_back", d, terminations))

    def dead_letter(self, d: Delivery, cause: str, reason: str | None, terminations: int) -> None:
        self._post(("dead_letter", d, cause, reason, terminations))

    def reply(self, d: Delivery, outcome: dict) -> None:
        """Publish ``outcome`` (JSON) to the message's reply_to, with its correlation_id."""
        if d.reply_to:
            self._post(("reply", d, outcome))

    def close(self) -> None:
        """Carry out what was asked so far, then disconnect; "closed" follows as an event."""
        self._post(("close",))

    def release(self) -> None:
        """After "closed": give back the eventfd, once the thread has written its last to it (the
        event is queued just before the write that signals it)."""
        self._thread.join(timeout=5.0)
        if self._wake >= 0 and not self._thread.is_alive():
            os.close(self._wake)
            self._wake = -1

    def _post(self, command: tuple) -> None:
        with self._lock:
            self._commands.append(command)
            connection = self._connection
        self._kick.set()
        if connection is not None:
            try:
                connection.add_callback_threadsafe(self._run_commands)
            except Exception:  # closed under us: the thread's reconnect picks the commands up
                pass

    # --- the thread's side ---------------------------------------------------------------------
    def _emit(self, event: Event) -> None:
        self._out.append(event)
        os.eventfd_write(self._wake, 1)

    def _state(self, state: str, detail: str | None = None) -> None:
        if (state, detail) != self._shown:
            self._shown = (state, detail)
            self._emit(Event("state", state=state, detail=detail))

    def _main(self) -> None:
        import pika

        self._shown = (CONNECTING, None)
        backoff = BACKOFF_FIRST
        try:
            while not self._stop:
                self._drop_stale_commands()
                if self._stop:
                    break
                try:
                    connection = pika.BlockingConnection(self.params)
                except Exception as e:
                    self._state(*_connect_trouble(pika, e, self.where, self.params))
                    self._pause(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                self._gen += 1
                try:
                    self._session(connection)
                    backoff = BACKOFF_FIRST
                except IntakeTrouble as e:
                    self._state(REFUSED, str(e))
                    self._pause(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                except Exception as e:
                    if self._stop:
                        break
                    self._state(WAITING, f"lost {self.where}: {_reason(e)}")
                    self._pause(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                finally:
                    with self._lock:
                        self._connection = None
                    try:
                        if connection.is_open:
                            connection.close()
                    except Exception:
                        pass
        finally:
            self._emit(Event("closed"))

    def _pause(self, seconds: float) -> None:
        """Wait before reconnecting; only a close cuts it short."""
        deadline = time.monotonic() + seconds
        while not self._stop:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._kick.wait(left)
            self._kick.clear()
            self._drop_stale_commands()

    def _drop_stale_commands(self) -> None:
        """With no connection: settlements of its deliveries cannot be made any more (the broker
        redelivers them); credit is re-applied on connecting; replies and close wait or act."""
        with self._lock:
            keep = collections.deque()
            while self._commands:
                command = self._commands.popleft()
                if command[0] == "close":
                    self._stop = True
                elif command[0] in ("ack", "give_back", "send_back", "dead_letter"):
                    self._settled_otherwise(command[1], LOST, "the connection to the broker was lost first")
                elif command[0] == "reply":
                    keep.append(command)
            self._commands = keep

    def _session(self, connection) -> None:
        import pika

        self._pika = pika
        channel = connection.channel()
        channel.confirm_delivery()
        try:
            channel.queue_declare(self.queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            raise IntakeTrouble(f"queue {self.queue!r} does not exist at {self.where} ({_reason(e)}): declare it, "
                                f"or fill it with pmlmctl enqueue") from None
        if self.exchange is not None:
            try:
                channel.exchange_declare(self.exchange, passive=True)
            except pika.exceptions.ChannelClosedByBroker as e:
                raise IntakeTrouble(f"dead-letter exchange {self.exchange!r} does not exist at {self.where} "
                                    f"({_reason(e)}): declare it and bind a queue to it") from None
        channel.add_on_cancel_callback(self._on_broker_cancel)
        self._channel = channel
        self._consumer = None
        self._cancelled_by_broker = False
        self._applied_credit = None
        with self._lock:
            self._connection = connection
        self._state(CONNECTED)
        next_depth = 0.0
        while True:
            self._run_commands()
            if self._stop:
                return
            if self._cancelled_by_broker:
                raise IntakeTrouble(f"the broker cancelled the consumer of queue {self.queue!r} (was the queue "
                                    "deleted?)")
            self._apply_credit()
            now = time.monotonic()
            if self.watch_depth and now >= next_depth:
                ok = channel.queue_declare(self.queue, passive=True)
                connection.process_data_events(0)  # hand over what arrived before the count
                self._emit(Event("depth", depth=ok.method.message_count))
                next_depth = now + EMPTY_POLL
            connection.process_data_events(time_limit=EMPTY_POLL if self.watch_depth else 1.0)

    def _on_broker_cancel(self, method) -> None:
        self._cancelled_by_broker = True
        self._consumer = None

    def _apply_credit(self) -> None:
        credit = self._credit
        if credit == self._applied_credit:
            return
        channel = self._channel
        if credit == 0:
            if self._consumer is not None:
                channel.basic_cancel(self._consumer)  # pika requeues what it had not handed over yet
                self._consumer = None
        else:
            channel.basic_qos(prefetch_count=credit, global_qos=True)
            if self._consumer is None:
                self._consumer = channel.basic_consume(self.queue, self._on_message)
        self._applied_credit = credit

    def _on_message(self, channel, method, properties, body: bytes) -> None:
        headers = properties.headers if isinstance(properties.headers, dict) else {}
        terminations = headers.get(TERMINATIONS_HEADER)
        if not isinstance(terminations, int) or isinstance(terminations, bool) or terminations < 0:
            terminations = 0
        self.counters.consumed += 1
        self._emit(Event("delivery", delivery=Delivery(
            tag=method.delivery_tag, generation=self._gen, body=body,
            # The task's id in the report: the message's own, or one made here for a message without.
            message_id=_text(properties.message_id) or new_message_id(), redelivered=bool(method.redelivered),
            terminations=min(terminations, MAX_TERMINATIONS), reply_to=_text(properties.reply_to),
            correlation_id=_text(properties.correlation_id), properties=properties, received=time.monotonic())))

    def _run_commands(self) -> None:
        # pika may call this (add_callback_threadsafe) inside a blocking call of an earlier
        # command, such as a publish waiting for its confirm: the outer call goes on with the rest.
        if self._busy:
            return
        self._busy = True
        try:
            self._drain_commands()
        finally:
            self._busy = False

    def _drain_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            kind = command[0]
            if kind == "close":
                self._stop = True
                continue
            if kind == "credit":
                self._apply_credit()  # the latest credit, however many changes were posted
                continue
            d: Delivery = command[1]
            if kind != "reply" and d.generation != self._gen:
                self._settled_otherwise(d, LOST, "the connection it came on was lost first")
                continue
            self._carry_out(kind, command)

    def _carry_out(self, kind: str, command: tuple) -> None:
        """One settlement or reply. Trouble with the connection or channel goes up (reconnect);
        a message the broker will not take is settled another way and said so."""
        channel = self._channel
        d: Delivery = command[1]
        c = self.counters
        if kind == "ack":
            channel.basic_ack(d.tag)
            c.acked += 1
        elif kind == "give_back":
            channel.basic_reject(d.tag, requeue=True)
            c.returned += 1
        elif kind == "send_back":
            problem = self._publish("", self.queue, d, {TERMINATIONS_HEADER: command[2], NODE_HEADER: self.node})
            if problem is None:
                channel.basic_ack(d.tag)
            else:  # the original, unchanged, is what there is: its termination is not counted
                channel.basic_reject(d.tag, requeue=True)
                self._settled_otherwise(d, GIVEN_BACK, f"the queue did not take it back with its termination count "
                                                       f"({problem}): given back unchanged")
            c.returned += 1
        elif kind == "dead_letter":
            _, _, cause, reason, terminations = command
            if self.exchange is None:
                channel.basic_nack(d.tag, requeue=False)
                c.rejected += 1
                return
            headers = {CAUSE_HEADER: cause, REASON_HEADER: (reason or "")[:1000], NODE_HEADER: self.node,
                       TERMINATIONS_HEADER: terminations}
            problem = self._publish(self.exchange, self.queue, d, headers)
            if problem is None:
                channel.basic_ack(d.tag)
                c.dead_lettered += 1
            else:  # not run forever: the queue's own dead-lettering (or none) takes it
                channel.basic_nack(d.tag, requeue=False)
                c.rejected += 1
                self._settled_otherwise(d, REJECTED, f"dead-letter exchange {self.exchange!r} did not take it "
                                                     f"({problem}): rejected without requeue")
        elif kind == "reply":
            body = json.dumps(command[2]).encode()
            props = self._pika.BasicProperties(content_type="application/json", correlation_id=d.correlation_id,
                                               delivery_mode=2)
            try:
                channel.basic_publish("", d.reply_to, body, props, mandatory=True)
                c.replies += 1
            except (self._pika.exceptions.UnroutableError, self._pika.exceptions.NackError) as e:
                log.warning("intake from queue %s: the result of message %s was not taken by reply_to queue %r "
                            "(%s)", self.queue, d.message_id, d.reply_to, _reason(e))

    def _publish(self, exchange: str, routing_key: str, d: Delivery, headers: dict) -> str | None:
        """The delivery's message again with ``headers`` added, confirmed by the broker before it
        returns; None, or why the broker did not take it. Headers of the original that cannot be
        encoded again (an integer past 64 bits) are left out rather than losing the message."""
        pika = self._pika
        original = d.properties
        kept = original.headers if original is not None and isinstance(original.headers, dict) else {}
        for attempt in ({**kept, **headers}, headers):
            props = pika.BasicProperties(
                content_type=getattr(original, "content_type", None) or "text/plain",
                content_encoding=getattr(original, "content_encoding", None), headers=attempt, delivery_mode=2,
                priority=getattr(original, "priority", None), correlation_id=getattr(original, "correlation_id", None),
                reply_to=getattr(original, "reply_to", None), message_id=getattr(original, "message_id", None)
                or d.message_id, timestamp=getattr(original, "timestamp", None), type=getattr(original, "type", None),
                app_id=getattr(original, "app_id", None))
            try:
                self._channel.basic_publish(exchange, routing_key, d.body, props, mandatory=True)
                return None
            except pika.exceptions.UnroutableError:
                return f"exchange {exchange or '(default)'!r} routes it to no queue"
            except pika.exceptions.NackError:
                return "the broker refused it (a full queue?)"
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError):
                raise
            except Exception as e:  # encoding the headers: try once more with ours alone
                problem = f"its headers cannot be sent again ({type(e).__name__})"
        return problem

    def _settled_otherwise(self, d: Delivery, how: str, why: str) -> None:
        if how == LOST:
            self.counters.lost += 1
        log.warning("intake from queue %s: message %s: %s", self.queue, d.message_id, why)
        self._emit(Event("settled", delivery=d, state=how, detail=why))

    def describe(self) -> dict[str, Any]:
        """The intake's figures for status (see summary.IntakeStatus)."""
        c = self.counters
        return {"broker": self.where, "queue": self.queue, "state": self.state, "detail": self.detail,
                "consumed": c.consumed, "acked": c.acked, "returned": c.returned, "dead_lettered": c.dead_lettered,
                "rejected": c.rejected, "lost": c.lost, "credit": self._credit}


def _connect_trouble(pika, e: Exception, where_: str, params) -> tuple[str, str]:
    """The state and its detail for a connection that could not be made."""
    if isinstance(e, pika.exceptions.ProbableAuthenticationError):
        user = getattr(params.credentials, "username", "?")
        return REFUSED, f"{where_} refused the login of user {user!r} ({_reason(e)}): check the user and password"
    if isinstance(e, pika.exceptions.ProbableAccessDeniedError):
        return REFUSED, f"{where_} refused access to vhost {params.virtual_host!r} ({_reason(e)})"
    return WAITING, f"cannot connect to {where_}: {_reason(e)}"


def _reason(e: BaseException) -> str:
    text = connection_reason(e)
    return text if len(text) < 300 else text[:300] + "..."


def _text(value) -> str | None:
    """A short-string property as text: AMQP does not promise UTF-8, and pika hands on bytes then."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    return str(value)[:255] or None


def new_message_id() -> str:
    return uuid.uuid4().hex
