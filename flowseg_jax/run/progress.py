"""Progress log lines with rate and ETA, for training, evaluation and prediction.

Lines come by time, not by count: one at most every `interval` seconds and one when the total is
reached, so a job of a second prints one line and a job of a day prints one every interval,
whatever the item rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from absl import logging

DEFAULT_INTERVAL_S = 10.0


class Progress:
  """`update(n)` counts items; logs "<what>: count/total (rate/s, ETA h:mm:ss)" when `interval`
  seconds passed since the last line (or the start), and when the count reaches the total."""

  def __init__(
    self,
    what: str,
    total: int | None,
    *,
    start: int = 0,
    interval: float = DEFAULT_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.what, self.total, self.interval = what, total, interval
    self.count = self.first = start  # a resumed run counts on from its first step
    self._clock = clock
    self.start = self._last = clock()

  def update(self, n: int = 1) -> None:
    self.count += n
    now = self._clock()
    at_end = self.total is not None and self.count >= self.total
    if now - self._last < self.interval and not at_end:
      return
    self._last = now
    rate = (self.count - self.first) / max(now - self.start, 1e-9)
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
