"""The live status line of pmlmctl run and submit --wait: it fits the terminal and output goes
above it. Its ETA: tests/test_progress.py."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios

import pytest

from pmlmd.client.ctl import STATUS_CLEAR, StatusLine, fit_status

PY = sys.executable

FULL = {"done": 12, "total": 100, "running": 4, "paused": 1, "queued": 83, "cpu_pct": 87.4, "free_pct": 61.2,
        "eta_s": 3724.2}  # shown rounded up: 1:02:05


class FakeTerminal(io.StringIO):
    encoding = "utf-8"


def drawn(stream: FakeTerminal) -> list[str]:
    """What each draw left on the row: the text after each clear."""
    return stream.getvalue().split(STATUS_CLEAR)[1:]


# --- fitting the terminal ----------------------------------------------------------------------
def test_a_wide_terminal_shows_every_part_in_order():
    out = FakeTerminal()
    StatusLine(out, columns=lambda: 200).draw(FULL)
    assert drawn(out) == ["12/100 done · 4 running · 1 paused · 83 queued · cpu 87% · free 61% · ETA 1:02:05"]


@pytest.mark.parametrize("columns", range(1, 120))
def test_the_line_is_never_as_wide_as_the_terminal(columns):
    out = FakeTerminal()
    StatusLine(out, columns=lambda: columns).draw(FULL)
    [line] = drawn(out)
    assert len(line) <= columns - 1
    assert "\n" not in out.getvalue()


ALL = "12/100 done · 4 running · 1 paused · 83 queued · cpu 87% · free 61% · ETA 1:02:05"  # 81 columns
NO_PAUSED = "12/100 done · 4 running · 83 queued · cpu 87% · free 61% · ETA 1:02:05"
NO_QUEUED = "12/100 done · 4 running · cpu 87% · free 61% · ETA 1:02:05"
NO_FREE = "12/100 done · 4 running · cpu 87% · ETA 1:02:05"
NO_CPU = "12/100 done · 4 running · ETA 1:02:05"
NO_RUNNING = "12/100 done · ETA 1:02:05"


@pytest.mark.parametrize("columns, expected", [
    (82, ALL),
    (81, NO_PAUSED),  # paused goes first
    (len(NO_PAUSED) + 1, NO_PAUSED),
    (len(NO_PAUSED), NO_QUEUED),  # then queued
    (len(NO_QUEUED), NO_FREE),  # then free
    (len(NO_FREE), NO_CPU),  # then cpu
    (len(NO_CPU), NO_RUNNING),  # then running; done and ETA stay longest
    (len(NO_RUNNING), "12/100 done"),
    (12, "12/100 done"),
    (8, "12/100 "),  # only now is a part cut
    (1, ""),
])
def test_narrower_terminals_drop_whole_parts_least_important_first(columns, expected):
    out = FakeTerminal()
    StatusLine(out, columns=lambda: columns).draw(FULL)
    assert drawn(out) == [expected]


def test_fit_status_keeps_the_order_of_what_stays():
    parts = [("a", 0), ("bbbb", 3), ("c", 1), ("dddd", 2)]
    assert fit_status(parts, 100, " ") == "a bbbb c dddd"
    assert fit_status(parts, 10, " ") == "a c dddd"
    assert fit_status(parts, 5, " ") == "a c"
    assert fit_status([], 5) == ""


def test_each_draw_reads_the_width_again():
    widths = iter([200, 30])
    out = FakeTerminal()
    line = StatusLine(out, columns=lambda: next(widths))
    line.draw(FULL)
    line.draw(FULL)
    wide, narrow = drawn(out)
    assert "paused" in wide and len(narrow) <= 29


def test_no_eta_before_a_task_has_finished():
    out = FakeTerminal()
    StatusLine(out, columns=lambda: 200).draw({**FULL, "done": 0, "eta_s": None})
    assert "ETA" not in drawn(out)[0]


def winsize(fd: int, rows: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def test_the_width_comes_from_the_streams_own_terminal():
    primary, secondary = os.openpty()
    try:
        with open(secondary, "w", encoding="utf-8", closefd=False) as stream:
            winsize(secondary, 24, 33)
            line = StatusLine(stream)
            assert line.columns() == 33
            winsize(secondary, 24, 120)  # the window was resized
            assert line.columns() == 120
            winsize(secondary, 0, 0)  # a terminal that does not know its size
            assert line.columns() > 0
    finally:
        os.close(primary)
        os.close(secondary)


# --- output above the line ---------------------------------------------------------------------
def read_available(fd: int) -> bytes:
    data = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def terminal():
    """A pty with its window set: (primary fd, a text stream on the secondary end)."""
    primary, secondary = os.openpty()
    attrs = termios.tcgetattr(secondary)
    attrs[1] &= ~termios.OPOST  # bytes as written, no \n -> \r\n: the sequence is compared exactly
    termios.tcsetattr(secondary, termios.TCSANOW, attrs)
    winsize(secondary, 24, 40)
    stream = open(secondary, "w", encoding="utf-8")
    yield primary, stream
    stream.close()
    os.close(primary)


def test_print_above_clears_writes_and_redraws(terminal):
    primary, stream = terminal
    line = StatusLine(stream)
    line.draw(FULL)
    status = read_available(primary).decode()
    assert status.startswith(STATUS_CLEAR) and len(status) - len(STATUS_CLEAR) <= 39
    other = os.dup(stream.fileno())  # another descriptor of the same terminal, as stdout would be
    try:
        line.print_above(other, b"hello from 0\nhello from 1\n")
    finally:
        os.close(other)
    assert read_available(primary).decode() == STATUS_CLEAR + "hello from 0\nhello from 1\n" + status


def test_print_above_to_the_status_stream_itself(terminal):
    primary, stream = terminal
    line = StatusLine(stream)
    line.draw(FULL)
    status = read_available(primary)
    line.print_above(stream, b"warning\n")
    assert read_available(primary) == STATUS_CLEAR.encode() + b"warning\n" + status


def test_print_above_ends_a_partial_line_so_the_status_cannot_erase_it(terminal):
    primary, stream = terminal
    line = StatusLine(stream)
    line.draw(FULL)
    status = read_available(primary)
    line.print_above(stream, b"no newline")
    assert read_available(primary) == STATUS_CLEAR.encode() + b"no newline\n" + status


def test_print_above_before_the_first_draw_and_after_the_clear_only_writes(terminal):
    primary, stream = terminal
    line = StatusLine(stream)
    line.print_above(stream, b"early\n")
    assert read_available(primary) == b"early\n"
    line.draw(FULL)
    line.clear()
    read_available(primary)
    line.print_above(stream, b"late\n")
    assert read_available(primary) == b"late\n"


def test_print_above_to_a_pipe_leaves_the_status_line_alone(terminal):
    primary, stream = terminal
    line = StatusLine(stream)
    line.draw(FULL)
    read_available(primary)
    r, w = os.pipe()
    try:
        with open(w, "w", encoding="utf-8") as piped:
            line.print_above(piped, b"to a file\n")
        assert os.read(r, 100) == b"to a file\n"
    finally:
        os.close(r)
    assert read_available(primary) == b""


def test_print_above_to_another_terminal_leaves_the_status_line_alone(terminal):
    primary, stream = terminal
    line = StatusLine(stream)
    line.draw(FULL)
    read_available(primary)
    other_primary, other_secondary = os.openpty()
    try:
        line.print_above(other_secondary, b"elsewhere\n")
        assert b"elsewhere" in read_available(other_primary)
    finally:
        os.close(other_primary)
        os.close(other_secondary)
    assert read_available(primary) == b""


def test_print_above_keeps_what_the_text_layer_held_first(terminal):
    primary, stream = terminal
    line = StatusLine(stream)
    stream.write("text first\n")  # not flushed: it must still come before the bytes
    line.print_above(stream, b"bytes after\n")
    assert read_available(primary) == b"text first\nbytes after\n"


# --- end to end: a real pty ------------------------------------------------------------------
class Screen:
    """Just enough of a terminal to see what stays visible: printable text with automatic
    wrap at the right margin, CR, LF, and erase to the end of the line (ESC [ K)."""

    def __init__(self, columns: int):
        self.columns = columns
        self.rows: list[list[str]] = [[]]
        self.wrapped: list[bool] = [False]  # the row continues the one above (automatic wrap)
        self.x = 0

    def _new_row(self, wrapped: bool) -> None:
        self.rows.append([])
        self.wrapped.append(wrapped)
        self.x = 0

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            ch = text[i]
            if text.startswith("\x1b[K", i):
                del self.rows[-1][self.x:]
                i += 3
                continue
            if ch == "\r":
                self.x = 0
            elif ch == "\n":
                self._new_row(False)
            elif ch >= " ":
                if self.x >= self.columns:
                    self._new_row(True)
                row = self.rows[-1]
                row.extend(" " * (self.x - len(row)))
                row[self.x:self.x + 1] = [ch]
                self.x += 1
            i += 1

    def lines(self) -> list[str]:
        """The visible lines, a wrapped line joined again."""
        lines: list[str] = []
        for row, wrapped in zip(self.rows, self.wrapped):
            text = "".join(row)
            if wrapped and lines:
                lines[-1] += text
            else:
                lines.append(text)
        return [line.rstrip() for line in lines]


def test_screen_model():
    screen = Screen(10)
    screen.feed("abc\r\x1b[Kxy\n0123456789ab\r\x1b[Kz\n")
    assert screen.lines() == ["xy", "0123456789z", ""]  # the erase reached the wrapped row only


STATUS = re.compile(r"\d+/\d+ done")


def run_on_a_pty(columns: int, args: list[str], stdout_on_the_pty: bool) -> bytes:
    """Run pmlmctl with its stderr (and maybe stdout) on a pty this many columns wide; all it wrote."""
    primary, secondary = os.openpty()
    winsize(secondary, 24, columns)
    proc = None
    try:
        proc = subprocess.Popen([PY, "-m", "pmlmd.client.ctl", *args], stdin=subprocess.DEVNULL,
                                stdout=secondary if stdout_on_the_pty else subprocess.DEVNULL, stderr=secondary,
                                start_new_session=True)
        os.close(secondary)
        secondary = None
        output = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: every writer has closed the other side
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=60) == 0, output
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if secondary is not None:
            os.close(secondary)
        os.close(primary)
    return output


def test_on_a_narrow_terminal_each_redraw_erases_the_last_and_nothing_is_left():
    columns = 24
    output = run_on_a_pty(columns, ["run", "-n", "4", "-j", "1", "--", "sleep", "0.3"], stdout_on_the_pty=False)
    draws = output.decode().split(STATUS_CLEAR)
    assert any(STATUS.search(d) for d in draws), "no status was drawn"
    assert all(len(d) <= columns - 1 for d in draws), draws
    # The ETA is among the last parts dropped; it shows once a task has finished, never before.
    assert not any("ETA" in d for d in draws if d.startswith("0/")), draws
    assert any("ETA" in d for d in draws if re.match(r"[123]/4 done", d)), draws
    screen = Screen(columns)
    screen.feed(output.decode())
    assert not any(screen.lines()), f"left on the screen: {screen.lines()}"


def test_worker_output_and_the_status_line_do_not_mix_on_a_narrow_terminal():
    columns = 30
    output = run_on_a_pty(columns, ["run", "-n", "3", "--", "sh", "-c", "echo hello from $PMLM_TASK_INDEX; sleep 0.3"],
                          stdout_on_the_pty=True)
    screen = Screen(columns)
    screen.feed(output.decode())
    lines = screen.lines()
    assert sorted(line for line in lines if "hello" in line) == [f"hello from {i}" for i in range(3)], lines
    assert not any(STATUS.search(line) for line in lines), f"a status line was left behind: {lines}"
    assert any(line.startswith("batch ") for line in lines), lines  # the summary


def test_submit_wait_on_a_narrow_terminal_leaves_nothing_behind_but_its_lines(daemon):
    columns = 24
    output = run_on_a_pty(columns, ["--socket", daemon.socket, "submit", "--wait", "-n", "4", "-j", "2", "--",
                                    "sleep", "0.3"], stdout_on_the_pty=False)
    draws = output.decode().split(STATUS_CLEAR)
    assert any(STATUS.search(d) for d in draws), "no status was drawn"
    assert all(len(d) <= columns - 1 for d in draws[1:]), draws  # draws[0]: "batch N submitted" before any
    screen = Screen(columns)
    screen.feed(output.decode())
    assert [line for line in screen.lines() if line] == [f"batch {draws[0].split()[1]} submitted"]
