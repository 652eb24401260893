"""The limit options are declared once (pmlmd.core.options.LIMIT_OPTIONS): what is derived from the
table is checked to follow it, and what is written by hand (the protocol's field table, the man
pages, the commented pmlmd.toml) is checked to say the same."""

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmlmd.core import protocol
from pmlmd.daemon.config import Config, ConfigError, load_config
from pmlmd.client.ctl import build_parser
from pmlmd.core.governor import Limits
from pmlmd.core.options import LIMIT_OPTIONS, tighten

ROOT = Path(__file__).parent.parent
NAMES = [o.name for o in LIMIT_OPTIONS]


def troff(text: str) -> str:
    return text.replace("-", "\\-")


def subparser(name):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


@pytest.mark.parametrize("command", ["run", "submit"])
@pytest.mark.parametrize("option", LIMIT_OPTIONS, ids=NAMES)
def test_pmlmctl_takes_each_limit_with_its_range_and_default(command, option):
    parser = subparser(command)
    action = next(a for a in parser._actions if option.flag in a.option_strings)
    assert action.dest == option.name
    # run uses the node-less defaults; submit leaves a limit out for the daemon's own.
    assert action.default == (option.default if command == "run" else None)
    if option.choices:
        assert tuple(action.choices) == option.choices
    else:
        assert action.metavar == option.metavar
        with pytest.raises(SystemExit):  # out of range is a usage error, before any daemon is asked
            parser.parse_args([option.flag, str(option.bound.high * 2 + 1), "--", "true"])


@pytest.mark.parametrize("option", LIMIT_OPTIONS, ids=NAMES)
def test_the_config_file_takes_each_limit_with_the_same_default(tmp_path, option):
    assert getattr(Config(), option.name) == option.default
    assert getattr(Config().limits(2), option.name) == option.default
    value = option.choices[-1] if option.choices else option.bound.low
    path = tmp_path / "pmlmd.toml"
    path.write_text(f"[limits]\n{option.name} = {value!r}\n".replace("'", '"'))
    assert getattr(load_config(str(path)).limits(2), option.name) == value
    if not option.choices:
        path.write_text(f"[limits]\n{option.name} = {option.bound.high * 2 + 1}\n")
        with pytest.raises(ConfigError, match=option.name):
            load_config(str(path))


@pytest.mark.parametrize("option", LIMIT_OPTIONS, ids=NAMES)
def test_submit_takes_each_limit_and_the_protocol_table_documents_it(option):
    field = protocol._SCHEMAS["submit"].fields[option.name]
    assert field.nullable and field.default is None  # left out: the node's
    rows = re.findall(rf"^``{option.name}``\s+(.*)$", protocol.__doc__, re.M)
    assert len(rows) == 1, f"{option.name}: one row in protocol's field table"
    if option.choices:
        assert all(f'``"{choice}"``' in rows[0] for choice in option.choices)
    else:
        assert f"{option.bound.kind if option.bound.kind != 'size' else 'integer'} " in rows[0]


def _entry(text: str, start: str) -> str:
    at = text.index(start)
    end = text.find("\n.TP", at)
    return text[at:end if end != -1 else None]


@pytest.mark.parametrize("option", LIMIT_OPTIONS, ids=NAMES)
def test_the_man_pages_and_the_shipped_config_describe_each_limit(option):
    shown = option.text(option.default)
    pmlmctl = (ROOT / "packaging/man/pmlmctl.1").read_text()
    entry = _entry(pmlmctl, troff(option.flag))
    assert f"default {shown}" in entry or "(the default)" in entry, entry
    toml5 = (ROOT / "packaging/man/pmlmd.toml.5").read_text()
    limits = toml5[toml5.index(".SH [limits]"):]
    entry = _entry(limits, f".B {option.name}\n")
    assert re.search(rf"Default\s+(\.BR \\\(dq)?{re.escape(str(shown))}|the default", entry), entry
    shipped = (ROOT / "etc/pmlmd/pmlmd.toml").read_text()
    quoted = f'"{shown}"' if option.choices or option.metavar == "SIZE" else shown
    assert f"# {option.name} = {quoted}\n" in shipped


def test_every_limit_of_the_governor_is_an_option():
    asked = {o.name for o in LIMIT_OPTIONS}
    assert asked == set(Limits.__dataclass_fields__) - {"max_workers"}  # the cap is a batch's, not a limit


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_batch_can_only_tighten_each_limit(data):
    node = Limits()
    asked = {}
    for option in LIMIT_OPTIONS:
        if option.choices:
            asked[option.name] = data.draw(st.sampled_from(option.choices))
        else:
            asked[option.name] = data.draw(st.floats(option.bound.low, option.bound.high) if option.metavar != "SIZE"
                                            else st.integers(option.bound.low, option.bound.high))
    limits = tighten(node, **asked)
    for option in LIMIT_OPTIONS:
        ours, theirs = getattr(node, option.name), getattr(limits, option.name)
        assert not option.looser(theirs, ours)
        assert option.looser(asked[option.name], ours) == (theirs != asked[option.name])
