"""What the commands share on their command lines: argument types and progress, with no torch or wgpu.

Every option is checked by argparse itself (a `type=` function here or `choices=`),
so a bad value is a usage error -- exit status 2, a message naming the option --
before anything slow is imported, built, exported or run on a GPU.

Results go to stdout; diagnostics (progress, the adapter, warnings) to stderr.
Progress is a tqdm bar on stderr, shown only when stderr is a terminal (tqdm's
disable=None); its notes and log records print above it, or as plain lines
without a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Callable, List, NoReturn, Optional, Sequence, Type

from executorch_wgpu.backend.serialization.blob import GROUP_ALIGN   # K and group sizes: multiples of this


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def int_in(low: int, high: int) -> Callable[[str], int]:
    """A type for an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def int_list(text: str) -> List[int]:
    """Comma-separated positive integers, at least one."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def multiple_of_32(text: str) -> int:
    """A positive multiple of 32: a group size, or the in-features K of a q4gsw layer of group size 32."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or value % GROUP_ALIGN:
        raise argparse.ArgumentTypeError(f"expected a positive multiple of {GROUP_ALIGN}, got {text!r}")
    return value


def comma_choices(choices: Sequence[str]) -> Callable[[str], List[str]]:
    """A type for a comma-separated subset of choices (order kept, at least one)."""

    def parse(text: str) -> List[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                                             f"choose from {', '.join(choices)}")
        return values

    parse.__name__ = "choices"
    return parse


def existing_file(text: str) -> Path:
    """A path to a file that exists."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}" if not path.exists() else f"not a file: {text!r}")
    return path


def route_table_file(text: str) -> str:
    """A route table (from `python -m executorch_wgpu tune`) that exists and reads; returned as given."""
    existing_file(text)
    from executorch_wgpu.backend.route_table import RouteTable, RouteTableError

    try:
        RouteTable.load(text)
    except RouteTableError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def output_file(text: str) -> Path:
    """A file to write, in a folder that exists."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(path.parent)!r} does not exist")
    return path


def output_folder(text: str) -> Path:
    """A folder to write into: it exists, or can be made (it is not a file)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return path


def figure(value: Optional[float], digits: int = 3) -> str:
    """A measurement with `digits` significant digits and no exponent: 4816, 12.3, 0.00123 -- never a "0.00"
    hiding a small value; "—" where there is none (e.g. GPU time on an adapter without timestamp queries)."""
    if value is None:
        return "—"
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.{max(0, digits - 1 - math.floor(math.log10(abs(value))))}f}"


def note(message: str) -> None:
    """A diagnostic line on stderr, above any progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


class Progress(contextlib.AbstractContextManager):
    """A tqdm bar on stderr over a command's slow steps, its elapsed time ticking while a step runs.

        with Progress(3, "demo") as progress:
            progress.step("exporting")      # the bar shows the step and the time so far
            ...
            progress.note("exported in 37 s")

    Shown only when stderr is a terminal; notes and log records (root's console
    handlers) print above it. advance() counts a step done without naming the next.
    """

    def __init__(self, total: int, desc: str = "", unit: str = "step", tick_s: float = 0.5):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False,
                         dynamic_ncols=True,
                         bar_format="{desc} |{bar:16}| {n_fmt}/{total_fmt} [{elapsed}]")
        self._desc = desc
        self._running = False
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        self._tick_s = tick_s
        self._redirect: Optional[contextlib.AbstractContextManager] = None

    @property
    def shown(self) -> bool:
        return not self._bar.disable

    def __enter__(self) -> "Progress":
        if self.shown:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(self._tick_s):
            self._bar.refresh()

    def step(self, what: str) -> None:
        """The previous step (if any) is done; `what` runs now."""
        if self._running:
            self._bar.update(1)
        self._running = True
        self._bar.set_description_str(f"{self._desc}: {what}" if self._desc else what)

    def advance(self, n: int = 1) -> None:
        """n steps done (counted without naming the next)."""
        self._bar.update(n)

    def add(self, n: int) -> None:
        """n more steps than planned (e.g. a fallback)."""
        self._bar.total += n
        self._bar.refresh()

    def note(self, message: str) -> None:
        note(message)

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self._bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(exc_type, exc, tb)


def fail(message: str, status: int = 1) -> NoReturn:
    """End the command with an error message on stderr (no traceback): a failure that is not a usage error."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)
