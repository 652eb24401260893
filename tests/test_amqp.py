"""Queue batches against a real RabbitMQ (tests/broker.py): many nodes, one queue.

Each "node" is a pmlmd of its own (its socket, its state directory) on this machine. Every task
leaves a marker: a line with its pid appended to a file named after its message, so a task that
ran twice shows as a file of two lines.
"""

from __future__ import annotations

import json
import re
import os
import signal
import time
from pathlib import Path

import pytest

from support import meminfo, wait_for

pytestmark = pytest.mark.slow

# A task: its marker, then (optionally) a little work. $PMLM_TASK is the message body.
MARK = 'echo $$ >> "$MARKS/$PMLM_TASK"'


def submit(daemon, broker, queue, *options, command=MARK + "; sleep 0.05", env=None):
    taken = daemon.ctl("submit", "--amqp", broker.url, "--queue", queue, *options, "--", "sh", "-c", command,
                       env={**os.environ, **(env or {})})
    assert taken.returncode == 0, taken.stderr
    return taken.stdout.strip()


def status(daemon, batch):
    taken = daemon.ctl("status", "--json", batch)
    assert taken.returncode == 0, taken.stderr
    return json.loads(taken.stdout)


def ended(daemon, batch) -> bool:
    return status(daemon, batch)["ended"] is not None


def marks(directory: Path) -> dict[str, int]:
    """Task -> how often it ran."""
    return {p.name: len(p.read_text().split()) for p in directory.iterdir()}


@pytest.fixture
def jobs(request) -> str:
    """A queue name of the test's own: the broker is shared by the module."""
    return "jobs-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:100]


@pytest.fixture
def marks_dir(tmp_path):
    d = tmp_path / "marks"
    d.mkdir()
    return d


def test_three_nodes_take_one_queue_and_run_each_task_exactly_once(broker, jobs, daemon_factory, marks_dir):
    broker.declare(jobs)
    broker.publish(jobs, [str(i) for i in range(300)])
    nodes = [daemon_factory().start() for _ in range(3)]
    env = {"MARKS": str(marks_dir)}
    batches = [submit(node, broker, jobs, "--until-empty", "-j", "4", env=env) for node in nodes]
    for node, batch in zip(nodes, batches):
        wait_for(lambda: ended(node, batch), timeout=120, what=f"the batch of {node.socket} to end")
    ran = marks(marks_dir)
    assert sorted(ran, key=int) == [str(i) for i in range(300)]
    assert set(ran.values()) == {1}, {task: n for task, n in ran.items() if n != 1}
    summaries = [status(node, batch) for node, batch in zip(nodes, batches)]
    acked = [s["intake"]["acked"] for s in summaries]
    assert sum(acked) == 300 and all(s["state"] == "finished" and s["exit_status"] == 0 for s in summaries)
    assert all(n > 0 for n in acked), acked  # every node took a share
    assert broker.count(jobs) == 0


