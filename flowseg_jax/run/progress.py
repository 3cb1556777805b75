"""Progress log lines with rate and ETA, for training, evaluation and prediction."""

from __future__ import annotations

import time

from absl import logging


class Progress:
  """A log line every `every` items with rate and ETA (quiet when `every` is 0)."""

  def __init__(self, what: str, total: int | None, every: int, *, start: int = 0):
    self.what, self.total, self.every = what, total, every
    self.count = self.first = start  # a resumed run counts on from its first step
    self.start = time.monotonic()

  def update(self, n: int = 1) -> None:
    before = self.count
    self.count += n
    if not self.every or self.count // self.every == before // self.every:
      return
    elapsed = time.monotonic() - self.start
    rate = (self.count - self.first) / max(elapsed, 1e-9)
    if self.total:
      eta = (self.total - self.count) / max(rate, 1e-9)
      logging.info(
        "%s: %d/%d (%.1f/s, ETA %s)", self.what, self.count, self.total, rate, _clock(eta)
      )
    else:
      logging.info("%s: %d (%.1f/s)", self.what, self.count, rate)


def _clock(seconds: float) -> str:
  s = int(round(max(seconds, 0)))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def every_for(num_items: int) -> int:
  """Log about twenty progress lines for long jobs, none for a handful of items."""
  return 0 if num_items < 64 else max(num_items // 20, 1)
