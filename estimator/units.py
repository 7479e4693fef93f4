"""Units: the one module that knows what a GiB, a GB and "1.3B" are.

Inside zeroest every amount of memory is an ``int`` of bytes and every count of parameters an ``int``.
Units appear only at the edges (parsing user input, rendering output):

* GiB is ``2**30`` bytes, MiB ``2**20``; GB is ``10**9`` bytes, MB ``10**6``.
* ``"1.3B"`` is 1.3e9 parameters, ``"350M"`` 3.5e8, ``"70b"`` 7e10 (case-insensitive; K, M, B, T).
* ``"24GiB"``/``"24G"`` are 24 * 2**30 bytes, ``"80GB"`` is 80 * 10**9 bytes, a bare number is bytes.
"""

from __future__ import annotations

import math
import re

KiB = 2**10
MiB = 2**20
GiB = 2**30
TiB = 2**40
KB = 10**3
MB = 10**6
GB = 10**9
TB = 10**12

_COUNT_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_BYTE_SUFFIX = {
    "": 1, "B": 1,
    "K": KiB, "KI": KiB, "KIB": KiB, "KB": KB,
    "M": MiB, "MI": MiB, "MIB": MiB, "MB": MB,
    "G": GiB, "GI": GiB, "GIB": GiB, "GB": GB,
    "T": TiB, "TI": TiB, "TIB": TiB, "TB": TB,
}
_NUMBER = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_count(text: str | int | float, *, what: str = "parameter count", minimum: int = 1) -> int:
    """Parse a parameter count such as ``"1.3B"``, ``"350M"``, ``"7e9"`` or ``125000000``; ``what`` names it in
    errors, and ``minimum`` is the smallest count taken (0 for element counts where DeepSpeed takes 0).

    Raises ValueError with a message that says what was expected.
    """
    if isinstance(text, (int, float)):
        value, suffix = float(text), ""
    else:
        match = _NUMBER.match(str(text))
        if not match or match.group(2).upper() not in _COUNT_SUFFIX:
            raise ValueError(
                f"cannot read {text!r} as a {what}: use a number with an optional K, M, B or T suffix, "
                f"e.g. {'1.3B or 350M' if what == 'parameter count' else '5e8 or 500M'}"
            )
        value, suffix = float(match.group(1)), match.group(2).upper()
    if not math.isfinite(value * _COUNT_SUFFIX[suffix]):
        raise ValueError(f"{what} {text!r} is too large to be a number; use e.g. "
                         f"{'1.3B or 70B' if what == 'parameter count' else '5e8 or 500M'}")
    count = round(value * _COUNT_SUFFIX[suffix])
    if count < minimum:
        raise ValueError(f"{what} {text!r} must be {'positive' if minimum == 1 else f'{minimum} or more'}")
    return count


def parse_bytes(text: str | int | float) -> int:
    """Parse a memory size such as ``"24GiB"``, ``"24G"`` (GiB), ``"80GB"`` (10**9) or a number of bytes."""
    if isinstance(text, (int, float)):
        value, suffix = float(text), ""
    else:
        match = _NUMBER.match(str(text))
        if not match or match.group(2).upper() not in _BYTE_SUFFIX:
            raise ValueError(
                f"cannot read {text!r} as a memory size: use e.g. 24GiB, 24G (GiB), 80GB (10**9 bytes) or bytes"
            )
        value, suffix = float(match.group(1)), match.group(2).upper()
    size = round(value * _BYTE_SUFFIX[suffix])
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return size


def gib(n_bytes: int | float) -> float:
    """Bytes to GiB (2**30), for display only."""
    return n_bytes / GiB


def format_gib(n_bytes: int | float, digits: int = 2) -> str:
    """``12.34 GiB``: bytes rendered in GiB (2**30)."""
    return f"{n_bytes / GiB:.{digits}f} GiB"


def format_count(n: int) -> str:
    """``1.31B``, ``124.4M``: a parameter count for display."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}" if n / scale < 100 else f"{n / scale:.1f}{suffix}"
    return str(n)


def ceil_div(a: int, b: int) -> int:
    """Ceiling of a / b for non-negative integers."""
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= a."""
    return ceil_div(a, multiple) * multiple


def round_up_bytes(x: float, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= x, for bytes summed as a float (fractions of byte counts, as
    the reserved model's terms are); 0 for x <= 0."""
    return round_up(max(0, math.ceil(x)), multiple)
