"""Progress a person can follow on long steps: tqdm bars on stderr with sizes, rates and ETA.

Bars are shown only when enabled (the CLI's `--no-progress` turns them off) and stderr is a terminal,
so logs, pipes and tests stay clean. Library code takes an `enabled` flag and never prints otherwise.
tqdm is imported only for a bar that shows (a run's start-up does not pay its ~17 ms of imports).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm


def _on(enabled: bool) -> bool:
    return enabled and sys.stderr.isatty()


class _Hidden:
    """A bar that is not shown: what `tqdm(disable=True)` does, without importing tqdm."""

    n = 0

    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Hidden:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _bar(enabled: bool, **kwargs: Any) -> tqdm | _Hidden:
    if not _on(enabled):
        return _Hidden()
    from tqdm import tqdm

    return tqdm(leave=False, dynamic_ncols=True, **kwargs)


def byte_bar(total: int, desc: str, *, enabled: bool) -> tqdm | _Hidden:
    """A bar over `total` bytes (B, kB, MB ... with rate and ETA); `update(n)` as bytes are done."""
    return _bar(enabled, total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


def count_bar(total: int, desc: str, *, unit: str, enabled: bool) -> tqdm | _Hidden:
    return _bar(enabled, total=total, desc=desc, unit=unit)


@contextmanager
def activity(desc: str, *, enabled: bool, expected_s: float | None = None) -> Iterator[None]:
    """A line that shows the elapsed time (and against `expected_s`, if known) of one opaque step."""
    if not _on(enabled):
        yield
        return
    stop = threading.Event()
    bar = _bar(enabled, total=expected_s, desc=desc,
               bar_format="{desc}: {elapsed}" + (" of ~{total:.0f}s" if expected_s else ""))
    start = time.monotonic()

    def tick() -> None:
        while not stop.wait(1.0):
            bar.n = min(time.monotonic() - start, expected_s or float("inf"))
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
