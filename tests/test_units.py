import pytest

from pmlmd.core.units import format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("0", 0), ("4096", 4096), ("200M", 200 << 20), ("200m", 200 << 20), ("1.5G", 3 << 29), ("300K", 300 << 10),
    ("2GiB", 2 << 30), ("1T", 1 << 40), (" 64 MB ", 64 << 20),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "-1M", "12X", "M", "1.2.3G", "ten"])
def test_parse_size_rejects_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match="K, M, G or T"):
        parse_size(text)


def test_format_size():
    assert format_size(512) == "512"
    assert format_size(1536) == "1.5K"
    assert format_size(300 << 20) == "300M"
    assert format_size(3 << 29) == "1.5G"
