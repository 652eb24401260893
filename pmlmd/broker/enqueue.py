"""``pmlmctl enqueue``: put task lines on a RabbitMQ queue, one persistent message per line.

A node's pmlmd can take its tasks from a queue; this feeds one without code. The message of a
task is its line's bytes (UTF-8 text, checked), published through the default exchange with
the queue's name as routing key, persistent (delivery mode 2), with a message id of its own
and content type text/plain. The queue is declared durable when it does not exist yet; one that
exists is used as it is (with its dead-letter exchange, length limit and so on). Every message
is confirmed by the broker before the next is sent, so when something goes wrong the count of
tasks enqueued is exact.

pika is imported only when a URL is parsed or a connection made, so that the commands that do
not talk to a broker never load it. ``parse_url``, ``where`` and ``check_queue`` serve the
consumer side too.

Exit statuses (as the other commands of pmlmctl): 0 enqueued (or nothing to enqueue); 1 the
broker did not take a task (nacked, returned unroutable, the channel closed), or refused the
queue; 2 usage error (bad URL, bad queue name, a line that is no task); 4 the broker cannot be
reached, refused the login or the vhost, or the connection was lost.
"""

from __future__ import annotations

import sys
import time
import urllib.parse
import uuid

from ..core import tasklines

EXIT_FAILED = 1
EXIT_UNREACHABLE = 4
CONTENT_TYPE = "text/plain"
PERSISTENT = 2          # AMQP delivery mode: written to disk by the broker, kept across its restart
MAX_QUEUE_NAME = 255    # bytes of UTF-8: an AMQP short string
URL_FORM = "amqp://USER:PASSWORD@HOST:PORT/VHOST"


