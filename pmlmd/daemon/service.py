"""pmlmd: the long-running service.

One event loop (an epoll set, node.loop.Loop) serves the control socket, watches every worker's
pidfd and runs the node-wide governor; no thread per worker. Batches are durable in
SQLite before a submit is answered, and a restarted daemon adopts the workers an
earlier one left running.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import grp
import json
import logging
import math
import os
import pwd
import resource
import signal
import socket
import sys
import time

import zmq

from .. import __version__

from ..node import cgroup, loginlimits, procctl, scopes, workdir

from ..core import events, protocol, replies, tasklines
from ..node.agentchannel import AgentChannels
from ..core.batch import (CANCELLED, CAUSE_DAEMON_RESTART, FAILED, FINISHED, GIVEN_UP, REPORT_VERSION, RETURNED, SUCCEEDED,
                    Batch, BatchSpec, Blank, IntakeSpec, iso)
from .config import AT_START, DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from ..engine import BatchRun, Engine
from ..node.gate import ULIMIT_FLAGS
from ..node.loop import Loop
from ..node.output import TaskFiles
from ..node.joblog import Joblog
from ..node.peerlimit import PeerLimit
from ..core.governor import HELD, PAUSED, RUNNING, free_bytes
from ..core.options import LIMIT_OPTIONS, tighten
from .store import Store, StoreError, StoredBatch, Unwritable, looks_like_report
from ..core.summary import STATE_FAILED, BatchSummary, IntakeStatus, summarize
from ..core.units import format_size
from ..node.systemd import Notifier, setup_logging
from .outbox import Outboxes

log = logging.getLogger("pmlmd.daemon")

HOUSEKEEPING = 1.0  # seconds between STATUS= updates and prune checks
HOUSEKEEPING_IDLE = 5.0  # the same with nothing to govern (and at least twice per watchdog period)
HOUSEKEEPING_SLACK = 0.5  # seconds housekeeping may wait for the next governor step (see serve)
FRESH_SAMPLE = 1.0  # seconds: an idle daemon samples the node for status when its last sample is older
GROUPS_TTL = 1.0  # seconds a user's groups, once read from the group database, are used before it is read again
# Connections one user (not root) may hold to the control socket: each pmlmctl holds one while it
# runs, `events --follow` and `submit --wait` for as long as they follow.
CONNECTIONS_PER_USER = 64
# Requests taken from the control socket per loop turn, so that a flood of them never holds up
# the governor; the socket queues the rest fairly (round-robin per connection).
REQUESTS_PER_TURN = 32
# ... and at most this long (seconds), and none once the governor's next sample or deadline is
# due: a burst of cheap reads waits for the next turn rather than delay a pause or a kill.
REQUEST_BUDGET = 0.005
RECENT_EVENTS = 2000  # events kept for ``pmlmctl events`` without --follow
# Bytes of task output one ``log`` reply carries at most: a reply is built within the loop's
# turn and a big log is read in several requests, so no reader holds up the governor.
LOG_REPLY_BYTES = 256 << 10
# Seconds per loop turn spent on replies built a slice at a time (a big batch's report).
JOB_BUDGET = 0.005
SD_LISTEN_FDS_START = 3


class DaemonError(Exception):
    """pmlmd cannot start; the message says why and what to do."""


class Denied(Exception):
    pass


class Unrestorable(Exception):
    """A stored batch that cannot be run again; the message says why, for its report and the log."""


def inherited_socket_fd() -> int | None:
    """The listening socket systemd passed (socket activation), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    return SD_LISTEN_FDS_START


def bind_control_socket(ctx: zmq.Context, config: Config, group_gid: int | None) -> zmq.Socket:
    path = config.socket
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished client raises instead of silently queueing
    sock.setsockopt(zmq.LINGER, 0)
    # Requests up to 4x the limit get a "too-large" reply; beyond that libzmq drops the peer.
    sock.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_MESSAGE_BYTES)
    fd = inherited_socket_fd()
    if fd is not None:
        sock.setsockopt(zmq.USE_FD, fd)
    else:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise DaemonError(f"another pmlmd already listens on {path}: stop it first, or give this one "
                                  "another --socket")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # left behind by a daemon that died
            finally:
                probe.close()
    try:
        sock.bind("ipc://" + path)
    except zmq.ZMQError as e:
        raise DaemonError(f"cannot bind the control socket {path}: {e}; check --socket (socket in pmlmd.toml) "
                          "and that its directory is writable") from e
    if fd is None:
        os.chmod(path, config.socket_mode)
        if group_gid is not None and os.geteuid() == 0:
            os.chown(path, -1, group_gid)
    return sock


def agent_socket_path(config: Config) -> str:
    """The agent channel's socket: as configured, or beside a control socket moved elsewhere.

    Two daemons with their own control sockets (a test, a user's private pmlmd) must not
    share, or unlink, each other's agent sockets.
    """
    if config.agent_socket != Config.agent_socket or config.socket == Config.socket:
        return config.agent_socket
    return os.path.splitext(config.socket)[0] + "-agent.sock"


def agent_directory(config: Config) -> str:
    """Where each owner's agent sockets live: ``agent_socket`` without ``.sock``, plus ``.d``.

    /run/pmlmd/agent.sock (the default) gives /run/pmlmd/agent.d/UID.sock and UID-ack.sock.
    """
    return os.path.splitext(agent_socket_path(config))[0] + ".d"


def peer_credentials(frame: zmq.Frame) -> tuple[int, int, int] | None:
    """(uid, gid, pid) of the client, from the kernel's SO_PEERCRED as libzmq reports it."""
    try:
        _, uid, gid, pid = frame.get("Peer-Address").rsplit(":", 3)
        return int(uid), int(gid), int(pid)
    except (zmq.ZMQError, ValueError):
        return None


def user_groups(uid: int, gid: int) -> list[int]:
    try:
        return sorted(set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)))
    except KeyError:  # a uid with no passwd entry has only its primary group
        return [gid]


def current_credentials(submitted: procctl.Credentials) -> procctl.Credentials:
    """A batch owner's credentials as the passwd and group databases give them now.

    Workers get the groups their user has when they start, not those of submit time: a
    group taken from the user is not handed to their later workers. The gid stays the
    one of submit (the client's, perhaps from newgrp or sg) while the user still has that
    group, else it is the passwd entry's. A uid with no passwd entry cannot be looked up
    by name: what was stored at submit is all there is.
    """
    try:
        entry = pwd.getpwuid(submitted.uid)
    except KeyError:
        return submitted
    groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    gid = submitted.gid if submitted.gid in groups else entry.pw_gid
    return procctl.Credentials(submitted.uid, gid, tuple(sorted(groups)))


