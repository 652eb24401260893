"""The daemon's systemd integration: sd_notify messages and journald logging.

Both work without systemd. The notify backend is python-systemd when it is importable, else the
pure-Python ``sdnotify`` package, else nothing; a process started without NOTIFY_SOCKET never
talks to any socket. Logging goes to journald through python-systemd's JournalHandler when
stderr is already the journal, and to stderr otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
import time

try:
    from systemd.daemon import notify as _systemd_notify
except ImportError:
    _systemd_notify = None

try:
    from systemd.journal import JournalHandler
except ImportError:
    JournalHandler = None

try:
    import sdnotify as _sdnotify
except ImportError:
    _sdnotify = None

BACKEND_PYTHON_SYSTEMD = "python-systemd"
BACKEND_SDNOTIFY = "sdnotify"
BACKEND_NONE = "none"

# In order of preference: python-systemd is libsystemd's own sd_notify, so it knows every socket
# form systemd may hand us; sdnotify covers pip installs that could not build python-systemd.
AVAILABLE_BACKENDS = tuple(name for name, module in ((BACKEND_PYTHON_SYSTEMD, _systemd_notify),
                                                     (BACKEND_SDNOTIFY, _sdnotify)) if module is not None)

LOGGER_NAME = "pmlmd"
SYSLOG_IDENTIFIER = "pmlmd"
LOG_TARGETS = ("auto", "journal", "console")
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR, "critical": logging.CRITICAL}

log = logging.getLogger("pmlmd.systemd")

_installed_handler: logging.Handler | None = None  # the handler setup_logging put on the "pmlmd" logger


def _one_line(text: str) -> str:
    # sd_notify separates assignments by newlines, so a newline inside STATUS would end it early
    # and turn the rest into an assignment of its own; NUL would cut the C string short.
    return " ".join("".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text).split())


class Notifier:
    """Sends sd_notify(3) messages to the service manager that started us, if any.

    NOTIFY_SOCKET and the watchdog variables are read once, here: systemd sets them at exec and
    the daemon builds one Notifier at start. Every method returns True when the message was
    handed to the socket, False when there is no one to tell or sending failed; none raises.
    """

    backend: str

    def __init__(self, backend: str | None = None):
        """``backend`` None picks the best importable one; a name forces it (tests, debugging)."""
        if backend is None:
            backend = AVAILABLE_BACKENDS[0] if AVAILABLE_BACKENDS else BACKEND_NONE
        elif backend not in (BACKEND_PYTHON_SYSTEMD, BACKEND_SDNOTIFY, BACKEND_NONE):
            raise ValueError(f"unknown notify backend {backend!r}")
        elif backend != BACKEND_NONE and backend not in AVAILABLE_BACKENDS:
            raise RuntimeError(f"notify backend {backend!r} is not installed")
        self.backend = backend
        self.socket_address = os.environ.get("NOTIFY_SOCKET") or None
        self._watchdog_usec, self._watchdog_pid = _watchdog_env()
        self._sdnotifier = None
        if self.socket_address and backend == BACKEND_NONE:
            # Under Type=notify systemd would wait for READY=1 until the start times out.
            log.warning("NOTIFY_SOCKET is set but neither python-systemd nor sdnotify is installed; "
                        "systemd will not be told when pmlmd is ready")
        elif self.socket_address and backend == BACKEND_SDNOTIFY:
            self._sdnotifier = self._connect_sdnotify()

    def _connect_sdnotify(self):
        # debug=True makes sdnotify raise instead of swallowing errors, so we can return False.
        try:
            return _sdnotify.SystemdNotifier(debug=True)
        except (OSError, TypeError, ValueError) as e:
            log.debug("cannot connect to NOTIFY_SOCKET %s: %s", self.socket_address, e)
            return None

    def _send(self, message: str) -> bool:
        if not self.socket_address or self.backend == BACKEND_NONE:
            return False
        if self.backend == BACKEND_PYTHON_SYSTEMD:
            try:
                return bool(_systemd_notify(message))
            except (OSError, ValueError) as e:
                log.debug("sd_notify %r failed: %s", message, e)
                return False
        return self._send_sdnotify(message)

    def _send_sdnotify(self, message: str) -> bool:
        # sdnotify encodes as Latin-1, which fails on any other character; handing it the UTF-8
        # bytes spelt as Latin-1 characters makes it put exactly those bytes on the wire.
        wire = message.encode("utf-8").decode("latin-1")
        for _ in range(2):
            if self._sdnotifier is None:
                self._sdnotifier = self._connect_sdnotify()
                if self._sdnotifier is None:
                    return False
            try:
                self._sdnotifier.notify(wire)
                return True
            except OSError as e:
                # sdnotify keeps one connected socket; reconnect once in case the peer was rebound.
                log.debug("sdnotify %r failed: %s", message, e)
                self._sdnotifier = None
        return False

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (or a reload) is complete; call only once the socket is bound."""
        message = "READY=1"
        if status is not None:
            message += "\nSTATUS=" + _one_line(status)
        return self._send(message)

    def status(self, text: str) -> bool:
        """STATUS=: the one line ``systemctl status`` shows."""
        return self._send("STATUS=" + _one_line(text))

    def reloading(self) -> bool:
        """RELOADING=1 on SIGHUP; systemd (Type=notify-reload) matches it to the reload request
        by the timestamp, so the daemon must send READY=1 when the reload is done."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self._send("STOPPING=1")

    def watchdog(self) -> bool:
        """WATCHDOG=1 keep-alive; a no-op unless systemd asked this process for it."""
        if self.watchdog_interval() is None:
            return False
        return self._send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WatchdogSec=, as sd_watchdog_enabled(3)
        advises), or None when no watchdog is set for this process."""
        if self._watchdog_usec is None:
            return None
        # WATCHDOG_PID names the process the watchdog is meant for; a child that inherited
        # the variables must not ping for its parent.
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1e6