def test_a_node_killed_mid_run_loses_nothing(broker, jobs, daemon_factory, marks_dir):
    """kill -9 of one pmlmd: the broker redelivers its unacked messages to the others. Its workers
    may still finish on their own, so those tasks may run twice: at-least-once, and the report of
    whoever ran a redelivered message says so."""
    broker.declare(jobs)
    broker.publish(jobs, [str(i) for i in range(60)])
    victim, *others = [daemon_factory().start() for _ in range(3)]
    env = {"MARKS": str(marks_dir)}
    slow = MARK + "; sleep 0.5"
    victim_batch = submit(victim, broker, jobs, "-j", "4", command=slow, env=env)
    wait_for(lambda: status(victim, victim_batch)["intake"]["in_flight"] >= 2, timeout=30,
             what="the first node to hold deliveries")
    in_flight = status(victim, victim_batch)["intake"]["in_flight"]
    victim.stop(signal.SIGKILL)
    batches = [submit(node, broker, jobs, "--until-empty", "-j", "4", command=slow, env=env) for node in others]
    for node, batch in zip(others, batches):
        wait_for(lambda: ended(node, batch), timeout=120, what="the other nodes to empty the queue")
    ran = marks(marks_dir)
    assert sorted(ran, key=int) == [str(i) for i in range(60)]  # nothing lost
    reports = [json.loads(node.ctl("report", batch).stdout) for node, batch in zip(others, batches)]
    redelivered = {t["task"] for r in reports for t in r["tasks"] if t["redelivered"]}
    twice = {task for task, n in ran.items() if n > 1}
    # What the killed node held came again, and each task that ran twice says so.
    assert redelivered and twice <= redelivered, (redelivered, twice, in_flight)
    # The killed pmlmd comes back: it ends what it had (the broker gave those out again) and takes on.
    victim.start()
    # Connected again: consuming, or taking nothing for now if the node is busy (a limit).
    wait_for(lambda: status(victim, victim_batch)["intake"]["state"] in ("consuming", "paused by a limit"),
             timeout=30, what="the restarted node to connect again")
    back = status(victim, victim_batch)
    assert back["counts"]["running"] == 0 and back["counts"]["returned"] >= 1, back
    # What it had taken before it was killed is in its state, message ids included.
    before = json.loads(victim.ctl("report", victim_batch).stdout)["tasks"]
    assert before and all(t["message_id"] for t in before)
    assert twice <= {t["task"] for t in before}  # only what it had taken ran twice
    assert all(t["settled"] == "acked" for t in before if t["status"] == "succeeded")
    assert victim.ctl("cancel", victim_batch).returncode == 0
    wait_for(lambda: ended(victim, victim_batch), timeout=30, what="the cancelled batch to end")
    assert status(victim, victim_batch)["state"] == "cancelled"


def test_a_node_with_little_headroom_takes_fewer_tasks(broker, jobs, daemon_factory, marks_dir):
    """The node whose memory limit leaves room for about one task holds about one delivery; the
    others take the rest. Each task holds 64 MiB for half a second."""
    broker.declare(jobs)
    broker.publish(jobs, [str(i) for i in range(30)])
    info = meminfo()
    # The tight node's limit: 150 MiB above today's free memory less the gap, so one 64 MiB task fits.
    limit_pct = 100.0 * (info["MemAvailable"] - (250 << 20)) / info["MemTotal"]
    roomy = daemon_factory().start()
    tight = daemon_factory(f'[limits]\nmemfree_limit = {limit_pct:.3f}\nmemory_gap = "100M"\nmin_free = "32M"\n'
                           "[batches]\nretries = 100\n").start()
    env = {"MARKS": str(marks_dir)}
    hog = MARK + f"; exec python3 {Path(__file__).parent / 'helpers' / 'hog.py'} 64 16 0.02 0.5"
    tight_batch = submit(tight, broker, jobs, "--until-empty", command=hog, env=env)
    roomy_batch = submit(roomy, broker, jobs, "--until-empty", "-j", "4", command=hog, env=env)
    for node, batch in ((roomy, roomy_batch), (tight, tight_batch)):
        wait_for(lambda: ended(node, batch), timeout=120, what="both nodes to empty the queue")
    acked = {name: status(node, batch)["intake"]["acked"] for name, node, batch in
             (("roomy", roomy, roomy_batch), ("tight", tight, tight_batch))}
    assert sum(acked.values()) == 30 and acked["tight"] * 2 < acked["roomy"], acked
    assert sorted(marks(marks_dir), key=int) == [str(i) for i in range(30)]


def test_a_task_that_never_fits_is_dead_lettered_with_its_cause(broker, jobs, pmlm, marks_dir):
    """pmlmctl run (no daemon): the governor terminates the big task; it goes back to the queue with
    its count in a header, runs again, and past --retries goes to the dead-letter exchange."""
    broker.declare(jobs)
    broker.declare_exchange("failed")
    broker.declare("failed-tasks")
    broker.bind("failed-tasks", "failed")
    broker.publish(jobs, ["small", "big"])
    info = meminfo()
    os.sync()
    limit_pct = 100.0 * (info["MemAvailable"] - (400 << 20)) / info["MemTotal"]
    hog = Path(__file__).parent / "helpers" / "hog.py"
    script = f'if [ "$PMLM_TASK" = big ]; then exec python3 {hog} 700 25 0.02 0.5; fi'
    run = pmlm("--amqp", broker.url, "--queue", jobs, "--until-empty", "--dead-letter", "failed", "--retries", "1",
               "--memfree-limit", f"{limit_pct:.3f}", "--memory-gap", "100M", "--min-free", "32M", "--json",
               "--", "sh", "-c", script)
    assert run.wait(timeout=120) == 1, run.stderr
    report = json.loads(run.stdout)
    by_status = {t["status"]: t for t in report["tasks"]}
    assert by_status["succeeded"]["task"] == "small" and by_status["succeeded"]["settled"] == "acked"
    assert by_status["returned"]["settled"] == "sent back"
    given_up = by_status["given-up"]
    assert given_up["task"] == "big" and given_up["settled"] == "dead-lettered" and given_up["redelivered"] is False
    [(body, props)] = broker.drain("failed-tasks")
    assert body == b"big"
    assert props.headers["x-pmlm-cause"] == "given-up" and props.headers["x-pmlm-terminations"] == 2
    assert "terminat" in props.headers["x-pmlm-reason"]
    assert broker.count(jobs) == 0


