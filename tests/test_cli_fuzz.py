"""No input a user can type makes pmlmctl print a Python traceback.

Hypothesis picks a command and options from pmlmctl's own parser and gives them hostile
values (huge and negative numbers, nan, text where numbers go, bytes that are not UTF-8,
empty strings). What parses runs for real: `run` starts `true`, the other commands talk to a
socket where no daemon listens. Every outcome is an exit status and lines for a person.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmlmd.client.ctl import build_parser

PY = sys.executable

HOSTILE = ["0", "-1", "1e400", "nan", "inf", "-inf", "99999999999999999999999999P", "10**400", "", " ", "1.5",
           "0x10", "1_000", "½", os.fsdecode(b"\xff\xfe"), "--", "-", "true", "1d", "9" * 400, "abc", "-5M", "-1e3",
           "\u0663", "\x1b[2J\n\u202e"]


def options_by_command() -> dict[str, list[argparse.Action]]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: [a for a in sub._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
            for name, sub in commands.choices.items()}


OPTIONS = options_by_command()


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(sorted(OPTIONS)))
    argv = [command]
    for action in draw(st.lists(st.sampled_from(OPTIONS[command]), max_size=4)):
        argv.append(action.option_strings[-1])
        if action.nargs != 0:
            argv.append(draw(st.sampled_from(HOSTILE)))
    if command in ("run", "submit"):
        argv += ["-n", "1", "--", "true"]
    elif draw(st.booleans()):
        argv.append(draw(st.sampled_from(HOSTILE)))
    return argv


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=command_lines())
def test_no_input_gives_a_traceback(tmp_path_factory, argv):
    socket = str(tmp_path_factory.mktemp("cli") / "none.sock")
    result = subprocess.run([PY, "-m", "pmlmd.client.ctl", "--socket", socket, *argv], capture_output=True, timeout=60,
                            stdin=subprocess.DEVNULL, cwd=tmp_path_factory.getbasetemp())
    stderr = result.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, (argv, stderr)
    assert result.returncode in (0, 1, 2, 3, 4), (argv, result.returncode, stderr)
