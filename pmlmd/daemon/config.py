"""The daemon's configuration: /etc/pmlmd/pmlmd.toml plus command-line overrides.

The file has four tables, [daemon], [limits], [batches] and [quotas]; their keys are the
field names of ``Config``. Unknown tables and keys and bad values are refused with
one line naming the file, the dotted key and what to write instead, so a typo never
passes silently as a default.

``load_config`` is a pure function of the file's content and the overrides: it
resolves no group, creates no directory and touches no socket. The daemon calls it
at start and again on SIGHUP, keeping the old Config when the new file is refused.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Callable

from ..core.bounds import BOUNDS, SIZE, Bound
from ..node.cgroup import BACKENDS as WORKER_BACKENDS
from ..core.governor import Limits
from ..core.options import LIMIT_OPTIONS, LimitOption, limits_from
from ..core.units import parse_size

DEFAULT_CONFIG_PATH = "/etc/pmlmd/pmlmd.toml"

LOG_TARGETS = ("auto", "journal", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
STRANDED_POLICIES = ("continue", "terminate")
SCOPE_BACKENDS = ("auto", "systemd", "none")

# sun_path holds 108 bytes including the terminating NUL; ZeroMQ's ipc:// transport
# refuses longer paths only at bind time, with a message that names no file or key.
MAX_SOCKET_PATH_BYTES = 107

# Where errors about command-line overrides say they come from.
OVERRIDE_SOURCE = "command line"


class ConfigError(Exception):
    """A config file or override that cannot be used; str() is one line for the log."""


# What pmlmd reads once, at start: a reload (SIGHUP) keeps the running values of these and logs
# which it kept, with the restart that applies them. Everything else applies at the reload.
AT_START = ("socket", "socket_mode", "group", "state_dir", "agent_socket", "scope_backend", "worker_backend",
            "slice_tasks_max", "slice_memory_max", "scope_tasks_max", "scope_memory_max")


@dataclass(frozen=True)
class Config:
    # [daemon]
    socket: str = "/run/pmlmd/control.sock"
    socket_mode: int = 0o660
    group: str = "pmlm"
    state_dir: str = "/var/lib/pmlmd"
    log_target: str = "auto"
    log_level: str = "info"
    prune_after: float = 7 * 86400.0  # seconds
    agent_socket: str = "/run/pmlmd/agent.sock"  # the cooperative-stop channel (agent mode)
    stranded: str = "continue"
    scope_backend: str = "auto"
    worker_backend: str = "auto"  # how workers are contained and measured: cgroup v2 where usable, or /proc
    # Kernel-enforced backstops on pmlm.slice (all batches) and each batch's scope (see scopes.CgroupLimits):
    # "infinity", a number (tasks, or bytes), or a percentage of the node's maximum tasks or its memory.
    slice_tasks_max: int | str = "50%"
    slice_memory_max: int | str = "90%"
    scope_tasks_max: int | str = "25%"
    scope_memory_max: int | str = "infinity"
    # Where pam_limits' configuration is (limits.conf, limits.d): workers get no more than a login.
    limits_conf_dir: str = "/etc/security"
    # Task output (see output.TaskFiles): the last output_limit bytes of each task's stdout and
    # stderr are kept with the batch; output_journal also sends each line to the journal.
    output_limit: int = 1 << 20
    output_journal: bool = False
    # [limits]: one per options.LIMIT_OPTIONS, with its default (checked by tests/test_options.py)
    cpu_limit: float = Limits.cpu_limit
    cpu_margin: float = Limits.cpu_margin
    memfree_limit: float = Limits.memfree_limit
    memory_metric: str = Limits.memory_metric
    memory_gap: int = Limits.memory_gap
    min_free: int = Limits.min_free
    victim: str = Limits.victim
    interval: float = Limits.interval
    max_workers: int | None = None  # None: the governor decides, up to 8 x CPUs
    # [batches]
    retries: int = 3
    retry_failed: int = 0
    term_grace: float = 10.0
    # [quotas]: what one user (uid) may ask of the daemon at once, checked when a batch starts
    # (submit, retry). A batch's tasks live in the daemon's memory until they end, and a batch's
    # interval sets how often the daemon samples the node, so these keep one user from
    # slowing the daemon down for everybody.
    tasks_queued: int = 1_000_000  # tasks not yet finished, over the user's active batches
    batches_active: int = 100
    min_interval: float = 0.1  # the shortest interval a batch may ask for (seconds)
    root_exempt: bool = True  # requests root makes (also for another user) are not held to quotas
    # What one user's finished batches may take of the state (submissions and reports as stored):
    # past it, that user's oldest finished batches are pruned before prune_after.
    state_bytes: int = 256 << 20
    request_bytes: int = 1 << 20  # the largest request one user may send (the protocol's own limit: 1M)
    output_bytes: int = 1 << 30  # disk one user's finished batches' output may take, like state_bytes

    def limits(self, cpus: int) -> Limits:
        """The governor's limits on a node with ``cpus`` CPUs."""
        return limits_from(self, self.max_workers or 8 * max(cpus, 1))