def test_intake_waits_out_a_broker_restart_and_loses_nothing(broker, jobs, daemon_factory, marks_dir):
    broker.declare(jobs)
    broker.publish(jobs, [str(i) for i in range(40)])
    node = daemon_factory().start()
    batch = submit(node, broker, jobs, "--until-empty", "-j", "2", command=MARK + "; sleep 0.3",
                   env={"MARKS": str(marks_dir)})
    wait_for(lambda: status(node, batch)["intake"]["acked"] >= 4, timeout=30, what="some tasks to be acked")
    broker.stop()
    wait_for(lambda: status(node, batch)["intake"]["state"] == "waiting for broker", timeout=60,
             what="the node to notice the broker is gone")
    assert node.proc.poll() is None
    broker.start()
    wait_for(lambda: ended(node, batch), timeout=120, what="the batch to finish after the broker came back")
    ran = marks(marks_dir)
    assert sorted(ran, key=int) == [str(i) for i in range(40)]
    # What ran while the broker was away could not be acked: those (at most -j 2 plus the ones held) ran twice.
    assert sum(n - 1 for n in ran.values()) <= 4, ran
    assert status(node, batch)["exit_status"] == 0


def test_results_go_to_reply_to_with_their_correlation_ids(broker, jobs, pmlm):
    broker.declare(jobs)
    broker.declare("results")
    for i in range(5):
        broker.publish(jobs, [str(i)], reply_to="results", correlation_id=f"req-{i}", message_id=f"msg-{i}")
    run = pmlm("--amqp", broker.url, "--queue", jobs, "--until-empty", "--", "sh", "-c", 'exit $((PMLM_TASK % 2))')
    assert run.wait(timeout=60) == 1, run.stderr
    results = {props.correlation_id: json.loads(body) for body, props in broker.drain("results")}
    assert set(results) == {f"req-{i}" for i in range(5)}
    for i in range(5):
        r = results[f"req-{i}"]
        assert r["task_id"] == f"msg-{i}" and r["exit_status"] == i % 2 and r["error"] is (i % 2 == 1)
        assert r["attempts"] == 1 and r["critical"] is False and r["node"] and r["duration_s"] >= 0
        assert r["cause"] == "exit" and r["status"] == ("failed" if i % 2 else "succeeded")
    assert broker.count(jobs) == 0


def test_an_unreachable_broker_is_waited_for_and_the_batch_can_be_cancelled(daemon_factory):
    node = daemon_factory().start()
    taken = node.ctl("submit", "--amqp", "amqp://guest:secret@127.0.0.1:1/%2F", "--queue", "jobs", "--", "true")
    assert taken.returncode == 0, taken.stderr
    batch = taken.stdout.strip()
    wait_for(lambda: status(node, batch)["intake"]["state"] == "waiting for broker", timeout=30,
             what="the intake to wait for the broker")
    shown = node.ctl("status", batch).stdout
    assert "waiting for broker: cannot connect to 127.0.0.1:1/%2F" in shown and "secret" not in shown
    assert "secret" not in node.logs()
    assert node.ctl("cancel", batch).returncode == 0
    wait_for(lambda: ended(node, batch), timeout=30, what="the cancelled batch to end")
    assert status(node, batch)["state"] == "cancelled"


