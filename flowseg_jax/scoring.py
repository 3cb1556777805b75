"""Decoding and the confusion matrix on device, over fixed-size chunks of pixels.

Evaluation decodes each image's continuous colours at the annotation's size (DESIGN.md
"Inference"), so the images of a batch come in many sizes. The scorer takes them as flat pixels
instead: the host lays out the pixels of as many finished images as fit in one call (their colours,
one row per test-time view, and their annotations), pads the call to a power-of-two size with the
ignore label, and one jitted program decodes every pixel (nearest class colour, or the mean class
probability over views) and counts `label * N + prediction` into an int32 (N, N) matrix. The host
adds each call's matrix into an int64 one: a whole COCO-Stuff val set has ~1.5e9 pixels, too close
to the int32 limit, while one call counts at most `MAX_PIXELS_PER_DEVICE` pixels per device.

`confusion_counts` is the project's one confusion matrix; `confusion_matrix` runs it on host
arrays (metrics tests, tools, experiments). The scorer runs on this process's devices only (no
collective with other processes, whose numbers of calls differ); the evaluator sums the matrices
over processes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import sharding

MIN_PIXELS_PER_DEVICE = 1 << 12
MAX_PIXELS_PER_DEVICE = 1 << 18  # a 512x512 image per device and call
INT32_LIMIT = 2**31 - 1


def confusion_counts(
  predictions: jax.Array,
  labels: jax.Array,
  num_classes: int,
  *,
  ignore_index: int = centroids_lib.IGNORE_LABEL,
) -> jax.Array:
  """int32 (N, N) pixel counts, rows = label, columns = prediction, of any matching shapes; jit-able.

  Pixels labelled `ignore_index` or outside [0, N), and predictions outside [0, N), are not counted.
  int32 is exact because one call counts fewer than 2^31 pixels (checked from the static shape);
  sum the calls in int64 on the host.
  """
  if predictions.shape != labels.shape:
    raise ValueError(
      f"confusion_counts: predictions {predictions.shape} and labels {labels.shape} differ"
    )
  if num_classes < 1:
    raise ValueError(f"confusion_counts: num_classes must be >= 1, got {num_classes}")
  if labels.size > INT32_LIMIT:
    raise ValueError(
      f"confusion_counts: {labels.size} pixels in one call overflow int32 counts; split the call"
    )
  n = num_classes
  labels = jnp.ravel(labels).astype(jnp.int32)
  predictions = jnp.ravel(predictions).astype(jnp.int32)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < n)
  valid &= (predictions >= 0) & (predictions < n)
  index = jnp.where(valid, labels * n + predictions, n * n)  # bin n*n collects the uncounted
  counts = jnp.bincount(index, length=n * n + 1)[: n * n]
  return counts.astype(jnp.int32).reshape(n, n)


def padded_size(pixels: int, num_devices: int) -> int:
  """The pixels of the next call for `pixels` waiting: a power of two per device between
  MIN_PIXELS_PER_DEVICE and MAX_PIXELS_PER_DEVICE (a few compiled sizes, whatever the images)."""
  per_device = -(-pixels // num_devices)
  size = max(MIN_PIXELS_PER_DEVICE, 1 << max(per_device - 1, 0).bit_length())
  return min(size, MAX_PIXELS_PER_DEVICE) * num_devices


@functools.lru_cache(maxsize=16)
def _compiled_confusion(num_classes: int, ignore_index: int):
  return jax.jit(
    functools.partial(confusion_counts, num_classes=num_classes, ignore_index=ignore_index)
  )


def confusion_matrix(
  predictions, labels, num_classes: int, *, ignore_index: int = centroids_lib.IGNORE_LABEL
) -> np.ndarray:
  """Host arrays of any matching shape -> int64 (N, N) counts, rows = label, columns = prediction:
  `confusion_counts` on the default device, in padded calls, summed in int64."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape:
    raise ValueError(
      f"confusion_matrix: predictions {predictions.shape} and labels {labels.shape} differ"
    )
  if num_classes < 1:
    raise ValueError(f"confusion_matrix: num_classes must be >= 1, got {num_classes}")
  fn = _compiled_confusion(int(num_classes), int(ignore_index))
  # Out-of-range values become -1 (never counted) before narrowing to int32.
  keep = lambda a: np.where((a >= 0) & (a <= INT32_LIMIT), a, -1).astype(np.int32).ravel()
  predictions, labels = keep(predictions), keep(labels)
  total = np.zeros((num_classes, num_classes), np.int64)
  start = 0
  while start < labels.size:
    size = padded_size(labels.size - start, 1)
    pred = np.zeros(size, np.int32)
    lab = np.full(size, ignore_index, np.int32)
    piece = slice(start, start + size)
    pred[: len(predictions[piece])] = predictions[piece]
    lab[: len(labels[piece])] = labels[piece]
    total += np.asarray(fn(pred, lab), np.int64)
    start += size
  return total


@functools.lru_cache(maxsize=16)
def _compiled_scorer(task, mesh, num_views: int):
  mu = np.asarray(task.decode_centroids, np.float32)  # the ignore colour is never predicted
  objective = task.objective if num_views > 1 else None

  def score(colours, labels):
    if num_views == 1:
      predictions = centroids_lib.decode_colours(colours[0], mu)
    else:
      predictions = centroids_lib.decode_views(colours, mu, tau=objective.tau, eps=objective.eps)
    return predictions, confusion_counts(predictions, labels, task.num_classes)

  views, pixels = _input_shardings(mesh)
  counts = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(score, in_shardings=(views, pixels), out_shardings=(pixels, counts))