def keep_descriptors_from_workers() -> None:
    """Mark every descriptor pmlmd was started with, but 0-2, close-on-exec.

    Workers are started with posix_spawn, which closes only those: without this a worker would
    inherit what pmlmd inherited, the control socket systemd passes in (LISTEN_FDS) first of all,
    on which it could accept other users' requests."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # closed meanwhile (the directory's own descriptor)


def take_login_groups() -> None:
    """pmlmd's own user's supplementary groups, as a login gives them (its service manager starts
    it with none): a batch of pmlmd's own user then has exactly pmlmd's credentials, and its
    workers start without a change of ids (procctl.spawn)."""
    if os.geteuid() == 0:
        try:
            os.setgroups(user_groups(0, os.getegid()))
        except OSError as e:
            log.warning("cannot take root's groups (%s): root's workers start through setpriv", e.strerror)


def _account(user: str) -> pwd.struct_passwd:
    """submit's --user: a user name, else a number that is a uid (as chown(1) takes them: a name
    first). Raises ProtocolError (bad-field) when it is neither."""
    try:
        return pwd.getpwnam(user)
    except KeyError:
        pass
    except (ValueError, UnicodeError):  # a NUL in it, or text that is no name
        raise protocol.ProtocolError(protocol.BAD_FIELD, f"submit: {user[:64]!r} is no user name or uid") from None
    if user.isascii() and user.isdigit() and len(user) <= 20:
        try:
            return pwd.getpwuid(int(user))
        except (KeyError, OverflowError):
            pass
    raise protocol.ProtocolError(protocol.BAD_FIELD, f"submit: no such user {user[:64]!r} (a user name or a uid)")


class Daemon:
    def __init__(self, config_path: str | None, overrides: dict):
        keep_descriptors_from_workers()
        take_login_groups()
        self.config_path = config_path
        self.overrides = overrides
        self.config = load_config(config_path, overrides)
        self.log_backend = setup_logging(self.config.log_target, self.config.log_level)
        self.fd_limits = raise_fd_limit()
        # The most a worker can get: its gate lowers limits as its user and cannot raise them.
        self.own_rlimits = {resource_id: resource.getrlimit(resource_id) for resource_id in ULIMIT_FLAGS}
        self.own_rlimits[resource.RLIMIT_NOFILE] = self.fd_limits  # not the one pmlmd raised for itself
        self.login_limits = loginlimits.LoginLimits(self.config.limits_conf_dir)
        self.notifier = Notifier()
        self.group_gid = self._group_gid(self.config.group)
        self.store = Store(self.config.state_dir)
        self.cpus = os.cpu_count() or 1
        self.loop = Loop(on_error=lambda e: log.exception("internal error, pmlmd goes on: %s", e))
        try:
            self.scopes = scopes.choose(self.config.scope_backend, scopes.CgroupLimits.of(self.config))
        except OSError as e:
            raise DaemonError(f"{e}; set scope_backend = \"auto\" or \"none\" in pmlmd.toml") from e
        self.output = TaskFiles(os.path.join(self.config.state_dir, "output"), self.config.output_limit,
                                forward=self._journal_forward())
        self.cgroups = worker_cgroups(self.config, self.scopes)
        self.output_mark: int | None = None  # the workers' CPU when their output was last checked
        self.governor_due = math.inf  # the engine's next sample or deadline, as of this loop turn
        # Workers get the descriptor limit pmlmd was started with, not the one it raised for itself.
        self.engine = Engine(self.config.limits(self.cpus), self.loop, critical_finish=False,
                             on_event=self._on_event, scopes=self.scopes,
                             worker_rlimits={resource.RLIMIT_NOFILE: self.fd_limits}, subreaper=True,
                             output=self.output, cgroups=self.cgroups)
        self.joblogs: dict[str, Joblog] = {}  # batch id -> its --joblog, opened as its owner
        self.jobs: collections.deque = collections.deque()  # replies built over several turns (ReportJob...)
        # Batches that finished while the state could not be written: served from memory until it is.
        self.unsaved: dict[str, BatchRun] = {}
        self.finishing: set[str] = set()  # batches whose FinishJob has not stored them yet
        # Finished batch -> (owner uid, bytes of the state it takes), oldest first: measured once each,
        # all at start (_restore), then each as it is stored finished (``unmeasured``).
        self.state_sizes: dict[str, tuple[int, int]] = {}
        self.unmeasured: list[str] = []
        self.quota_check_due = True  # at start, and whenever a batch's size is known
        self.ctx = zmq.Context()
        self.sock = bind_control_socket(self.ctx, self.config, self.group_gid)
        self.loop.watch(self.sock, self._on_request)
        self.peers = PeerLimit(self.sock, lambda uid: None if uid == 0 else CONNECTIONS_PER_USER, "control socket")
        self.loop.watch(self.peers.monitor, self.peers.read)
        try:
            self.engine.agent = AgentChannels(self.ctx, agent_directory(self.config), self.engine.on_agent_ack,
                                              self.loop)
        except OSError as e:
            raise DaemonError(f"cannot set up the agent channel: {e}") from e
        self.recent = collections.deque(maxlen=RECENT_EVENTS)
        # (client, request id) -> what it follows: a batch id or None (every batch), and the kinds of
        # event it asked for or None (every kind)
        self.followers: dict[tuple[bytes, object], tuple[str | None, frozenset[str] | None]] = {}
        # What a client does not read at once waits for it there (events bounded, replies kept).
        self.outboxes = Outboxes(self.sock, on_gone=self._client_gone)
        self.asked: dict[str, dict] = {}  # batch id -> the limits it asked for, to re-apply on reload
        # batch id -> (its owner as submitted, whether root submitted it for them with --user)
        self.owners: dict[str, tuple[procctl.Credentials, bool]] = {}
        # cache: until when, the owner's credentials now, and their login limits now
        self.identities: dict[procctl.Credentials, tuple[float, procctl.Credentials, dict | None]] = {}
        self.carried: dict[str, dict[int, tuple[int, int]] | None] = {}  # batch id -> its submitter's limits
        self.limits_basis: dict[str, tuple] = {}  # batch id -> the identities entry its workers' limits come from
        self.stopping = False
        self.started = time.monotonic()
        self.next_housekeeping = 0.0
        self.housekeeping_at = 0.0  # monotonic: when housekeeping last ran

    @staticmethod
    def _group_gid(name: str) -> int | None:
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            log.warning("group %r does not exist: only root may submit batches (create it with "
                        "'groupadd --system %s')", name, name)
            return None

    # --- the loop ------------------------------------------------------------------------
    def serve(self) -> int:
        self.loop.handle_signals((signal.SIGTERM, signal.SIGINT, signal.SIGHUP), self._on_signal)
        self._restore()
        log.info("pmlmd %s ready on %s (state %s, workers in %s, notify via %s)", __version__, self.config.socket,
                 self.store.path, self._containment(), self.notifier.backend)
        self.notifier.ready(self._status_line())
        watchdog = self.notifier.watchdog_interval()
        self.store.grouping = True  # flushed at the points of the loop below
        slack = HOUSEKEEPING_SLACK if watchdog is None else min(HOUSEKEEPING_SLACK, watchdog / 2)
        try:
            while not self.stopping:
                self.governor_due = self.engine.next_deadline()  # requests are served up to it (_on_request)
                # Housekeeping rides along with a governor step due within ``slack`` after it: a
                # wake-up of its own costs about what the work does (a sleeping daemon's caches are
                # cold). Within half the watchdog's period, so that its ping is never late.
                housekeeping = self.next_housekeeping
                if self.governor_due <= housekeeping + slack:
                    housekeeping = self.governor_due
                deadline = min(self.governor_due, housekeeping, self.outboxes.next_retry())
                self.loop.poll(0 if self.jobs else deadline - time.monotonic())
                # The turn's ended attempts are written in one transaction (Store.grouping), and
                # before the events about them reach any client.
                self.store.flush()
                self.outboxes.flush()
                self._refresh_owners()  # workers start only in tick(), with what this finds
                self.engine.tick()
                self.store.flush()
                self._run_jobs()
                # Quiet (nothing to govern, or every worker still): housekeeping every HOUSEKEEPING_IDLE,
                # as nothing is sampled and a still worker writes no output; else the usual pace, at once.
                quiet = self.engine.idle() or self.engine.still
                if not quiet:
                    self.next_housekeeping = min(self.next_housekeeping, self.housekeeping_at + HOUSEKEEPING)
                if time.monotonic() >= self.next_housekeeping:
                    self._housekeeping()
                    every = HOUSEKEEPING_IDLE if quiet and not self.jobs else HOUSEKEEPING
                    self.next_housekeeping = time.monotonic() + min(every, watchdog or every)
        finally:
            self._shutdown()
        return 0

    def _housekeeping(self) -> None:
        self.housekeeping_at = time.monotonic()
        self.notifier.status(self._status_line())
        self.notifier.watchdog()
        self.engine.agent.close_idle()
        self.engine.reap_orphans()
        mark = self.engine.cpu_mark()
        if mark is None or mark != self.output_mark:  # output grows only while a worker runs
            self.output.enforce()
        self.output_mark = mark
        self.store.retry()  # what a full disk kept from the state, written once there is space
        if self.unmeasured or self.quota_check_due:
            self._prune_over_quota()
        for batch_id in [b for b in self.unsaved if ("finish", b) not in self.store.pending
                         and b not in self.finishing]:
            del self.unsaved[batch_id]  # written: the state answers for it again
        self.store.backup()
        pruned = self.store.prune(time.time() - self.config.prune_after)
        if pruned:
            log.info("pruned %d finished batches older than %gs", pruned, self.config.prune_after)
            self._forget_pruned()

    def _forget_pruned(self) -> None:
        """After a prune: the output and the sizes of batches the state no longer holds go too."""
        kept = self.store.batch_ids()
        self.output.keep_only(kept)
        self.state_sizes = {b: size for b, size in self.state_sizes.items() if b in kept}

    def _journal_forward(self):
        """With output_journal: a function that sends one line of a task's output to the journal."""
        if not self.config.output_journal:
            return None
        try:
            from systemd import journal
        except ImportError:
            log.warning("output_journal is set, but python3-systemd is missing: task output stays in the "
                        "state directory only")
            return None

        def forward(batch_id: str, index: int, stream: str, line: bytes) -> None:
            # sendv: the line's bytes as they are (journal.send takes text only).
            journal.sendv(b"MESSAGE=" + line, f"PRIORITY={6 if stream == 'stdout' else 4}", f"BATCH_ID={batch_id}",
                          f"TASK_INDEX={index}", f"STREAM={stream}", f"SYSLOG_IDENTIFIER=pmlm-batch-{batch_id}")
        return forward

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self._reload()
        else:
            queues = sum(1 for run in self.engine.runs.values() if run.batch.spec.open_ended)
            log.info("%s: stopping; workers keep running and are adopted at the next start%s",
                     signal.Signals(signum).name,
                     f" (those of the {queues} queue batches are ended then: the broker gives their messages out "
                     "again when pmlmd's connection closes)" if queues else "")
            self.stopping = True

    def _shutdown(self) -> None:
        self.notifier.stopping()
        for job in self.jobs:
            if isinstance(job, FinishJob):  # a batch that ended is stored before pmlmd goes
                while job.step(float("inf")) is None:
                    pass
            elif hasattr(job, "close"):  # replies still being built: their readers of the database end here
                job.close()
        # Workers waiting at their gates for a scope systemd is making get it (or run where
        # they are), rather than ending at their gates with pmlmd.
        try:
            self.scopes.close()
        except Exception:  # what the answers asked for must not keep the workers from being let go
            log.exception("internal error while settling the calls to systemd, pmlmd goes on stopping")
        # Nothing may stay stopped while no pmlmd watches it (the next pmlmd also tells every
        # adopted agent-mode worker to go on, in case this request does not reach it).
        for w in self.engine.workers.values():
            self.engine.let_go(w)
            os.close(w.child.pidfd)
        self.engine.close()  # and no worker throttled by a memory line nobody moves
        if self.cgroups is not None:
            self.cgroups.remove()  # the cgroups of workers that ended; those still running keep theirs
        self.loop.close()
        self.peers.close()
        self.sock.close()
        self.engine.agent.close()
        for joblog in self.joblogs.values():
            joblog.close()
        self.joblogs.clear()
        self.ctx.term()
        if inherited_socket_fd() is None and os.path.exists(self.config.socket):
            os.unlink(self.config.socket)
        self.store.retry()
        self.store.backup(force=True)
        self.store.close()

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path, self.overrides)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
        else:
            kept = [key for key in AT_START if getattr(new, key) != getattr(self.config, key)]
            if kept:
                # The socket, state and cgroups in use stay what they are until a restart (and the
                # socket pmlmd removes when it stops is the one it bound).
                new = dataclasses.replace(new, **{key: getattr(self.config, key) for key in AT_START})
                log.warning("reload: %s changed, and take%s effect only at the next start of pmlmd "
                            "(systemctl restart pmlmd)", ", ".join(kept), "s" if len(kept) == 1 else "")
            if (new.log_target, new.log_level) != (self.config.log_target, self.config.log_level):
                self.log_backend = setup_logging(new.log_target, new.log_level)
            if new.limits_conf_dir != self.config.limits_conf_dir:
                self.login_limits = loginlimits.LoginLimits(new.limits_conf_dir)
                self.identities.clear()  # the next worker of each batch gets the new directory's limits
            self.config = new
            self.output.limit = new.output_limit
            self.output.forward = self._journal_forward()
            self.engine.limits = new.limits(self.cpus)
            for run in self.engine.runs.values():
                run.limits = tighten(self.engine.limits, **self.asked.get(run.id, {}))
            self.engine.next_sample_at = 0.0
            log.info("configuration reloaded from %s: cpu limit %g%%, memfree limit %g%%", self.config_path
                     or DEFAULT_CONFIG_PATH, new.cpu_limit, new.memfree_limit)
        self.notifier.ready(self._status_line())

    def _fresh_sample(self):
        """The node's last sample; an idle engine takes none, so one is taken here when the last is
        older than FRESH_SAMPLE (its CPU share then covers the time since that one)."""
        engine = self.engine
        sample = engine.last_sample
        if engine.idle() and (sample is None or time.monotonic() - sample.time > FRESH_SAMPLE):
            sample = engine.last_sample = engine.node.sample()
        return sample

    def _status_line(self) -> str:
        sample = self._fresh_sample()
        node = ""
        if sample is not None:
            free = 100.0 * free_bytes(sample, self.engine.limits) / sample.mem_total
            node = f"; cpu {sample.cpu_pct or 0:.0f}% free {free:.0f}%"
        batches = len(self.engine.runs)
        return (f"{batches} batch{'' if batches == 1 else 'es'}, {self.engine.count(RUNNING)} running, "
                f"{self.engine.count(PAUSED) + self.engine.count(HELD)} paused{node}")

    # --- owners ------------------------------------------------------------------------------
    def _refresh_owners(self) -> None:
        """Before workers start: each batch with queued tasks gets its owner's current groups.

        A user's entry is read at most every GROUPS_TTL seconds, so a batch of tiny tasks
        does not read the group database per worker; a change reaches the first worker
        started after that. A batch whose owner has left the daemon's group admits no more:
        its queued tasks are cancelled, its running workers go on. A batch root submitted
        for a user (--user) is root's decision and needs no membership.
        """
        now = time.monotonic()
        if len(self.identities) > 4096:
            self.identities.clear()  # each entry lives a second; this only bounds a burst of users
        for run in list(self.engine.runs.values()):
            if not run.batch.queue or run.id not in self.owners:
                continue
            submitted, vouched = self.owners[run.id]
            cached = self.identities.get(submitted)
            if cached is None or now >= cached[0]:
                owner = current_credentials(submitted)
                cached = (now + GROUPS_TTL, owner, self._login_limits(owner))
                self.identities[submitted] = cached
            run.owner = owner = cached[1]
            if self.limits_basis.get(run.id) is not cached:
                # limits.conf may have changed, or the owner's groups: later workers get what applies now.
                self.limits_basis[run.id] = cached
                run.rlimits = worker_rlimits(self.carried.get(run.id), cached[2], self.own_rlimits)
            if vouched or owner.uid == 0 or (self.group_gid is not None
                                             and self.group_gid in owner.groups + (owner.gid,)):
                continue
            try:
                name = pwd.getpwuid(owner.uid).pw_name
            except KeyError:
                name = f"uid {owner.uid}"
            reason = f"owner {name} is no longer a member of group {self.config.group}"
            log.warning("batch %s: %s: its %d queued tasks are cancelled, its running workers go on", run.id,
                        reason, len(run.batch.queue), extra={"BATCH_ID": run.id})
            # Not stored as the batch's cancel reason: a restart would take that for a user's cancel
            # and end the running workers. The next pmlmd finds the owner's groups for itself.
            self.engine.cancel(run, reason, running=False)
            self.store.queue_cancelled(run.id)

    # --- restart -----------------------------------------------------------------------------
    def _restore(self) -> None:
        # Every batch is rebuilt (and held to today's rules) before anything is adopted: a batch
        # whose record cannot be used is marked failed, not left to fail the daemon at each start.
        restored = []
        for stored in self.store.active_batches():
            try:
                restored.append((stored, self._run_from(stored)))
            except Exception as e:  # whatever the record holds, it costs its own batch only
                self._unrestorable(stored, e)
        active = {stored.id for stored, _ in restored}
        # Output of batches the state does not know goes; not while the state is read without its
        # last writes (a start on a full disk), when a batch it does not show may still exist.
        removed = 0 if self.store.read_only else self.output.keep_only(self.store.batch_ids())
        self.output.measure()
        self.state_sizes = {b: (uid, size) for b, uid, size in self.store.finished_sizes()}
        if removed:
            log.info("removed the output of %d batches the state no longer knows", removed)
        for batch_id in self.scopes.scopes():
            self.scopes.thaw(batch_id)  # frozen by an earlier pmlmd: held batches are frozen again below
            if batch_id in active:
                self.scopes.adopted(batch_id)
            else:
                # Nothing to adopt these into: their batch is over (or unknown); end them, never orphan them.
                pids = self.scopes.scope_pids(batch_id)
                if pids:
                    log.warning("ending %d processes left in the scope of batch %s, which is not active",
                                len(pids), batch_id)
                    signal_pids(pids, (signal.SIGTERM, signal.SIGCONT))
        for stored, run in restored:
            try:
                self._resume(stored, run)
            except Exception as e:  # a value the checks let through: still this batch's problem only
                self._withdraw(run)
                self._unrestorable(stored, e)
        self.engine.end_leftovers()

    def _unrestorable(self, stored: StoredBatch, error: Exception) -> None:
        """Mark a batch that cannot be restored failed, with the reason, and end its workers.

        Its workers would run with nobody governing them, so they are ended like the processes left in
        the scope of a batch that is not active: SIGTERM (and SIGCONT, should they stand stopped).
        """
        if isinstance(error, Unrestorable):
            reason = str(error)
            log.error("batch %s cannot be restored and is marked failed: %s", stored.id, reason,
                      extra={"BATCH_ID": stored.id})
        else:
            reason = f"restoring it failed ({type(error).__name__}: {error})"[:500]
            log.exception("batch %s cannot be restored and is marked failed: %s", stored.id, reason,
                          extra={"BATCH_ID": stored.id})
        self._drop_batch_state(stored.id)
        ended = 0
        for pid, start_ticks in self.store.recorded_workers(stored.rowid):
            try:
                child = procctl.adopt(pid, start_ticks)
            except OSError:
                child = None
            if child is not None:
                procctl.signal_group(child.pid, signal.SIGTERM)
                procctl.signal_group(child.pid, signal.SIGCONT)
                os.close(child.pidfd)
                ended += 1
        if ended:
            log.warning("batch %s: ended %d of its workers, which nobody could govern", stored.id, ended,
                        extra={"BATCH_ID": stored.id})
        statuses = self.store.task_statuses(stored.rowid)
        self.store.fail_batch(stored.rowid, time.time(), unrestorable_report(stored.id, reason, statuses))

    def _drop_batch_state(self, batch_id: str) -> None:
        """What the daemon keeps beside a live batch, let go when it ends or cannot be restored."""
        self.asked.pop(batch_id, None)
        self.owners.pop(batch_id, None)
        self.carried.pop(batch_id, None)
        self.limits_basis.pop(batch_id, None)
        joblog = self.joblogs.pop(batch_id, None)
        if joblog is not None:
            joblog.close()

    def _withdraw(self, run: BatchRun) -> None:
        """Take a batch that failed half-way through ``_resume`` back out of the engine."""
        if run.thaw_owed:
            self.scopes.thaw_later(run.id)
        self.engine.withdraw(run)

    def _resume(self, stored: StoredBatch, run: BatchRun) -> None:
        """Adopt a restored batch's workers that still run and hand the batch to the engine.

        A queue batch's tasks that had not ended went back to their queue when the previous pmlmd's
        broker connection closed (the broker redelivers what was not acked): they end ``returned``
        here, and their workers, still running, are terminated, since another node (or this one)
        runs them again."""
        if run.batch.spec.open_ended:
            self._return_unsettled(stored, run)
        for task, attempt, start_ticks in stored.open_attempts:
            child = procctl.adopt(attempt.pid, start_ticks) if attempt.pid and start_ticks else None
            if child is None:
                attempt.reason = "its worker was gone when pmlmd restarted"
                run.batch.end_attempt(task, attempt, time.time(), CAUSE_DAEMON_RESTART)
                self.store.attempt_ended(run.id, task, attempt)
                if run.id in self.joblogs:
                    self.joblogs[run.id].attempt_ended(run.batch.spec, task, attempt)
                continue
            self.engine.adopt(run, task, attempt, child, terminate=self.config.stranded == "terminate")
        self._add(run)
        if run.batch.spec.open_ended:
            self.engine.end_adopted(run, "its message went back to its queue when pmlmd stopped")
        if stored.held:
            self.engine.hold(run)
        if stored.cancel_reason:
            self.engine.cancel(run, stored.cancel_reason)
        log.info("batch %s restored: %d tasks queued, %d workers adopted", run.id, len(run.batch.queue),
                 len(self.engine.workers_of(run)))
        # Its last task may have ended just before the previous pmlmd stopped, before the batch was
        # marked finished: with nothing queued and no worker, nothing else would ever finish it.
        self.engine._finish_if_done(run)

    def _return_unsettled(self, stored: StoredBatch, run: BatchRun) -> None:
        """A restored queue batch: its queued tasks end returned (their messages went back)."""
        returned = len(run.batch.queue)
        run.batch.cancel_queued()
        if returned:
            self.store.queue_cancelled(run.id, RETURNED)
        in_flight = returned + len(stored.open_attempts)
        if in_flight:
            log.info("batch %s: %d tasks went back to queue %s when pmlmd stopped (the broker gives them out again); "
                     "those of their %d workers that still run are ended", run.id, in_flight,
                     run.batch.spec.intake.queue, len(stored.open_attempts), extra={"BATCH_ID": run.id})

    def _run_from(self, stored: StoredBatch) -> BatchRun:
        """The batch of a stored record, held to the rules a submit is held to today; raises Unrestorable."""
        if stored.problem is not None:
            raise Unrestorable(stored.problem)
        try:
            args = protocol.check_args("submit", stored.submission)
        except protocol.ProtocolError as e:
            raise Unrestorable(f"its submission breaks today's rules: {e.message}") from None
        lines = [t.line for t in stored.tasks] if args.get("amqp") else submitted_lines(args)
        if len(lines) != stored.task_count:
            raise Unrestorable(f"it has {stored.task_count} tasks, its submission {len(lines)}")
        spec = self._spec(stored.id, args, lines)
        batch = Batch(spec, stored.created, tasks=stored.tasks, rest=stored.rest)
        batch.cancel_reason = stored.cancel_reason
        self.asked[stored.id] = self._asked(args)
        submitted = procctl.Credentials(stored.owner_uid, stored.owner_gid, tuple(stored.owner_groups))
        self.owners[stored.id] = (submitted, args.get("user") is not None)
        self.carried[stored.id] = carried_rlimits(args["rlimits"])
        if args["joblog"] is not None:
            # Appended to from where the previous pmlmd left it, opened as its owner is now.
            try:
                self.joblogs[stored.id] = self._open_joblog(args["joblog"], current_credentials(submitted),
                                                            args["umask"], append=True)
            except OSError as e:
                log.warning("batch %s: cannot reopen its joblog %s (%s): it goes on without", stored.id,
                            args["joblog"].encode("utf-8", "backslashreplace").decode(), e.strerror,
                            extra={"BATCH_ID": stored.id})
        return BatchRun(batch=batch, limits=spec.limits, priority=stored.priority, seq=stored.seq,
                        max_workers=args["max_workers"], cwd=args["cwd"], env=args["env"], owner=submitted,
                        description=self._description(stored.id, stored.name, stored.owner_uid),
                        umask=args["umask"], rlimits=self._worker_rlimits(stored.id, submitted),
                        results=args["results"])

    def _login_limits(self, owner: procctl.Credentials) -> dict | None:
        """What the owner's login gets from limits.conf (see loginlimits); None: no limits at all."""
        try:
            entry = pwd.getpwuid(owner.uid)
            name, gid = entry.pw_name, entry.pw_gid
        except KeyError:  # no passwd entry: only the numeric domains can match it
            name, gid = None, owner.gid
        account = loginlimits.Account(name, owner.uid, gid, frozenset(owner.groups) | {gid, owner.gid})
        try:
            return self.login_limits.limits_for(account)
        except Exception:  # a bug here must cost the caps, not the daemon (and every batch with it)
            log.exception("cannot work out the login limits of uid %d: its workers get pmlmd's own", owner.uid)
            return {}

    def _worker_rlimits(self, batch_id: str, owner: procctl.Credentials) -> dict[int, tuple[int, int]] | None:
        return worker_rlimits(self.carried.get(batch_id), self._login_limits(owner), self.own_rlimits)

    @staticmethod
    def _description(batch_id: str, name: str | None, uid: int) -> str:
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = f"uid {uid}"
        return f"pmlmd batch {batch_id}{f' ({name})' if name else ''} of {user}"

    def _refuse_looser(self, args: dict) -> None:
        """A batch may make the node's limits stricter, never looser: say so rather than run it
        with other limits than it asked for."""
        node = self.engine.limits
        for limit in LIMIT_OPTIONS:
            asked = args.get(limit.name)
            if not limit.refuse_looser or asked is None or not limit.looser(asked, getattr(node, limit.name)):
                continue
            option, ours, shown = limit.name, getattr(node, limit.name), limit.text
            raise protocol.ProtocolError(protocol.BAD_FIELD, (
                f"submit: {option} {shown(asked)} is looser than this node's {shown(ours)}: a batch "
                f"can only make the node's limits stricter; ask for {shown(ours)} or stricter, or "
                f"have the administrator change {option} in [limits] of {self.config_path or DEFAULT_CONFIG_PATH}"))

    def _refuse_impossible(self, req: str, args: dict) -> None:
        """A batch whose limits ask for more free memory than the node has could never start a
        task: it would wait for ever (governor.held_back). Refused, saying so."""
        sample = self._fresh_sample()
        if sample is None:
            return
        total = sample.mem_total
        for limits, whose, fix in (
                (self.engine.limits, f"pmlmd's own [limits] (in {self.config_path or DEFAULT_CONFIG_PATH})",
                 "the administrator must lower them (pmlmd.toml(5))"),
                (tighten(self.engine.limits, **self._asked(args)), "the batch's limits", "ask for lower memory limits")):
            limit = limits.memory_limit_bytes(total)
            if max(limits.min_free, limit + limits.memory_gap) < total:
                continue
            need = (f"min_free {format_size(limits.min_free)}" if limits.min_free >= limit + limits.memory_gap else
                    f"memfree_limit {limits.memfree_limit:g}% ({format_size(limit)}) plus memory_gap "
                    f"{format_size(limits.memory_gap)}")
            raise protocol.ProtocolError(protocol.BAD_FIELD, f"{req}: {whose} ask for {need} free before a first "
                                         f"task starts, and this node has {format_size(total)} of memory in all: no "
                                         f"task could ever start; {fix}")

    @staticmethod
    def _asked(args: dict) -> dict:
        return {o.name: args[o.name] for o in LIMIT_OPTIONS if args.get(o.name) is not None}

    def _spec(self, batch_id: str, args: dict, lines: list) -> BatchSpec:
        c = self.config
        return BatchSpec(batch_id=batch_id, command=args["command"], tasks=lines,
                         limits=tighten(self.engine.limits, **self._asked(args)), shell=args["shell"],
                         term_grace=c.term_grace if args["term_grace"] is None else args["term_grace"],
                         retries=c.retries if args["retries"] is None else args["retries"],
                         retry_failed=c.retry_failed if args["retry_failed"] is None else args["retry_failed"],
                         task_id=args.get("name"), term_mode=args.get("term_mode") or "signal",
                         pause_mode=args.get("pause_mode") or "signal",
                         agent_timeout=args.get("agent_timeout") or 5.0, timeout=args["timeout"],
                         halt=args["halt"], halt_fail=args["halt_fail"], halt_fail_pct=args["halt_fail_pct"],
                         append=args["append"],
                         intake=None if args.get("amqp") is None else IntakeSpec(
                             url=args["amqp"], queue=args["queue"], until_empty=args["until_empty"],
                             dead_letter=args["dead_letter"]))

    @staticmethod
    def _open_joblog(path: str, owner: procctl.Credentials | None, umask: int | None, append: bool) -> Joblog:
        """The batch's --joblog, opened as its owner would open it (see workdir.open_file): truncated
        at submit, appended to after a restart; created with the submitter's umask. Only a regular
        file (open_file refuses the rest). Raises OSError."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        credentials = owner if os.geteuid() == 0 else None
        previous = os.umask(umask) if umask is not None else None
        try:
            # The very bytes submitted, whatever pmlmd's file system encoding (see tasklines).
            fd = workdir.open_file(os.fsdecode(tasklines.raw(path)), flags, 0o666, credentials)
        finally:
            if previous is not None:
                os.umask(previous)
        return Joblog(fd, path)

    def _add(self, run: BatchRun) -> None:
        self.engine.add(run)

    # --- events ------------------------------------------------------------------------------
    def _on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Sample):
            return
        run = self.engine.runs.get(getattr(event, "batch", None))
        if run is not None:
            self._record(run, event)
        wire = {"time": round(time.time(), 3), **{k: v for k, v in event.wire().items() if v is not None}}
        self.recent.append(wire)
        for (client, request_id), (only, kinds) in list(self.followers.items()):
            if (client, request_id) not in self.followers:
                continue  # its client went away while this event was handed out
            if (only is None or only == wire.get("batch")) and (kinds is None or event.KIND in kinds):
                self.outboxes.event(client, request_id, wire)
            if isinstance(event, events.Finished) and only == event.batch and (client, request_id) in self.followers:
                # Following one batch ends with it: the closing reply, and the follower is let go.
                self.store.flush()
                del self.followers[(client, request_id)]
                self._send(client, protocol.encode_reply(replies.EventsEnd().to_json(), request_id), request_id)

    def _record(self, run: BatchRun, event: events.Event) -> None:
        """What an event of a live batch changes in the state (and the joblog, the log)."""
        match event:
            case events.Added():
                self.store.task_added(run.id, run.batch.tasks[event.task])
            case events.Settled():
                self.store.tasks_changed(run.id, [run.batch.tasks[event.task]])
            case events.Start():
                task = run.batch.tasks[event.task]
                self.store.attempt_started(run.id, task, task.attempts[-1], event.start_ticks)
            case events.End():
                task = run.batch.tasks[event.task]
                # A queue batch's ends are written at once: its deliveries are settled with the broker
                # from the intake's thread, not after this loop turn's flush.
                self.store.attempt_ended(run.id, task, task.attempts[-1], group=run.intake is None)
                if run.id in self.joblogs:
                    self.joblogs[run.id].attempt_ended(run.batch.spec, task, task.attempts[event.attempt - 1])
            case events.Halted():
                # Its queue was cancelled: a restarted pmlmd must not run those tasks.
                self.store.queue_cancelled(run.id)
                log.info("batch %s: %s", run.id, event.reason, extra={"BATCH_ID": run.id})
            case events.Finished():
                # Every task ended: what is still queued in the state was cancelled from the queue.
                self.store.queue_cancelled(run.id)
                # Its report is encoded a slice at a time, then stored with its summary (FinishJob);
                # until then status, list and report read the batch here.
                self.unsaved[run.id] = run
                self.finishing.add(run.id)
                self.jobs.append(FinishJob(self, run))
                self._drop_batch_state(run.id)
                log.info("batch %s finished: %s", run.id, event.summary, extra={"BATCH_ID": run.id})

    # --- requests ------------------------------------------------------------------------------
    def _on_request(self) -> None:
        self.store.flush()  # a request reads the state as the events it may have seen left it
        until = min(time.monotonic() + REQUEST_BUDGET, self.governor_due)
        for served in range(REQUESTS_PER_TURN):
            if served and time.monotonic() >= until:
                return  # the socket stays readable: the rest are served after the governor's turn
            try:
                client, frame = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except ValueError:  # not two frames: not a pmlmctl
                continue
            request_id = None
            try:
                if len(frame) > protocol.MAX_MESSAGE_BYTES:
                    raise protocol.ProtocolError(protocol.TOO_LARGE, f"request of {len(frame)} bytes is larger "
                                                 f"than the {protocol.MAX_MESSAGE_BYTES} bytes allowed")
                request = protocol.parse_request(frame.bytes)
                request_id = request.request_id
                peer = peer_credentials(frame)
                if peer is None:
                    raise Denied("the client's credentials could not be read")
                if len(frame) > self.config.request_bytes and not (peer[0] == 0 and self.config.root_exempt):
                    raise protocol.ProtocolError(protocol.QUOTA_EXCEEDED, (
                        f"{request.name}: a request of {len(frame)} bytes, more than quotas.request_bytes = "
                        f"{self.config.request_bytes} in {self.config_path or DEFAULT_CONFIG_PATH} (send fewer or "
                        "shorter task lines, several batches, or ask the operator to raise it)"))
                reply = getattr(self, "_do_" + request.name)(client.bytes, request, peer)
            except protocol.ProtocolError as e:  # raised while parsing, or by a handler (which knows no id)
                reply = protocol.encode_error(e.code, e.message, request_id if e.request_id is None else e.request_id)
            except Denied as e:
                reply = protocol.encode_error(protocol.PERMISSION_DENIED, f"permission denied: {e}", request_id)
            except Unwritable as e:  # a full disk: refused, and nothing was acknowledged
                reply = protocol.encode_error(protocol.INTERNAL, str(e), request_id)
            except Exception as e:  # a bug must not take the daemon down with it
                log.exception("request failed")
                reply = protocol.encode_error(protocol.INTERNAL, f"internal error: {e}", request_id)
            if reply is not None:
                self._send(client.bytes, reply, request_id)

    def _send(self, client: bytes, payload: bytes, request_id=None) -> None:
        """A reply: sent now, or as soon as the client reads (see outbox.Outboxes); lost only with the client."""
        self.outboxes.reply(client, request_id, payload)

    def _client_gone(self, client: bytes) -> None:
        for follower in [follower for follower in self.followers if follower[0] == client]:
            del self.followers[follower]

    def _batch(self, batch_id: str, peer, action: str | None) -> BatchRun | None:
        """The live batch, or None if it has finished; checks that the peer may act on it.

        A batch that finished while its end could not be written yet (a full disk) is read from
        memory: returned to a reader (``action`` None), finished (None) to anything else."""
        run = self.engine.runs.get(batch_id)
        unsaved = self.unsaved.get(batch_id)
        owner = (run or unsaved).owner.uid if (run or unsaved) is not None else self.store.batch_owner(batch_id)
        if owner is None:
            raise protocol.ProtocolError(protocol.NO_SUCH_BATCH, f"no batch {batch_id!r}: see 'pmlmctl list'")
        if action and peer[0] not in (0, owner):
            raise Denied(f"batch {batch_id} belongs to uid {owner}; only its owner or root may {action} it")
        return run if run is not None or action else unsaved

    def _do_ping(self, client, request, peer) -> bytes:
        return protocol.encode_reply(replies.Pong(__version__, os.getpid(), round(time.monotonic() - self.started, 3))
                                     .to_json(), request.request_id)

    def _may_submit(self, uid: int, gid: int, groups: list[int]) -> None:
        if uid != 0 and (self.group_gid is None or self.group_gid not in groups + [gid]):
            raise Denied(f"uid {uid} may not submit batches: only root and members of group {self.config.group!r} "
                         f"may (add the user with 'adduser USER {self.config.group}')")

    def _do_submit(self, client, request, peer) -> bytes:
        args = request.args
        uid, gid, _ = peer
        groups = user_groups(uid, gid)
        self._may_submit(uid, gid, groups)
        if args["user"] is not None:
            entry = _account(args["user"])
            if uid != 0:
                if entry.pw_uid != uid:
                    raise Denied("only root may submit a batch to run as another user")
                # Their own account: the batch is theirs as without --user. (A batch with --user is
                # one root vouches for: it goes on when its owner leaves the group.)
                args = dict(args, user=None)
            else:
                uid, gid, groups = entry.pw_uid, entry.pw_gid, user_groups(entry.pw_uid, entry.pw_gid)
        owner = procctl.Credentials(uid, gid, tuple(groups))
        return self._start("submit", args, owner, peer, request.request_id)

    def _start(self, req: str, args: dict, owner: procctl.Credentials, peer, request_id, extra=None) -> bytes:
        """Start a batch of checked submit arguments for ``owner``: a submit, or a retry."""
        uid, gid, groups = owner.uid, owner.gid, list(owner.groups)
        if os.geteuid() != 0 and uid != os.geteuid():
            raise Denied(f"pmlmd runs as uid {os.geteuid()} and cannot start workers as uid {uid}")
        self._check_quotas(req, args, uid, peer)
        self._refuse_looser(args)
        self._refuse_impossible(req, args)
        # Every spawn enters the directory as the user again (it may change meanwhile); checked
        # here too, so that a directory the user cannot enter is refused at once, not task by task.
        try:
            workdir.check(args["cwd"], owner if os.geteuid() == 0 else None)
        except workdir.DirectoryError as e:
            raise protocol.ProtocolError(protocol.BAD_FIELD, f"{req}: {e}") from None
        if args["results"] is not None:
            try:  # made now, as the user: a directory they cannot make is refused before anything runs
                workdir.make_directories(args["results"], owner if os.geteuid() == 0 else None)
            except OSError as e:
                raise protocol.ProtocolError(protocol.BAD_FIELD, f"{req}: cannot make the results directory "
                                             f"{args['results']}: {e.strerror}") from None
        joblog = None
        if args["joblog"] is not None:
            try:
                joblog = self._open_joblog(args["joblog"], owner, args["umask"], append=False)
            except OSError as e:
                shown = args["joblog"].encode("utf-8", "backslashreplace").decode()
                raise protocol.ProtocolError(protocol.BAD_FIELD, f"{req}: cannot write the joblog {shown} as uid "
                                             f"{uid}: {e.strerror}") from None
        try:
            seq = self.store.next_seq()
            batch_id = str(seq)
            spec = self._spec(batch_id, args, submitted_lines(args))
            now = time.time()
            batch = Batch(spec, now)
            self.store.add_batch(batch_id, seq, args["name"], (uid, gid, groups), args["priority"], args, now,
                                 None if spec.open_ended else len(batch.tasks))
        except BaseException:
            if joblog is not None:
                joblog.close()
            raise
        if joblog is not None:
            joblog.header()
            self.joblogs[batch_id] = joblog
        self.asked[batch_id] = self._asked(args)
        self.owners[batch_id] = (owner, args["user"] is not None)
        self.carried[batch_id] = carried_rlimits(args["rlimits"])
        run = BatchRun(batch=batch, limits=spec.limits, priority=args["priority"], seq=seq,
                       max_workers=args["max_workers"], cwd=args["cwd"], env=args["env"], owner=owner,
                       description=self._description(batch_id, args["name"], uid), umask=args["umask"],
                       rlimits=self._worker_rlimits(batch_id, owner), results=args["results"])
        self._add(run)
        source = f"tasks from queue {spec.intake.queue} at {run.intake.where}" if spec.intake else \
            f"{len(spec.tasks)} tasks"
        log.info("batch %s %s by uid %d: %s of %s", batch_id, "submitted" if req == "submit" else
                 f"retried (tasks of batch {(extra or {}).get('of')})", peer[0], source, spec.command,
                 extra={"BATCH_ID": batch_id})
        lowered = lowered_rlimits(self.carried[batch_id], run.rlimits)
        if lowered:
            log.info("batch %s: its workers get lower limits than its submitter has (the owner's login "
                     "limits, or pmlmd's own): %s", batch_id, lowered, extra={"BATCH_ID": batch_id})
        return protocol.encode_reply(replies.Started(batch_id, args["name"], lowered, **(extra or {})).to_json(),
                                     request_id)

    def _prune_over_quota(self) -> None:
        """Each user's finished batches take at most quotas.state_bytes of the state and
        quotas.output_bytes of the disk: past either, their oldest go, with their output, before
        prune_after (root's stay with root_exempt)."""
        waiting = []
        for batch_id in self.unmeasured:
            try:
                found = self.store.finished_sizes(batch_id)
            except Exception as e:  # sqlite3.Error: measured at the next turn
                log.warning("cannot measure batch %s in the state now: %s", batch_id, e)
                found = None
            if found:
                self.state_sizes[batch_id] = found[0][1:]
            else:  # not stored finished yet (a full disk): measured once it is
                waiting.append(batch_id)
        if waiting != self.unmeasured:
            self.quota_check_due = True
        self.unmeasured = waiting
        if not self.quota_check_due:
            return
        self.quota_check_due = False
        used, output = collections.Counter(), collections.Counter()
        for batch_id, (uid, size) in self.state_sizes.items():
            used[uid] += size
            output[uid] += self.output.kept.get(batch_id, 0)
        config = self.config
        doomed: dict[int, list[str]] = {}
        for batch_id, (uid, size) in self.state_sizes.items():  # oldest first
            if (used[uid] > config.state_bytes or output[uid] > config.output_bytes) \
                    and not (uid == 0 and config.root_exempt):
                doomed.setdefault(uid, []).append(batch_id)
                used[uid] -= size
                output[uid] -= self.output.kept.get(batch_id, 0)
        for uid, ids in doomed.items():
            if self.store.forget(ids):
                for batch_id in ids:
                    self.output.remove(batch_id)
                    self.state_sizes.pop(batch_id, None)
                log.info("pruned %d finished batches of uid %d early (%s): its finished batches took more of the "
                         "state than quotas.state_bytes = %d or of the disk for their output than "
                         "quotas.output_bytes = %d", len(ids), uid, ", ".join(ids), config.state_bytes,
                         config.output_bytes)

    def _check_quotas(self, req: str, args: dict, uid: int, peer) -> None:
        """Refuse a batch that would take its owner past a quota of [quotas] (root's own requests pass
        with root_exempt): tasks not yet finished, active batches, and the shortest interval."""
        config = self.config
        if peer[0] == 0 and config.root_exempt:
            return
        path = self.config_path or DEFAULT_CONFIG_PATH

        def exceeded(what: str, key: str, value, fix: str, beyond: str = "more than") -> protocol.ProtocolError:
            return protocol.ProtocolError(protocol.QUOTA_EXCEEDED, f"{req}: {what}, {beyond} quotas.{key} = "
                                          f"{value} in {path} ({fix})")

        interval = args["interval"]
        if interval is not None and interval < config.min_interval:
            raise exceeded(f"uid {uid} asked for an interval of {interval:g} s", "min_interval",
                           f"{config.min_interval:g}", f"ask for --interval {config.min_interval:g} or more, or ask "
                           f"the operator to lower it", beyond="shorter than")
        runs = [run for run in self.engine.runs.values() if run.owner.uid == uid and run.batch.finished is None]
        if len(runs) + 1 > config.batches_active:
            raise exceeded(f"uid {uid} would have {len(runs) + 1} active batches", "batches_active",
                           config.batches_active, "wait for one to finish, or ask the operator to raise it")
        tasks = len(args["task_lines"]) if args["task_lines"] is not None else args["tasks"]
        running = collections.Counter(id(w.run) for w in self.engine.workers.values())
        queued = tasks + sum(len(run.batch.queue) + running[id(run)] for run in runs)
        if queued > config.tasks_queued:
            raise exceeded(f"uid {uid} would have {queued} tasks queued", "tasks_queued", config.tasks_queued,
                           "wait for some to finish, or ask the operator to raise it")

    def _do_retry(self, client, request, peer) -> bytes:
        """A new batch of the tasks of a finished batch that did not succeed (see protocol, ``retry``)."""
        batch_id, failed_only = request.args["batch"], request.args["failed_only"]
        if self._batch(batch_id, peer, "retry") is not None:
            raise protocol.ProtocolError(protocol.BAD_FIELD, f"retry: batch {batch_id} is still running: retry it "
                                         f"once it has finished (cancel it first to end it now)")
        try:
            record = self.store.submission(batch_id)
        except ValueError as e:  # store.Unusable: a damaged record costs this request only
            raise protocol.ProtocolError(protocol.BAD_FIELD, f"retry: batch {batch_id} cannot be run again: "
                                         f"{e}") from None
        if record is None:
            raise protocol.ProtocolError(protocol.NO_SUCH_BATCH, f"no batch {batch_id!r}: see 'pmlmctl list'")
        submission, (uid, gid, groups), statuses = record
        if isinstance(submission, dict) and submission.get("amqp") is not None:
            raise protocol.ProtocolError(protocol.BAD_FIELD, f"retry: batch {batch_id} took its tasks from queue "
                                         f"{submission.get('queue')!r}, and they belong to the queue: a task that "
                                         "failed went to the dead-letter exchange (or the queue's own); publish it "
                                         "to the queue again to run it again")
        if peer[0] != 0:
            # The owner retries: they must still be allowed to submit (root may retry anyone's).
            self._may_submit(peer[0], peer[1], user_groups(peer[0], peer[1]))
        wanted = (FAILED, GIVEN_UP) if failed_only else (FAILED, GIVEN_UP, CANCELLED)
        picked = [index for index, status in enumerate(statuses) if status in wanted]
        if not picked:
            which = "failed or given-up" if failed_only else "failed, given-up or cancelled"
            raise protocol.ProtocolError(protocol.BAD_FIELD, f"retry: batch {batch_id} has no {which} task: "
                                         f"nothing to retry")
        if not isinstance(submission, dict):
            submission = {}
        lines = submission.get("task_lines")
        # Its own joblog, if asked; no --results: its tasks are numbered afresh, and would write over
        # the original's results of the same numbers.
        submission = {**submission, "joblog": request.args["joblog"], "results": None}
        if isinstance(lines, list) and len(lines) == len(statuses):
            submission.update(task_lines=[lines[index] for index in picked], tasks=None)
        else:
            submission.update(task_lines=None, tasks=len(picked))
        try:
            args = protocol.check_args("submit", submission)
        except protocol.ProtocolError as e:
            raise protocol.ProtocolError(protocol.BAD_FIELD, f"retry: batch {batch_id} cannot be run again, its "
                                         f"submission breaks today's rules: {e.message}") from None
        owner = current_credentials(procctl.Credentials(uid, gid, tuple(groups)))
        return self._start("retry", args, owner, peer, request.request_id, {"retried": picked, "of": batch_id})

    def _summary(self, run: BatchRun) -> dict:
        return self._batch_summary(run).to_json()

    def _batch_summary(self, run: BatchRun) -> BatchSummary:
        """A live batch's summary (see pmlmd/core/summary.py); at its end, the one stored with it."""
        live = run.batch.finished is None
        return summarize(run.batch, now=time.time(), owner_uid=run.owner.uid, owner_user=user_name(run.owner.uid),
                         priority=run.priority, held=run.held,
                         paused_workers=self.engine.count(PAUSED, run) + self.engine.count(HELD, run),
                         scope=scopes.scope_name(run.id) if self.scopes.name == "systemd" else None,
                         freezer=self.scopes.freezer_state(run.id, self.engine.freezer(run)) if live else None, intake=intake_status(run))

    def _finished_summaries(self, batch_id: str | None = None) -> list[BatchSummary]:
        """The stored summaries of finished batches (of one, with ``batch_id``), owners named."""
        found = self.store.finished_batches() if batch_id is None else \
            [s for s in [self.store.finished_summary(batch_id)] if s is not None]
        # Stored without a summary (see Store.finished_batches): the owner is named now.
        return [s.with_user(user_name(s.owner.uid)) if s.owner.user is None and s.owner.uid is not None else s
                for s in found]

    def _do_status(self, client, request, peer) -> bytes:
        """With a batch: its summary (pmlmd/core/summary.py, BatchSummary.to_json), live or finished, plus
        ``node``. Without: ``status`` (the STATUS= line), ``node``, ``limits`` and ``batches``, the
        summaries of the live batches in submission order. ``node`` is null before the first sample,
        else ``cpu_pct``, ``free_bytes``, ``total_bytes`` and ``free_pct``."""
        batch_id = request.args["batch"]
        if batch_id is not None:
            run = self._batch(batch_id, peer, None)
            waiting = None
            if run is None:
                found = self._finished_summaries(batch_id)
                if not found:
                    raise protocol.ProtocolError(protocol.NO_SUCH_BATCH, f"batch {batch_id!r} is neither running "
                                                 "nor finished: see 'pmlmctl list'")
                summary = found[0]
            else:
                summary, waiting = self._batch_summary(run), self._waiting(run)
            return protocol.encode_reply(replies.BatchStatus(summary, self._node(), waiting).to_json(),
                                         request.request_id)
        limits = self.engine.limits
        return protocol.encode_reply(replies.NodeStatus(
            status=self._status_line(), node=self._node(), batches=[self._summary(r) for r in self._ordered()],
            workers=self._containment(),
            limits={**{option.name: getattr(limits, option.name) for option in LIMIT_OPTIONS},
                    "max_workers": limits.max_workers}).to_json(), request.request_id)

    def _waiting(self, run: BatchRun) -> str | None:
        """Why the node starts none of the batch's waiting tasks now (Engine.waiting)."""
        sample = self._fresh_sample()
        return None if sample is None else self.engine.waiting(run, sample)

    def _containment(self) -> str:
        """How workers are held, for the ready line and status: one line."""
        return cgroup.containment(self.cgroups, "systemd scopes" if self.scopes.name == "systemd" else "process groups")

    def _node(self) -> dict | None:
        sample = self._fresh_sample()
        if sample is None:
            return None
        free = free_bytes(sample, self.engine.limits)
        return {"cpu_pct": sample.cpu_pct, "free_bytes": free, "total_bytes": sample.mem_total,
                "free_pct": round(100.0 * free / sample.mem_total, 2)}

    def _ordered(self) -> list[BatchRun]:
        return sorted(self.engine.runs.values(), key=lambda r: r.seq)

    def _do_list(self, client, request, peer) -> bytes:
        """``batches``: the summary of every batch pmlmd knows, as status gives it: the finished ones
        (until they are pruned), then the live ones, each in submission order."""
        batches = [s.to_json() for s in self._finished_summaries()] + [
            self._summary(r) for r in sorted(self.unsaved.values(), key=lambda r: r.seq)] + [
            self._summary(r) for r in self._ordered()]
        return protocol.encode_reply(replies.BatchList(batches).to_json(), request.request_id)

    def _do_cancel(self, client, request, peer) -> bytes:
        run = self._batch(request.args["batch"], peer, "cancel")
        if run is None:
            return protocol.encode_reply(replies.Control(request.args["batch"], "finished").to_json(),
                                         request.request_id)
        reason = f"cancelled by {user_name(peer[0])} (uid {peer[0]})"
        self.store.set_cancelled(run.id, reason)
        self.engine.cancel(run, reason)
        self.store.queue_cancelled(run.id)  # its workers' ends are written as they come
        return protocol.encode_reply(replies.Control(run.id, "cancelling").to_json(), request.request_id)

    def _do_pause(self, client, request, peer) -> bytes | None:
        return self._hold(client, request, peer, True)

    def _do_resume(self, client, request, peer) -> bytes | None:
        return self._hold(client, request, peer, False)

    def _hold(self, client: bytes, request, peer, held: bool) -> bytes | None:
        """pause and resume. The reply goes once the batch's scope is frozen or thawed (off the
        loop: engine.hold, engine.resume), so that what systemd shows of the scope afterwards
        agrees with it."""
        action = "pause" if held else "resume"
        run = self._batch(request.args["batch"], peer, action)
        if run is None:
            raise protocol.ProtocolError(protocol.NO_SUCH_BATCH, f"batch {request.args['batch']} has finished: "
                                         f"there is nothing to {action}")
        def reply() -> bytes:
            # The batch's state when the answer goes: a resume asked while the pause's freeze was under
            # way has set it going again, and the pause then says so.
            return protocol.encode_reply(replies.Control(run.id, "held" if run.held else "active").to_json(),
                                         request.request_id)

        if run.held == held:
            return reply()
        self.store.set_held(run.id, held)
        (self.engine.hold if held else self.engine.resume)(run, lambda: self._send(client, reply(), request.request_id))
        return None

    def _do_report(self, client, request, peer) -> bytes | None:
        run = self._batch(request.args["batch"], peer, None)
        if run is not None:
            # Encoded over several loop turns (a report lists every task): answered when complete.
            self.jobs.append(ReportJob(self, client, request.request_id, run))
            return None
        stored = self.store.open_report(request.args["batch"])  # checked bytes, a Blob to read, or None
        if isinstance(stored, bytes):
            return protocol.encode_reply_json(stored, request.request_id)
        if stored is None:
            raise protocol.ProtocolError(protocol.NO_SUCH_BATCH, f"batch {request.args['batch']} has no report "
                                         "(its record was damaged)")
        self.jobs.append(StoredReportJob(client, request.request_id, stored))
        return None

    def _run_jobs(self) -> None:
        """Work on replies built a slice at a time, for at most JOB_BUDGET seconds per loop turn."""
        until = time.monotonic() + JOB_BUDGET
        while self.jobs and time.monotonic() < until:
            job = self.jobs[0]
            reply = job.step(until)
            if reply is not None:
                self.jobs.popleft()
                if job.client is not None:
                    self._send(job.client, reply, job.request_id)

    def _do_log(self, client, request, peer) -> bytes:
        """A slice of what the batch's tasks wrote: chunks of at most LOG_REPLY_BYTES in all.

        Reply: ``chunks`` (each ``task``, ``offset``, ``data`` as text carrying bytes, see the
        protocol's "Bytes", and ``skipped``: bytes before ``offset`` that were not kept), where
        to go on (``from_task``, ``offset``), ``more`` (the size ran out: ask again at once) and
        ``complete`` (nothing more will come for what was asked).
        """
        args = request.args
        batch_id = args["batch"]
        run = self._batch(batch_id, peer, "read the output of")
        tasks = run.batch.tasks if run is not None else None
        if args["task"] is not None:
            count = len(tasks) if tasks is not None else self.store.task_count(batch_id)
            if args["task"] >= count:
                raise protocol.ProtocolError(protocol.BAD_FIELD, f"batch {batch_id} has no task {args['task']}: "
                                             f"its {count} tasks are numbered from 0 to {count - 1}")
        stream, task, index, offset = args["stream"], args["task"], args["from_task"], args["offset"]
        if task is not None:
            index = max(index, task)

        def finished(i: int) -> bool:  # no worker of the task runs, and none will
            return tasks is None or tasks[i].status in FINISHED

        # Live reading stops at the first task that has not finished: its output may grow.
        last = task if task is not None else (len(tasks) - 1 if tasks is not None else None)
        stop = None
        if args["live"] and tasks is not None:
            stop = next((i for i in range(index, last + 1) if not finished(i)), None)
        candidates = [task] if task is not None else self.output.tasks_with_output(batch_id, stream, index)
        budget, chunks, more = LOG_REPLY_BYTES, [], False
        for i in candidates:
            if i < index:
                continue
            if stop is not None and i > stop:
                break
            chunk = self.output.read(batch_id, i, stream, offset if i == index else 0, budget)
            if chunk.data or chunk.skipped:
                chunks.append({"task": i, "offset": chunk.offset, "skipped": chunk.skipped,
                               "data": tasklines.text(chunk.data)})
                budget -= len(chunk.data)
            index, offset = i, chunk.offset + len(chunk.data)
            if budget <= 0:
                more = True
                break
            if i == stop:
                break
            index, offset = i + 1, 0
        if not more and stop is not None and index < stop:
            index, offset = stop, 0  # it has written nothing yet: wait at it
        # A live queue batch may take more tasks: its output is complete when the batch has ended.
        open_ended = run is not None and run.batch.spec.open_ended and run.batch.finished is None
        complete = not more and stop is None and not (open_ended and task is None)
        return protocol.encode_reply(replies.LogSlice(chunks, index, offset, more, complete).to_json(),
                                     request.request_id)

    def _do_events(self, client, request, peer) -> bytes | None:
        only, kinds = request.args["batch"], request.args["kinds"]
        kinds = None if kinds is None else frozenset(kinds)
        # A batch that has ended (also one still being stored) has no more events to follow.
        live = only is None or (self._batch(only, peer, None) is not None and only in self.engine.runs)
        for event in self.recent:
            if (only is None or event.get("batch") == only) and (kinds is None or event["event"] in kinds):
                self.outboxes.event(client, request.request_id, event)
        if request.args["follow"] and live:  # a finished batch has nothing more to follow
            self.followers[(client, request.request_id)] = (only, kinds)
            return None  # the stream stays open
        return protocol.encode_reply(replies.EventsEnd().to_json(), request.request_id)


class ReportJob:
    """A live batch's report, its tasks encoded a slice at a time between the governor's turns.

    Each task is encoded as it stands when its slice is reached; the head (state, counts,
    summary) as the batch stands when the last slice is done.
    """

    SLICE = 500  # tasks encoded between two looks at the clock

    def __init__(self, daemon: "Daemon", client: bytes, request_id, run: BatchRun):
        self.daemon, self.client, self.request_id, self.run = daemon, client, request_id, run
        # The head comes first, once the tasks are done. The tasks go into one buffer: a big one
        # lives in its own mapping and goes back to the system whole when freed, where thousands
        # of slices would leave the daemon's heap fragmented (a million tasks: 70 MB kept).
        self.parts: list[bytes | bytearray] = [b"", bytearray()]
        self.next = 0

    def step(self, until: float) -> bytes | None:
        if not self._encode(until):
            return None
        return protocol.encode_reply_json(self.parts, self.request_id)

    def _encode(self, until: float) -> dict | None:
        """Encode the next slices until ``until``; when all are done, the head, and return it."""
        tasks = self.run.batch.tasks
        while self.next < len(tasks):
            if time.monotonic() >= until:
                return None
            end = min(self.next + self.SLICE, len(tasks))
            # ASCII JSON (surrogates carrying bytes as escapes), a slice in one piece.
            lead = b"" if self.next == 0 else b", "
            self.parts[1] += lead + tasks.encode(self.next, end).encode("ascii")
            self.next = end
        # running: how long so far, nothing failed that has not; the state and counts status shows
        self.summary = self.daemon._batch_summary(self.run)
        head = self.run.batch.report(time.time(), summary=self.summary, with_tasks=False)
        self.parts[0] = (json.dumps(head)[:-1] + ', "tasks": [').encode("ascii")
        self.parts.append(b"]}")
        return head


class FinishJob(ReportJob):
    """A finished batch's report encoded a slice at a time, then stored with its summary, so that
    the end of a big batch does not hold up the governor; status, list and report read the batch
    from memory (Daemon.unsaved) meanwhile."""

    def __init__(self, daemon: "Daemon", run: BatchRun):
        super().__init__(daemon, None, None, run)

    def step(self, until: float) -> bytes | None:
        head = self._encode(until)
        if head is None:
            return None
        run, store = self.run, self.daemon.store
        critical = head["error_message"] if head["critical_error"] else None
        store.finish(run.id, run.batch.finished, self.parts, self.summary.to_json(), critical)
        self.daemon.finishing.discard(run.id)
        self.daemon.unmeasured.append(run.id)
        if ("finish", run.id) not in store.pending:
            self.daemon.unsaved.pop(run.id, None)  # stored: the state answers for it from now on
        return b""


class StoredReportJob:
    """A finished batch's stored report, read a slice at a time between the governor's turns."""

    SLICE = 256 << 10  # bytes read between two looks at the clock

    def __init__(self, client: bytes, request_id, blob):
        self.client, self.request_id, self.blob = client, request_id, blob
        self.parts: list[bytes] = []

    def step(self, until: float) -> bytes | None:
        try:
            while time.monotonic() < until:
                piece = self.blob.read(self.SLICE)
                if not piece:
                    break
                self.parts.append(piece)
            else:
                return None
        except Exception as e:  # sqlite3.Error: the row changed (pruned) under the reader
            self.blob.close()
            return protocol.encode_error(protocol.NO_SUCH_BATCH, f"the report could not be read: {e}",
                                         self.request_id)
        self.blob.close()
        if not looks_like_report(self.parts):
            return protocol.encode_error(protocol.NO_SUCH_BATCH, "the batch has no report (its record was damaged)",
                                         self.request_id)
        return protocol.encode_reply_json(self.parts, self.request_id)

    def close(self) -> None:
        self.blob.close()


def carried_rlimits(sent: dict | None) -> dict[int, tuple[int, int]] | None:
    """submit's ``rlimits`` (name -> [soft, hard]) as resource.RLIMIT_* -> (soft, hard)."""
    if sent is None:
        return None  # an older pmlmctl: the login limits, else pmlmd's own
    return {protocol.RLIMITS[name]: tuple(resource.RLIM_INFINITY if value == protocol.UNLIMITED else value
                                          for value in pair) for name, pair in sent.items()}


def worker_rlimits(carried: dict[int, tuple[int, int]] | None, login: dict | None,
                   own: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]] | None:
    """The limits a batch's workers start with (resource.RLIMIT_* -> (soft, hard)), for their gate.

    ``carried``: the submitter's (None: not sent); ``login``: what the owner's login gets from
    limits.conf, None for a limit it does not set (None: a line lifts them all); ``own``: pmlmd's.
    A hard limit is the lowest of the submitter's (else pmlmd's), the login's and pmlmd's own: a
    worker cannot be given more than pmlmd has, and a member must not get more than their login
    by submitting instead. The soft limit is the submitter's (else the login's, else pmlmd's),
    never above the hard one; the login's soft limit does not lower the submitter's, since any
    shell may raise its soft limit up to the hard one. A resource nobody names stays as pmlmd
    starts every worker (None when that is all of them).
    """
    limits = {}
    for resource_id, (own_soft, own_hard) in own.items():
        sent = (carried or {}).get(resource_id)
        login_soft, login_hard = (login or {}).get(resource_id, (None, None))
        if sent is None and login_soft is None and login_hard is None:
            continue
        if sent is not None:
            soft, hard = sent
        else:
            soft, hard = (own_soft if login_soft is None else login_soft), own_hard
        if login_hard is not None:
            hard = loginlimits.lower(hard, login_hard)
        hard = loginlimits.lower(hard, own_hard)
        limits[resource_id] = (loginlimits.lower(soft, hard), hard)
    return limits or None