def test_a_missing_queue_is_named(broker, jobs, daemon_factory):
    node = daemon_factory().start()
    batch = submit(node, broker, "no-such-queue", command="true")
    wait_for(lambda: "does not exist" in (status(node, batch)["intake"]["detail"] or ""), timeout=30,
             what="the intake to say the queue is missing")
    assert node.ctl("cancel", batch).returncode == 0
    wait_for(lambda: ended(node, batch), timeout=30, what="the cancelled batch to end")
    # Its tasks are the queue's: retry says where they went instead of running them from here.
    retried = node.ctl("retry", batch)
    assert retried.returncode == 2 and "took its tasks from queue 'no-such-queue'" in retried.stderr


@pytest.mark.parametrize("args, says", [
    (["--amqp", "amqp://u:p@localhost/"], "--amqp needs --queue NAME"),
    (["--queue", "jobs"], "--queue needs --amqp URL"),
    (["--amqp", "http://u:secret@localhost/", "--queue", "jobs"], "must start with amqp://"),
    (["--amqp", "amqp://u:p@localhost/", "--queue", "jobs", "-n", "3"], "not allowed with argument"),
])
def test_pmlmctl_refuses_a_queue_batch_that_cannot_work(pmlm, args, says):
    run = pmlm(*args, "--", "true")
    assert run.wait(timeout=30) == 2
    assert says in run.stderr and "Traceback" not in run.stderr and "secret" not in run.stderr


# --- what a careless or hostile queue holds, and a broker that will not --------------------------------------

def test_a_dead_letter_queue_that_refuses_gets_no_task_run_twice(broker, jobs, daemon_factory, marks_dir):
    """The dead-letter exchange routes to a full queue that rejects publishes: the failed task's
    message is rejected without requeue (not run again and again), and the other tasks go on."""
    broker.declare_exchange(f"{jobs}-dlx")
    broker.declare(f"{jobs}-full", **{"x-max-length": 1, "x-overflow": "reject-publish"})
    broker.bind(f"{jobs}-full", f"{jobs}-dlx")
    broker.publish(f"{jobs}-full", ["already there"])
    broker.declare(f"{jobs}-nowhere-dlx-queue")  # an exchange with no queue bound: routes nowhere
    broker.declare_exchange(f"{jobs}-empty")
    node = daemon_factory().start()
    for exchange in (f"{jobs}-dlx", f"{jobs}-empty"):
        broker.declare(jobs)
        broker.publish(jobs, ["fail-a", "ok-b", "ok-c"])
        batch = submit(node, broker, jobs, "--until-empty", "-j", "1", "--dead-letter", exchange,
                       command=MARK + '; case "$PMLM_TASK" in fail*) exit 1;; esac', env={"MARKS": str(marks_dir)})
        wait_for(lambda: ended(node, batch), timeout=60, what="the batch to end")
        s = status(node, batch)
        assert s["intake"]["rejected"] == 1 and s["intake"]["dead_lettered"] == 0 and s["intake"]["acked"] == 2, s
        tasks = {t["task"]: t for t in json.loads(node.ctl("report", batch).stdout)["tasks"]}
        assert tasks["fail-a"]["settled"] == "rejected" and tasks["ok-b"]["settled"] == "acked"
        assert marks(marks_dir)["fail-a"] == (1 if exchange.endswith("dlx") else 2)  # ran once per batch
        assert broker.count(jobs) == 0
    assert node.proc.poll() is None


def test_messages_that_cannot_be_task_lines_fail_unrun_and_survive_a_restart(broker, jobs, daemon_factory):
    broker.declare(jobs)
    broker.publish(jobs, [b"has\x00nul", b"x" * (3 << 20), b"fine"])
    node = daemon_factory().start()
    batch = submit(node, broker, jobs, "-j", "1", "--dead-letter", "amq.fanout", command="true")
    wait_for(lambda: status(node, batch)["intake"]["consumed"] == 3 and not status(node, batch)["intake"]["in_flight"],
             timeout=60, what="the three messages to be settled")
    tasks = json.loads(node.ctl("report", batch).stdout)["tasks"]
    bad = [t for t in tasks if t["status"] == "failed"]
    assert len(bad) == 2 and all(t["attempts"][0]["cause"] == "bad-message" and t["attempts"][0]["pid"] is None
                                 for t in bad)
    assert any("NUL" in t["attempts"][0]["reason"] for t in bad)
    big = next(t for t in bad if t["task"].startswith("xxx"))
    assert len(big["task"]) < 300 and f"({3 << 20} bytes)" in big["task"]  # not kept whole
    node.stop()
    node.start()
    again = status(node, batch)
    assert again["state"] in ("queued", "running") and again["counts"]["failed"] == 2, again
    assert again["intake"]["consumed"] == 3  # its figures come back with it
    assert node.ctl("cancel", batch).returncode == 0


