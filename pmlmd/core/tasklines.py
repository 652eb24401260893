"""Task lines, command words and environment strings: the bytes they are, and what exec accepts.

To the kernel a worker's arguments and environment are byte strings, and a tasks file, a
file name given as an argument or a variable in the submitter's environment need not be
UTF-8. Everywhere inside pmlmd (the control protocol, the state database, reports) such
bytes are carried as text decoded from UTF-8 with ``surrogateescape``: a valid UTF-8
sequence becomes its character, every other byte 0xNN the lone surrogate U+DCNN.
``raw`` gives the very bytes back, and the engine applies it when it starts a worker. Both
directions are fixed to UTF-8 rather than the locale's encoding, so a pmlmctl and a pmlmd
running under different locales still hand every byte on unchanged.

What Linux's execve accepts, and ``Fit`` checks before any worker starts (so a line that
could never be executed is refused up front instead of failing as a task):

* no NUL inside a string: it would end the string there;
* at most ``MAX_ARG_STRLEN`` bytes (32 pages, 131072 on x86-64) for one argument or
  environment string, its terminating NUL included;
* all of them together, with a pointer each, within a quarter of the stack limit, at most
  6 MiB and at least 32 pages (``arg_max``).
"""

from __future__ import annotations

import os
import resource
import shlex
from typing import Mapping

PAGE_SIZE = os.sysconf("SC_PAGESIZE")
MAX_ARG_STRLEN = 32 * PAGE_SIZE
TASK_VARIABLE = "PMLM_TASK"
# The longest line that fits in PMLM_TASK=LINE with its NUL.
MAX_LINE_BYTES = MAX_ARG_STRLEN - len(TASK_VARIABLE) - 2
POINTER = 8  # each string also costs its pointer in argv[] or envp[]
# Room kept for what pmlmd adds after the check: its PMLM_* variables, the agent channel's
# addresses, the gate's arguments (node.gate.gate) and the program's path. Together well under 2 KiB.
RESERVE = 4096


def text(data: bytes) -> str:
    """Bytes as pmlmd carries them: UTF-8 where they are UTF-8, U+DC80..U+DCFF for every other byte."""
    return data.decode("utf-8", "surrogateescape")


def raw(value: str) -> bytes:
    """The bytes that ``value`` carries (the inverse of ``text``).

    Raises UnicodeEncodeError for a surrogate outside U+DC80..U+DCFF, which stands for no byte.
    """
    return value.encode("utf-8", "surrogateescape")


def environment() -> dict[str, str]:
    """This process's environment as pmlmd carries it (os.environ decodes with the locale's encoding)."""
    return {text(name): text(value) for name, value in os.environb.items()}


def split(data: bytes, null: bool = False) -> list[tuple[int, bytes]]:
    """The tasks in a tasks file: (number, line) for every non-empty line, numbered from 1.

    A line is the bytes up to a newline (with ``null``: up to a NUL), or up to the end of the
    data for a last line without one. Nothing else ends a line and nothing is stripped: a
    carriage return, form feed or U+2028 is part of the line, as for xargs and GNU parallel.
    An empty line (two separators in a row) holds no task and is skipped.
    """
    parts = data.split(b"\0" if null else b"\n")
    return [(number, part) for number, part in enumerate(parts, 1) if part]


def appends(command: list[str], shell: bool, append: bool) -> bool:
    """Whether a task line is added as the last argument: with ``append``, when no word of the
    command (with ``shell``: nothing in the script) holds ``{}``, as GNU parallel does."""
    return append and not any("{}" in word for word in command)


def worker_argv(command: list[str], shell: bool, line: str | None, append: bool = False) -> list[str]:
    """The command for one task: ``{}`` replaced by the task line (shell-quoted with ``shell``).

    With ``append`` and no ``{}`` in the command, the line is added as the last argument
    instead (to the script, shell-quoted, with ``shell``). A task without a line (``-n N``)
    runs the command as it is.

    shlex.quote works on the surrogate-escaped text: a byte that is not UTF-8 is not a safe
    character, so such a line is single-quoted, and inside single quotes sh takes every byte
    (newlines, carriage returns, bytes over 0x7f) as it is.
    """
    last = line is not None and appends(command, shell, append)
    if shell:
        script = " ".join(command)
        if last:
            script = f"{script} {shlex.quote(line)}"
        elif line is not None:
            script = script.replace("{}", shlex.quote(line))
        return ["/bin/sh", "-c", script]
    if line is None:
        return list(command)
    if last:
        return [*command, line]
    return [arg.replace("{}", line) for arg in command]


def arg_max(stack: int | None = None) -> int:
    """How many bytes exec takes for all arguments and environment strings together (fs/exec.c):
    a quarter of the soft stack limit (``stack`` bytes, RLIM_INFINITY for none; default: this
    process's), at most 6 MiB, at least 32 pages."""
    soft = resource.getrlimit(resource.RLIMIT_STACK)[0] if stack is None else stack
    limit = 6 << 20
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft // 4)
    return max(limit, 32 * PAGE_SIZE)