def _watchdog_env() -> tuple[int | None, int | None]:
    """(WATCHDOG_USEC, WATCHDOG_PID) as sd_watchdog_enabled(3) reads them; usec None = no watchdog."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None, None
    if usec <= 0:
        return None, None
    pid_text = os.environ.get("WATCHDOG_PID")
    if pid_text is None:
        return usec, None
    try:
        pid = int(pid_text)
    except ValueError:
        return None, None  # sd_watchdog_enabled treats a bad WATCHDOG_PID as "not enabled"
    if pid <= 0:
        return None, None
    return usec, pid


def stderr_is_journal() -> bool:
    """True when fd 2 is the stream systemd connected to journald (systemd.exec(5), $JOURNAL_STREAM).

    Comparing device and inode, rather than just seeing the variable, keeps a child whose stderr
    was redirected from believing it still writes to the journal.
    """
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        dev_text, ino_text = value.split(":")
        dev, ino = int(dev_text), int(ino_text)
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


# syslog(3) priorities for the "<N>" prefix journald reads at the start of each stderr line.
_SYSLOG_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class _JournalStreamFormatter(logging.Formatter):
    """Lines for a stderr that journald reads without python-systemd: journald stamps time,
    identifier and pid itself, and takes the priority from the "<N>" prefix (SyslogLevelPrefix=)."""

    def __init__(self):
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _SYSLOG_PRIORITY if record.levelno >= level), 7)
        return f"<{priority}>" + super().format(record)


_CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CONSOLE_DATEFMT = "%Y-%m-%d %H:%M:%S"


def setup_logging(target: str = "auto", level: str = "info") -> str:
    """Point the "pmlmd" logger at journald or stderr; returns "journal" or "console".

    Only the "pmlmd" logger is configured and it stops propagating, so libraries' and the root
    logger's handlers stay as they are and nothing is logged twice. Calling it again (on reload)
    replaces the handler it installed before.
    """
    if target not in LOG_TARGETS:
        raise ValueError(f"log target must be one of {', '.join(LOG_TARGETS)}, not {target!r}")
    try:
        levelno = LOG_LEVELS[level.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}") from None

    to_journal = stderr_is_journal()
    want_journal = target == "journal" or (target == "auto" and to_journal)
    missing_journal_handler = want_journal and JournalHandler is None

    if want_journal and JournalHandler is not None:
        handler = JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
        handler.setFormatter(logging.Formatter("%(message)s"))
        chosen = "journal"
    else:
        handler = logging.StreamHandler(sys.stderr)
        # Decision fields stay out of the console line: the message already says it in words.
        if to_journal:
            handler.setFormatter(_JournalStreamFormatter())
        else:
            handler.setFormatter(logging.Formatter(_CONSOLE_FORMAT, _CONSOLE_DATEFMT))
        chosen = "console"

    global _installed_handler
    logger = logging.getLogger(LOGGER_NAME)
    if _installed_handler is not None:
        logger.removeHandler(_installed_handler)
        _installed_handler.close()
    logger.addHandler(handler)
    _installed_handler = handler
    logger.setLevel(levelno)
    logger.propagate = False

    if target == "journal" and missing_journal_handler:
        logger.warning("log_target is journal but python-systemd is not installed; logging to stderr")
    return chosen


# Fields JournalHandler.emit passes by name itself; the same key in a record would make its
# send() call fail with "got multiple values", and the entry would be lost.
_RESERVED_FIELDS = frozenset({"MESSAGE", "PRIORITY", "LOGGER", "THREAD_NAME", "PROCESS_NAME",
                              "CODE_FILE", "CODE_LINE", "CODE_FUNC"})
_FIELD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def decision_fields(**fields) -> dict:
    """The ``extra=`` dict that carries structured journal fields on a log call.

    JournalHandler sends every attribute of the LogRecord as a field and logging.makeRecord
    turns each ``extra`` key into an attribute, so uppercase keys arrive as journal fields
    (BATCH_ID=..., DECISION=...) that ``journalctl BATCH_ID=...`` can match. None means
    "not known" and is left out rather than logged as the text "None".
    """
    extra = {}
    for key, value in fields.items():
        name = key.upper()
        # journald drops fields whose names it considers invalid, silently: check here instead.
        if (not name or len(name) > 64 or name[0] == "_" or name[0].isdigit()
                or not set(name) <= _FIELD_CHARS):
            raise ValueError(f"{key!r} is not a valid journal field name")
        if name in _RESERVED_FIELDS:
            raise ValueError(f"{name} is set by the journal handler itself")
        if value is not None:
            extra[name] = str(value)
    return extra