class Failed(Exception):
    """pmlmctl enqueue could not do all it was asked; ``status`` is its exit status, the message
    one line that names no password."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _pika():
    try:
        import pika
    except ImportError as e:
        raise Failed(EXIT_FAILED, f"talking to RabbitMQ needs the Python module pika (Debian: python3-pika): {e}")
    return pika


def parse_url(text: str):
    """``text`` as pika.URLParameters: ``amqp://USER:PASSWORD@HOST:PORT/VHOST`` or amqps://.

    Percent-escapes are decoded in the user, password and vhost (the default vhost / is
    %2F); query arguments are pika's (heartbeat=30, socket_timeout=5, ...). Raises ValueError
    with a message that names the problem and never the password.
    """
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as e:  # such as an unbalanced [ in the host
        raise ValueError(f"bad AMQP URL: {e}; the form is {URL_FORM}") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"an AMQP URL starts with amqp:// or amqps:// (the form is {URL_FORM})")
    if not parts.hostname:
        raise ValueError(f"the AMQP URL names no host (the form is {URL_FORM})")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"the port of the AMQP URL is not a number from 1 to 65535 (the form is {URL_FORM})") \
            from None
    if port == 0:
        raise ValueError(f"the port of the AMQP URL is not a number from 1 to 65535 (the form is {URL_FORM})")
    if parts.username is not None and parts.password is None:
        raise ValueError(f"the AMQP URL has a user but no password (the form is {URL_FORM})")
    # pika takes the first path segment as the vhost and drops the rest without a word.
    if parts.path.count("/") > 1:
        raise ValueError("the vhost of the AMQP URL is one path segment: write a / inside it as %2F "
                         "(the default vhost / is %2F)")
    pika = _pika()
    try:
        return pika.URLParameters(text)
    except Exception as e:  # pika says ValueError for a bad query argument, other things for others
        message = str(e)
        if parts.password and parts.password in message:
            message = message.replace(parts.password, "***")
        raise ValueError(f"bad AMQP URL: {message}") from None


def where(params) -> str:
    """HOST:PORT/VHOST of pika connection parameters, for messages (never the credentials)."""
    host = f"[{params.host}]" if ":" in params.host else params.host
    return f"{host}:{params.port}/{urllib.parse.quote(params.virtual_host, safe='')}"


def _host_port(params) -> str:
    return where(params).rsplit("/", 1)[0]


def check_queue(name: str) -> None:
    """Raise ValueError unless ``name`` can name a queue to publish to: not empty (the broker
    would make up a name), UTF-8, at most 255 bytes of it."""
    if not name:
        raise ValueError("the queue name is empty")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # bytes of a command line that are not UTF-8 (surrogate escapes)
        raise ValueError("the queue name is not valid UTF-8") from None
    if size > MAX_QUEUE_NAME:
        raise ValueError(f"the queue name is {size} bytes long; AMQP allows at most {MAX_QUEUE_NAME}")


def task_bodies(data: bytes, null: bool = False, source: str = "the tasks file") -> list[bytes]:
    """The message bodies of a tasks file's contents: the bytes of each non-empty line (split as
    run --tasks-file splits, on NULs with ``null``), in order.

    Raises ValueError naming the first line that is no task: one that is not UTF-8 (our tasks
    are text lines; an AMQP body could carry anything, the worker's $PMLM_TASK could not be
    compared or shown), one holding a NUL byte, or one longer than a task line may be.
    """
    unit = "item" if null else "line"
    bodies = []
    for number, line in tasklines.split(data, null):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{unit} {number} of {source} is not valid UTF-8 (byte 0x{line[e.start]:02x} at "
                             f"offset {e.start}): a task is a line of text; nothing was enqueued") from None
        if b"\0" in line:  # only without --null
            raise ValueError(f"line {number} of {source} contains a NUL byte, which no task can hold; use --null "
                             f"to split on NUL; nothing was enqueued")
        if len(line) > tasklines.MAX_LINE_BYTES:
            raise ValueError(f"{unit} {number} of {source} is too long ({len(line)} bytes): a task line holds at "
                             f"most {tasklines.MAX_LINE_BYTES}; nothing was enqueued")
        bodies.append(line)
    return bodies


def connection_reason(exc: BaseException) -> str:
    """The innermost cause of a failed connection, in words (pika wraps the socket's error twice)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "exceptions", None)  # AMQPConnectionWorkflowFailed: one per attempt
        if inner:
            exc = inner[-1]
            continue
        inner = getattr(exc, "exception", None)   # AMQPConnector*Error: the phase's error
        if isinstance(inner, BaseException):
            exc = inner
            continue
        if exc.args and isinstance(exc.args[0], BaseException):  # AMQPConnectionError(wrapped)
            exc = exc.args[0]
            continue
        break
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(getattr(exc, "reply_code", None), int):  # closed by the broker (or by pika, with its reason)
        return f"({exc.reply_code}) {exc.reply_text}"
    if type(exc).__name__ == "AMQPConnectorStackTimeout":  # its text is a dump of the socket address
        return "no AMQP handshake within the connection timeout (stack_timeout)"
    text = str(exc) or type(exc).__name__
    # A refused login or vhost comes as the text of the ConnectionClosedByBroker it was.
    return text.removeprefix("ConnectionClosedByBroker: ")


def connect(params):
    """A pika.BlockingConnection to the broker; Failed (exit 4) with the reason if there is none."""
    pika = _pika()
    # A timeout of the whole attempt (stack_timeout) comes as this, which is no AMQPError.
    from pika.adapters.utils.connection_workflow import AMQPConnectorException
    try:
        return pika.BlockingConnection(params)
    except pika.exceptions.ProbableAuthenticationError as e:
        user = getattr(params.credentials, "username", "?")
        raise Failed(EXIT_UNREACHABLE, f"the broker at {_host_port(params)} refused the login of user {user!r} "
                                       f"({connection_reason(e)}); check the user and password in the URL") from None
    except pika.exceptions.ProbableAccessDeniedError as e:
        raise Failed(EXIT_UNREACHABLE, f"the broker at {_host_port(params)} refused access to vhost "
                                       f"{params.virtual_host!r} ({connection_reason(e)})") from None
    except (pika.exceptions.AMQPError, AMQPConnectorException, OSError) as e:
        hint = "is the host name right?" if _is_name_error(e) else "is RabbitMQ running?"
        raise Failed(EXIT_UNREACHABLE, f"cannot reach the broker at {_host_port(params)}: {connection_reason(e)}; {hint}") \
            from None


def _is_name_error(exc: BaseException) -> bool:
    import socket

    return isinstance(exc, socket.gaierror) or "Name or service not known" in connection_reason(exc)


def open_queue(connection, queue: str):
    """A channel on which ``queue`` exists: declared durable if it did not. A queue that exists is
    only looked at (a passive declare), so one declared with other arguments (a dead-letter
    exchange, a length limit) is used as it is instead of failing with PRECONDITION_FAILED."""
    pika = _pika()
    channel = connection.channel()
    try:
        channel.queue_declare(queue, passive=True)
        return channel
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code != 404:  # NOT_FOUND; the broker closed this channel in any case
            raise
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    return channel


class Progress:
    """``enqueued N/TOTAL`` on one line of a terminal, redrawn at most ten times a second; nothing
    when the stream is not a terminal (a log wants the final line only)."""

    def __init__(self, total: int, stream=None):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.live = self.stream.isatty()
        except (AttributeError, ValueError):
            self.live = False
        self._drawn = 0.0
        self._shown = False

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.live and (now - self._drawn >= 0.1 or done == self.total):
            self._drawn = now
            self.stream.write(f"\r\033[Kenqueued {done}/{self.total}")
            self.stream.flush()
            self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False


def publish(params, queue: str, bodies: list[bytes], progress=None) -> int:
    """Publish each body to ``queue`` (declared durable if missing) as a persistent text/plain
    message with a fresh message id, each confirmed by the broker before the next is sent.
    ``progress(n)`` is called after the n-th confirm. Returns how many were enqueued (all).

    Raises Failed: exit 4 when the broker cannot be reached or the connection is lost, exit 1
    when it does not take a message or refuses the queue; the message says how many of the
    tasks were enqueued before.
    """
    pika = _pika()
    errors = pika.exceptions
    total = len(bodies)
    connection = connect(params)
    done = 0

    def so_far() -> str:
        return f"{done} of {total} task{'' if total == 1 else 's'} enqueued"

    try:
        channel = open_queue(connection, queue)
        channel.confirm_delivery()
        for body in bodies:
            properties = pika.BasicProperties(delivery_mode=PERSISTENT, content_type=CONTENT_TYPE,
                                              message_id=uuid.uuid4().hex)
            # mandatory: a message no queue takes comes back (UnroutableError) instead of vanishing.
            channel.basic_publish("", queue, body, properties, mandatory=True)
            done += 1
            if progress is not None:
                progress(done)
    except errors.UnroutableError:
        raise Failed(EXIT_FAILED, f"the broker returned task {done + 1} unroutable: queue {queue!r} is gone; "
                                  f"{so_far()}") from None
    except errors.NackError:
        raise Failed(EXIT_FAILED, f"the broker refused task {done + 1} (a nack: is queue {queue!r} full, with "
                                  f"overflow reject-publish?); {so_far()}") from None
    except errors.ChannelClosedByBroker as e:
        raise Failed(EXIT_FAILED, f"the broker refused queue {queue!r}: ({e.reply_code}) {e.reply_text}; "
                                  f"{so_far()}") from None
    except (errors.AMQPConnectionError, OSError) as e:
        raise Failed(EXIT_UNREACHABLE, f"lost the connection to the broker at {_host_port(params)}: {connection_reason(e)}; "
                                       f"{so_far()} (task {done + 1} may or may not have arrived)") from None
    except errors.AMQPError as e:
        raise Failed(EXIT_FAILED, f"the broker at {_host_port(params)}: {connection_reason(e)}; {so_far()}") from None
    except KeyboardInterrupt:
        raise Failed(130, f"interrupted: {so_far()}") from None
    finally:
        _close(connection)
    return done


def _close(connection) -> None:
    """Close quietly: after an error the connection may be half gone, and the error said enough."""
    try:
        if connection.is_open:
            connection.close()
    except Exception:
        pass


SOURCE_LIMIT = 1 << 30  # bytes of a tasks file enqueue reads: every line is checked before any is sent
SOURCE_CHUNK = 1 << 20


def read_source(path: str, limit: int = SOURCE_LIMIT) -> bytes:
    """The bytes of a tasks file, or of standard input for ``-``, at most ``limit`` of them (input
    that never ends, /dev/zero or yes, must not take all memory). Raises ValueError if unreadable
    or longer."""
    try:
        if path == "-":
            if sys.stdin is None:  # started with its standard input closed
                raise ValueError("cannot read tasks file '-': standard input is closed")
            return _bounded(sys.stdin.buffer, path, limit)
        with open(path, "rb") as f:
            return _bounded(f, path, limit)
    except OSError as e:
        raise ValueError(f"cannot read tasks file {path!r}: {e.strerror or e}") from None


def _bounded(stream, path: str, limit: int) -> bytes:
    chunks, total = [], 0
    while chunk := stream.read(SOURCE_CHUNK):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise ValueError(f"tasks file {path!r} holds more than {limit} bytes, more than enqueue reads at once "
                             "(every line is checked before any is sent): split it, and enqueue each part")
    return b"".join(chunks)


def source_name(path: str) -> str:
    return "standard input" if path == "-" else repr(path)

