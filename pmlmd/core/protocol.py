"""The control protocol between the daemon ``pmlmd`` and the client ``pmlmctl``.

This module encodes, decodes and validates messages; it does no socket I/O. The daemon
passes every frame it receives to ``parse_request`` and, on ``ProtocolError``, sends
``encode_error(err.code, err.message, err.request_id)`` back and carries on.

Transport
=========

ZeroMQ: the daemon binds a ROUTER socket, a client connects a DEALER socket. Every
message is one ZeroMQ frame (besides the identity frame the ROUTER adds and strips)
holding one JSON object encoded as UTF-8.

* A request may be at most ``MAX_MESSAGE_BYTES`` (1 MiB); larger ones are refused with
  ``too-large`` before they are decoded. Replies have no size limit.
* JSON is read strictly: ``NaN``, ``Infinity``, numbers beyond the float range and
  duplicate keys in an object are refused with ``bad-json``.
* No string in a request may contain a NUL character or an unpaired surrogate, except
  that the strings that carry bytes hold U+DC80..U+DCFF for bytes that are not UTF-8
  (see "Bytes" below).

Requests
========

::

    {"version": 1, "request": "status", "request_id": 7, "args": {"batch": "e2d9cefaea5d"}}

=============  =================================================================
``version``    required; the integer 1 (``PROTOCOL_VERSION``)
``request``    required; the name of the request (below)
``request_id`` optional; a string of at most 200 characters, or an integer. Every
               message answering the request carries it, so a client with several
               requests in flight can match the answers. null = absent.
``args``       an object; may be left out when the request has no required argument
=============  =================================================================

Any other top-level key is refused with ``unknown-field`` (arguments belong inside
``args``), and so is an argument the request does not take.

Types are strict: ``true``/``false`` are not integers, ``1.0`` is not an integer, and
*number* means an integer or a float (handed to the daemon as a float). An optional
argument that is left out or null takes its default; null means "the daemon's default"
(the limits of ``pmlmctl run``, see the README). The daemon receives every argument of
the request, defaults filled in.

============  ===========================================================================
request       arguments
============  ===========================================================================
``ping``      none. Is the daemon there?
``list``      none. Every batch the daemon knows, finished ones included.
``status``    ``batch``: string or null (default null = the node and its live batches)
``cancel``    ``batch``: string, required
``pause``     ``batch``: string, required
``resume``    ``batch``: string, required
``report``    ``batch``: string, required
``events``    ``batch``: string or null (default null = every batch);
              ``follow``: boolean (default false = only the events recorded so far);
              ``kinds``: list of event kinds (see "Events") or null (default null =
              every kind): only events of these kinds (and ``dropped``)
``log``       the output tasks wrote (only the batch's owner and root): ``batch``: string,
              required; ``task``: integer or null (default null = every task, in task
              order); ``stream``: ``"stdout"`` (default) or ``"stderr"``; ``from_task``,
              ``offset``: integers, where to go on (default 0, 0: from the start);
              ``live``: boolean (default false): stop at the first task that has not
              finished, to go on from there later (``pmlmctl log --follow``)
``submit``    start a batch; the arguments below
``retry``     ``batch``: string, required: a finished batch of the caller's (root: anyone's);
              ``failed_only``: boolean (default false: the tasks that failed, were given up
              or were cancelled; true: only failed and given up);
              ``joblog``: absolute path or null (default null: none; the original batch's
              joblog is not carried over), as submit's. Submits those tasks again as a new
              batch: the original submission (command, options, environment, ``cwd``,
              owner, name, priority) with those tasks, numbered from 0 (a task's line is
              kept). ``bad-field`` when nothing is left to retry, when the batch is still
              running, or when its stored submission breaks today's rules. The result is
              submit's, plus ``retried``: the original indices of the tasks, in the new
              batch's order, and ``of``: the original batch's id.
============  ===========================================================================

``submit`` arguments (all but ``command`` and ``cwd`` may be null or left out):

=================  ==================================================  =====================
argument           type                                                default
=================  ==================================================  =====================
``command``        list of 1 to 4096 strings, the first (the program)  required
                   non-empty; bytes (see "Bytes")
``tasks``          integer 1 to 1000000: run the command that often    1 if ``task_lines``
                                                                       is null
``task_lines``     list of 1 to 1000000 strings, one task each; bytes  null
                   (see "Bytes")
``shell``          boolean: run the command words as one ``sh -c``     false
                   script
``name``           string of at most 200 characters                    null
``priority``       integer -1000 to 1000; higher runs first, pays last  0
``max_workers``    integer 1 to 100000                                 null
``cpu_limit``      number 1 to 100 (percent)                           null
``cpu_margin``     number 0 to 99 (percentage points)                  null
``memfree_limit``  number 0 to 99 (percent)                            null
``memory_metric``  ``"available"`` or ``"free"``                       null
``memory_gap``     integer 0 to 2**60 (bytes; 2**60 is 1 EiB)          null
``min_free``       integer 0 to 2**60 (bytes)                          null
``victim``         ``"newest"``, ``"oldest"`` or ``"largest"``         null
``term_grace``     number 0 to 3600 (seconds)                          null
``interval``       number 0.01 to 60 (seconds)                         null
``retries``        integer 0 to 1000                                   null
``retry_failed``   integer 0 to 1000                                   null
``term_mode``      ``"signal"`` or ``"agent"`` (ask workers to stop    null (signal)
                   through the agent channel)
``pause_mode``     ``"signal"`` or ``"agent"``                         null (signal)
``agent_timeout``  number 0.1 to 3600 (seconds to wait for an agent    null (5)
                   acknowledgement)
``timeout``        number 0.01 to 31536000 (seconds): an attempt       null (none)
                   running longer is terminated (SIGTERM, SIGKILL
                   after ``term_grace``) and fails its task (cause
                   ``timeout``, against ``retry_failed``); time pmlmd
                   holds it paused does not count
``halt``           ``"soon"`` or ``"now"``: once ``halt_fail`` tasks   null (never)
                   (or ``halt_fail_pct`` percent of them) have failed
                   or been given up, start no more (queued ones end
                   cancelled); ``now`` also terminates the running
                   ones. Needs exactly one of the two below
``halt_fail``      integer 1 to 1000000: a count of failed tasks       null
``halt_fail_pct``  number 1 to 100 (percent of the batch's tasks)      null
``append``         boolean: with ``task_lines`` and no ``{}`` in the   false
                   command, the line is the command's last argument
                   (with ``shell``: appended to the script,
                   shell-quoted); pmlmctl sends true unless
                   ``--no-append``
``joblog``         absolute path or null: a joblog (GNU parallel's     null
                   format, see pmlmd.node.joblog), opened at submit as the
                   batch's owner, truncated, and written by the daemon
                   (``bad-field`` naming the path when the owner cannot
                   open it for writing, or it is not a regular file);
                   bytes (see "Bytes")
``umask``          integer 0 to 511 (0o777): the workers' file mode     null (pmlmd's own,
                   creation mask, the submitter's                      normally 022)
``rlimits``        object: a resource name of ``RLIMITS`` (``cpu``,     null (the owner's
                   ``fsize``, ``data``, ``stack``, ``core``, ``rss``,  login limits, else
                   ``memlock``, ``nproc``, ``nofile``, ``as``,          pmlmd's own)
                   ``rtprio``) to ``[soft, hard]``, each an integer 0
                   to 2**60 in getrlimit(2)'s unit (bytes, seconds, a
                   count) or ``"unlimited"``, soft not above hard: the
                   submitter's limits
``user``           string: run the workers as this user (the daemon    null
                   checks that the caller may)
``cwd``            absolute path (a string starting with ``/``): the   required
                   workers' working directory, entered with the
                   submitter's permissions (``bad-field`` when they
                   cannot enter it); bytes (see "Bytes")
``results``        absolute path: a directory; each task's stdout,        null
                   stderr and exit status go to ``PATH/TASK/stdout``,
                   ``stderr`` and ``exit``, made as the submitter
                   (``bad-field`` when they cannot make the
                   directory); bytes (see "Bytes")
``env``            object of string to string: the workers'            ``{}``
                   environment; names non-empty, without ``=``;
                   names and values are bytes (see "Bytes")
``amqp``           string of at most 2048 characters: take the tasks    null
                   from a queue of this AMQP 0-9-1 broker
                   (``amqp://USER:PASSWORD@HOST:PORT/VHOST``), one
                   per message body; the batch is open-ended (see
                   pmlmd.broker.intake); needs ``queue``, and no
                   ``task_lines``
``queue``          string of 1 to 255 bytes: the queue (it must exist)  null
``until_empty``    boolean: end once the queue is empty and no task     false
                   of the batch is in flight (else: until cancelled)
``dead_letter``    string: an exchange for tasks that failed or were    null (nack without
                   given up, with ``x-pmlm-cause`` headers              requeue)
=================  ==================================================  =====================

Give at most one of ``tasks`` and ``task_lines``; giving both is ``bad-field``. The range
of every number comes from ``bounds.BOUNDS``, which pmlmd.toml and pmlmctl's options are
checked against too.

``umask`` and ``rlimits`` are what the workers inherit from the submitter (pmlmctl sends its
own); the daemon lowers each limit to the owner's login limits (pam_limits' configuration)
and to its own hard limits, which a worker cannot exceed. A resource left out of
``rlimits`` gets the owner's login limit, else pmlmd's own. The reply's result holds
``batch``, ``name`` and ``rlimits_lowered``: each limit sent that the workers get lower, by
name, as ``[soft, hard]`` (an empty object when none is).

Bytes
=====

Command words, task lines, ``cwd`` and the names and values of ``env`` reach the worker's
exec as bytes (``joblog`` the daemon's open), and they need not be UTF-8 (a Latin-1 file
name, a tasks file in another encoding). Each travels as the text that decoding its bytes from UTF-8 with Python's
``surrogateescape`` gives (``tasklines.text``): valid UTF-8 as its characters, every other
byte 0xNN as the lone surrogate U+DCNN. A lone surrogate has no UTF-8 form, so every message
(requests, replies, events) is written with it as the JSON escape ``\\udcNN``; the frame
stays UTF-8. The daemon encodes the text back the same way (``tasklines.raw``), so the
worker gets the submitted bytes exactly, whatever either side's locale. In these fields a
surrogate outside U+DC80..U+DCFF stands for no byte and is refused (``bad-field``); in
every other string any unpaired surrogate is. Reports and replies carry task lines and
command words the same way: ``json.loads`` and ``.encode("utf-8", "surrogateescape")``
give the bytes back. An older pmlmd refuses such a string with ``bad-field``; no message
that was valid before changes its meaning, so the version stays 1.

No string may hold a NUL: exec could not pass it on. And what Linux's exec takes is checked
at submit, so that no task fails later for it (``bad-field``, naming the task line): at most
``MAX_ARG_STRLEN`` bytes (32 pages: 131072 on x86-64) for one argument or environment
string, its NUL included, after ``{}`` is replaced by the task line (shell-quoted with
``shell``) or the line is appended (``append``); so a task line has at most 131061 bytes,
since it also reaches the worker as ``PMLM_TASK=LINE``. And all of a worker's arguments and
environment strings together, with a pointer each, within a quarter of the workers' soft
stack limit (the ``stack`` of ``rlimits``, else pmlmd's own; at most 6 MiB), 4096 bytes of
that kept for the variables pmlmd adds.

Replies
=======

Every request is answered by exactly one reply, a result or an error; ``request_id`` is
the request's (null if it had none or could not be read far enough to find it)::

    {"version": 1, "ok": true, "result": {...}, "request_id": 7}
    {"version": 1, "ok": false, "error": {"code": "no-such-batch", "message": "..."}, "request_id": 7}

The contents of ``result`` depend on the request: one typed body each, documented and read
back in pmlmd/core/replies.py.
``status`` and ``list`` describe each batch by its summary, one shape whether the batch is
queued, running or long finished (``summary_version`` 2; pmlmd/core/summary.py defines its fields,
its counts, which add up to ``tasks``, and its ``state``: ``queued``, ``running``, ``paused``,
``finishing``, ``finished``, ``cancelled`` or ``failed``). ``status`` with a batch answers
with its summary plus ``node`` (the last sample: ``cpu_pct``, ``free_bytes``, ``total_bytes``,
``free_pct``; null before the first); without one, with ``status`` (one line), ``node``,
``limits``, ``workers`` (one line: how workers are contained and measured, a cgroup v2 each or
process groups followed through /proc) and ``batches``, the summaries of the live batches. ``list`` answers with
``batches``: the summaries of the finished batches, then of the live ones, each in submission
order. A batch has ended when its summary's ``ended`` is not null.

Events
======

``events`` is answered by a stream: any number of event messages, each carrying the
request's ``request_id``, ended by one reply (result or error) as above::

    {"version": 1, "ok": true, "event": {...}, "request_id": 7}

With ``follow`` false the stream holds the events recorded so far; with ``follow`` true
it stays open for new events.

An event is ``{"event": KIND, "time": T, ...}``: ``time`` in seconds since the epoch, then
the fields of its kind below, each left out when it is null. Their types and units are in
pmlmd/core/events.py, where each kind is declared once (a test checks this table against it):

================  ==============================================================================
event             fields
================  ==============================================================================
``decision``      decision, count, batch, pid, task, rule, reason, cpu_pct, free_pct, latency_ms
``start``         batch, task, attempt, pid, start_ticks
``end``           batch, task, attempt, pid, exit_code, signal, cause, status, reason
``deferred``      batch, task, cause, reason
``timeout``       batch, task, pid
``noncompliant``  batch, task, pid, cpu_pct
``held``          batch
``released``      batch
``finished``      batch, exit_status, summary
``halted``        batch, reason
``intake``        batch, state, detail
``settled``       batch, task, settled, reason
``added``         batch, task
``returned``      batch, task, reason
``dropped``       count
================  ==============================================================================

A reader that does not keep up gets every reply, and every event or in their place
``{"event": "dropped", "count": N}``: N events of this stream were left out there, before
the next message of the stream (see pmlmd/daemon/outbox.py). Replies are never left out while
the client is connected.

Errors
======

The ``code`` is for programs to branch on; the ``message`` is for people: it names the
field, what was expected and what was given, and the fix where there is one.

=====================  ================================================================
code                   meaning
=====================  ================================================================
``bad-json``           not UTF-8, not strict JSON, or not a JSON object
``too-large``          the request is longer than ``MAX_MESSAGE_BYTES``
``bad-version``        ``version`` missing or not 1
``unknown-request``    no such request
``missing-field``      a required field or argument is missing
``unknown-field``      a top-level key or argument that the request does not take
``bad-field``          a field of the wrong type, or a value out of range
``no-such-batch``      (daemon) the batch does not exist, or the caller may not see it
``permission-denied``  (daemon) the caller may not do this
``quota-exceeded``     (daemon) the batch would take its user past a quota of pmlmd.toml's
                       [quotas]; the message names the key, its value and what was asked
``internal``           (daemon) a bug in pmlmd; or pmlmd cannot do it now: its state
                       cannot be written (a submit on a full disk: "no space in
                       STATE_DIR (DIR): free space, then submit again"; pmlmd goes on
                       and takes submits again once it can write, no restart needed);
                       the message says more
=====================  ================================================================

Versions
========

Each side refuses messages of another version with ``bad-version``. New requests and
new arguments can be added without a new version: an older daemon refuses them with
``unknown-request`` or ``unknown-field``. The version changes when an existing message
changes its shape or meaning.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import resource
from dataclasses import dataclass
from typing import Any, Callable

from . import events, tasklines
from .batch import HALT_WHEN
from .bounds import BOUNDS, DURATION, MAX_RLIMIT, MAX_TASKS, NUMBER
from .options import LIMIT_OPTIONS
PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
MAX_OFFSET = 1 << 62  # a position in a task's output: more than any file system holds

# The resource limits submit carries, by the names limits.conf(5) gives them: those a worker's
# gate can set (engine.ULIMIT_FLAGS).
RLIMITS = {"cpu": resource.RLIMIT_CPU, "fsize": resource.RLIMIT_FSIZE, "data": resource.RLIMIT_DATA,
           "stack": resource.RLIMIT_STACK, "core": resource.RLIMIT_CORE, "rss": resource.RLIMIT_RSS,
           "memlock": resource.RLIMIT_MEMLOCK, "nproc": resource.RLIMIT_NPROC, "nofile": resource.RLIMIT_NOFILE,
           "as": resource.RLIMIT_AS, "rtprio": resource.RLIMIT_RTPRIO}
UNLIMITED = "unlimited"

BAD_JSON = "bad-json"
TOO_LARGE = "too-large"
BAD_VERSION = "bad-version"
UNKNOWN_REQUEST = "unknown-request"
MISSING_FIELD = "missing-field"
UNKNOWN_FIELD = "unknown-field"
BAD_FIELD = "bad-field"
NO_SUCH_BATCH = "no-such-batch"
PERMISSION_DENIED = "permission-denied"
QUOTA_EXCEEDED = "quota-exceeded"
INTERNAL = "internal"
ERROR_CODES = (BAD_JSON, TOO_LARGE, BAD_VERSION, UNKNOWN_REQUEST, MISSING_FIELD, UNKNOWN_FIELD, BAD_FIELD,
               NO_SUCH_BATCH, PERMISSION_DENIED, QUOTA_EXCEEDED, INTERNAL)

MAX_REQUEST_ID_CHARS = 200


class ProtocolError(Exception):
    """A message that breaks the protocol; ``code`` is one of ERROR_CODES.

    ``request_id`` is the offending request's id when it was read before the problem was
    found, so the error reply can still be matched by the client.
    """

    def __init__(self, code: str, message: str, request_id: str | int | None = None):
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


@dataclass(frozen=True)
class Request:
    name: str
    args: dict
    request_id: str | int | None = None


# Argument kinds.
_STR = "string"
_PATH = "absolute path"
_INT = "integer"
_NUMBER = "number"
_BOOL = "boolean"
_CHOICE = "choice"
_STR_LIST = "list of strings"
_STR_MAP = "string map"
_RLIMITS = "resource limits"


@dataclass(frozen=True)
class _Field:
    kind: str
    required: bool = False
    nullable: bool = False
    default: Any = None
    low: int | float | None = None
    high: int | float | None = None
    max_chars: int | None = None
    choices: tuple[str, ...] = ()
    min_items: int = 0
    max_items: int | None = None
    first_nonempty: bool = False
    unit: str = ""
    carries_bytes: bool = False  # a string that reaches exec as bytes: see "Bytes" in the module docstring

    def describe(self) -> str:
        """What a valid value looks like, phrased to follow "must be"."""
        if self.kind == _STR:
            text = "a string" if self.max_chars is None else f"a string of at most {self.max_chars} characters"
        elif self.kind == _PATH:
            text = "an absolute path (a string starting with '/')"
        elif self.kind in (_INT, _NUMBER):
            article = "an integer" if self.kind == _INT else "a number"
            if self.low is not None and self.high is not None:
                text = f"{article} from {self.low} to {self.high}"
            elif self.low is not None:
                text = f"{article} >= {self.low}"
            else:
                text = article
        elif self.kind == _BOOL:
            text = "true or false"
        elif self.kind == _CHOICE:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == _STR_LIST:
            text = f"a list of {self.min_items} to {self.max_items} strings"
            if self.first_nonempty:
                text += ", the first one non-empty"
        elif self.kind == _RLIMITS:
            text = (f"an object mapping resource names ({', '.join(RLIMITS)}) to [soft, hard], each an integer "
                    f"from 0 to {MAX_RLIMIT} or {UNLIMITED!r}")
        else:
            text = "an object mapping variable names to strings"
        if self.unit:
            text += f" ({self.unit})"
        if self.nullable:
            text += " or null"
        return text


@dataclass(frozen=True)
class _Schema:
    fields: dict[str, _Field]
    # At most one of these may be non-null; with none given, `one_of_default` = (field, value) applies.
    one_of: tuple[str, ...] = ()
    one_of_default: tuple[str, Any] | None = None
    # Checks the arguments together once each is valid: check(request name, arguments); raises ProtocolError.
    check: Callable[[str, dict], None] | None = None


_BATCH = _Field(_STR, required=True)
_ANY_BATCH = _Field(_STR, nullable=True)


def _opt(kind: str, **kw) -> _Field:
    return _Field(kind, nullable=True, **kw)


def _bounded(name: str, nullable: bool = True, **kw) -> _Field:
    """A numeric argument whose kind, range and unit are those of ``name`` in bounds.BOUNDS."""
    bound = BOUNDS[name]
    kind = _NUMBER if bound.kind in (NUMBER, DURATION) else _INT
    return _Field(kind, nullable=nullable, low=bound.low, high=bound.high, unit=bound.unit, **kw)


_SCHEMAS: dict[str, _Schema] = {
    "ping": _Schema({}),
    "list": _Schema({}),
    "status": _Schema({"batch": _ANY_BATCH}),
    "cancel": _Schema({"batch": _BATCH}),
    "pause": _Schema({"batch": _BATCH}),
    "resume": _Schema({"batch": _BATCH}),
    "report": _Schema({"batch": _BATCH}),
    "events": _Schema({"batch": _ANY_BATCH, "follow": _Field(_BOOL, default=False),
                       "kinds": _opt(_STR_LIST, min_items=1, max_items=len(events.STREAMED))},
                      check=lambda req, args: _check_kinds(req, args)),
    "log": _Schema({"batch": _BATCH, "task": _bounded("task_index"),
                    "stream": _Field(_CHOICE, choices=("stdout", "stderr"), default="stdout"),
                    "from_task": _Field(_INT, default=0, low=0, high=MAX_TASKS),
                    "offset": _Field(_INT, default=0, low=0, high=MAX_OFFSET),
                    "live": _Field(_BOOL, default=False)}),
    "retry": _Schema({"batch": _BATCH, "failed_only": _Field(_BOOL, default=False),
                      "joblog": _opt(_PATH, carries_bytes=True)}),
    "submit": _Schema(
        {
            "command": _Field(_STR_LIST, required=True, min_items=1, max_items=4096, first_nonempty=True,
                              carries_bytes=True),
            "tasks": _bounded("tasks"),
            "task_lines": _opt(_STR_LIST, min_items=1, max_items=MAX_TASKS, carries_bytes=True),
            "shell": _Field(_BOOL, default=False),
            "name": _opt(_STR, max_chars=200),
            "priority": _bounded("priority", nullable=False, default=0),
            "max_workers": _bounded("max_workers"),
            **{o.name: _opt(_CHOICE, choices=o.choices) if o.choices else _bounded(o.name) for o in LIMIT_OPTIONS},
            "term_grace": _bounded("term_grace"),
            "retries": _bounded("retries"),
            "retry_failed": _bounded("retry_failed"),
            "term_mode": _opt(_CHOICE, choices=("signal", "agent")),
            "pause_mode": _opt(_CHOICE, choices=("signal", "agent")),
            "agent_timeout": _bounded("agent_timeout"),
            "timeout": _bounded("timeout"),
            "halt": _opt(_CHOICE, choices=HALT_WHEN),
            "halt_fail": _bounded("halt_fail"),
            "halt_fail_pct": _bounded("halt_fail_pct"),
            "append": _Field(_BOOL, default=False),
            "joblog": _opt(_PATH, carries_bytes=True),
            "umask": _bounded("umask"),
            "rlimits": _opt(_RLIMITS),
            "user": _opt(_STR),
            "cwd": _Field(_PATH, required=True, carries_bytes=True),
            "results": _opt(_PATH, carries_bytes=True),
            "env": _Field(_STR_MAP, default={}, carries_bytes=True),
            "amqp": _opt(_STR, max_chars=2048),
            "queue": _opt(_STR, max_chars=255),
            "until_empty": _Field(_BOOL, default=False),
            "dead_letter": _opt(_STR, max_chars=255),
        },
        one_of=("tasks", "task_lines"),
        one_of_default=("tasks", 1),
        check=lambda req, args: _check_submit(req, args),  # defined below, with the other checks
    ),
}

REQUESTS = tuple(_SCHEMAS)

_ENVELOPE = ("version", "request", "request_id", "args")
_MISSING = object()


# --- showing what a client sent, briefly ------------------------------------------------

_SHOW_CHARS = 60


def _show(value: Any) -> str:
    """A short rendering of a decoded JSON value for error messages (never the whole of a big one)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        # str() of a huge int is slow (and refused past 4300 digits).
        return str(value) if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if len(value) > _SHOW_CHARS:
            return repr(value[:_SHOW_CHARS]) + f"... ({len(value)} characters)"
        return repr(value)
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _suggest(word: str, known) -> str:
    # difflib is quadratic; a long word is no typo of a short name anyway.
    if len(word) > 64:
        return ""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _text_problem(text: str, carries_bytes: bool = False) -> str | None:
    """Why a string cannot be passed on (to exec, to the environment, back out as UTF-8), or None.

    With ``carries_bytes`` the surrogates that stand for bytes are fine (see "Bytes")."""
    if "\x00" in text:
        return "must not contain a NUL character"
    try:
        text.encode("utf-8", "surrogateescape" if carries_bytes else "strict")
    except UnicodeEncodeError:
        if carries_bytes:
            return ("holds a surrogate that stands for no byte (only U+DC80 to U+DCFF carry bytes that are not "
                    "UTF-8)")
        return "must be valid Unicode text (it holds an unpaired surrogate)"
    return None


