"""experiments/confidence_maps.py: boundaries, AUROC, and a run on a tiny trained workdir."""

import json
import os

import numpy as np
from scipy import stats as scipy_stats

from experiments import confidence_maps
from flowseg_jax import train
from tests.train_test import tiny_config


def test_boundary_mask_marks_both_sides_of_every_edge():
  label = np.array([[0, 0, 1], [0, 0, 1], [2, 2, 2]])
  want = np.array([[0, 1, 1], [1, 1, 1], [1, 1, 1]], bool)
  np.testing.assert_array_equal(confidence_maps.boundary_mask(label), want)
  assert not confidence_maps.boundary_mask(np.zeros((3, 4), int)).any()


def test_auroc_is_mann_whitney_with_ties_halved():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, 200).astype(float)  # many ties
  positive = rng.random(200) < 0.4 + 0.1 * scores
  u = scipy_stats.mannwhitneyu(scores[positive], scores[~positive]).statistic
  want = u / (positive.sum() * (~positive).sum())
  np.testing.assert_allclose(confidence_maps.auroc(scores, positive), want, rtol=1e-12)
  assert confidence_maps.auroc(np.array([1.0, 2.0]), np.array([False, True])) == 1.0


def test_measure_writes_panels_and_paired_tests(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(), workdir)
  out = str(tmp_path / "out")
  result = confidence_maps.measure(workdir, out, num_pictures=2, max_examples=6)
  assert result["num_images"] == 6
  pair = result["boundary_vs_interior"]
  assert pair["test"] == "paired" and pair["n"] <= 6
  assert pair["ci_low"] <= pair["diff"] <= pair["ci_high"]
  assert 0.0 <= result["auroc_correct"] <= 1.0 or np.isnan(result["auroc_correct"])
  panels = sorted(f for f in os.listdir(out) if f.endswith(".png"))
  assert len(panels) == 2
  with open(os.path.join(out, "confidence.json")) as f:
    assert json.load(f)["num_images"] == 6
