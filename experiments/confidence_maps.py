"""Where the Segmenter's confidence is low: boundaries and errors, on a trained workdir's eval split.

  python -m experiments.confidence_maps --workdir /tmp/flowseg_demo --out /tmp/confidence

`seg(image, return_confidence=True)` gives each pixel the decoded colour's margin between its class
colour and the runner-up's (1 on a class colour, 0 halfway between two). This script measures, over
the eval split's images, the mean confidence on annotation boundaries (pixels with a differently
labelled 4-neighbour, ignored pixels excluded) against the interior, and on wrong against correct
pixels, each as a per-image paired difference with its 95 % interval and two-sided t test
(experiments/stats.py), plus the AUROC of confidence for telling correct from wrong pixels. It saves
`--num-pictures` panels (image | annotation | prediction | confidence | errors) and `confidence.json`.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image
from scipy import stats as scipy_stats

from experiments import stats
from flowseg_jax import inference
from flowseg_jax.centroids import IGNORE_LABEL
from flowseg_jax.evaluators import common


def boundary_mask(label: np.ndarray) -> np.ndarray:
  """True where a pixel has a 4-neighbour of another label (either side of every edge)."""
  out = np.zeros(label.shape, bool)
  vertical = label[1:] != label[:-1]
  horizontal = label[:, 1:] != label[:, :-1]
  out[1:] |= vertical
  out[:-1] |= vertical
  out[:, 1:] |= horizontal
  out[:, :-1] |= horizontal
  return out


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
  """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U / (n+ n-))."""
  ranks = scipy_stats.rankdata(scores)
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _panel(seg, image, label, pred, confidence, scale: int) -> Image.Image:
  """image | annotation | prediction | confidence (white = 1) | errors (red), upscaled `scale`x."""
  grey = np.repeat((confidence[..., None] * 255).round().astype(np.uint8), 3, -1)
  errors = np.zeros_like(image)
  valid = label != IGNORE_LABEL
  errors[valid & (pred != label)] = (255, 0, 0)
  errors[valid & (pred == label)] = (60, 60, 60)
  tiles = [image, seg.colourise(label), seg.colourise(pred), grey, errors]
  strip = np.concatenate(
    [np.pad(t, ((0, 0), (0, 2), (0, 0)), constant_values=255) for t in tiles], 1
  )
  h, w = strip.shape[:2]
  return Image.fromarray(strip).resize((w * scale, h * scale), Image.Resampling.NEAREST)


def measure(workdir: str, out: str, *, num_pictures: int = 2, max_examples: int = -1) -> dict:
  seg = inference.Segmenter.from_workdir(workdir)
  config = seg.config.copy_and_resolve_references()
  config.eval.max_examples = max_examples
  _, examples, _ = common.local_examples(config)
  os.makedirs(out, exist_ok=True)
  per_image = {"boundary": [], "interior": [], "wrong": [], "correct": []}
  scores, correct_all = [], []
  for i, ex in enumerate(examples):
    label = ex["label"]
    pred, confidence = seg(ex["image_orig"], return_confidence=True)
    valid = label != IGNORE_LABEL
    edge = boundary_mask(label) & valid
    right = (pred == label) & valid
    wrong = (pred != label) & valid
    parts = {"boundary": edge, "interior": valid & ~edge, "wrong": wrong, "correct": right}
    for name, mask in parts.items():
      per_image[name].append(float(confidence[mask].mean()) if mask.any() else float("nan"))
    scores.append(confidence[valid])
    correct_all.append(right[valid])
    if i < num_pictures:
      _panel(seg, ex["image_orig"], label, pred, confidence, 4).save(
        os.path.join(out, f"confidence_{i}_{ex['name']}.png")
      )
  result = {"workdir": workdir, "num_images": len(per_image["boundary"])}
  for a, b in (("boundary", "interior"), ("wrong", "correct")):
    x, y = np.asarray(per_image[a]), np.asarray(per_image[b])
    both = ~np.isnan(x) & ~np.isnan(y)
    pairs = np.flatnonzero(both).tolist()  # images as the pairing key, as seeds in the study
    test = stats.compare({k: float(x[k]) for k in pairs}, {k: float(y[k]) for k in pairs})
    test[f"mean_{a}"], test[f"mean_{b}"] = test.pop("mean_better"), test.pop("mean_worse")
    result[f"{a}_vs_{b}"] = {"num_images": len(pairs), **test}
  result["auroc_correct"] = auroc(np.concatenate(scores), np.concatenate(correct_all))
  with open(os.path.join(out, "confidence.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="a trained semantic workdir")
  p.add_argument("--out", required=True, help="folder for the panels and confidence.json")
  p.add_argument("--num-pictures", type=int, default=2)
  p.add_argument("--max-examples", type=int, default=-1, help="-1: the whole eval split")
  args = p.parse_args(argv)
  result = measure(
    args.workdir, args.out, num_pictures=args.num_pictures, max_examples=args.max_examples
  )
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
