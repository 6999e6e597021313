"""Field checks shared by every reader of user input: protocol messages (server/state.py), steering specs and
command-line values (engine/steering.py) and score files (protocol/score.py).

One wording for each problem, whoever reads the value; each reader names the field (`where`) and raises its
own error type (`error`: ProtocolError, ScoreError, ValueError), so a message says what is wrong in the
reader's terms. Torch-free, like the rest of protocol/.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Sequence

ErrorType = Callable[[str], Exception]
ECHO_CHARS = 80  # the most of a value an error message quotes: an error names bad input, never echoes all of it


def shown(value: Any, limit: int = ECHO_CHARS) -> str:
    """`repr(value)` for an error message, cut to `limit` characters (and the full length said), so an error
    about a 60 KB key or string stays short. repr also escapes what cannot be encoded (a lone surrogate)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def number(where: str, value: Any, lo: float | None = None, hi: float | None = None, *,
           error: ErrorType = ValueError) -> float:
    """A finite real number (not a bool) as a float, within [lo, hi] when given. An integer beyond the float
    range (JSON and TOML carry 1e400 written out as digits) is refused as not finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{where} must be a number, got {shown(value)}")
    try:
        as_float = float(value)
    except OverflowError:
        raise error(f"{where} must be finite, got an integer of {len(str(value))} digits") from None
    if not math.isfinite(as_float):
        raise error(f"{where} must be finite, got {shown(value)}")
    if (lo is not None and as_float < lo) or (hi is not None and as_float > hi):
        raise error(f"{where} must be in [{lo}, {hi}], got {as_float}")
    return as_float


def whole(where: str, value: Any, lo: int | None = None, hi: int | None = None, *, integral_floats: bool = False,
          error: ErrorType = ValueError) -> int:
    """A whole number (not a bool) within [lo, hi] when given. `integral_floats` also takes 1500.0 as 1500
    (JSON writers may turn one into the other); the protocol does not."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and integral_floats and isinstance(value, float) and value.is_integer():
        ok = True
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
        raise error(f"{where} must be a whole number{bounds}, got {shown(value)}")
    return int(value)


def choice(where: str, value: Any, options: Sequence[str], *, error: ErrorType = ValueError) -> str:
    """One of `options`."""
    if value not in options:
        raise error(f"{where} must be one of {', '.join(options)}, got {shown(value)}")
    return value


def fields(where: str, value: Any, allowed: Sequence[str], *, kind: str = "an object", key: str = "field",
           error: ErrorType = ValueError) -> Mapping[str, Any]:
    """A mapping whose keys are all in `allowed` (`kind` and `key` name it in the reader's terms: a score
    says "a table" and "key")."""
    if not isinstance(value, dict):
        raise error(f"{where} must be {kind}, got {shown(value)}")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise error(f"{where}: unknown {key} {shown(unknown[0])}; allowed: {', '.join(allowed)}")
    return value
