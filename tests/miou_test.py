"""Metrics against hand-computed cases and a brute-force mmseg-style computation."""

import numpy as np
import pytest

from flowseg_jax import scoring
from flowseg_jax.evaluators import miou as metrics


def mmseg_bruteforce(preds, labels, n):
  """The mmseg IoUMetric algorithm written out: per-image histograms, summed, then ratios."""
  inter, area_p, area_l = np.zeros(n), np.zeros(n), np.zeros(n)
  for p, g in zip(preds, labels, strict=True):
    mask = g != 255
    p, g = p[mask], g[mask]
    inter += np.histogram(p[p == g], bins=n, range=(0, n - 1))[0]
    area_p += np.histogram(p, bins=n, range=(0, n - 1))[0]
    area_l += np.histogram(g, bins=n, range=(0, n - 1))[0]
  union = area_p + area_l - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    iou, acc = inter / union, inter / area_l
  return inter.sum() / area_l.sum(), np.nanmean(iou), np.nanmean(acc), iou, acc


def test_hand_computed_case():
  # 3 classes; class 2 absent from GT and predicted once -> IoU_2 = 0, Acc_2 = NaN.
  label = np.array([[0, 0, 1, 255]])
  pred = np.array([[0, 1, 2, 2]])
  cm = np.asarray(scoring.confusion_matrix(pred, label, 3))
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 0, 1], [0, 0, 0]])
  r = metrics.compute_metrics(cm)
  np.testing.assert_allclose(r["IoU"], [1 / 2, 0 / 2, 0.0])
  np.testing.assert_allclose(r["Acc"], [1 / 2, 0, np.nan])
  assert r["aAcc"] == pytest.approx(1 / 3)
  assert r["mIoU"] == pytest.approx(1 / 6)
  assert r["mAcc"] == pytest.approx(1 / 4)
  assert metrics.summary_percent(r) == {"aAcc": 33.33, "mIoU": 16.67, "mAcc": 25.0}


def test_class_absent_everywhere_is_excluded_from_mean():
  cm = np.array(
    [[5, 0, 0], [0, 3, 1], [0, 0, 0]]
  )  # class 2 in neither GT nor prediction... except once
  cm[2, 2] = 0
  cm[1, 2] = 0
  r = metrics.compute_metrics(cm)
  assert np.isnan(r["IoU"][2]) and np.isnan(r["Acc"][2])
  assert r["mIoU"] == pytest.approx(1.0)


def test_all_ignored_gives_nan_not_crash():
  label = np.full((2, 3), 255)
  cm = np.asarray(scoring.confusion_matrix(np.zeros((2, 3), int), label, 4))
  assert cm.sum() == 0
  r = metrics.compute_metrics(cm)
  assert np.isnan(r["aAcc"]) and np.isnan(r["mIoU"]) and np.isnan(r["mAcc"])


def test_against_bruteforce_summed_over_images():
  rng = np.random.default_rng(0)
  n = 7
  preds = rng.integers(0, n, size=(6, 9, 11))
  labels = rng.integers(0, n - 1, size=(6, 9, 11))  # class n-1 never in GT
  labels[rng.uniform(size=labels.shape) < 0.15] = 255
  total = np.zeros((n, n), np.int64)
  for p, g in zip(preds, labels, strict=True):  # per image, as the evaluator counts
    total += scoring.confusion_matrix(p, g, n)
  assert total.dtype == np.int64
  r = metrics.compute_metrics(total)
  a_acc, miou, macc, iou, acc = mmseg_bruteforce(preds, labels, n)
  assert r["aAcc"] == pytest.approx(a_acc, rel=1e-12)
  assert r["mIoU"] == pytest.approx(miou, rel=1e-12)
  assert r["mAcc"] == pytest.approx(macc, rel=1e-12)
  np.testing.assert_allclose(r["IoU"], iou, rtol=1e-12)
  np.testing.assert_allclose(r["Acc"], acc, rtol=1e-12)
  assert np.isnan(r["Acc"][n - 1]) and r["IoU"][n - 1] == 0.0


def test_counts_are_int64_and_out_of_range_predictions_dropped():
  cm = scoring.confusion_matrix(np.array([0, 1, 5, -1]), np.array([0, 1, 1, 0]), 2)
  assert cm.dtype == np.int64
  np.testing.assert_array_equal(cm, [[1, 0], [0, 1]])
  big = np.full((2, 2), 2**31 - 1, np.int64)
  total = big + scoring.confusion_matrix(np.zeros(4, int), np.zeros(4, int), 2) + big
  assert int(total[0, 0]) == 2 * (2**31 - 1) + 4
  assert metrics.compute_metrics(total)["aAcc"] == pytest.approx(0.5, rel=1e-9)


def test_bad_input():
  with pytest.raises(ValueError, match="differ"):
    scoring.confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)
  with pytest.raises(ValueError, match="square"):
    metrics.compute_metrics(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="num_classes"):
    scoring.confusion_matrix(np.zeros(2, int), np.zeros(2, int), 0)
