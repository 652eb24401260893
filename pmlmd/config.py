"""The daemon's configuration: /etc/pmlmd/pmlmd.toml plus command-line overrides.

The file has three tables, [daemon], [limits] and [batches]; their keys are the
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
from typing import Any, Callable

from .governor import MEMORY_METRICS, VICTIM_POLICIES, Limits
from .units import parse_size

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
    # [limits]
    cpu_limit: float = 90.0
    cpu_margin: float = 10.0
    memfree_limit: float = 20.0
    memory_metric: str = "available"
    memory_gap: int = 200 << 20
    min_free: int = 300 << 20
    victim: str = "newest"
    interval: float = 0.5
    max_workers: int | None = None  # None: the governor decides, up to 8 x CPUs
    # [batches]
    retries: int = 3
    retry_failed: int = 0
    term_grace: float = 10.0

    def limits(self, cpus: int) -> Limits:
        """The governor's limits on a node with ``cpus`` CPUs."""
        return Limits(cpu_limit=self.cpu_limit, memfree_limit=self.memfree_limit, memory_metric=self.memory_metric,
                      memory_gap=self.memory_gap, min_free=self.min_free, victim=self.victim,
                      max_workers=self.max_workers or 8 * max(cpus, 1), cpu_margin=self.cpu_margin,
                      window=self.interval)


# --- value parsers: TOML value -> typed value, or ValueError with the reason and the fix ---


def _show(value: Any) -> str:
    """A value as the operator wrote it in TOML, not as Python prints it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
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


def _number(low: float, high: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        # Written as "not inside" so that nan, which compares false with everything, is refused.
        if not _is_number(value) or not low <= value <= high:
            raise ValueError(f"expected a number from {low:g} to {high:g}, got {_show(value)}")
        return float(value)
    return parse


def _whole(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if not _is_number(value) or isinstance(value, float) or not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}, got {_show(value)}")
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
        return int(value, 8)
    # An unquoted 0660 is not valid TOML and an unquoted 660 would be read as decimal,
    # so the mode is always a quoted string of octal digits, as chmod takes it.
    raise ValueError(f'expected a quoted string of 3 or 4 octal digits like "0660", got {_show(value)}')


def _socket_mode_bits(value: Any) -> int:
    """An override arrives already converted: permission bits as an int."""
    if not _is_number(value) or isinstance(value, float) or not 0 <= value <= 0o7777:
        raise ValueError(f"expected permission bits from 0 to 0o7777, got {_show(value)}")
    return value


def _group(value: Any) -> str:
    # Only the shape is checked here; whether the group exists is the daemon's
    # question at start, when it changes the socket's owner.
    if not isinstance(value, str) or not re.fullmatch(r"[^\s:/]+", value):
        raise ValueError(f'expected a group name such as "pmlm" (no spaces, ":" or "/"), got {_show(value)}')
    return value


def _size(value: Any) -> int:
    try:
        if _is_number(value) and not isinstance(value, float) and value >= 0:
            return value
        if isinstance(value, str):
            return parse_size(value)
    except ValueError:
        pass
    raise ValueError(f'expected a size: bytes or a number with K, M, G or T like "200M", got {_show(value)}')


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*")


def parse_duration(value: Any) -> float:
    """Seconds from a number of seconds or a string with a unit: "30s", "15m", "12h", "7d"."""
    if _is_number(value):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value)):
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    else:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(f'expected a positive duration: seconds or a number with s, m, h or d like "12h" or '
                         f'"7d", got {_show(value)}')
    return seconds


def _max_workers(value: Any) -> int | None:
    if value == "auto":
        return None
    if not _is_number(value) or isinstance(value, float) or not 1 <= value <= 100000:
        raise ValueError(f'expected "auto" or a whole number from 1 to 100000, got {_show(value)}')
    return value


# --- the file's layout ---


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
    "cpu_limit": _Option("limits", _number(1, 100)),
    "cpu_margin": _Option("limits", _number(0, 99)),
    "memfree_limit": _Option("limits", _number(0, 99)),
    "memory_metric": _Option("limits", _choice(MEMORY_METRICS)),
    "memory_gap": _Option("limits", _size),
    "min_free": _Option("limits", _size),
    "victim": _Option("limits", _choice(VICTIM_POLICIES)),
    "interval": _Option("limits", _number(0.01, 60)),
    "max_workers": _Option("limits", _max_workers),
    "retries": _Option("batches", _whole(0, 1000)),
    "retry_failed": _Option("batches", _whole(0, 1000)),
    "term_grace": _Option("batches", _number(0, 3600)),
}
TABLES = ("daemon", "limits", "batches")


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