def lowered_rlimits(carried: dict[int, tuple[int, int]] | None, given: dict[int, tuple[int, int]] | None) -> dict:
    """The limits the workers get below what the submitter sent, by name: [soft, hard]."""
    lowered = {}
    for name, resource_id in protocol.RLIMITS.items():
        sent = (carried or {}).get(resource_id)
        got = (given or {}).get(resource_id)
        if sent is not None and got is not None and got != sent:
            lowered[name] = [protocol.UNLIMITED if value == resource.RLIM_INFINITY else value for value in got]
    return lowered


def submitted_lines(args: dict) -> list[str | None] | Blank:
    """A checked submit's task lines: those it gave, N blank ones for ``tasks`` N (kept as a
    count, see batch.Blank), none for a queue batch (its tasks come as messages)."""
    if args.get("amqp"):
        return []
    return args["task_lines"] if args["task_lines"] is not None else Blank(args["tasks"])


def unrestorable_report(batch_id: str, reason: str, statuses: list[str]) -> dict:
    """The execution report of a batch marked failed because its stored record could not be used.

    It has the keys of every report; what the record could not tell is null. Tasks that had not
    finished count as failed.
    """
    now = time.time()
    counts = {"tasks": len(statuses), "succeeded": statuses.count(SUCCEEDED), "given_up": statuses.count(GIVEN_UP),
              "cancelled": statuses.count(CANCELLED), "running": 0, "paused": 0, "queued": 0, "terminated": 0,
              "requeued": 0}
    counts["failed"] = counts["tasks"] - counts["succeeded"] - counts["given_up"] - counts["cancelled"]
    message = f"not restored when pmlmd started: {reason}"
    # "state": "failed" also tells summary.from_record that the batch was marked failed.
    return {"report_version": REPORT_VERSION, "batch_id": batch_id, "task_id": batch_id, "command": None,
            "shell": None, "state": STATE_FAILED, "started": None, "finished": iso(now), "duration_s": None,
            "error_exist": True,
            "error_message": message, "critical_error": False,
            "execution_message": f"batch {batch_id}: {counts['tasks']} tasks, {counts['succeeded']} succeeded, "
                                 f"marked failed: {message}",
            "exit_status": 1, "limits": None, "counts": counts, "lowest_free_memory_bytes": None,
            "lowest_free_memory_pct": None, "highest_cpu_pct": None, "cpu_pct": None, "free_memory_pct": None,
            "tasks": []}