# --- value parsers: TOML value -> typed value, or ValueError with the reason and the fix ---


def _show(value: Any) -> str:
    """A value as the operator wrote it in TOML, not as Python prints it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if len(value) > 60:  # the reason must stay one readable line
            return json.dumps(value[:60], ensure_ascii=False)[:-1] + f'..." ({len(value)} characters)'
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def _closest(word: str, candidates: list[str]) -> str | None:
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _is_number(value: Any) -> bool:
    # TOML true/false arrive as Python bools, which are ints; a switch is not a number.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Ranges come from bounds.BOUNDS, shared with the control protocol and pmlmctl's options.


def _number(name: str) -> Callable[[Any], float]:
    bound = BOUNDS[name]

    def parse(value: Any) -> float:
        if not bound.admits(value):  # bools, nan and infinities included
            raise ValueError(f"expected a number {bound.span()}, got {_show(value)}")
        return float(value)
    return parse


def _whole(name: str) -> Callable[[Any], int]:
    bound = BOUNDS[name]

    def parse(value: Any) -> int:
        if not bound.admits(value):
            raise ValueError(f"expected a whole number {bound.span()}, got {_show(value)}")
        return value
    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value in choices and isinstance(value, str):
            return value
        listed = ", ".join(f'"{c}"' for c in choices)
        hint = _closest(value, list(choices)) if isinstance(value, str) else None
        fix = f' (did you mean "{hint}"?)' if hint else ""
        raise ValueError(f"expected one of {listed}, got {_show(value)}{fix}")
    return parse


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ValueError(f"expected an absolute path (starting with /), got {_show(value)}")
    return value


def _socket_path(value: Any) -> str:
    path = _path(value)
    length = len(path.encode())
    if length > MAX_SOCKET_PATH_BYTES:
        raise ValueError(f"the path is {length} bytes long; a Unix socket path can have at most "
                         f"{MAX_SOCKET_PATH_BYTES} bytes, choose a shorter one")
    return path


def _socket_mode(value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"[0-7]{3,4}", value):
        return _socket_mode_bits(int(value, 8))
    # An unquoted 0660 is not valid TOML and an unquoted 660 would be read as decimal,
    # so the mode is always a quoted string of octal digits, as chmod takes it.
    raise ValueError(f'expected a quoted string of 3 or 4 octal digits like "0660", got {_show(value)}')


def _socket_mode_bits(value: Any) -> int:
    """An override arrives already converted: permission bits as an int. Only the read, write
    and execute bits: set-user-ID, set-group-ID and sticky mean nothing on a socket."""
    if not _is_number(value) or isinstance(value, float) or not 0 <= value <= 0o777:
        raise ValueError(f"expected permission bits from 0000 to 0777 (no set-user-ID, set-group-ID or sticky "
                         f"bit: they mean nothing on a socket), got {format(value, '04o') if isinstance(value, int) and not isinstance(value, bool) else _show(value)}")
    return value


def _group(value: Any) -> str:
    # Only the shape is checked here; whether the group exists is the daemon's
    # question at start, when it changes the socket's owner.
    if not isinstance(value, str) or not re.fullmatch(r"[^\s:/]+", value):
        raise ValueError(f'expected a group name such as "pmlm" (no spaces, ":" or "/"), got {_show(value)}')
    return value


def _size(name: str) -> Callable[[Any], int]:
    bound = BOUNDS[name]

    def parse(value: Any) -> int:
        try:
            size = parse_size(value) if isinstance(value, str) else value
        except ValueError:
            size = None
        if not bound.admits(size):
            raise ValueError(f'expected a size {bound.span()}: bytes or a number with K, M, G or T like "200M", '
                             f'got {_show(value)}')
        return size
    return parse


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*")


def parse_duration(value: Any, bound: Bound = BOUNDS["prune_after"]) -> float:
    """Seconds from a number of seconds or a string with a unit: "30s", "15m", "12h", "7d"."""
    seconds: Any = math.nan
    if _is_number(value):
        seconds = value
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value)):
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]  # a long digit string gives inf: out of range
    if not bound.admits(seconds):
        raise ValueError(f'expected a positive duration {bound.span()}: seconds or a number with s, m, h or d '
                         f'like "12h" or "7d", got {_show(value)}')
    return float(seconds)


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {_show(value)}")


def _max_workers(value: Any) -> int | None:
    if value == "auto":
        return None
    bound = BOUNDS["max_workers"]
    if not bound.admits(value):
        raise ValueError(f'expected "auto" or a whole number {bound.span()}, got {_show(value)}')
    return value


# TasksMax: the kernel's largest pid_max on 64-bit machines; more tasks than that cannot exist.
MAX_TASKS_MAX = 4 * 1024 * 1024
# MemoryMax: below 1M not even a shell starts, so a smaller value is a typo (a missing unit).
MIN_MEMORY_MAX = 1 << 20
MAX_MEMORY_MAX = 1 << 60
_PERCENT_RE = re.compile(r"\s*(\d{1,3}(?:\.\d{1,2})?)\s*%\s*")


def _percent(value: Any) -> str | None:
    """A percentage above 0 and up to 100, with at most two decimals as systemd takes it: "25%", "12.5%"."""
    match = _PERCENT_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None or not 0 < Decimal(match[1]) <= 100:
        return None
    return f"{Decimal(match[1]).normalize():f}%"


def _tasks_max(value: Any) -> int | str:
    if value == "infinity":
        return value
    if (percent := _percent(value)) is not None:
        return percent
    if _is_number(value) and not isinstance(value, float) and 1 <= value <= MAX_TASKS_MAX:
        return value
    raise ValueError(f'expected a number of tasks from 1 to {MAX_TASKS_MAX}, a percentage of the node\'s maximum '
                     f'like "25%", or "infinity", got {_show(value)}')


def _memory_max(value: Any) -> int | str:
    if value == "infinity":
        return value
    if (percent := _percent(value)) is not None:
        return percent
    try:
        size = parse_size(value) if isinstance(value, str) else value
    except ValueError:
        size = None
    if _is_number(size) and not isinstance(size, float) and MIN_MEMORY_MAX <= size <= MAX_MEMORY_MAX:
        return size
    raise ValueError(f'expected a size from 1M (bytes or a number with K, M, G or T like "4G"), a percentage of '
                     f'the node\'s memory like "90%", or "infinity", got {_show(value)}')


# --- the file's layout ---


def _limit_parser(option: LimitOption) -> Callable[[Any], Any]:
    if option.choices is not None:
        return _choice(option.choices)
    return _size(option.name) if option.bound.kind == SIZE else _number(option.name)


@dataclass(frozen=True)
class _Option:
    table: str
    parse: Callable[[Any], Any]
    # Overrides arrive already typed (from argparse); where the typed form differs from
    # what the file holds, this checks the typed form instead of ``parse``.
    check_typed: Callable[[Any], Any] | None = None


_OPTIONS: dict[str, _Option] = {
    "socket": _Option("daemon", _socket_path),
    "socket_mode": _Option("daemon", _socket_mode, _socket_mode_bits),
    "group": _Option("daemon", _group),
    "state_dir": _Option("daemon", _path),
    "log_target": _Option("daemon", _choice(LOG_TARGETS)),
    "log_level": _Option("daemon", _choice(LOG_LEVELS)),
    "prune_after": _Option("daemon", parse_duration),
    "agent_socket": _Option("daemon", _socket_path),
    "stranded": _Option("daemon", _choice(STRANDED_POLICIES)),
    "scope_backend": _Option("daemon", _choice(SCOPE_BACKENDS)),
    "worker_backend": _Option("daemon", _choice(WORKER_BACKENDS)),
    "slice_tasks_max": _Option("daemon", _tasks_max),
    "slice_memory_max": _Option("daemon", _memory_max),
    "scope_tasks_max": _Option("daemon", _tasks_max),
    "scope_memory_max": _Option("daemon", _memory_max),
    "limits_conf_dir": _Option("daemon", _path),
    "output_limit": _Option("daemon", _size("output_limit")),
    "output_journal": _Option("daemon", _switch),
    **{o.name: _Option("limits", _limit_parser(o)) for o in LIMIT_OPTIONS},
    "max_workers": _Option("limits", _max_workers),
    "retries": _Option("batches", _whole("retries")),
    "retry_failed": _Option("batches", _whole("retry_failed")),
    "term_grace": _Option("batches", _number("term_grace")),
    "tasks_queued": _Option("quotas", _whole("tasks_queued")),
    "batches_active": _Option("quotas", _whole("batches_active")),
    "min_interval": _Option("quotas", _number("min_interval")),
    "root_exempt": _Option("quotas", _switch),
    "state_bytes": _Option("quotas", _size("state_bytes")),
    "request_bytes": _Option("quotas", _size("request_bytes")),
    "output_bytes": _Option("quotas", _size("output_bytes")),
}
TABLES = ("daemon", "limits", "batches", "quotas")


def _keys_in(table: str) -> list[str]:
    return [name for name, option in _OPTIONS.items() if option.table == table]


def _unknown_key(table: str, key: str) -> str:
    if key in _OPTIONS:
        return f"unknown key in [{table}]; {key} belongs in [{_OPTIONS[key].table}]"
    known = _keys_in(table)
    hint = _closest(key, known)
    fix = f', did you mean "{hint}"?' if hint else ""
    return f"unknown key{fix} (known keys in [{table}]: {', '.join(known)})"


def _unknown_table(name: str) -> str:
    if name in _OPTIONS:
        return f"settings go in a table; {name} belongs in [{_OPTIONS[name].table}]"
    hint = _closest(name, list(TABLES))
    fix = f", did you mean [{hint}]?" if hint else ""
    return f"unknown table{fix} (known tables: {', '.join(f'[{t}]' for t in TABLES)})"


def _values_from_file(source: str, data: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for table, entries in data.items():
        if table not in TABLES:
            raise ConfigError(f"{source}: {table}: {_unknown_table(table)}")
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: {table}: expected a table [{table}], got {_show(entries)}")
        for key, value in entries.items():
            if key not in _OPTIONS or _OPTIONS[key].table != table:
                raise ConfigError(f"{source}: {table}.{key}: {_unknown_key(table, key)}")
            try:
                values[key] = _OPTIONS[key].parse(value)
            except ValueError as e:
                raise ConfigError(f"{source}: {table}.{key}: {e}") from None
    return values


def _read(path: str, explicit: bool) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        if not explicit:
            return {}  # no file at the default place: every option at its default
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the config file at ``path`` (None: DEFAULT_CONFIG_PATH, which may be absent).

    ``overrides`` maps Config field names to values already converted by the command
    line; they win over the file, and None means "not given". Raises ConfigError.
    """
    explicit = path is not None
    source = path if explicit else DEFAULT_CONFIG_PATH
    values = _values_from_file(source, _read(source, explicit))
    for name, value in (overrides or {}).items():
        if name not in _OPTIONS:
            raise TypeError(f"load_config: no Config field named {name!r}")
        if value is None:
            continue
        option = _OPTIONS[name]
        try:
            values[name] = (option.check_typed or option.parse)(value)
        except ValueError as e:
            raise ConfigError(f"{OVERRIDE_SOURCE}: --{name.replace('_', '-')}: {e}") from None
    return replace(Config(), **values)
