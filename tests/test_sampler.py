"""The /proc parsers against fake /proc trees (and once against the real one)."""

import os

import pytest

from pmlmd.node.sampler import (PAGE_SIZE, NodeSampler, ProcReader, count_cpus, group_usage, parse_cpu_line,
                           parse_meminfo, parse_memory, parse_pid_stat)

MEMINFO = """\
MemTotal:       16000000 kB
MemFree:         1000000 kB
MemAvailable:    6000000 kB
Buffers:          200000 kB
HugePages_Total:       0
"""

STAT = """\
cpu  100 0 100 700 100 0 0 0 0 0
cpu0 50 0 50 350 50 0 0 0 0 0
cpu1 50 0 50 350 50 0 0 0 0 0
intr 1234
"""


def pid_stat_line(pid, comm="worker", state="S", ppid=1, pgrp=None, utime=0, stime=0, cutime=0, cstime=0,
                  start=1000, rss=256):
    pgrp = pid if pgrp is None else pgrp
    # fields 3.. of proc(5): state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    # cutime cstime priority nice num_threads itrealvalue starttime vsize rss ...
    rest = [state, ppid, pgrp, pgrp, 0, -1, 4194304, 0, 0, 0, 0, utime, stime, cutime, cstime, 20, 0, 1, 0, start,
            1 << 24, rss] + [0] * 30
    return f"{pid} ({comm}) " + " ".join(str(v) for v in rest) + "\n"


def fake_proc(tmp_path, processes=(), meminfo=MEMINFO, stat=STAT):
    (tmp_path / "meminfo").write_text(meminfo)
    (tmp_path / "stat").write_text(stat)
    for kwargs in processes:
        d = tmp_path / str(kwargs["pid"])
        d.mkdir()
        (d / "stat").write_text(pid_stat_line(**kwargs))
    (tmp_path / "self").mkdir()  # non-numeric entries are ignored
    return ProcReader(str(tmp_path))


def test_meminfo_fields_in_bytes():
    info = parse_meminfo(MEMINFO)
    assert info["MemTotal"] == 16000000 * 1024
    assert info["MemAvailable"] == 6000000 * 1024
    assert info["HugePages_Total"] == 0  # unitless fields stay as they are


def test_memory_reads_the_three_fields_a_sample_needs_in_bytes():
    assert parse_memory(MEMINFO.encode()) == (16000000 * 1024, 1000000 * 1024, 6000000 * 1024)
    # Before Linux 3.14 there is no MemAvailable: MemFree stands for it.
    assert parse_memory(b"MemTotal: 1000 kB\nMemFree: 300 kB\nBuffers: 5 kB\n") == (1000 * 1024, 300 * 1024, 300 * 1024)
    with pytest.raises(ValueError, match="MemTotal"):
        parse_memory(b"MemFree: 300 kB\n")


def test_a_sample_reads_the_files_again_through_its_kept_descriptors(tmp_path):
    proc = fake_proc(tmp_path)
    assert proc.memory()[1] == 1000000 * 1024
    (tmp_path / "meminfo").write_text(MEMINFO.replace("MemFree:         1000000", "MemFree: 5"))  # in place
    assert proc.memory()[1] == 5 * 1024
    assert set(proc.kept) == {"meminfo"}


def test_cpu_line_counts_idle_and_iowait_as_not_busy():
    busy, total = parse_cpu_line(STAT)
    assert (busy, total) == (200, 1000)
    assert count_cpus(STAT) == 2


def test_cpu_line_missing_is_an_error():
    with pytest.raises(ValueError, match="cpu"):
        parse_cpu_line("intr 1\n")


@pytest.mark.parametrize("comm", ["worker", "a b", "x) S 1 (y", "((("])
def test_pid_stat_survives_any_command_name(comm):
    st = parse_pid_stat(pid_stat_line(42, comm=comm, state="T", ppid=7, pgrp=40, utime=3, stime=4, cutime=5,
                                      cstime=6, start=999, rss=10))
    assert (st.pid, st.state, st.ppid, st.pgrp, st.cpu_ticks, st.start_ticks, st.rss_pages) == \
        (42, "T", 7, 40, 18, 999, 10)


