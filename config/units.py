"""Byte sizes ("48GiB", "512MB") and durations ("30s", "5m", "forever") as
people write them in a config file or a request."""

from __future__ import annotations

import math
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_bytes(text: str) -> int:
    """``"48GiB"``, ``"48G"`` (binary, as memory is sold), ``"500MB"``, ``"1024"``."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (try '48GiB' or '512MiB')")
    number, prefix, _ = match.groups()
    power = " KMGT".index(prefix.upper() or " ")
    return int(float(number) * 1024**power)


def parse_duration(value: object) -> float:
    """Seconds from a number or ``"30s"``/``"5m"``/``"1h"``; a negative number or
    ``"forever"`` means for ever (``math.inf``), as in Ollama's ``keep_alive``."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        try:
            return math.inf if value < 0 else float(value)
        except OverflowError:  # past a float: for ever, in effect
            return math.inf
    if isinstance(value, str):
        if value.strip().lower() in {"forever", "inf", "-1"}:
            return math.inf
        match = _DURATION.match(value)
        if match is not None:
            number, unit = match.groups()
            return float(number) * _SECONDS[unit or "s"]
    raise ValueError(f"not a duration: {value!r} (try 30, '90s', '5m' or 'forever')")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
