"""Semantic segmentation scored as mmseg scores it: a dataset-level confusion matrix -> aAcc, mIoU,
mAcc, per-class IoU, with pictures.

The confusion matrix (rows = ground truth, columns = prediction) is counted on device with the
decoding, per chunk of pixels in int32 (`scoring`), summed on the host in int64 (a whole COCO-Stuff
val set has ~1.5e9 pixels, too close to the int32 limit) and over the processes. Definitions
(mmseg IoUMetric): pixels whose label is `ignore_index` are dropped; I_c, P_c, L_c are the
per-class intersection, prediction and label counts summed over the dataset; IoU_c = I_c / (P_c +
L_c - I_c), Acc_c = I_c / L_c (NaN for 0/0); aAcc = sum I / sum L; mIoU and mAcc are NaN-excluding
means. Predictions must lie in [0, N) (the nearest-centroid decoder guarantees it); out-of-range
predictions are not counted.

Each image's continuous colours are resized bilinearly to the annotation's size and decoded there
(the Segmenter does it, as mmseg resizes logits before the argmax). Training writes
`eval/step_<k>.json` and `pictures/step_<k>/`; `flowseg evaluate` writes under
`step_<k>_steps<n>_<mode>`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import defaults, storage
from flowseg_jax.data import classes, datasets, transforms
from flowseg_jax.evaluators import common
from flowseg_jax.run import files, progress


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


def per_class_iou(names, result: dict[str, Any]) -> dict[str, float | None]:
  """Class name -> IoU (None for classes absent from both prediction and annotation)."""
  return {
    name: (None if np.isnan(v) else float(v)) for name, v in zip(names, result["IoU"], strict=True)
  }


def picture_panel(image, colours, pred, label, pal) -> np.ndarray:
  """image | raw colour output | nearest-centroid mask | ground truth, at the annotation's size."""
  h, w = label.shape
  raw = transforms.resize_image(centroids_lib.to_uint8_image(colours), (h, w))
  img = transforms.resize_image(np.asarray(image, np.uint8), (h, w))
  tiles = [img, raw, classes.colourise(pred, pal), classes.colourise(label, pal)]
  return np.concatenate(tiles, axis=1)


class MiouEvaluator(common.Evaluator):
  """aAcc / mIoU / mAcc and per-class IoU of a semantic Segmenter, and the first pictures."""

  def __init__(self, segmenter):
    super().__init__(segmenter)
    # (name, image, colours, prediction, annotation) of the first config.eval.num_pictures images.
    self.pictures: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

  def settings(self, *, num_steps=None, mode=None, adaptive=None) -> dict:
    del adaptive  # no adaptive rule for semantic segmentation
    cfg = self.config.eval
    out = {
      "num_steps": int(cfg.num_steps if num_steps is None else num_steps),
      "mode": cfg.mode if mode is None else mode,
      "tta": cfg.get("tta", "none"),
    }
    if out["tta"] == "ms_flip":
      out["tta_scales"] = [float(s) for s in cfg.get("tta_scales", ())]
    return out

  def output_name(self, step: int, settings: dict) -> str:
    suffix = "" if settings["tta"] == "none" else f"_{settings['tta']}"
    scales = settings.get("tta_scales")
    if scales is not None and tuple(scales) != tuple(defaults.eval_config().tta_scales):
      suffix += "_x" + "-".join(f"{s:g}" for s in scales)  # other scales: another file
    return f"step_{step}_steps{settings['num_steps']}_{settings['mode']}{suffix}"

  def run(self, settings: dict) -> dict:
    seg = self.segmenter
    n = seg.num_classes
    dataset, examples, num_local = common.local_examples(self.config)
    matrix = np.zeros((n, n), np.int64)  # the device's per-chunk int32 counts, summed in int64
    count = 0
    self.pictures = []
    keep = self.config.eval.num_pictures
    first = {}  # index -> example, for the first pictures

    def items():
      for i, ex in enumerate(examples):
        if i < keep:
          first[i] = ex
        yield i, ex["image_orig"], None, ex["label"]

    report = progress.Progress("evaluate", num_local)
    stream = seg.segment_stream(
      items(),
      num_local,
      num_steps=settings["num_steps"],
      mode=settings["mode"],
      tta=settings["tta"],
      progress=report,
      confusion=matrix,
    )
    for i, colours, pred, _ in stream:
      count += 1
      if i in first:
        ex = first.pop(i)
        self.pictures.append((ex["name"], ex["image_orig"], colours, pred, ex["label"]))
    matrix, count = common.sum_over_processes((matrix, np.asarray(count)))
    result = compute_metrics(matrix)
    result["num_examples"] = int(count)
    result["num_skipped_examples"] = dataset.num_skipped
    return result

  def write(self, workdir, name, step, result, settings, writer=None) -> str:
    """eval/<name>.json (metrics, per-class IoU by class name), pictures/<name>/<image>.png, and the
    writer's scalars and images."""
    ious = per_class_iou(datasets.class_names(self.config.input), result)
    summary = {
      "step": step,
      **{k: result[k] for k in ("aAcc", "mIoU", "mAcc", "num_examples", "num_skipped_examples")},
      "percent": summary_percent(result),
      "per_class_IoU": ious,
      **settings,
    }
    path = common.write_json(workdir, name, summary)
    if not path:  # not process 0
      return path
    pal = self.segmenter.palette  # classes.json's colours, else the centroids'
    pic_dir = storage.path(workdir) / files.PICTURES_DIR / name
    pic_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    for image_name, image, colours, pred, label in self.pictures:
      panel = picture_panel(image, colours, pred, label, pal)
      storage.save_image(Image.fromarray(panel), pic_dir / f"{image_name}.png")
      images[f"eval/{image_name}"] = panel[None]
    if writer is not None:
      scalars = {f"eval/{k}": result[k] for k in ("aAcc", "mIoU", "mAcc")}
      scalars.update({f"eval_IoU/{k}": v for k, v in ious.items() if v is not None})
      writer.write_scalars(step, scalars)
      if images:
        writer.write_images(step, images)
    return path

  def summary(self, result: dict) -> str:
    return f"mIoU {100 * result['mIoU']:.2f}%"

  def log_line(self, result: dict) -> str:
    return f"{summary_percent(result)} over {result['num_examples']} examples"
