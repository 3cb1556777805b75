"""Segmentation metrics as mmseg computes them: dataset-level confusion matrix -> aAcc, mIoU, mAcc.

Per batch, a (N, N) confusion matrix (rows = ground truth, columns = prediction) is computed on device in
int32 (a batch has far fewer than 2^31 pixels). Across batches it is summed on the host in int64: a whole
COCO-Stuff val set has ~1.5e9 pixels, too close to the int32 limit.

Definitions (mmseg IoUMetric): pixels whose label is `ignore_index` are dropped; I_c, P_c, L_c are the
per-class intersection, prediction and label counts summed over the dataset; IoU_c = I_c / (P_c + L_c - I_c),
Acc_c = I_c / L_c (NaN for 0/0); aAcc = sum I / sum L; mIoU and mAcc are NaN-excluding means. Predictions must
lie in [0, N) (the nearest-centroid decoder guarantees it); out-of-range predictions are not counted.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

IGNORE_LABEL = 255


def confusion_matrix(
  predictions: jax.Array, labels: jax.Array, num_classes: int, *, ignore_index: int = IGNORE_LABEL
) -> jax.Array:
  """(N, N) int32 counts, rows = label, columns = prediction. jit-able; any matching shapes."""
  if predictions.shape != labels.shape:
    raise ValueError(
      f"confusion_matrix: predictions {predictions.shape} and labels {labels.shape} differ"
    )
  if num_classes < 1:
    raise ValueError(f"confusion_matrix: num_classes must be >= 1, got {num_classes}")
  labels = labels.astype(jnp.int32).reshape(-1)
  predictions = predictions.astype(jnp.int32).reshape(-1)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  valid &= (predictions >= 0) & (predictions < num_classes)
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(valid.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def compute_metrics(matrix) -> dict[str, Any]:
  """mmseg metrics from a (N, N) confusion matrix (host, float64).

  Returns fractions (not percent): `aAcc`, `mIoU`, `mAcc` (floats) and per-class `IoU`, `Acc` arrays with
  NaN where undefined, plus `intersection`, `union`, `pred_area`, `label_area` int64 arrays.
  """
  m = np.asarray(matrix, dtype=np.int64)
  if m.ndim != 2 or m.shape[0] != m.shape[1]:
    raise ValueError(f"compute_metrics: expected a square matrix, got shape {m.shape}")
  intersection = np.diag(m)
  label_area = m.sum(axis=1)
  pred_area = m.sum(axis=0)
  union = pred_area + label_area - intersection
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = intersection / union.astype(np.float64)
    acc = intersection / label_area.astype(np.float64)
    total = label_area.sum()
    a_acc = intersection.sum() / total if total else float("nan")
  iou[union == 0] = np.nan
  acc[label_area == 0] = np.nan

  def nanmean(x):
    return float(np.nanmean(x)) if np.any(~np.isnan(x)) else float("nan")

  return {
    "aAcc": float(a_acc),
    "mIoU": nanmean(iou),
    "mAcc": nanmean(acc),
    "IoU": iou,
    "Acc": acc,
    "intersection": intersection,
    "union": union,
    "pred_area": pred_area,
    "label_area": label_area,
  }


def summary_percent(results: dict[str, Any]) -> dict[str, float]:
  """The three headline numbers as mmseg prints them: percent, rounded to 2 decimals."""
  return {k: round(results[k] * 100, 2) for k in ("aAcc", "mIoU", "mAcc")}


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
  """A clu Metric accumulating the confusion matrix.

  Build it in the eval step with `ConfusionMatrix.from_model_output(predictions=..., labels=...,
  num_classes=N)`; `merge` adds matrices. Merge per-batch metrics on the host after `to_host()` so the sum is
  int64; `compute()` returns `compute_metrics`'s dict.
  """

  matrix: jax.Array

  @classmethod
  def empty(cls) -> ConfusionMatrix:
    """The merge identity (a 0x0 matrix; its first merge takes the other's shape)."""
    return cls(matrix=np.zeros((0, 0), np.int64))

  @classmethod
  def from_model_output(
    cls, *, predictions: jax.Array, labels: jax.Array, num_classes: int, **_
  ) -> ConfusionMatrix:
    return cls(matrix=confusion_matrix(predictions, labels, num_classes))

  def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
    if self.matrix.size == 0:
      return other
    if other.matrix.size == 0:
      return self
    if self.matrix.shape != other.matrix.shape:
      raise ValueError(
        f"ConfusionMatrix.merge: shapes {self.matrix.shape} and {other.matrix.shape} differ"
      )
    return type(self)(matrix=self.matrix + other.matrix)

  def to_host(self) -> ConfusionMatrix:
    """A copy on the host with int64 counts (fetches from device)."""
    return type(self)(matrix=np.asarray(jax.device_get(self.matrix), dtype=np.int64))

  def compute(self) -> dict[str, Any]:
    return compute_metrics(self.matrix)