def _input_shardings(mesh):
  """(colours (V, P, 3), labels (P,)) shardings: pixels split along the batch axes."""
  spec = jax.sharding.PartitionSpec
  return (
    jax.sharding.NamedSharding(mesh, spec(None, sharding.BATCH_AXES)),
    jax.sharding.NamedSharding(mesh, spec(sharding.BATCH_AXES)),
  )


def score_fn(task, mesh, num_views: int = 1):
  """jit: (colours float32 (V, P, 3), labels int32 (P,)) -> (predictions int32 (P,), counts int32
  (N, N)). Decodes each pixel (nearest class colour for one view, `decode_views` for several) and
  counts it against its label (the ignore label for pixels without one, e.g. padding). P is a
  multiple of the mesh size, sharded along the batch axes. Compiled once per (task, mesh, views)
  and call size."""
  return _compiled_scorer(task, mesh, int(num_views))


class PixelScorer:
  """Images' colours (at their annotation's size) in, labels out, confusion counts summed on the
  host: `add` images, then `flush` runs them through `score_fn` in as few calls as fit.

  Args:
    task: the Segmenter's task (classes, decoding colours, objective's tau and eps).
    mesh: this process's devices (a mesh of addressable devices only).
    num_views: colour views per pixel (test-time augmentation).
    confusion: an int64 (N, N) host array the counts of annotated images are added to, or None.
  """

  def __init__(self, task, mesh, num_views: int, confusion: np.ndarray | None = None):
    if confusion is not None and (
      confusion.dtype != np.int64 or confusion.shape != (task.num_classes,) * 2
    ):
      raise ValueError(
        f"confusion must be an int64 ({task.num_classes}, {task.num_classes}) array, got "
        f"{confusion.dtype} {confusion.shape}"
      )
    self.fn = score_fn(task, mesh, num_views)
    # Host arrays are placed explicitly: a multi-process jit refuses sharded numpy arguments.
    self.shardings = _input_shardings(mesh)
    self.mesh = mesh
    self.num_views = num_views
    self.confusion = confusion
    self.pending: list[tuple[object, np.ndarray, np.ndarray | None]] = []
    self.pending_pixels = 0

  @property
  def full(self) -> bool:
    return self.pending_pixels >= MAX_PIXELS_PER_DEVICE * self.mesh.size

  def add(self, key, views: Sequence[np.ndarray] | np.ndarray, annotation=None) -> None:
    """One image: colours (V, H, W, 3) and its int labels (H, W) (None: not scored); `key` (any
    object) comes back with its labels."""
    views = np.asarray(views, np.float32)
    if views.shape[0] != self.num_views or views.ndim != 4 or views.shape[-1] != 3:
      raise ValueError(
        f"PixelScorer.add: colours must be ({self.num_views}, H, W, 3), got {views.shape}"
      )
    if annotation is not None and np.shape(annotation) != views.shape[1:3]:
      raise ValueError(
        f"PixelScorer.add: annotation {np.shape(annotation)} differs from the image {views.shape[1:3]}"
      )
    self.pending.append((key, views, annotation))
    self.pending_pixels += views.shape[1] * views.shape[2]

  def flush(self) -> list[tuple[object, np.ndarray]]:
    """(key, int32 labels (H, W)) of every pending image, in order; their counts are added."""
    if not self.pending:
      return []
    total = self.pending_pixels
    colours = np.concatenate([v.reshape(self.num_views, -1, 3) for _, v, _ in self.pending], axis=1)
    labels = np.concatenate(
      [
        np.full(v.shape[1:3], centroids_lib.IGNORE_LABEL, np.int32).ravel()
        if a is None
        else np.asarray(a, np.int32).ravel()
        for _, v, a in self.pending
      ]
    )
    outputs, start = [], 0
    # This process's mesh, also inside a caller's multi-process one (`jax.set_mesh`).
    with jax.set_mesh(self.mesh):
      while start < total:  # dispatch every call, then fetch: the device queue stays full
        size = padded_size(total - start, self.mesh.size)
        end = min(start + size, total)
        x = np.zeros((self.num_views, size, 3), np.float32)
        y = np.full(size, centroids_lib.IGNORE_LABEL, np.int32)  # padding is never counted
        x[:, : end - start] = colours[:, start:end]
        y[: end - start] = labels[start:end]
        x, y = jax.device_put((x, y), self.shardings)
        outputs.append((end - start, self.fn(x, y)))
        start = end
    predictions = []
    for used, (pred, counts) in outputs:
      predictions.append(sharding.local_rows(pred)[:used])
      if self.confusion is not None:  # replicated: read from one device
        self.confusion += np.asarray(counts, np.int64)
    flat = np.concatenate(predictions)
    out, start = [], 0
    for key, views, _ in self.pending:
      h, w = views.shape[1:3]
      out.append((key, flat[start : start + h * w].reshape(h, w)))
      start += h * w
    self.pending, self.pending_pixels = [], 0
    return out
