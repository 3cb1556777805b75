"""grain building blocks of the input pipeline.

Per-example loaders (`LoadTrainExample`, a grain RandomMap; `LoadEvalExample`, a Map) that read,
check, decode and transform a source record; in 'skip' mode they return a `Skipped` placeholder
for a bad example instead of raising. `SkippingBatchIterDataset` batches while dropping and
counting those placeholders (the count travels in the batch as `num_skipped`, so it also reaches
the main process from grain worker processes). `TrainIterator` records the input setup in the
iterator state and refuses a mismatching restore, and starts grain's data workers with Ctrl-C held
(`_InterruptsHeldThread`). `EvalDataset` wraps the eval shard.
"""

import dataclasses
import os
import queue
import signal
import threading
from concurrent import futures
from typing import Any

import grain
import numpy as np
from absl import logging

from flowseg_jax.data import sources, transforms


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Placeholder the loaders emit for a bad example in 'skip' mode."""

  name: str
  reason: str


# Names already warned about in this process (logging de-duplication only).
_warned: set[str] = set()


def _skip(err: sources.BadExampleError) -> Skipped:
  # Warn once per example and process (a bad file is met again every epoch).
  if err.name not in _warned:
    _warned.add(err.name)
    logging.warning("Skipping bad example %s: %s", err.name, err)
  return Skipped(err.name, str(err))


@dataclasses.dataclass(frozen=True)
class LoadTrainExample(grain.transforms.RandomMap):
  """Record -> {'image', 'label'} training example (see `transforms.train_example`)."""

  label_map: sources.LabelMap
  image_size: tuple[int, int]
  random_scale: tuple[float, float] | None
  random_flip: bool
  on_bad_example: str

  def random_map(self, record: dict, rng: np.random.Generator):
    name = record["name"]
    try:
      label = sources.read_label(record["label"], name, self.label_map)
      opened = sources.open_image(record["image"], name)
      ex = transforms.train_example(
        opened,
        label,
        image_size=self.image_size,
        random_scale=self.random_scale,
        random_flip=self.random_flip,
        rng=rng,
        name=name,
        src=record["image"],
        label_src=record["label"],
      )
    except sources.BadExampleError as e:
      if self.on_bad_example == "raise":
        raise
      return _skip(e)
    return _with_prompt(ex, record)


def _with_prompt(ex: dict, record: dict) -> dict:
  """Prompted records carry the example's prompt id through (data.prompted), and its text
  features float32 (T, D) when they are streamed from a cache (data.text_cache)."""
  if "prompt" in record:
    ex["prompt"] = np.int32(record["prompt"])
  if "text" in record:
    ex["text"] = np.asarray(record["text"], np.float32)
  return ex


@dataclasses.dataclass(frozen=True)
class LoadEvalExample(grain.transforms.Map):
  """Record -> eval example (see `transforms.eval_example`) plus its 'name'."""

  label_map: sources.LabelMap
  image_size: tuple[int, int]
  on_bad_example: str

  def map(self, record: dict):
    name = record["name"]
    try:
      label = sources.read_label(record["label"], name, self.label_map)
      opened = sources.open_image(record["image"], name)
      ex = transforms.eval_example(
        opened,
        label,
        image_size=self.image_size,
        name=name,
        src=record["image"],
        label_src=record["label"],
      )
    except sources.BadExampleError as e:
      if self.on_bad_example == "raise":
        raise
      return _skip(e)
    ex["name"] = name
    return _with_prompt(ex, record)


# ----------------------------------------------------------------------------------------------
# Batching that skips bad examples and counts them.
# ----------------------------------------------------------------------------------------------


class _SkippingBatchIterator(grain.DatasetIterator):
  """Collects `batch_size` good examples; counts the `Skipped` ones met on the way."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size

  def __next__(self) -> dict[str, np.ndarray]:
    good, skipped = [], 0
    while len(good) < self._batch_size:
      value = next(self._parent)  # StopIteration ends the stream (drop remainder).
      if isinstance(value, Skipped):
        skipped += 1
        if skipped > 1000 * self._batch_size:
          raise RuntimeError(
            f"{skipped} bad examples while filling one batch of {self._batch_size} (last: "
            f"{value.reason}); the dataset looks unusable."
          )
      else:
        good.append(value)
    batch = {k: np.stack([ex[k] for ex in good]) for k in good[0]}
    batch["num_skipped"] = np.asarray(skipped, np.int32)
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def __str__(self) -> str:
    return f"SkippingBatchIterator(batch_size={self._batch_size})"


