"""Sizes as operators write them ("200M", "1.5G") and as pmlmd prints them."""

import re
from decimal import Context, Decimal

_MULTIPLIERS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
# Decimal, not float: float() of a long digit string is inf, and int(inf) raises OverflowError.
# 60 digits keep every size up to far beyond bounds.MAX_SIZE exact.
_EXACT = Context(prec=60)


def parse_size(text: str) -> int:
    """Parse a size with an optional binary suffix K, M, G or T into bytes.

    A bare number is bytes. Raises ValueError naming the accepted forms. Any number of digits
    is read; whether the size is in range is for the caller to check (bounds.BOUNDS).
    """
    match = _SIZE_RE.match(str(text))
    if not match:
        shown = repr(text) if len(str(text)) <= 40 else f"{str(text)[:40]!r}..."
        raise ValueError(
            f"invalid size {shown}: use a number of bytes or a number with K, M, G or T (e.g. 200M, 1.5G)"
        )
    number, suffix = match.groups()
    return int(_EXACT.multiply(Decimal(number), _MULTIPLIERS[suffix.upper()]))


def format_size(nbytes: float) -> str:
    """Format bytes compactly with a binary suffix: 1536 -> '1.5K'."""
    sign = "-" if nbytes < 0 else ""
    value = float(abs(nbytes))
    for suffix in ("", "K", "M", "G"):
        if value < 1024:
            return f"{sign}{value:.0f}{suffix}" if suffix == "" or value >= 100 else f"{sign}{value:.1f}{suffix}"
        value /= 1024
    return f"{sign}{value:.1f}T"
