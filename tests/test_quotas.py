"""Quotas per user ([quotas] in pmlmd.toml): a batch that would take its user past one is refused
at submit (and at retry, which starts a batch too), with the quota, the value and the key named.

Real daemons, real users (made with useradd, see test_daemon_auth), real processes; every batch
a test starts is cancelled and waited for before the test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import zmq

from pmlmd.core import protocol

from support import Daemon, wait_for
from test_daemon_auth import SH_PATH, accounts, as_root, as_user, submitted, wait_event  # noqa: F401

SLEEPER = dict(command=["/bin/sleep", "30"], cwd="/tmp", env=SH_PATH)
LIMITS = "[limits]\ncpu_limit = 100\nmemfree_limit = 0\nmemory_gap = 0\nmin_free = 0\n"


def quota_daemon(accounts, quotas: str) -> Daemon:
    base = Path(tempfile.mkdtemp(prefix="pmlm-"))
    base.chmod(0o755)  # the test users must reach the socket inside
    return Daemon(base, f'[daemon]\ngroup = "{accounts.group}"\nsocket_mode = "0666"\n{LIMITS}[quotas]\n{quotas}')


@pytest.fixture
def quotas(accounts):
    """Start a daemon with the given [quotas] lines; at the end, cancel and wait for every batch."""
    made: list[Daemon] = []

    def start(text: str) -> Daemon:
        daemon = quota_daemon(accounts, text)
        made.append(daemon)
        return daemon.start()

    yield start
    for daemon in made:
        try:
            if daemon.proc.poll() is None:
                for summary in as_root(daemon, "status")["batches"]:
                    as_root(daemon, "cancel", batch=summary["batch"])
                    wait_event(daemon, summary["batch"], "finished")
        finally:
            daemon.cleanup()
            shutil.rmtree(daemon.base, ignore_errors=True)


def as_root_raw(daemon: Daemon, request_name: str, **args) -> dict:
    """One request as root (this process), the whole reply: {"ok": ..., "result" or "error"}."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect("ipc://" + daemon.socket)
        sock.send(protocol.encode_request(request_name, request_id="root", **args))
        assert sock.poll(10_000), f"pmlmd did not answer {request_name}"
        return protocol.decode_reply(sock.recv())
    finally:
        sock.close()
        ctx.term()


def assert_quota(reply: dict, *fragments: str) -> None:
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == protocol.QUOTA_EXCEEDED, reply
    for fragment in fragments:
        assert fragment in reply["error"]["message"], reply


def test_tasks_queued_counts_a_users_active_batches_and_no_one_elses(quotas, accounts):
    daemon = quotas("tasks_queued = 10\n")
    uid = accounts.uid(accounts.a)
    first = submitted(as_user(daemon, accounts.a, "submit", tasks=6, **SLEEPER))
    refused = as_user(daemon, accounts.a, "submit", tasks=5, **SLEEPER)
    assert_quota(refused, f"submit: uid {uid} would have 11 tasks queued, more than quotas.tasks_queued = 10 in "
                          f"{daemon.config_path} (")
    submitted(as_user(daemon, accounts.a, "submit", tasks=4, **SLEEPER))  # exactly the quota
    assert_quota(as_user(daemon, accounts.a, "submit", tasks=1, **SLEEPER), "would have 11 tasks queued")
    # Another user has a quota of their own; root is exempt by default.
    submitted(as_user(daemon, accounts.b, "submit", tasks=10, **SLEEPER))
    submitted(as_root_raw(daemon, "submit", tasks=50, **SLEEPER))
    # A batch that has ended counts no more.
    as_root(daemon, "cancel", batch=first)
    wait_event(daemon, first, "finished")
    submitted(as_user(daemon, accounts.a, "submit", tasks=6, **SLEEPER))


def test_a_single_batch_larger_than_the_quota_is_refused(quotas, accounts):
    daemon = quotas("tasks_queued = 100\n")
    lines = [str(i) for i in range(101)]
    refused = as_user(daemon, accounts.a, "submit", command=["/bin/true"], task_lines=lines, cwd="/tmp",
                      env=SH_PATH)
    assert_quota(refused, "would have 101 tasks queued", "quotas.tasks_queued = 100")


def test_batches_active_caps_a_users_batches(quotas, accounts):
    daemon = quotas("batches_active = 2\n")
    uid = accounts.uid(accounts.a)
    for _ in range(2):
        submitted(as_user(daemon, accounts.a, "submit", **SLEEPER))
    refused = as_user(daemon, accounts.a, "submit", **SLEEPER)
    assert_quota(refused, f"submit: uid {uid} would have 3 active batches, more than quotas.batches_active = 2 "
                          f"in {daemon.config_path} (wait for one to finish")
    submitted(as_user(daemon, accounts.b, "submit", **SLEEPER))