def _brief(word: str) -> str:
    return repr(word) if len(word) <= 40 else repr(word[:40]) + "..."


class Fit:
    """Whether the exec of a worker can take a task line, for one command and environment.

    Only the sizes of the strings matter, and after ``{}`` is replaced each argument's size
    grows linearly with the size of what replaces it, so the sizes are worked out once per
    distinct replacement size: checking 100000 lines costs about as much as reading them.
    Strings must already be free of NUL and of surrogates that stand for no byte.
    """

    def __init__(self, command: list[str], shell: bool, env: Mapping[str, str], limit: int | None = None,
                 append: bool = False):
        self.command = command
        self.shell = shell
        words = [" ".join(command)] if shell else command
        fixed = [b"/bin/sh", b"-c"] if shell else []
        # (size in bytes, occurrences of {}) per word; "{}" is ASCII, so it is the same count in bytes.
        self.words = [(len(raw(w)), w.count("{}")) for w in words]
        # An appended line is sized as if the command ended in " {}" (the script) or a word "{}".
        self.appended = appends(command, shell, append)
        if self.appended and shell:
            self.words = [(self.words[0][0] + 3, 1)]
        elif self.appended:
            self.words.append((2, 1))
        self.fixed = sum(len(w) + 1 + POINTER for w in fixed)
        self.env_sizes = {name: len(raw(name)) + len(raw(value)) + 2
                          for name, value in env.items() if name != TASK_VARIABLE}  # pmlmd sets that one
        self.env_total = sum(size + POINTER for size in self.env_sizes.values()) + RESERVE
        self.limit = arg_max() if limit is None else limit
        self._by_size: dict[int, tuple[int, int, int]] = {}

    def _arguments(self, size: int) -> tuple[int, int, int]:
        """With ``{}`` replaced by ``size`` bytes: (index of the longest argument, its size, all of them)."""
        known = self._by_size.get(size)
        if known is None:
            longest, longest_at, total = -1, 0, self.fixed
            for index, (length, count) in enumerate(self.words):
                length += count * (size - 2)
                total += length + 1 + POINTER
                if length > longest:
                    longest, longest_at = length, index
            known = self._by_size[size] = (longest_at, longest, total)
        return known

    def _what(self, index: int) -> str:
        if self.shell:
            return "the /bin/sh -c script"
        if index >= len(self.command):
            return f"argument {index} of the command (the task line, appended)"
        return f"argument {index} of the command ({_brief(self.command[index])})"

    def base_problem(self) -> str | None:
        """Why the command and environment cannot be executed even without a task line, or None."""
        for index, (length, _) in enumerate(self.words):
            if length >= MAX_ARG_STRLEN:
                return (f"{self._what(index)} is {length} bytes, and Linux takes at most {MAX_ARG_STRLEN - 1} for "
                        f"one argument (MAX_ARG_STRLEN, {MAX_ARG_STRLEN} with its NUL)")
        for name, size in self.env_sizes.items():
            if size > MAX_ARG_STRLEN:
                return (f"the environment variable {_brief(name)} is {size - 1} bytes as NAME=VALUE, and Linux takes "
                        f"at most {MAX_ARG_STRLEN - 1} for one (MAX_ARG_STRLEN, {MAX_ARG_STRLEN} with its NUL)")
        return self._total_problem(self._arguments(2)[2], "")

    def problem(self, line: str) -> str | None:
        """Why a worker could not be started with ``line`` as its task, or None.

        Phrased to follow "LINE is too long (N bytes): ".
        """
        size = len(raw(line))
        if size > MAX_LINE_BYTES:
            return (f"a task line may have at most {MAX_LINE_BYTES} bytes, because it reaches the worker as "
                    f"{TASK_VARIABLE}=LINE and Linux takes at most {MAX_ARG_STRLEN} bytes for one environment string "
                    f"(MAX_ARG_STRLEN, its NUL included)")
        replaced = len(raw(shlex.quote(line))) if self.shell else size
        index, longest, total = self._arguments(replaced)
        if longest >= MAX_ARG_STRLEN:
            return (f"with it, {self._what(index)} would be {longest} bytes, and Linux takes at most "
                    f"{MAX_ARG_STRLEN - 1} for one argument (MAX_ARG_STRLEN, {MAX_ARG_STRLEN} with its NUL)")
        return self._total_problem(total + len(TASK_VARIABLE) + size + 2 + POINTER, "with it, ")

    def _total_problem(self, arguments: int, prefix: str) -> str | None:
        total = arguments + self.env_total
        if total <= self.limit:
            return None
        return (f"{prefix}the worker's arguments and environment would take {total} bytes, more than the "
                f"{self.limit} Linux takes for them together (a quarter of the stack limit, see ulimit -s; "
                f"{RESERVE} of them kept for pmlmd's own variables): shorten them, or unset variables the workers "
                f"do not need")
