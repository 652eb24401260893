"""Sizes as operators write them ("200M", "1.5G") and as pmlmd prints them."""

import re

_MULTIPLIERS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a size with an optional binary suffix K, M, G or T into bytes.

    A bare number is bytes. Raises ValueError naming the accepted forms.
    """
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(
            f"invalid size {text!r}: use a number of bytes or a number with K, M, G or T (e.g. 200M, 1.5G)"
        )
    number, suffix = match.groups()
    return int(float(number) * _MULTIPLIERS[suffix.upper()])


def format_size(nbytes: float) -> str:
    """Format bytes compactly with a binary suffix: 1536 -> '1.5K'."""
    sign = "-" if nbytes < 0 else ""
    value = float(abs(nbytes))
    for suffix in ("", "K", "M", "G"):
        if value < 1024:
            return f"{sign}{value:.0f}{suffix}" if suffix == "" or value >= 100 else f"{sign}{value:.1f}{suffix}"
        value /= 1024
    return f"{sign}{value:.1f}T"
