"""The one rule for plain arguments (counts, seeds, sizes) of the Python API and the CLI's flags alike: a wrong
value is one `ConfigError` that names the argument, the value and what is expected, never a traceback from deep
inside (a negative top-k reaching torch.topk, a string reaching range())."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError, quote


def whole_number(name: str, value: Any, least: int = 0) -> int:
    """`value` as an int of at least `least` (a bool, a float or a string is refused: '10' is not 10 in Python)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{name}={quote(value)}: expected a whole number of at least {least}")
    return value


def optional_whole_number(name: str, value: Any, least: int = 0) -> int | None:
    return None if value is None else whole_number(name, value, least)


def real_number(name: str, value: Any, above: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (above is not None and not value > above):
        limit = f" above {above:g}" if above is not None else ""
        raise ConfigError(f"{name}={quote(value)}: expected a number{limit}")
    return float(value)


def path_like(name: str, value: Any) -> Path:
    """A file or folder argument: a str or a path."""
    if not isinstance(value, str | Path) or not str(value):
        raise ConfigError(f"{name}={quote(value)}: expected a path (a str or a pathlib.Path)")
    return Path(value)


def paths(name: str, value: Any) -> list[Path]:
    """One path, or a list or tuple of them."""
    items = [value] if isinstance(value, str | Path) else value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(f"{name}={quote(value)}: expected a path or a list of paths")
    return [path_like(name, item) for item in items]
