"""The data pre-flight: every mask of a split read once before step 1, in parallel, with progress.

For each example of this process's share (examples i, i + P, ... of P processes) the mask is read
and mapped exactly as training reads it (`sources.read_label`: missing, unreadable, not an index
map, a value outside the classes, a colour outside the palette) and the image's header gives its
size (a size mismatch); the listing's problems (an image without its mask, a mask without its
image, an image of another format: `data.listing`) come first. Every message names the file and
the fix. 'raise' stops at the first bad example in the split's order; 'skip' counts them (training
skips them again where it meets them, `grain_ops`).

Two things no single mask shows are checked over the split: the class histogram (pixels per class,
logged, with the classes that never occur), and masks that hold nothing but 0 and 255. Read as
"class 0 and ignore", 0/255 binary masks train a model of one class without any error; they are
refused in either mode, with the fix (`binary_fix`).

Masks are PNG-decoded by PIL, which releases the GIL, so threads read several at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from flowseg_jax.centroids import IGNORE_LABEL
from flowseg_jax.data import sources
from flowseg_jax.run.progress import Progress

_BLOCK = 256  # examples handed to the threads at a time (bounds memory; 'raise' stops early)


class SplitError(sources.BadExampleError):
  """A problem of a whole split (0/255 masks), which skipping examples would not fix."""


@dataclasses.dataclass
class Report:
  """What the pre-flight of one split found on this process.

  Attributes:
    split: the split's name.
    num_examples: examples (image-mask pairs) this process checked.
    bad: (name, message) of each bad example and listing problem, in the split's order.
    histogram: int64 (256,) pixels per train id over the good masks (index 255: ignored pixels).
  """

  split: str
  num_examples: int
  bad: list[tuple[str, str]]
  histogram: np.ndarray

  def class_summary(self, names: Sequence[str], limit: int = 12) -> str:
    """'cat 41.0%, dog 22.5%, ..., ignore 3.1%' (most frequent first) and the absent classes."""
    total = int(self.histogram.sum())
    if not total:
      return "no labelled pixels"
    counts = self.histogram[: len(names)]
    order = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k]]
    parts = [f"{names[k]} {100 * counts[k] / total:.1f}%" for k in order[:limit]]
    if len(order) > limit:
      parts.append(f"{len(order) - limit} more")
    parts.append(f"ignore {100 * self.histogram[IGNORE_LABEL] / total:.1f}%")
    absent = [names[k] for k in range(len(names)) if not counts[k]]
    text = ", ".join(parts)
    if absent:
      shown = ", ".join(absent[:limit]) + (", ..." if len(absent) > limit else "")
      text += f"; {len(absent)} class(es) never occur: {shown}"
    return text


def _check(record: dict[str, Any], label_map: sources.LabelMap):
  """(histogram, None) of a good example, (None, BadExampleError) of a bad one."""
  name = record["name"]
  try:
    label = sources.read_label(record["label"], name, label_map)
    opened = sources.open_image(record["image"], name)
    try:  # the header is enough for the size; training decodes the pixels
      hw = sources.image_size_hw(opened)
    finally:
      if isinstance(opened, Image.Image):
        opened.close()
    sources.check_same_size(hw, label, name, record["image"], record["label"])
  except sources.BadExampleError as e:
    return None, e
  return np.bincount(label.ravel(), minlength=256), None


def scan(
  source,
  label_map: sources.LabelMap,
  *,
  split: str,
  on_bad_example: str,
  num_classes: int,
  process_index: int = 0,
  process_count: int = 1,
  binary_fix: str = "",
  threads: int | None = None,
) -> Report:
  """Checks this process's share of `source` (a grain source of path/bytes records).

  Args:
    source: the split's source; its `problems` (if any) are the listing's.
    label_map: how its masks become train ids.
    split: the split's name, for messages.
    on_bad_example: 'raise' or 'skip'.
    num_classes: N (train ids 0..N-1).
    process_index, process_count: this process's share (listing problems are shared out too).
    binary_fix: the fix named when the masks hold only 0 and 255; '' disables that check.
    threads: reader threads (default: 4 per CPU, at most 32: reading is mostly waiting).

  Returns:
    The Report ('skip': with the bad examples counted).

  Raises:
    sources.BadExampleError: the first bad example ('raise'); SplitError: 0/255 masks (either
      mode).
  """
  problems = [tuple(p) for p in getattr(source, "problems", ())]
  reported = {name for name, _ in problems}  # examples already counted bad (a missing mask)
  bad: list[tuple[str, str]] = problems[process_index::process_count]
  if bad and on_bad_example == "raise":
    raise sources.BadExampleError(*bad[0])
  indices = range(process_index, len(source), process_count)
  histogram = np.zeros(256, np.int64)
  first_with_ignore = None  # (name, mask) of the first good mask holding 255
  progress = Progress(f"pre-flight {split}", len(indices))
  workers = threads or min(32, 4 * (os.cpu_count() or 1))

  def check(index: int):
    record = source[index]  # in the thread too: a Hugging Face row is read here
    if record["name"] in reported:
      return record, None, None
    return record, *_check(record, label_map)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for start in range(0, len(indices), _BLOCK):
      block = indices[start : start + _BLOCK]
      for record, counts, error in pool.map(check, block):
        if error is not None:
          if on_bad_example == "raise":
            raise error
          bad.append((record["name"], str(error)))
        elif counts is not None:
          histogram += counts
          if first_with_ignore is None and counts[IGNORE_LABEL]:
            first_with_ignore = (record["name"], record["label"])
      progress.update(len(block))
  only_zero = not histogram[1:num_classes].any() and not histogram[num_classes:IGNORE_LABEL].any()
  if binary_fix and first_with_ignore is not None and only_zero:
    name, mask = first_with_ignore
    where = mask if isinstance(mask, str) else f"record '{name}'"
    raise SplitError(
      name,
      f"every mask of the {split} split holds only 0 and 255, e.g. {where}: read as class 0 and "
      f"ignore, nothing else would be learnt. {binary_fix}",
    )
  return Report(split, len(indices), bad, histogram)
