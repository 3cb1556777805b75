"""What a trained model does, on a real one: tests/assets/demo_model is `flowseg export` of the
3000-step static demo model of the study (seed 0; eval mIoU 65.83 % on the 64 held-out images).

It checks behaviour an untrained test network cannot show: the folder loads into a segmenter that
scores far above chance, and its confidence is lower on annotation boundaries and on wrong pixels.
If the model folder format changes, regenerate the folder: `flowseg export --workdir <a 3000-step
demo workdir> --out tests/assets/demo_model`.
"""

import os

import numpy as np
import pytest

from experiments import confidence_maps
from flowseg_jax import defaults, inference, scoring
from flowseg_jax.centroids import IGNORE_LABEL
from flowseg_jax.data import pipeline
from flowseg_jax.evaluators import miou
from tests.train_test import REPO

MODEL = os.path.join(REPO, "tests", "assets", "demo_model")
NUM_IMAGES = 16


@pytest.fixture(scope="module")
def seg():
  return inference.Segmenter.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def examples():
  config = defaults.load_config_file(os.path.join(REPO, "configs", "demo.py"))
  dataset = pipeline.create_eval_dataset(config.input)
  return [ex for _, ex in zip(range(NUM_IMAGES), dataset, strict=False)]


@pytest.fixture(scope="module")
def predictions(seg, examples):
  """(labels, confidence) of every example, in one streamed pass."""
  return seg.segment_batch([ex["image_orig"] for ex in examples], return_confidence=True)


def test_the_trained_model_scores_far_above_chance(seg, examples, predictions):
  """12 classes: chance mIoU is ~4 %; this model scored 65.8 % on all 64 held-out images."""
  matrix = sum(
    scoring.confusion_matrix(pred, ex["label"], seg.num_classes)
    for ex, (pred, _) in zip(examples, predictions, strict=True)
  )
  assert miou.compute_metrics(matrix)["mIoU"] > 0.5


def test_confidence_is_low_on_boundaries_and_errors(examples, predictions):
  """Per image, mean confidence on annotation boundaries < interior and on wrong < right pixels
  (over all 64 images: 0.75 vs 0.88 and 0.66 vs 0.91, experiments/confidence_maps.py)."""
  gaps = {"boundary": [], "wrong": []}
  for ex, (pred, confidence) in zip(examples, predictions, strict=True):
    label = ex["label"]
    valid = label != IGNORE_LABEL
    edge = confidence_maps.boundary_mask(label) & valid
    wrong = (pred != label) & valid
    gaps["boundary"].append(confidence[valid & ~edge].mean() - confidence[edge].mean())
    if wrong.any() and (valid & ~wrong).any():
      gaps["wrong"].append(confidence[valid & ~wrong].mean() - confidence[wrong].mean())
  for name, values in gaps.items():
    values = np.asarray(values)
    assert values.mean() > 0.05 and (values > 0).mean() >= 0.75, (name, values)


def _demo_segmenter(seg, **eval_overrides):
  """The demo model under configs/demo.py (its eval split and settings)."""
  config = defaults.load_config_file(os.path.join(REPO, "configs", "demo.py"))
  config.unlock()
  for key, value in eval_overrides.items():
    config.eval[key] = value
  return inference.Segmenter(config, seg.params, task=seg.task, mesh=seg.mesh)


@pytest.mark.parametrize(
  "tta,want",
  [
    ("none", (0.6583238901963968, 0.7958843704066634)),
    ("flip", (0.6727895691843521, 0.8052425281724644)),
  ],
)
def test_demo_evaluation_is_what_the_host_scorer_gave(seg, tta, want):
  """mIoU and aAcc over the 64 held-out images as main measured them before decoding and the
  confusion matrix moved on device (host nearest-centroid / float64 view decoding, per-image
  np.bincount): unchanged to the last digit, here on 8 devices as on 1."""
  evaluator = miou.MiouEvaluator(_demo_segmenter(seg, tta=tta))
  result = evaluator.run(evaluator.settings())
  assert result["num_examples"] == 64
  assert (result["mIoU"], result["aAcc"]) == pytest.approx(want, abs=1e-12)


def test_a_padded_last_batch_counts_only_its_examples(seg, examples):
  """5 examples on 8 devices at one window each: the last sampler batch carries 3 zero windows
  and the scorer's call is padded to a power of two; neither counts. The evaluator's sums equal
  np.bincount over the 5 images' labels."""
  evaluator = miou.MiouEvaluator(_demo_segmenter(seg, max_examples=5, batch_per_device=1))
  result = evaluator.run(evaluator.settings())
  assert result["num_examples"] == 5
  labels = evaluator.segmenter.segment_batch([ex["image_orig"] for ex in examples[:5]])
  n = seg.num_classes
  want = np.zeros((n, n), np.int64)
  for pred, ex in zip(labels, examples[:5], strict=True):
    g, p = ex["label"].ravel().astype(np.int64), pred.ravel()
    keep = g != IGNORE_LABEL
    want += np.bincount(g[keep] * n + p[keep], minlength=n * n).reshape(n, n)
  np.testing.assert_array_equal(result["intersection"], np.diag(want))
  np.testing.assert_array_equal(result["label_area"], want.sum(1))
  np.testing.assert_array_equal(result["pred_area"], want.sum(0))
  assert want.sum() == sum(int((ex["label"] != IGNORE_LABEL).sum()) for ex in examples[:5])
  assert len(evaluator.pictures) == 4 and evaluator.pictures[0][0] == examples[0]["name"]