def test_a_deleted_queue_is_noticed(broker, jobs, daemon_factory):
    broker.declare(jobs)
    node = daemon_factory().start()
    batch = submit(node, broker, jobs, command="true")
    wait_for(lambda: status(node, batch)["intake"]["state"] == "consuming", timeout=30, what="the intake to consume")
    with broker.connection() as conn:
        conn.channel().queue_delete(jobs)
    wait_for(lambda: status(node, batch)["intake"]["state"] == "refused by broker", timeout=30,
             what="the intake to notice")
    assert "cancelled the consumer" in status(node, batch)["intake"]["detail"] or \
        "does not exist" in status(node, batch)["intake"]["detail"]
    broker.declare(jobs)  # put right: it takes on
    broker.publish(jobs, ["1"])
    wait_for(lambda: status(node, batch)["intake"]["acked"] == 1, timeout=60, what="the queue to be consumed again")
    assert node.ctl("cancel", batch).returncode == 0


def test_wait_prints_a_running_queue_batch_s_output(broker, jobs, daemon_factory):
    broker.declare(jobs)
    broker.publish(jobs, [str(i) for i in range(5)])
    node = daemon_factory().start()
    taken = node.ctl("submit", "--wait", "--amqp", broker.url, "--queue", jobs, "--until-empty", "--", "sh", "-c",
                     'echo "out $PMLM_TASK"')
    assert taken.returncode == 0, taken.stderr
    assert sorted(taken.stdout.split("\n")[:5]) == [f"out {i}" for i in range(5)], taken.stdout


def test_a_restart_ends_a_worker_that_ignores_sigterm(broker, jobs, daemon_factory):
    broker.declare(jobs)
    broker.publish(jobs, ["stubborn"])
    node = daemon_factory("[batches]\nterm_grace = 1\n").start()
    batch = submit(node, broker, jobs, command="trap '' TERM; sleep 60")
    wait_for(lambda: status(node, batch)["counts"]["running"] == 1, timeout=30, what="the worker to start")
    [(pid, _)] = node.worker_pids()
    node.stop(signal.SIGKILL)
    node.start()
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
             timeout=30, what="the old worker to be ended (SIGKILL after the grace)")
    assert node.ctl("cancel", batch).returncode == 0


def test_a_broker_that_refuses_the_login_ends_pmlmctl_run_and_is_shown_by_the_daemon(broker, jobs, pmlm,
                                                                                      daemon_factory):
    broker.declare(jobs)
    wrong = broker.url.replace("guest:guest", "guest:wrong-secret")
    run = pmlm("--amqp", wrong, "--queue", jobs, "--until-empty", "--", "true")
    assert run.wait(timeout=60) == 3, run.stderr
    assert "refused the login of user 'guest'" in run.stderr and "wrong-secret" not in run.stderr
    node = daemon_factory().start()
    batch = submit(node, type("B", (), {"url": wrong})(), jobs, command="true")
    wait_for(lambda: status(node, batch)["intake"]["state"] == "refused by broker", timeout=30,
             what="the daemon to say the broker refused")
    assert "wrong-secret" not in node.ctl("status", batch).stdout + node.logs()
    assert node.ctl("cancel", batch).returncode == 0


@pytest.mark.parametrize("url, says", [
    ("amqp://pmlm:se/cretXYZ@127.0.0.1:5672/%2F", "must be %-encoded"),
    ("amqp://pmlm:x@[::1:5672/%2F", "Invalid IPv6 URL"),
])
def test_a_url_that_cannot_be_parsed_is_refused_without_its_secret(pmlm, url, says):
    run = pmlm("--amqp", url, "--queue", "jobs", "--", "true")
    assert run.wait(timeout=30) == 2
    assert says in run.stderr and "cretXYZ" not in run.stderr and "Traceback" not in run.stderr