# --- argument checks, one per kind --------------------------------------------------------


def _bad(req: str, name: str, field: _Field, value: Any) -> ProtocolError:
    return ProtocolError(BAD_FIELD, f"{req}: {name!r} must be {field.describe()}, got {_show(value)}")


def _check_text(req: str, name: str, text: str, carries_bytes: bool = False) -> None:
    problem = _text_problem(text, carries_bytes)
    if problem:
        raise ProtocolError(BAD_FIELD, f"{req}: {name!r} {problem}, got {_show(text)}")


def _check_str(req: str, name: str, field: _Field, value: Any) -> str:
    if not isinstance(value, str) or (field.max_chars is not None and len(value) > field.max_chars):
        raise _bad(req, name, field, value)
    _check_text(req, name, value)
    return value


def _check_path(req: str, name: str, field: _Field, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _bad(req, name, field, value)
    _check_text(req, name, value, field.carries_bytes)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(field: _Field, value: int | float) -> bool:
    return (field.low is None or value >= field.low) and (field.high is None or value <= field.high)


def _check_int(req: str, name: str, field: _Field, value: Any) -> int:
    if not _is_int(value) or not _in_range(field, value):
        raise _bad(req, name, field, value)
    return value


def _check_number(req: str, name: str, field: _Field, value: Any) -> float:
    # math.isfinite() overflows on a huge int, so ints are only range-checked (exact in Python).
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(req, name, field, value)
    if not (_is_int(value) or isinstance(value, float)) or not _in_range(field, value):
        raise _bad(req, name, field, value)
    return float(value)


def _check_bool(req: str, name: str, field: _Field, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(req, name, field, value)
    return value


def _check_choice(req: str, name: str, field: _Field, value: Any) -> str:
    if not isinstance(value, str) or value not in field.choices:
        raise _bad(req, name, field, value)
    return value


def _check_str_list(req: str, name: str, field: _Field, value: Any) -> list[str]:
    if not isinstance(value, list) or not field.min_items <= len(value) <= field.max_items:
        raise _bad(req, name, field, value)
    for index, item in enumerate(value):
        item_name = f"{name}[{index}]"
        if not isinstance(item, str):
            raise ProtocolError(BAD_FIELD, f"{req}: {item_name!r} must be a string, got {_show(item)}")
        _check_text(req, item_name, item, field.carries_bytes)
    if field.first_nonempty and not value[0]:
        raise ProtocolError(BAD_FIELD, f"{req}: {name + '[0]'!r} (the program to run) must not be empty")
    return list(value)


def _check_str_map(req: str, name: str, field: _Field, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _bad(req, name, field, value)
    for key, item in value.items():
        if not key or "=" in key:
            raise ProtocolError(BAD_FIELD, f"{req}: {name!r} has the variable name {_show(key)}; "
                                           f"a variable name must be non-empty and without '='")
        problem = _text_problem(key, field.carries_bytes)
        if problem:
            raise ProtocolError(BAD_FIELD, f"{req}: {name!r} variable name {_show(key)} {problem}")
        if not isinstance(item, str):
            raise ProtocolError(BAD_FIELD, f"{req}: {name!r} variable {_show(key)} must be a string, "
                                           f"got {_show(item)}")
        problem = _text_problem(item, field.carries_bytes)
        if problem:
            raise ProtocolError(BAD_FIELD, f"{req}: {name!r} variable {_show(key)} {problem}")
    return dict(value)


def _check_rlimits(req: str, name: str, field: _Field, value: Any) -> dict[str, list]:
    if not isinstance(value, dict):
        raise _bad(req, name, field, value)
    checked = {}
    for key, pair in value.items():
        if key not in RLIMITS:
            raise ProtocolError(BAD_FIELD, f"{req}: {name!r} has the resource {_show(key)}"
                                           f"{_suggest(key, RLIMITS)}; "
                                           f"known resources: {', '.join(RLIMITS)}")
        if not isinstance(pair, list) or len(pair) != 2 or not all(
                item == UNLIMITED or (_is_int(item) and 0 <= item <= MAX_RLIMIT) for item in pair):
            raise ProtocolError(BAD_FIELD, f"{req}: {name!r} resource {key!r} must be [soft, hard], each an "
                                           f"integer from 0 to {MAX_RLIMIT} or {UNLIMITED!r}, got {_show(pair)}")
        soft, hard = pair
        if hard != UNLIMITED and (soft == UNLIMITED or soft > hard):
            raise ProtocolError(BAD_FIELD, f"{req}: {name!r} resource {key!r}: the soft limit {_show(soft)} is "
                                           f"above the hard limit {_show(hard)}")
        checked[key] = [soft, hard]
    return checked


_CHECKS = {
    _STR: _check_str,
    _PATH: _check_path,
    _INT: _check_int,
    _NUMBER: _check_number,
    _BOOL: _check_bool,
    _CHOICE: _check_choice,
    _STR_LIST: _check_str_list,
    _STR_MAP: _check_str_map,
    _RLIMITS: _check_rlimits,
}


def _check_args(req: str, schema: _Schema, given: dict) -> dict:
    for key in given:
        if key not in schema.fields:
            takes = ", ".join(schema.fields) if schema.fields else "no arguments"
            raise ProtocolError(UNKNOWN_FIELD, f"{req}: unknown argument {_show(key)}{_suggest(key, schema.fields)}; "
                                               f"{req} takes {takes}")
    args = {}
    for name, field in schema.fields.items():
        value = given.get(name, _MISSING)
        if value is _MISSING or (value is None and not field.required):
            if field.required:
                raise ProtocolError(MISSING_FIELD, f"{req}: required argument {name!r} is missing; "
                                                   f"give {field.describe()}")
            # Copied so one request's default can never leak into another's through mutation.
            args[name] = copy.copy(field.default)
        elif value is None and not field.nullable:
            raise _bad(req, name, field, value)
        else:
            args[name] = _CHECKS[field.kind](req, name, field, value)
    if schema.one_of:
        given_names = [name for name in schema.one_of if args[name] is not None]
        if len(given_names) > 1:
            raise ProtocolError(BAD_FIELD, f"{req}: {' and '.join(repr(n) for n in given_names)} are both given; "
                                           f"give only one of them and leave the other out")
        if not given_names and schema.one_of_default is not None:
            name, value = schema.one_of_default
            args[name] = value
    if schema.check is not None:
        schema.check(req, args)
    return args


def _check_kinds(req: str, args: dict) -> None:
    """``kinds``: each one a kind of event the stream carries (events.STREAMED)."""
    for kind in args["kinds"] or ():
        if kind not in events.STREAMED:
            raise ProtocolError(BAD_FIELD, f"{req}: 'kinds' holds {_show(kind)}, which is no kind of event sent; the "
                                           f"kinds are {', '.join(events.STREAMED)}{_suggest(kind, events.STREAMED)}")


def _check_submit(req: str, args: dict) -> None:
    _check_halt(req, args)
    _check_intake(req, args)
    _check_exec_fits(req, args)


def _check_intake(req: str, args: dict) -> None:
    """``amqp`` takes ``queue`` (and tasks from there: no ``task_lines``); the queue options need it."""
    if args["amqp"] is None:
        given = [name for name in ("queue", "dead_letter") if args[name] is not None]
        given += ["until_empty"] if args["until_empty"] else []
        if given:
            raise ProtocolError(BAD_FIELD, f"{req}: {given[0]!r} is given without 'amqp': give the broker's URL in "
                                           f"'amqp' too, or leave {given[0]!r} out")
        return
    if args["queue"] is None:
        raise ProtocolError(BAD_FIELD, f"{req}: 'amqp' needs 'queue': the queue to take the tasks from")
    if args["task_lines"] is not None:
        raise ProtocolError(BAD_FIELD, f"{req}: 'amqp' takes the tasks from the queue: leave 'task_lines' out")
    from ..broker.intake import URLError, check_name, check_url  # pika: only for a queue batch

    try:
        check_url(args["amqp"])
        check_name(args["queue"], "queue")
        if args["dead_letter"] is not None:
            check_name(args["dead_letter"], "dead-letter exchange")
    except URLError as e:
        raise ProtocolError(BAD_FIELD, f"{req}: {e}") from None


def _check_halt(req: str, args: dict) -> None:
    """``halt`` takes exactly one of ``halt_fail`` and ``halt_fail_pct``, and they need it."""
    given = [name for name in ("halt_fail", "halt_fail_pct") if args[name] is not None]
    if args["halt"] is None and given:
        raise ProtocolError(BAD_FIELD, f"{req}: {given[0]!r} is given without 'halt': give 'halt' (\"soon\" or "
                                       f"\"now\") too, or leave {given[0]!r} out")
    if args["halt"] is not None and len(given) != 1:
        raise ProtocolError(BAD_FIELD, f"{req}: 'halt' needs exactly one of 'halt_fail' (a count of failed tasks) "
                                       f"and 'halt_fail_pct' (a percentage of the tasks), got "
                                       f"{' and '.join(repr(n) for n in given) if given else 'neither'}")


def _check_exec_fits(req: str, args: dict) -> None:
    """submit: every worker's exec must take its command, environment and task line (see "Bytes"),
    so that a line too long for Linux is refused now rather than failing as a task later."""
    # A worker's exec runs under the stack limit the submitter sent (pmlmd may only lower it
    # further), else under pmlmd's own.
    stack = (args.get("rlimits") or {}).get("stack")
    soft = None if stack is None else resource.RLIM_INFINITY if stack[0] == UNLIMITED else stack[0]
    fit = tasklines.Fit(args["command"], args["shell"], args["env"], tasklines.arg_max(soft), args["append"])
    problem = fit.base_problem()
    if problem:
        raise ProtocolError(BAD_FIELD, f"{req}: the command cannot be executed: {problem}")
    for index, line in enumerate(args["task_lines"] or ()):
        problem = fit.problem(line)
        if problem:
            raise ProtocolError(BAD_FIELD, f"{req}: 'task_lines[{index}]' is too long "
                                           f"({len(tasklines.raw(line))} bytes): {problem}")


# --- framing -------------------------------------------------------------------------------


def _reject_constant(token: str):
    raise ProtocolError(BAD_JSON, f"{token} is not a JSON number; send finite numbers only")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ProtocolError(BAD_JSON, f"the number {token[:_SHOW_CHARS]} is too large for a float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ProtocolError(BAD_JSON, f"the key {_show(key)} appears twice in one object; give it once")
            seen.add(key)
    return obj


def _load(frame: bytes, what: str, limit: int | None) -> dict:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(BAD_JSON, f"a {what} must be bytes, got {type(frame).__name__}")
    size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
    if limit is not None and size > limit:
        raise ProtocolError(TOO_LARGE, f"the {what} is {size} bytes, more than the limit of {limit} bytes: "
                                       f"split it up (for submit: fewer task_lines per batch)")
    try:
        text = bytes(frame).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(BAD_JSON, f"the {what} is not UTF-8 (bad byte at offset {exc.start}); "
                                      f"send JSON encoded as UTF-8") from None
    try:
        message = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant,
                             parse_float=_finite_float)
    except RecursionError:
        raise ProtocolError(BAD_JSON, f"the {what} is nested too deeply to decode") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(BAD_JSON, f"the {what} is not valid JSON: {exc.msg} at line {exc.lineno} "
                                      f"column {exc.colno}") from None
    except ValueError:
        # Python refuses to convert integers of more than 4300 digits.
        raise ProtocolError(BAD_JSON, f"the {what} holds a number too long to decode") from None
    if not isinstance(message, dict):
        raise ProtocolError(BAD_JSON, f"a {what} must be a JSON object, got {_show(message)}")
    return message


def _request_id(value: Any) -> str | int | None:
    """The request_id if it is valid, else raise; decides whether an error reply can carry it."""
    if value is None or _is_int(value):
        return value
    if isinstance(value, str) and len(value) <= MAX_REQUEST_ID_CHARS and _text_problem(value) is None:
        return value
    raise ProtocolError(BAD_FIELD, f"'request_id' must be a string of at most {MAX_REQUEST_ID_CHARS} characters "
                                   f"(without NUL characters or unpaired surrogates) or an integer, "
                                   f"got {_show(value)}")


def parse_request(frame: bytes) -> Request:
    """Decode and validate one request frame; raise ProtocolError, and nothing else, if it is not valid."""
    message = _load(frame, "request", MAX_MESSAGE_BYTES)

    # The version comes first: a request from another version may differ in any other way.
    version = message.get("version", _MISSING)
    if version is _MISSING:
        raise ProtocolError(BAD_VERSION, f"the request has no 'version'; this pmlmd speaks protocol version "
                                         f"{PROTOCOL_VERSION}: upgrade pmlmctl so they match")
    if not _is_int(version):
        raise ProtocolError(BAD_VERSION, f"'version' must be the integer {PROTOCOL_VERSION}, got {_show(version)}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(BAD_VERSION, f"protocol version {_show(version)} is not supported; this pmlmd speaks "
                                         f"version {PROTOCOL_VERSION}: upgrade pmlmctl or pmlmd so they match")

    request_id = _request_id(message.get("request_id"))
    try:
        for key in message:
            if key not in _ENVELOPE:
                raise ProtocolError(UNKNOWN_FIELD, f"unknown top-level field {_show(key)}; a request has only "
                                                   f"'version', 'request', 'request_id' and 'args' "
                                                   f"(arguments go inside 'args')")
        name = message.get("request", _MISSING)
        if name is _MISSING:
            raise ProtocolError(MISSING_FIELD, f"the request has no 'request' field naming what to do; "
                                               f"give one of {', '.join(REQUESTS)}")
        if not isinstance(name, str):
            raise ProtocolError(BAD_FIELD, f"'request' must be a string, one of {', '.join(REQUESTS)}; "
                                           f"got {_show(name)}")
        schema = _SCHEMAS.get(name)
        if schema is None:
            raise ProtocolError(UNKNOWN_REQUEST, f"unknown request {_show(name)}{_suggest(name, REQUESTS)}; "
                                                 f"this pmlmd knows {', '.join(REQUESTS)}: check the spelling, "
                                                 f"or upgrade pmlmd if pmlmctl is newer")
        given = message.get("args", _MISSING)
        if given is _MISSING:
            given = {}
        elif not isinstance(given, dict):
            raise ProtocolError(BAD_FIELD, f"{name}: 'args' must be an object, got {_show(given)}")
        return Request(name=name, args=_check_args(name, schema, given), request_id=request_id)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise


def check_args(name: str, given: Any) -> dict:
    """A request's arguments checked as ``parse_request`` checks them, defaults filled in.

    For arguments that did not just arrive on the wire: a batch's submission as an earlier
    pmlmd stored it is held to today's rules before it is run again. Raises ProtocolError.
    """
    if not isinstance(given, dict):
        raise ProtocolError(BAD_FIELD, f"{name}: the arguments must be an object, got {_show(given)}")
    return _check_args(name, _SCHEMAS[name], given)


# --- encoding ------------------------------------------------------------------------------


# A lone surrogate: in pmlmd's strings, a byte that is not UTF-8 (see "Bytes").
_SURROGATE = re.compile("[\ud800-\udfff]")


def _dump(message: dict) -> bytes:
    text = json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # UTF-8 has no form for a lone surrogate, a JSON escape has; every other character stays
    # as it is, so text that is UTF-8 costs no more room than before. Surrogates occur only
    # inside JSON strings, where an escape means the same character.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode("utf-8")


def encode_request(name: str, /, request_id: str | int | None = None, **args) -> bytes:
    """A request frame; not validated (the daemon does that). `name` is positional-only so that
    submit's own `name` argument can be passed as a keyword."""
    message: dict[str, Any] = {"version": PROTOCOL_VERSION, "request": name}
    if request_id is not None:
        message["request_id"] = request_id
    message["args"] = args
    return _dump(message)


def encode_reply(result: dict, request_id: str | int | None = None) -> bytes:
    if not isinstance(result, dict):
        raise TypeError(f"a reply's result must be a dict, got {type(result).__name__}")
    return _dump({"version": PROTOCOL_VERSION, "ok": True, "result": result, "request_id": request_id})


def encode_reply_json(result_json: bytes | list[bytes], request_id: str | int | None = None) -> bytes:
    """A reply whose result is JSON already (a stored report, or one encoded a slice at a time,
    given as its pieces), so that it is not decoded and encoded again: ASCII JSON (as
    ``json.dumps`` writes it by default), copied once into the frame."""
    head = _dump({"version": PROTOCOL_VERSION, "ok": True, "request_id": request_id})
    pieces = result_json if isinstance(result_json, list) else [result_json]
    return b"".join([head[:-1], b',"result":', *pieces, b"}"])


def encode_error(code: str, message: str, request_id: str | int | None = None) -> bytes:
    # A typo in a code would reach clients that branch on it; refuse it here instead.
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}; add it to ERROR_CODES first")
    return _dump({"version": PROTOCOL_VERSION, "ok": False, "error": {"code": code, "message": str(message)},
                  "request_id": request_id})


def encode_event(event: dict, request_id: str | int | None = None) -> bytes:
    if not isinstance(event, dict):
        raise TypeError(f"an event must be a dict, got {type(event).__name__}")
    return _dump({"version": PROTOCOL_VERSION, "ok": True, "event": event, "request_id": request_id})


# --- decoding replies (client side) --------------------------------------------------------


def decode_reply(frame: bytes) -> dict:
    """The whole reply or event message as a dict; raise ProtocolError if pmlmd sent something malformed.

    An error reply is returned, not raised: it is a well-formed answer.
    """
    message = _load(frame, "reply", None)
    version = message.get("version", _MISSING)
    if version is _MISSING or not _is_int(version) or version != PROTOCOL_VERSION:
        shown = "no version" if version is _MISSING else f"protocol version {_show(version)}"
        raise ProtocolError(BAD_VERSION, f"pmlmd replied with {shown}; this pmlmctl speaks version "
                                         f"{PROTOCOL_VERSION}: upgrade pmlmctl or pmlmd so they match")
    if "ok" not in message:
        raise ProtocolError(MISSING_FIELD, "pmlmd's reply has no 'ok'")
    ok = message["ok"]
    if not isinstance(ok, bool):
        raise ProtocolError(BAD_FIELD, f"'ok' in pmlmd's reply must be true or false, got {_show(ok)}")
    request_id = message.get("request_id")
    if not (request_id is None or _is_int(request_id) or isinstance(request_id, str)):
        raise ProtocolError(BAD_FIELD, f"'request_id' in pmlmd's reply must be a string, an integer or null, "
                                       f"got {_show(request_id)}")
    if ok:
        bodies = [key for key in ("result", "event") if key in message]
        if len(bodies) != 1:
            raise ProtocolError(MISSING_FIELD if not bodies else BAD_FIELD,
                                "pmlmd's reply must hold exactly one of 'result' and 'event'")
        if not isinstance(message[bodies[0]], dict):
            raise ProtocolError(BAD_FIELD, f"{bodies[0]!r} in pmlmd's reply must be an object, "
                                           f"got {_show(message[bodies[0]])}")
    else:
        error = message.get("error", _MISSING)
        if error is _MISSING:
            raise ProtocolError(MISSING_FIELD, "pmlmd's error reply has no 'error'")
        if not isinstance(error, dict) or not isinstance(error.get("code"), str) \
                or not isinstance(error.get("message"), str):
            raise ProtocolError(BAD_FIELD, "'error' in pmlmd's reply must be an object with the strings "
                                           "'code' and 'message'")
    return message