def test_group_usage_sums_the_members_of_each_group(tmp_path):
    proc = fake_proc(tmp_path, [
        dict(pid=10, state="S", utime=5, rss=100),
        dict(pid=11, pgrp=10, state="R", utime=20, rss=300),
        dict(pid=12, pgrp=10, state="Z", rss=0),
        dict(pid=20, state="T", stime=7, rss=50),
        dict(pid=30, rss=999),  # not a worker
    ])
    usage = group_usage(proc.all_pid_stats(), {10, 20, 99})
    assert usage[10].rss == 400 * PAGE_SIZE and usage[10].cpu_ticks == 25
    assert sorted(usage[10].states) == ["R", "S", "Z"] and usage[10].processes == 3
    assert usage[20].states == "T"
    assert 99 not in usage  # a group with no members is simply absent


def test_vanished_process_reads_as_none(tmp_path):
    proc = fake_proc(tmp_path)
    assert proc.pid_stat(12345) is None


def test_node_sampler_measures_cpu_over_a_window(tmp_path):
    proc = fake_proc(tmp_path)
    clock = iter([0.0, 0.1, 0.5]).__next__
    sampler = NodeSampler(proc, cpu_window=0.2, clock=clock)
    first = sampler.sample()
    assert first.cpu_pct is None  # one reading is not a rate
    assert first.mem_available == 6000000 * 1024 and first.mem_free == 1000000 * 1024
    (tmp_path / "stat").write_text("cpu  400 0 400 1100 100 0 0 0 0 0\ncpu0 1\ncpu1 1\n")
    assert sampler.sample().cpu_pct is None  # 0.1 s: too short a window, nothing yet
    assert sampler.sample().cpu_pct == pytest.approx(100.0 * 600 / 1000)


def test_meminfo_without_memavailable_falls_back_to_memfree(tmp_path):
    proc = fake_proc(tmp_path, meminfo="MemTotal: 1000 kB\nMemFree: 300 kB\n")
    assert NodeSampler(proc).sample().mem_available == 300 * 1024


def test_real_proc_sees_this_process():
    reader = ProcReader()
    me = reader.pid_stat(os.getpid())
    assert me.pid == os.getpid() and me.rss_pages > 0 and me.state in "RS"
    info = reader.meminfo()
    assert 0 < info["MemAvailable"] <= info["MemTotal"]


def test_pss_is_read_from_smaps_rollup_in_bytes(tmp_path):
    from pmlmd.node.sampler import ProcReader, parse_pss

    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "smaps_rollup").write_text(
        "56404743c000-7ffd048ee000 ---p 00000000 00:00 0    [rollup]\nRss:  1728 kB\nPss:  597 kB\n")
    assert ProcReader(str(tmp_path)).pss(7) == 597 * 1024
    assert ProcReader(str(tmp_path)).pss(8) is None  # gone
    assert parse_pss("Rss: 1 kB\n") is None


def test_a_thread_made_while_its_process_is_read_is_found(tmp_path):
    """Thread 11 is made by thread 10 after the threads were listed and before 10's time was read:
    the time read for 10 already counts the making, so 10 will not move again, and a thread
    missed now would stay unseen while 10 sleeps. The threads are listed again until no new one
    shows."""
    (tmp_path / "10" / "task" / "10").mkdir(parents=True)
    times = {10: 500, 11: 7}

    def read(pid, tid):
        if tid == 10:
            (tmp_path / "10" / "task" / "11").mkdir(exist_ok=True)  # made as 10 runs
        return times[tid]

    assert ProcReader(str(tmp_path)).runtimes(10, read) == {10: 500, 11: 7}
