"""Metrics of prompted (referring) segmentation: gIoU, cIoU and precision at IoU thresholds.

Each example is one (image, prompt) pair with a binary target mask (1 = the referred region,
0 = background, `ignore_index` = not evaluated) and a binary prediction. Per example, I and U are
the foreground intersection and union over the evaluated pixels.
- gIoU (generalised / mean IoU): the mean over examples of I / U. An example whose target and
  prediction are both empty (U = 0) counts as IoU 1: the model correctly found nothing (the
  gRefCOCO convention; it never arises on RefCOCO, where every target is non-empty).
- cIoU (cumulative, also called oIoU): sum of I over the dataset / sum of U (1 when both sums
  are 0). Large objects weigh more than in gIoU.
- prec@k: the fraction of examples with IoU > k (strictly, as LAVT/CRIS evaluate), k in
  PREC_THRESHOLDS.
Per batch the counts are computed on device (int32: a batch has far fewer than 2^31 pixels);
across batches `PromptedIoU` sums them on the host in float64 / int64.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from flowseg_jax.metrics import IGNORE_LABEL

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_union(
  predictions: jax.Array, targets: jax.Array, *, ignore_index: int = IGNORE_LABEL
) -> tuple[jax.Array, jax.Array]:
  """Per-example foreground intersection and union, each (B,) int32. jit-able.

  Args:
    predictions: (B, ...) bool or int; nonzero = foreground.
    targets: (B, ...) int; 1 = foreground, 0 = background, ignore_index = not evaluated.
  """
  if predictions.shape != targets.shape:
    raise ValueError(
      f"intersection_union: predictions {predictions.shape} and targets {targets.shape} differ"
    )
  b = predictions.shape[0]
  targets = targets.reshape(b, -1).astype(jnp.int32)
  valid = targets != ignore_index
  pred = (predictions.reshape(b, -1) != 0) & valid
  true = (targets == 1) & valid
  inter = jnp.sum(pred & true, axis=1, dtype=jnp.int32)
  union = jnp.sum(pred | true, axis=1, dtype=jnp.int32)
  return inter, union


def example_iou(inter, union) -> np.ndarray:
  """I / U per example, 1 where U = 0 (both empty), float64."""
  inter, union = np.asarray(inter, np.float64), np.asarray(union, np.float64)
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@flax.struct.dataclass
class PromptedIoU(clu_metrics.Metric):
  """A clu Metric accumulating gIoU / cIoU / prec@k statistics.

  Build it per batch with `PromptedIoU.from_model_output(predictions=..., targets=...,
  mask=...)` (mask (B,): 0 for padding examples of a ragged last batch); merge on the host after
  `to_host()`; `compute()` returns {'giou', 'ciou', 'prec@0.5', ..., 'num_examples'}.
  """

  iou_sum: jax.Array
  count: jax.Array
  inter_sum: jax.Array
  union_sum: jax.Array
  hits: jax.Array  # (len(PREC_THRESHOLDS),) examples with IoU > threshold

  @classmethod
  def empty(cls) -> PromptedIoU:
    zero = np.zeros((), np.float64)
    return cls(zero, zero, zero, zero, np.zeros(len(PREC_THRESHOLDS), np.float64))

  @classmethod
  def from_model_output(
    cls, *, predictions: jax.Array, targets: jax.Array, mask: jax.Array | None = None, **_
  ) -> PromptedIoU:
    inter, union = intersection_union(predictions, targets)
    w = jnp.ones(inter.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    iou = jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)
    thresholds = jnp.asarray(PREC_THRESHOLDS, jnp.float32)
    return cls(
      iou_sum=jnp.sum(w * iou),
      count=jnp.sum(w),
      inter_sum=jnp.sum(w * inter),
      union_sum=jnp.sum(w * union),
      hits=jnp.sum(w[:, None] * (iou[:, None] > thresholds[None, :]), axis=0),
    )

  def merge(self, other: PromptedIoU) -> PromptedIoU:
    return jax.tree.map(lambda a, b: a + b, self, other)

  def to_host(self) -> PromptedIoU:
    """A float64 copy on the host (fetches from device)."""
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float64), self)

  def compute(self) -> dict[str, Any]:
    count = float(self.count)
    if count == 0:
      raise ValueError("PromptedIoU.compute: no examples were accumulated.")
    union = float(self.union_sum)
    out = {
      "giou": float(self.iou_sum) / count,
      "ciou": float(self.inter_sum) / union if union > 0 else 1.0,
      "num_examples": int(round(count)),
    }
    for k, hits in zip(PREC_THRESHOLDS, np.asarray(self.hits)):
      out[f"prec@{k}"] = float(hits) / count
    return out
