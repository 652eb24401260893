"""Usage errors: each names the problem and the fix, exits 2, and starts nothing."""

import subprocess
import sys

import pytest


def pmlmctl(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "pmlmd.client.ctl", *args], input=stdin, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("args,message", [
    (["run"], "missing command: give it after --"),
    (["run", "--"], "missing command"),
    (["run", "--", "no-such-command-pmlm"], "command not found: 'no-such-command-pmlm'"),
    (["run", "--", "/nonexistent/tool"], "cannot execute '/nonexistent/tool'"),
    (["run", "--bogus", "--", "true"], "unrecognized arguments: --bogus"),
    (["run", "-n", "0", "--", "true"], "--tasks must be between 1"),
    (["run", "-n", "2", "--tasks-file", "x", "--", "true"], "not allowed with argument"),
    (["run", "--cpu-limit", "150", "--", "true"], "--cpu-limit must be between 1 and 100"),
    (["run", "--memfree-limit", "lots", "--", "true"], "--memfree-limit must be a number"),
    (["run", "--memory-gap", "12X", "--", "true"], "use a number of bytes or a number with K, M, G or T"),
    # Negative-looking values are values, said to be out of range (or not a number) as -5 is.
    (["run", "--memory-gap", "-5M", "--", "true"], "--memory-gap must be between 0 and 1048576T, not '-5M'"),
    (["run", "--min-free", "-1.5G", "--", "true"], "--min-free must be between 0 and 1048576T, not '-1.5G'"),
    (["run", "--cpu-margin", "-1e3", "--", "true"], "--cpu-margin must be between 0 and 99, not '-1e3'"),
    (["run", "--timeout", "-5s", "--", "true"], "--timeout must be a number, not '-5s'"),
    # Digits of other scripts are no numbers here (int() and float() would read them).
    (["run", "-n", "\u0663", "--", "true"], "--tasks takes a number in ASCII digits (0-9), not '\u0663'"),
    (["run", "--memory-gap", "\u0663M", "--", "true"], "--memory-gap takes a number in ASCII digits (0-9)"),
    (["run", "--cpu-limit", "\uff15\uff10", "--", "true"], "--cpu-limit takes a number in ASCII digits (0-9)"),
    (["run", "--halt", "now,fail=\u0663", "--", "true"], "--halt fail= takes a count of failed tasks"),
    (["run", "--halt", "soon,fail=\u0663%", "--", "true"], "--halt fail= takes a share of the tasks"),
    (["log", "1", "\u0663"], "TASK takes a number in ASCII digits (0-9)"),
    (["run", "--victim", "random", "--", "true"], "invalid choice: 'random'"),
    (["run", "-j", "many", "--", "true"], "--max-workers must be a number"),
    (["run", "--tasks-file", "/nonexistent/tasks", "--", "true"], "cannot read tasks file '/nonexistent/tasks'"),
    (["run", "--report", "/nonexistent/dir/r.json", "--", "true"], "cannot write '/nonexistent/dir/r.json'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_usage_errors_exit_2_with_a_clear_message(args, message):
    result = pmlmctl(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stdout == ""


def test_empty_tasks_file_is_refused():
    result = pmlmctl("run", "--tasks-file", "-", "--", "echo", "{}", stdin="\n\n")
    assert result.returncode == 2
    assert "holds no tasks (one task per line)" in result.stderr


def test_help_documents_exit_statuses_and_limits():
    result = pmlmctl("run", "--help")
    assert result.returncode == 0
    for text in ("exit status:", "--memfree-limit", "--memory-gap", "--min-free", "--victim", "critical finish"):
        assert text in result.stdout


def test_version():
    result = pmlmctl("--version")
    assert result.returncode == 0 and result.stdout.startswith("pmlmctl ")


def test_negative_numbers_stay_values_beside_the_short_null_option():
    # -0 (--null) looks like a negative number to argparse; --priority -5 must still be a value.
    result = pmlmctl("--socket", "/nonexistent/ctl.sock", "submit", "--priority", "-5", "-0", "--tasks-file", "-",
                     "--", "echo", "{}", stdin="a\0")
    assert result.returncode == 4, result.stderr  # parsed, read, checked: only the daemon is missing


def test_the_commands_that_talk_to_the_daemon_load_no_engine_and_nothing_of_systemd(tmp_path):
    """pmlmctl status (and every command but run) needs the protocol and the client: not the engine,
    the sampler, process control, scopes, D-Bus or python-systemd, whose import costs time and
    which a client node need not have."""
    program = ("import sys, pmlmd.client.ctl\n"
               "code = pmlmd.client.ctl.main(['--socket', sys.argv[1], 'status'])\n"
               "heavy = ['pmlmd.engine', 'pmlmd.client.runner', 'pmlmd.node.sampler', 'pmlmd.node.procctl', 'pmlmd.node.scopes',\n"
               "         'pmlmd.node.systemd', 'pmlmd.broker.intake', 'jeepney', 'systemd', 'pika']\n"
               "print(sorted(m for m in heavy if m in sys.modules), code)\n")
    result = subprocess.run([sys.executable, "-c", program, str(tmp_path / "none.sock")], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout == "[] 4\n", result.stdout + result.stderr
