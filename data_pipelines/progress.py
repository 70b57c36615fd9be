"""A progress bar on stderr for the long data commands (``check-data``, ``pack``): tqdm's when it is
installed, else a plain counter line."""
from __future__ import annotations

import sys


def progress_bar(total: int, unit: str = "img"):
    """A bar counting to ``total`` (``update(n)``, ``close()``), on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        return Counter(total)
    return tqdm(total=total, unit=unit, file=sys.stderr, smoothing=0.1)


class Counter:
    """A progress line for when tqdm is missing."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def update(self, n: int) -> None:
        self.done += n
        if self.done % 1000 == 0 or self.done == self.total:
            print(f"\r{self.done}/{self.total} images", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)
