"""The config loader: the shipped file, every key's good and bad values, and the errors operators see."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pmlmd.daemon import config
from pmlmd.daemon.config import Config, ConfigError, load_config
from pmlmd.core.governor import Limits

SHIPPED = Path(__file__).parent.parent / "etc" / "pmlmd" / "pmlmd.toml"
# A setting in the shipped file: "# key = value" on a line of its own.
SETTING_RE = re.compile(r"^# ([a-z_]+) = (.+)$", re.MULTILINE)


def write(tmp_path: Path, text: str, name: str = "pmlmd.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_shipped_file_loads_to_the_defaults():
    assert load_config(str(SHIPPED)) == Config()


def test_shipped_file_uncommented_also_loads_to_the_defaults(tmp_path):
    text = SHIPPED.read_text(encoding="utf-8")
    uncommented = SETTING_RE.sub(r"\1 = \2", text)
    assert load_config(write(tmp_path, uncommented)) == Config()


def test_shipped_file_documents_every_field_once():
    documented = SETTING_RE.findall(SHIPPED.read_text(encoding="utf-8"))
    names = [name for name, _ in documented]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(Config))


def test_every_field_has_a_place_in_the_file():
    assert set(config._OPTIONS) == {f.name for f in dataclasses.fields(Config)}
    assert {option.table for option in config._OPTIONS.values()} == set(config.TABLES)


# (table, key, TOML value, expected field value)
GOOD = [
    ("daemon", "socket", '"/run/x/ctl.sock"', "/run/x/ctl.sock"),
    ("daemon", "socket_mode", '"0660"', 0o660),
    ("daemon", "socket_mode", '"600"', 0o600),
    ("daemon", "group", '"batchers"', "batchers"),
    ("daemon", "state_dir", '"/srv/pmlmd"', "/srv/pmlmd"),
    ("daemon", "log_target", '"journal"', "journal"),
    ("daemon", "log_target", '"console"', "console"),
    ("daemon", "log_level", '"debug"', "debug"),
    ("daemon", "prune_after", '"12h"', 43200.0),
    ("daemon", "prune_after", '"30s"', 30.0),
    ("daemon", "prune_after", '"15m"', 900.0),
    ("daemon", "prune_after", '"7d"', 604800.0),
    ("daemon", "prune_after", "3600", 3600.0),
    ("daemon", "agent_socket", '"/run/pmlmd/a.sock"', "/run/pmlmd/a.sock"),
    ("daemon", "stranded", '"terminate"', "terminate"),
    ("daemon", "scope_backend", '"none"', "none"),
    ("daemon", "worker_backend", '"proc"', "proc"),
    ("daemon", "slice_tasks_max", "20000", 20000),
    ("daemon", "slice_tasks_max", '"60%"', "60%"),
    ("daemon", "slice_tasks_max", '"infinity"', "infinity"),
    ("daemon", "slice_memory_max", '"64G"', 64 << 30),
    ("daemon", "slice_memory_max", '"95.5%"', "95.5%"),
    ("daemon", "slice_memory_max", '"infinity"', "infinity"),
    ("daemon", "scope_tasks_max", "4096", 4096),
    ("daemon", "scope_tasks_max", '"12.50%"', "12.5%"),  # written back the way systemd shows it
    ("daemon", "scope_tasks_max", '"100%"', "100%"),
    ("daemon", "scope_memory_max", '"4G"', 4 << 30),
    ("daemon", "scope_memory_max", "1073741824", 1 << 30),
    ("daemon", "scope_memory_max", '"30%"', "30%"),
    ("daemon", "limits_conf_dir", '"/srv/security"', "/srv/security"),
    ("daemon", "output_limit", '"64K"', 65536),
    ("daemon", "output_limit", "0", 0),
    ("daemon", "output_journal", "true", True),
    ("limits", "cpu_limit", "50", 50.0),
    ("limits", "cpu_limit", "99.5", 99.5),
    ("limits", "cpu_margin", "0", 0.0),
    ("limits", "memfree_limit", "35", 35.0),
    ("limits", "memory_metric", '"free"', "free"),
    ("limits", "memory_gap", '"1G"', 1 << 30),
    ("limits", "memory_gap", "4096", 4096),
    ("limits", "min_free", '"512M"', 512 << 20),
    ("limits", "victim", '"largest"', "largest"),
    ("limits", "interval", "0.25", 0.25),
    ("limits", "interval", "2", 2.0),
    ("limits", "max_workers", "64", 64),
    ("limits", "max_workers", '"auto"', None),
    ("batches", "retries", "0", 0),
    ("batches", "retry_failed", "5", 5),
    ("batches", "term_grace", "30", 30.0),
    ("quotas", "tasks_queued", "500", 500),
    ("quotas", "batches_active", "4", 4),
    ("quotas", "min_interval", "0.5", 0.5),
    ("quotas", "min_interval", "1", 1.0),
    ("quotas", "state_bytes", '"1G"', 1 << 30),
    ("quotas", "request_bytes", '"64K"', 65536),
    ("quotas", "output_bytes", '"2G"', 2 << 30),
    ("quotas", "root_exempt", "false", False),
]


@pytest.mark.parametrize("table,key,toml,expected", GOOD, ids=lambda v: str(v))
def test_each_key_accepts_a_good_value(tmp_path, table, key, toml, expected):
    loaded = load_config(write(tmp_path, f"[{table}]\n{key} = {toml}\n"))
    assert getattr(loaded, key) == expected
    assert loaded == dataclasses.replace(Config(), **{key: expected})


# (table, key, TOML value, a fragment of the reason)
BAD = [
    ("daemon", "socket", '"run/ctl.sock"', "absolute path"),
    ("daemon", "socket", '"/' + "s" * 120 + '"', "at most 107 bytes"),
    ("daemon", "socket", "5", "absolute path"),
    ("daemon", "socket_mode", '"rw"', "octal digits"),
    ("daemon", "socket_mode", '"0680"', "octal digits"),
    ("daemon", "socket_mode", "432", "octal digits"),
    ("daemon", "socket_mode", '"7777"', "no set-user-ID, set-group-ID or sticky bit"),
    ("daemon", "group", '""', "group name"),
    ("daemon", "group", '"my group"', "group name"),
    ("daemon", "state_dir", '"var/lib/pmlmd"', "absolute path"),
    ("daemon", "log_target", '"syslog"', '"auto", "journal", "console"'),
    ("daemon", "log_level", '"verbose"', '"debug", "info", "warning", "error"'),
    ("daemon", "log_level", '"warn"', 'did you mean "warning"?'),
    ("daemon", "prune_after", '"12"', "duration"),
    ("daemon", "prune_after", '"2w"', "duration"),
    ("daemon", "prune_after", "0", "positive duration"),
    ("daemon", "prune_after", "-5", "positive duration"),
    ("daemon", "prune_after", "inf", "positive duration"),
    ("daemon", "agent_socket", '"agent.sock"', "absolute path"),
    ("daemon", "stranded", '"kill"', '"continue", "terminate"'),
    ("daemon", "scope_backend", '"docker"', '"auto", "systemd", "none"'),
    ("daemon", "worker_backend", '"cgroups"', '"auto", "cgroup", "proc"'),
    ("daemon", "slice_tasks_max", "0", "number of tasks from 1 to 4194304"),
    ("daemon", "slice_tasks_max", "5000000", "number of tasks from 1 to 4194304"),
    ("daemon", "slice_memory_max", '"lots"', 'a size from 1M'),
    ("daemon", "scope_tasks_max", '"0%"', 'percentage of the node\'s maximum like "25%"'),
    ("daemon", "scope_tasks_max", '"101%"', 'or "infinity", got "101%"'),
    ("daemon", "scope_tasks_max", '"12.345%"', 'got "12.345%"'),
    ("daemon", "scope_tasks_max", "2.5", "got 2.5"),
    ("daemon", "scope_tasks_max", "true", "got true"),
    ("daemon", "scope_tasks_max", '"unlimited"', 'or "infinity"'),
    ("daemon", "scope_memory_max", '"4"', "a size from 1M"),
    ("daemon", "scope_memory_max", "0", "a size from 1M"),
    ("daemon", "scope_memory_max", '"-1G"', "a size from 1M"),
    ("daemon", "scope_memory_max", "1.5", "got 1.5"),
    ("daemon", "scope_memory_max", '"infinite"', 'or "infinity"'),
    ("daemon", "limits_conf_dir", '"etc/security"', "absolute path"),
    ("daemon", "output_limit", '"lots"', "size"),
    ("daemon", "output_limit", "-1", "size"),
    ("daemon", "output_journal", '"yes"', "true or false"),
    ("daemon", "output_journal", "1", "true or false"),
    ("limits", "cpu_limit", "150", "from 1 to 100, got 150"),
    ("limits", "cpu_limit", "0", "from 1 to 100"),
    ("limits", "cpu_limit", "true", "got true"),
    ("limits", "cpu_limit", '"90"', 'got "90"'),
    ("limits", "cpu_limit", "nan", "from 1 to 100"),
    ("limits", "cpu_margin", "100", "from 0 to 99"),
    ("limits", "memfree_limit", "-1", "from 0 to 99"),
    ("limits", "memory_metric", '"MemFree"', '"available", "free"'),
    ("limits", "memory_gap", '"lots"', "K, M, G or T"),
    ("limits", "memory_gap", "-1", "K, M, G or T"),
    ("limits", "memory_gap", "1.5", "K, M, G or T"),
    ("limits", "min_free", '"-300M"', "K, M, G or T"),
    ("limits", "victim", '"biggest"', '"newest", "oldest", "largest"'),
    ("limits", "interval", "0.001", "from 0.01 to 60"),
    ("limits", "interval", "61", "from 0.01 to 60"),
    ("limits", "max_workers", "0", '"auto" or a whole number from 1 to 100000'),
    ("limits", "max_workers", "2.5", '"auto" or a whole number'),
    ("limits", "max_workers", '"many"', '"auto" or a whole number'),
    ("limits", "max_workers", "false", '"auto" or a whole number'),
    ("batches", "retries", "-1", "whole number from 0 to 1000"),
    ("batches", "retries", "3.0", "whole number from 0 to 1000, got 3.0"),
    ("batches", "retry_failed", "1001", "whole number from 0 to 1000"),
    ("batches", "term_grace", "3601", "from 0 to 3600"),
    ("batches", "term_grace", "[10]", "got an array"),
    ("quotas", "tasks_queued", "0", "whole number from 1 to 100000000"),
    ("quotas", "tasks_queued", '"100K"', "whole number from 1 to 100000000"),
    ("quotas", "batches_active", "10001", "whole number from 1 to 10000"),
    ("quotas", "min_interval", "0.001", "number from 0.01 to 60"),
    ("quotas", "state_bytes", '"512K"', "size from 1M"),
    ("quotas", "request_bytes", '"2M"', "size from 4K to 1M"),
    ("quotas", "output_bytes", '"100K"', "size from 1M"),
    ("quotas", "root_exempt", '"yes"', "expected true or false"),
]


@pytest.mark.parametrize("table,key,toml,reason", BAD, ids=lambda v: str(v)[:40])
def test_each_key_refuses_a_bad_value_naming_file_key_and_reason(tmp_path, table, key, toml, reason):
    path = write(tmp_path, f"[{table}]\n{key} = {toml}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {table}.{key}: ")
    assert reason in message
    assert "\n" not in message


def test_every_key_has_good_and_bad_cases():
    names = {f.name for f in dataclasses.fields(Config)}
    assert {key for _, key, _, _ in GOOD} == names
    assert {key for _, key, _, _ in BAD} == names


def test_unknown_key_suggests_the_closest_known_key(tmp_path):
    path = write(tmp_path, "[limits]\ncpu_limt = 80\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: limits.cpu_limt: unknown key")
    assert 'did you mean "cpu_limit"?' in message
    assert "known keys in [limits]: cpu_limit, cpu_margin, memfree_limit" in message


def test_unknown_key_without_a_close_match_lists_the_known_keys(tmp_path):
    path = write(tmp_path, "[batches]\ncolour = 1\n")
    with pytest.raises(ConfigError, match=r"batches\.colour: unknown key \(known keys in \[batches\]: "
                                          r"retries, retry_failed, term_grace\)$"):
        load_config(path)


def test_key_in_the_wrong_table_names_the_right_one(tmp_path):
    path = write(tmp_path, "[limits]\nretries = 3\n")
    with pytest.raises(ConfigError, match=r"limits\.retries: .*retries belongs in \[batches\]"):
        load_config(path)


def test_unknown_table(tmp_path):
    path = write(tmp_path, "[limit]\ncpu_limit = 80\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: limit: unknown table")
    assert "did you mean [limits]?" in message
    assert "[daemon], [limits], [batches]" in message


def test_setting_outside_any_table_names_its_table(tmp_path):
    path = write(tmp_path, "cpu_limit = 80\n")
    with pytest.raises(ConfigError, match=r": cpu_limit: settings go in a table; cpu_limit belongs in \[limits\]"):
        load_config(path)


def test_table_name_given_a_value(tmp_path):
    path = write(tmp_path, "limits = 5\n")
    with pytest.raises(ConfigError, match=r": limits: expected a table \[limits\], got 5"):
        load_config(path)


def test_invalid_toml_gives_the_line(tmp_path):
    path = write(tmp_path, "[limits]\ncpu_limit 80\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in message


def test_unquoted_octal_mode_is_invalid_toml(tmp_path):
    path = write(tmp_path, "[daemon]\nsocket_mode = 0660\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "pmlmd.toml"
    path.write_bytes(b'[daemon]\ngroup = "\xff"\n')
    with pytest.raises(ConfigError, match=r"invalid TOML: not UTF-8"):
        load_config(str(path))


def test_missing_explicit_file_is_an_error(tmp_path):
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: cannot read the config file: No such file"):
        load_config(path)


def test_explicit_directory_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}: cannot read the config file: "):
        load_config(str(tmp_path))


def test_missing_default_file_gives_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    assert load_config(None) == Config()


def test_default_file_is_read_when_present(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", write(tmp_path, "[limits]\ncpu_limit = 60\n"))
    assert load_config(None).cpu_limit == 60.0


def test_errors_in_the_default_file_name_it(tmp_path, monkeypatch):
    path = write(tmp_path, "[limits]\ncpu_limit = 600\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", path)
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: limits\.cpu_limit: "):
        load_config(None)


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_overrides_beat_the_file(tmp_path):
    path = write(tmp_path, '[daemon]\nsocket = "/run/a.sock"\nstate_dir = "/srv/a"\nlog_target = "journal"\n')
    loaded = load_config(path, {"socket": "/run/b.sock", "state_dir": "/srv/b", "log_target": "console"})
    assert (loaded.socket, loaded.state_dir, loaded.log_target) == ("/run/b.sock", "/srv/b", "console")


def test_none_overrides_are_ignored(tmp_path):
    path = write(tmp_path, '[daemon]\nsocket = "/run/a.sock"\n')
    assert load_config(path, {"socket": None, "log_target": None}).socket == "/run/a.sock"


def test_overrides_of_converted_fields_take_typed_values(tmp_path):
    loaded = load_config(write(tmp_path, ""), {"socket_mode": 0o600, "memory_gap": 1 << 30, "prune_after": 60.0,
                                               "max_workers": 4})
    assert (loaded.socket_mode, loaded.memory_gap, loaded.prune_after, loaded.max_workers) == (0o600, 1 << 30, 60.0, 4)


def test_bad_override_is_refused_naming_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"^command line: --state-dir: expected an absolute path"):
        load_config(write(tmp_path, ""), {"state_dir": "relative/dir"})
    with pytest.raises(ConfigError, match=r"^command line: --log-target: expected one of"):
        load_config(write(tmp_path, ""), {"log_target": "syslog"})


def test_override_for_no_field_is_a_programming_error(tmp_path):
    with pytest.raises(TypeError, match="no Config field named 'sockets'"):
        load_config(write(tmp_path, ""), {"sockets": "/run/x.sock"})


def test_loading_is_a_pure_function_of_the_content(tmp_path):
    text = '[limits]\ncpu_limit = 70\nmemory_gap = "1G"\n[batches]\nretries = 1\n'
    first = load_config(write(tmp_path, text, "one.toml"))
    second = load_config(write(tmp_path, text, "two.toml"))
    assert first == second == Config(cpu_limit=70.0, memory_gap=1 << 30, retries=1)


def test_limits_with_auto_workers_is_eight_per_cpu():
    assert Config().limits(cpus=2) == Limits(max_workers=16)


def test_limits_carry_every_limit():
    cfg = Config(cpu_limit=50.0, cpu_margin=5.0, memfree_limit=30.0, memory_metric="free", memory_gap=1 << 30,
                 min_free=1 << 29, victim="largest", interval=0.2, max_workers=3)
    assert cfg.limits(cpus=64) == Limits(cpu_limit=50.0, memfree_limit=30.0, memory_metric="free",
                                         memory_gap=1 << 30, min_free=1 << 29, victim="largest", max_workers=3,
                                         cpu_margin=5.0, interval=0.2)


def test_config_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().cpu_limit = 50.0  # type: ignore[misc]


def test_parse_duration():
    assert config.parse_duration("1.5h") == 5400.0
    assert config.parse_duration(" 2d ") == 172800.0
    assert config.parse_duration(90) == 90.0
