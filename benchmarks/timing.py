"""Timing: the median of repeated calls, contenders taking turns round by round, and summaries."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def median_time(fn: Callable[[], Any], steps: int, warmup: int) -> float:
  """Median wall-clock seconds of `steps` calls of `fn` after `warmup` calls (fn must block)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved_rounds(
  fns: dict[str, Callable[[int], None]], *, rounds: int, steps: int, warmup: int
) -> dict[str, list[float]]:
  """Seconds per step of each fn, one measurement per round, the fns taking turns within a round.

  `fn(n)` must run n steps and block until they are done. Taking turns spreads slow drifts of the
  machine's load (a shared box) evenly over the contenders, so per-round ratios are meaningful.
  """
  for fn in fns.values():
    if warmup:
      fn(warmup)
  out: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn(steps)
      out[name].append((time.perf_counter() - start) / steps)
  return out


def summarize(times: Sequence[float]) -> dict[str, float]:
  """Median, min, max and the relative half-spread (max - min) / (2 median) of a list of timings."""
  if not times:
    raise ValueError("summarize: no timings")
  med = statistics.median(times)
  return {
    "median": med,
    "min": min(times),
    "max": max(times),
    "spread": (max(times) - min(times)) / (2 * med) if med > 0 else 0.0,
    "n": len(times),
  }