def test_min_interval_is_a_floor_for_what_a_batch_asks(quotas, accounts):
    daemon = quotas("")  # the default floor, 0.1 s
    uid = accounts.uid(accounts.a)
    refused = as_user(daemon, accounts.a, "submit", interval=0.01, **SLEEPER)
    assert_quota(refused, f"submit: uid {uid} asked for an interval of 0.01 s, shorter than quotas.min_interval = "
                          f"0.1 in {daemon.config_path} (ask for --interval 0.1 or more")
    submitted(as_user(daemon, accounts.a, "submit", interval=0.1, **SLEEPER))
    submitted(as_user(daemon, accounts.a, "submit", **SLEEPER))  # the daemon's own interval
    submitted(as_root_raw(daemon, "submit", interval=0.01, **SLEEPER))  # root_exempt


def test_retry_is_held_to_the_quotas_too(quotas, accounts):
    daemon = quotas("tasks_queued = 10\n")
    uid = accounts.uid(accounts.a)
    failing = submitted(as_user(daemon, accounts.a, "submit", command=["/bin/false"], tasks=6, cwd="/tmp",
                                env=SH_PATH))
    wait_event(daemon, failing, "finished")
    submitted(as_user(daemon, accounts.a, "submit", tasks=5, **SLEEPER))
    refused = as_user(daemon, accounts.a, "retry", batch=failing)
    assert_quota(refused, f"retry: uid {uid} would have 11 tasks queued, more than quotas.tasks_queued = 10")


def test_without_root_exempt_root_is_held_to_the_quotas_and_pmlmctl_exits_1(quotas, accounts):
    daemon = quotas("root_exempt = false\nbatches_active = 1\n")
    result = daemon.ctl("submit", "--interval", "0.05", "--", "true")
    assert result.returncode == 1, result
    assert "uid 0 asked for an interval of 0.05 s, shorter than quotas.min_interval = 0.1" in result.stderr
    submitted(as_root_raw(daemon, "submit", **SLEEPER))
    assert_quota(as_root_raw(daemon, "submit", **SLEEPER), "uid 0 would have 2 active batches")


def test_a_users_finished_batches_past_state_bytes_are_pruned_oldest_first(daemon_factory, tmp_path):
    daemon = daemon_factory('[quotas]\nstate_bytes = "1M"\nroot_exempt = false\n').start()
    lines = tmp_path / "lines"
    lines.write_text("".join(f"{i:01500d}\n" for i in range(200)))  # 300 KB in the submission and the report
    batches = []
    for _ in range(3):
        result = daemon.ctl("submit", "--wait", "--tasks-file", str(lines), "-j", "8", "--", "echo")
        assert result.returncode == 0, result.stderr
        batches.append(result.stderr.split()[1])
    # Each batch takes about 0.7 MB of the state: only the newest fits in 1M; the older ones go
    # before prune_after, with their output, and the log says why.
    wait_for(lambda: [b["batch"] for b in json.loads(daemon.ctl("list", "--json").stdout)] == batches[-1:],
             timeout=30, what="the oldest batches pruned")
    output = Path(daemon.state_dir) / "output"
    assert not (output / batches[0]).exists() and (output / batches[-1] / "0.out").exists()
    assert "more of the state than quotas.state_bytes" in daemon.logs()


def test_a_request_larger_than_request_bytes_is_refused_naming_the_key(daemon_factory, tmp_path):
    daemon = daemon_factory('[quotas]\nrequest_bytes = "64K"\nroot_exempt = false\n').start()
    lines = tmp_path / "lines"
    lines.write_text("".join(f"{i:0100d}\n" for i in range(1000)))  # 100 KB of task lines
    refused = daemon.ctl("submit", "--tasks-file", str(lines), "--", "true")
    assert refused.returncode == 1
    assert "more than quotas.request_bytes = 65536" in refused.stderr, refused.stderr
    assert json.loads(daemon.ctl("list", "--json").stdout) == []
    assert daemon.ctl("submit", "-n", "2", "--", "true").returncode == 0  # a small one goes


def test_a_users_output_past_output_bytes_prunes_their_oldest_batches(daemon_factory):
    daemon = daemon_factory('[quotas]\noutput_bytes = "1M"\nroot_exempt = false\n').start()
    batches = []
    for _ in range(3):  # each keeps 600 KB of output
        result = daemon.ctl("submit", "--wait", "--", "head", "-c", "600000", "/dev/zero")
        assert result.returncode == 0, result.stderr
        batches.append(result.stderr.split()[1])
    wait_for(lambda: [b["batch"] for b in json.loads(daemon.ctl("list", "--json").stdout)] == batches[-1:],
             timeout=30, what="the oldest batches pruned")
    output = Path(daemon.state_dir) / "output"
    assert sorted(os.listdir(output)) == batches[-1:]
    # Counted again at a restart, from what is on disk.
    assert daemon.stop() == 0
    daemon.start()
    assert [b["batch"] for b in json.loads(daemon.ctl("list", "--json").stdout)] == batches[-1:]
