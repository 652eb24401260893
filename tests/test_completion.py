"""The static bash completion for pmlmctl, run in a real bash with bash-completion loaded."""

import os
import subprocess
import sys
from pathlib import Path

import argparse

import pytest

from pmlmd.client.ctl import build_parser

SCRIPT = Path(__file__).parent.parent / "etc" / "bash_completion.d" / "pmlmctl"
FRAMEWORK = Path("/usr/share/bash-completion/bash_completion")


def complete(line: str, socket: str = "/nonexistent.sock") -> list[str]:
    """COMPREPLY for the command line ``line`` (the cursor at its end)."""
    if not FRAMEWORK.exists():
        pytest.fail("bash-completion is not installed (.ci/run installs it)")
    program = (f"source {FRAMEWORK}; source {SCRIPT}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; "
               f"read -ra COMP_WORDS <<< \"$COMP_LINE\"; [[ $COMP_LINE == *' ' ]] && COMP_WORDS+=(''); "
               "COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _pmlmctl; printf '%s\\n' \"${COMPREPLY[@]}\"")
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30,
                            env={"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "PMLM_SOCKET": socket,
                                 # the pmlmctl that lists batch ids is the tree under test, not an installed one
                                 "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    return [w for w in result.stdout.split("\n") if w]


def _subcommands() -> dict:
    from pmlmd.client.ctl import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_commands():
    # Every command of the parser, in its order: the completion is checked against the parser.
    assert complete("pmlmctl ") == [*_subcommands(), "--socket", "--version", "--help"]
    assert complete("pmlmctl su") == ["submit"]


@pytest.mark.parametrize("command", ["run", "submit", "status", "list", "events", "log", "wait", "enqueue"])
def test_every_option_of_a_command_is_completed(command):
    offered = set(complete(f"pmlmctl {command} --"))
    options = {flag for action in _subcommands()[command]._actions for flag in action.option_strings
               if flag.startswith("--")}  # the long names; short ones are their aliases
    assert options <= offered, sorted(options - offered)


def test_options_and_their_values():
    assert "--memfree-limit" in complete("pmlmctl run --")
    assert complete("pmlmctl run --victim ") == ["newest", "oldest", "largest"]
    assert "--priority" in complete("pmlmctl submit --")
    assert complete("pmlmctl events --f") == ["--follow"]


def test_batch_ids_come_from_the_daemon(daemon):
    daemon.ctl("submit", "--wait", "--", "true")
    assert complete("pmlmctl report ", socket=daemon.socket)[:1] == ["1"]
    assert complete(f"pmlmctl --socket {daemon.socket} cancel ")[:1] == ["1"]


def _options(parser) -> set[str]:
    """Its long options (the short ones are aliases of them)."""
    return {option for action in parser._actions if action.help != argparse.SUPPRESS
            for option in action.option_strings if option.startswith("--")}


def test_every_option_of_the_parser_is_completed():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert complete("pmlmctl ")[:len(commands.choices)] == list(commands.choices)
    for name, sub in commands.choices.items():
        offered = set(complete(f"pmlmctl {name} -"))
        missing = _options(sub) - offered
        assert not missing, f"pmlmctl {name}: {sorted(missing)} not completed"


def test_new_options_and_their_values():
    assert complete("pmlmctl run --halt ") == ["soon,fail=", "now,fail=", "never"]
    assert complete("pmlmctl retry --f") == ["--failed"]
    assert complete("pmlmctl run --term-mode a") == ["agent"]
    assert complete("pmlmctl events --kind se") == ["settled"]