class SkippingBatchIterDataset(grain.IterDataset):
  """`IterDataset.batch(drop_remainder=True)` that drops `Skipped` placeholders and counts them."""

  def __init__(self, parent: grain.IterDataset, batch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size

  def __iter__(self) -> _SkippingBatchIterator:
    return _SkippingBatchIterator(self._parent.__iter__(), self._batch_size)

  def __str__(self) -> str:
    return f"SkippingBatchIterDataset(batch_size={self._batch_size})"


class _InterruptsHeldThread:
  """Runs calls on one thread that holds (blocks) SIGINT; the caller waits, still interruptible.

  grain starts its worker processes from threads it creates while batches are fetched (not only
  for the first), and a thread or process starts with its creator's signal mask. With every call
  into grain made from here, every worker starts with Ctrl-C held until its init function ignores
  it (data.pipeline): a terminal's Ctrl-C in the second a worker spends importing would otherwise
  kill it and fail the batch. The calling (main) thread keeps SIGINT: the trainer's handler runs,
  and a second Ctrl-C still breaks a fetch that hangs. A daemon thread, unlike an executor's, so
  that such a hung fetch cannot also hold up the interpreter's exit. One hand-off per call."""

  def __init__(self):
    self._requests = None
    if hasattr(signal, "pthread_sigmask"):  # POSIX; elsewhere calls run in the caller
      self._requests = queue.SimpleQueue()
      # The thread holds the queue, not self: an unclosed iterator can still be collected.
      threading.Thread(
        target=_serve_with_interrupts_held, args=(self._requests,), name="flowseg-data", daemon=True
      ).start()

  def __call__(self, fn, *args):
    if self._requests is None:
      return fn(*args)
    future = futures.Future()
    self._requests.put((fn, args, future))
    return future.result()

  def close(self) -> None:
    if self._requests is not None:
      self._requests.put(None)


def _serve_with_interrupts_held(requests: queue.SimpleQueue) -> None:
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
  while (request := requests.get()) is not None:
    fn, args, future = request
    try:
      future.set_result(fn(*args))
    except BaseException as e:  # StopIteration included: the caller re-raises it
      future.set_exception(e)


class TrainIterator(grain.DatasetIterator):
  """The train iterator: grain's, with its input setup recorded in (and checked against) its state.

  `get_state()` is `{'input': {...}, 'iterator': <grain state>}`; `set_state` raises a clear
  ValueError when the saved setup (dataset, split size, global batch, process index/count,
  workers, data seed) differs from this iterator's, instead of silently resuming elsewhere.
  """

  def __init__(self, dataset: grain.IterDataset, setup: dict[str, Any]):
    self._held = _InterruptsHeldThread()
    super().__init__(self._held(iter, dataset))
    self._setup = setup

  def __next__(self) -> dict[str, np.ndarray]:
    return self._held(next, self._parent)

  def get_state(self) -> dict[str, Any]:
    return {"input": dict(self._setup), "iterator": self._held(self._parent.get_state)}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = {"start": 0, **state.get("input", {})}  # "start" came with elastic resume
    diff = {k: (saved.get(k), v) for k, v in self._setup.items() if saved.get(k) != v}
    if diff:
      details = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
      raise ValueError(
        "The data iterator state was saved with another input setup and cannot be restored "
        f"here ({details}). Resume with the same config.input and process count."
      )
    self._held(self._parent.set_state, state["iterator"])

  def close(self) -> None:  # also grain's __del__, maybe at interpreter exit: no hand-off
    try:
      super().close()
    finally:
      if getattr(self, "_held", None) is not None:
        self._held.close()

  def __str__(self) -> str:
    return f"TrainIterator({self._setup})"


class EvalDataset:
  """This process's eval examples in a fixed order (iterable any number of times).

  Each example: {'image': float32 (H, W, 3) in [-1, 1] at image_size, 'image_orig': uint8
  (h0, w0, 3), 'label': int32 (h0, w0) with 255 = ignore, 'name': str}. In 'skip' mode bad
  examples are left out and counted in `num_skipped` (reset at the start of each pass).
  """

  def __init__(self, dataset: grain.MapDataset, num_examples: int):
    self._dataset = dataset
    self._num_examples = num_examples
    self.num_skipped = 0

  def __len__(self) -> int:
    """Number of examples in this shard before skipping bad ones."""
    return self._num_examples

  def __iter__(self):
    self.num_skipped = 0
    for ex in self._dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=min(4, os.cpu_count() or 1), prefetch_buffer_size=8)
    ):
      if isinstance(ex, Skipped):
        self.num_skipped += 1
        continue
      yield ex