def intake_status(run: BatchRun) -> IntakeStatus | None:
    """What status shows of a queue batch's intake (summary.IntakeStatus); None for other batches.

    The state is the connection's (intake: connecting, waiting for broker, refused by broker,
    closed) or, while connected, what the batch does with it: consuming, paused (by its owner),
    paused by a limit (the governor admits nothing now), closing (it takes no more)."""
    spec = run.batch.spec.intake
    if spec is None:
        return None
    d = run.intake.describe()  # made by Engine.add, which every batch shown has been through
    state = d["state"]
    if state == "connected":
        b = run.batch
        if run.intake_done or run.intake_closing or b.cancel_reason or b.halt_reason or b.critical_reason:
            state = f"closing ({run.intake_done or b.cancel_reason or b.halt_reason or b.critical_reason})"
        elif run.held:
            state = "paused (pmlmctl pause)"
        else:
            state = "consuming" if d["credit"] else "paused by a limit"
    return IntakeStatus(broker=d["broker"], queue=d["queue"], state=state, detail=d["detail"],
                        in_flight=len(run.deliveries), until_empty=spec.until_empty,
                        **{key: d[key] for key in ("consumed", "acked", "returned", "dead_lettered", "rejected", "lost")})


def user_name(uid: int | None) -> str | None:
    """The name of a batch's owner, for its summary: the passwd entry's, else the uid as text."""
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def raise_fd_limit() -> tuple[int, int]:
    """Raise pmlmd's soft RLIMIT_NOFILE to its hard limit; return the limits it was started with.

    pmlmd holds a descriptor per worker (pidfd) and per client connection; running out of
    them would fail spawns and, inside libzmq, abort the process (see peerlimit).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, e)
    return soft, hard


def signal_pids(pids, signals) -> None:
    for pid in pids:
        for sig in signals:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break


def subtree_name(config: Config) -> str:
    """The name of the workers' cgroup subtree: by the state directory, so that a restarted pmlmd
    (and --release-workers) finds the cgroups of the workers it adopts."""
    return cgroup.subtree_name("pmlmd", os.path.realpath(config.state_dir))


def worker_cgroups(config: Config, scope_backend) -> cgroup.Subtree | cgroup.Scoped | None:
    """Where the workers' cgroups are (config ``worker_backend``); None for the /proc backend.

    With systemd scopes, below each batch's scope (cgroup.Scoped), where pmlmd may write the
    hierarchy; else a subtree of pmlmd's own cgroup (named by subtree_name). Raises DaemonError
    for ``worker_backend = "cgroup"`` where that cannot be."""
    try:
        if scope_backend.name == "systemd":
            if config.worker_backend == "proc":
                return None
            try:
                return cgroup.scoped("/" + scopes.SLICE)
            except cgroup.Unusable as e:
                if config.worker_backend == "cgroup":
                    raise
                log.info("workers are followed through /proc: %s", e)
                return None
        return cgroup.choose(config.worker_backend, subtree_name(config))
    except cgroup.Unusable as e:
        raise DaemonError(f'worker_backend = "cgroup": {e}; set worker_backend = "auto" or "proc" in pmlmd.toml') \
            from None


def release_workers(config: Config) -> int:
    """For ExecStopPost: while no pmlmd runs, no worker may stay stopped or frozen.

    Thaws every pmlm scope and every worker cgroup and continues every process in them and
    every worker the state database knows as running (or, with ``stranded = "terminate"``,
    ends them).
    """
    signals = (signal.SIGTERM, signal.SIGCONT) if config.stranded == "terminate" else (signal.SIGCONT,)
    try:
        backend = scopes.choose(config.scope_backend)
    except OSError as e:
        log.warning("%s: releasing workers by their process groups only", e)
        backend = scopes.NoScopes()
    in_scopes = known = 0
    subtree = cgroup.existing(subtree_name(config))
    held = subtree.workers() if subtree is not None else []
    roots = [subtree.root] if subtree is not None else []
    if backend.name == "systemd" and (mount := cgroup.cgroup2_mount()) is not None:
        scoped = cgroup.Scoped(mount, "/" + scopes.SLICE)
        held += scoped.workers()  # a worker cgroup's freeze outlasts ThawUnit
        roots += scoped.roots()
    for root in roots:
        cgroup.MemoryGuard.lift_lines(root)  # no line throttles workers that nobody governs now
    for w in held:
        try:
            w.thaw()
        except OSError as e:  # gone meanwhile, or not ours to write: the others are released all the same
            log.warning("cannot thaw %s: %s", w.path, e.strerror)
        for sig in signals:
            w.signal(sig)
    for batch_id in backend.scopes():
        backend.thaw(batch_id)
        pids = backend.scope_pids(batch_id)
        signal_pids(pids, signals)
        in_scopes += len(pids)
    if os.path.exists(os.path.join(config.state_dir, "state.db")):
        store = Store(config.state_dir)
        for stored in store.active_batches():
            for _, attempt, start_ticks in stored.open_attempts:
                child = procctl.adopt(attempt.pid, start_ticks) if attempt.pid and start_ticks else None
                if child is not None:
                    for sig in signals:
                        procctl.signal_group(child.pid, sig)
                    os.close(child.pidfd)
                    known += 1
        store.close()
    log.info("released workers (%s): %d processes in pmlm scopes, %d workers from the state database",
             config.stranded, in_scopes, known)
    return 0


class _Version(argparse.Action):
    """--version: the version, and the worker backend as probed when asked (cgroup.explain)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(f"pmlmd {__version__}\nworkers: {cgroup.explain()}\n")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmlmd", description="The Process & Load Manager daemon: runs batches of "
                                "workers submitted with pmlmctl and keeps the node within its CPU and "
                                "free-memory limits.")
    p.add_argument("--version", action=_Version, help="show the version and where workers would run here "
                   "(the worker backend that worker_backend = auto picks for this process), then exit")
    p.add_argument("--config", metavar="PATH", help=f"configuration file (default {DEFAULT_CONFIG_PATH}; a "
                   "missing default file means built-in defaults)")
    p.add_argument("--socket", metavar="PATH", help="control socket path (default /run/pmlmd/control.sock)")
    p.add_argument("--state-dir", metavar="DIR", help="where the state database lives (default /var/lib/pmlmd)")
    p.add_argument("--log-target", choices=("auto", "journal", "console"),
                   help="auto: the journal when stderr is connected to it, else the console")
    p.add_argument("--check-config", nargs="?", const=True, metavar="PATH",
                   help="do not serve: check the configuration file (PATH, else --config, else the default) "
                        "as a start would, print what is wrong, exit 0 or 1; for ExecReload=")
    p.add_argument("--release-workers", action="store_true",
                   help="do not serve: continue (or, with stranded = \"terminate\", end) every worker an earlier "
                        "pmlmd left, thawing their scopes; for ExecStopPost=")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"socket": args.socket, "state_dir": args.state_dir, "log_target": args.log_target}
    if args.check_config is not None:
        path = args.config if args.check_config is True else args.check_config
        try:
            load_config(path, overrides)
        except ConfigError as e:
            print(f"pmlmd: {e}", file=sys.stderr)
            return 1
        print(f"pmlmd: {path or DEFAULT_CONFIG_PATH}: the configuration is valid")
        return 0
    if args.release_workers:
        try:
            config = load_config(args.config, overrides)
            setup_logging(config.log_target, config.log_level)
            return release_workers(config)
        except (ConfigError, StoreError) as e:
            print(f"pmlmd: {e}", file=sys.stderr)
            return 1
    try:
        daemon = Daemon(args.config, overrides)
    except (ConfigError, StoreError, DaemonError) as e:
        print(f"pmlmd: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    return daemon.serve()


if __name__ == "__main__":
    sys.exit(main())
