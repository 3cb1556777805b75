"""Evaluation: the eval split through the `Segmenter`, scored the mmseg way, with pictures.

Whole-image or sliding-window inference (`config.eval.mode`, see `inference`); the continuous colours
are resized bilinearly to the annotation's size and decoded there, and the confusion matrix is summed
over the dataset in int64. Training writes `eval/step_<k>.json` and `pictures/step_<k>/`; `flowseg
evaluate` writes under a name keyed by its settings (`eval/step_<k>_steps<n>_<mode>.json`), so it never
overwrites training's results. This module imports no training code.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import inference, metrics
from flowseg_jax.data import classes, pipeline, transforms

# Kept for callers of the former names.
make_sample_fn = inference.make_sample_fn


class _Scorer:
  """Host-side: accumulates the int64 confusion matrix and keeps the first pictures."""

  def __init__(self, num_classes: int, num_pictures: int):
    self.n = num_classes
    self.matrix = np.zeros((num_classes, num_classes), np.int64)
    self.num_pictures = num_pictures
    self.pictures: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    self.count = 0

  def add(self, example: dict, colours: np.ndarray, pred: np.ndarray) -> None:
    """pred: labels at the annotation's size."""
    label = example["label"]
    valid = (label != centroids_lib.IGNORE_LABEL) & (label >= 0) & (label < self.n)
    idx = label[valid].astype(np.int64) * self.n + pred[valid]
    self.matrix += np.bincount(idx, minlength=self.n * self.n).reshape(self.n, self.n)
    self.count += 1
    if len(self.pictures) < self.num_pictures:
      self.pictures.append((example["name"], example["image_orig"], colours, pred, label))


def evaluate_segmenter(
  segmenter: inference.Segmenter, *, num_steps: int | None = None, mode: str | None = None
) -> tuple[dict[str, Any], _Scorer]:
  """Runs the eval split of segmenter.config through the segmenter; (metrics dict, scorer)."""
  config = segmenter.config
  pc = jax.process_count()
  dataset = pipeline.create_eval_dataset(config.input)
  total = pipeline.num_eval_examples(config.input)
  limit = config.eval.max_examples
  if limit is not None and limit >= 0:
    total = min(total, limit)
  num_local = min(len(dataset), -(-total // pc))
  items = ((ex, ex["image_orig"]) for _, ex in zip(range(num_local), dataset, strict=False))
  scorer = _Scorer(segmenter.num_classes, config.eval.num_pictures)
  progress = inference.Progress("evaluate", num_local, inference.progress_every(num_local))
  for ex, colours, pred in segmenter.segment_stream(
    items, num_local, num_steps=num_steps, mode=mode, progress=progress
  ):
    scorer.add(ex, colours, pred)

  matrix, count = scorer.matrix, scorer.count
  if pc > 1:
    matrix = np.asarray(multihost_utils.process_allgather(matrix)).sum(axis=0)
    count = int(np.sum(multihost_utils.process_allgather(np.asarray(count))))
  result = metrics.compute_metrics(matrix)
  result["num_examples"] = count
  result["num_skipped_examples"] = dataset.num_skipped
  return result, scorer


def evaluate_params(config, setup, params, mesh, *, step: int | None = None):
  """Scores denoiser params on the eval split; `setup` is an `inference.InferenceSetup` or
  `train.Setup` of config. Returns (metrics dict, scorer with pictures)."""
  segmenter = inference.Segmenter(config, params, mesh=mesh, step=step, setup=setup)
  return evaluate_segmenter(segmenter)


def scorer_centroids(config) -> np.ndarray:
  n = pipeline.num_classes(config.input)
  return centroids_lib.class_centroids(n, ignore_as_class=not config.objective.mask_ignored)[:n]


def per_class_iou(config, result: dict[str, Any]) -> dict[str, float | None]:
  """Class name -> IoU (None for classes absent from both prediction and annotation)."""
  names = pipeline.class_names(config.input)
  return {
    name: (None if np.isnan(v) else float(v)) for name, v in zip(names, result["IoU"], strict=True)
  }


def write_outputs(
  config,
  result: dict[str, Any],
  scorer: _Scorer,
  workdir: str,
  step: int,
  writer=None,
  *,
  name: str | None = None,
  settings: dict | None = None,
) -> str:
  """eval/<name>.json (metrics, per-class IoU by class name) and pictures/<name>/<image>.png.

  name defaults to `step_<step>` (training's); `settings` (num_steps, mode) go into the JSON.
  """
  if jax.process_index() != 0:
    return ""
  name = name or f"step_{step}"
  settings = settings or {"num_steps": config.eval.num_steps, "mode": config.eval.mode}
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  ious = per_class_iou(config, result)
  summary = {
    "step": step,
    **{k: result[k] for k in ("aAcc", "mIoU", "mAcc", "num_examples", "num_skipped_examples")},
    "percent": metrics.summary_percent(result),
    "per_class_IoU": ious,
    **settings,
  }
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w") as f:
    json.dump(summary, f, indent=2)
  pal = centroids_lib.palette(scorer_centroids(config))
  pic_dir = os.path.join(workdir, "pictures", name)
  os.makedirs(pic_dir, exist_ok=True)
  images = {}
  for image_name, image, colours, pred, label in scorer.pictures:
    panel = picture_panel(image, colours, pred, label, pal)
    Image.fromarray(panel).save(os.path.join(pic_dir, f"{image_name}.png"))
    images[f"eval/{image_name}"] = panel[None]
  if writer is not None:
    scalars = {f"eval/{k}": result[k] for k in ("aAcc", "mIoU", "mAcc")}
    scalars.update({f"eval_IoU/{k}": v for k, v in ious.items() if v is not None})
    writer.write_scalars(step, scalars)
    if images:
      writer.write_images(step, images)
  return path


def picture_panel(image, colours, pred, label, pal) -> np.ndarray:
  """image | raw colour output | nearest-centroid mask | ground truth, at the annotation's size."""
  h, w = label.shape
  raw = transforms.resize_image(centroids_lib.to_uint8_image(colours), (h, w))
  img = transforms.resize_image(np.asarray(image, np.uint8), (h, w))
  tiles = [img, raw, classes.colorize(pred, pal), classes.colorize(label, pal)]
  return np.concatenate(tiles, axis=1)


def inference_params(config, state):
  """The denoiser parameters inference uses: EMA unless config.eval.use_ema is False."""
  return (state.ema_params if config.eval.use_ema else state.params)["denoiser"]


def _log(step: int, result: dict, name: str = "eval") -> None:
  logging.info(
    "%s step %d: %s over %d examples",
    name,
    step,
    metrics.summary_percent(result),
    result["num_examples"],
  )


def evaluate_state(config, setup, state, mesh, *, workdir: str, step: int, writer=None) -> dict:
  """Evaluates a TrainState (EMA parameters unless config.eval.use_ema is False) and writes
  training's eval/step_<k>.json and pictures (gIoU / cIoU for a prompted run)."""
  if setup.task.name == "prompted":
    from flowseg_jax import prompted_inference

    params = inference_params(config, state)
    return prompted_inference.evaluate_state(
      config, setup, params, mesh, workdir=workdir, step=step, writer=writer
    )
  result, scorer = evaluate_params(config, setup, inference_params(config, state), mesh, step=step)
  write_outputs(config, result, scorer, workdir, step, writer)
  _log(step, result)
  return result


def output_name(step: int, num_steps: int, mode: str) -> str:
  """The name `flowseg evaluate` files its results under: keyed by step and sampler settings."""
  return f"step_{step}_steps{num_steps}_{mode}"


def evaluate(
  config: ml_collections.ConfigDict | None,
  workdir: str,
  *,
  step: int | None = None,
  segmenter: inference.Segmenter | None = None,
) -> dict:
  """`flowseg evaluate`: the newest readable checkpoint of workdir (or `step`) on the eval split.

  config defaults to workdir/config.json. Results go to eval/step_<k>_steps<n>_<mode>.json and
  pictures/step_<k>_steps<n>_<mode>/; the returned dict also holds that 'path'.
  """
  seg = segmenter or inference.Segmenter.from_workdir(workdir, config, step=step)
  cfg = seg.config
  if seg.setup.task.name == "prompted":
    from flowseg_jax import prompted_inference

    result = prompted_inference.evaluate_segmenter(seg)
    settings = prompted_inference.settings(cfg)
    name = f"step_{seg.step}_steps{settings['num_steps']}" + (
      "_adaptive" if settings["adaptive_one_step"] else ""
    )
    path = prompted_inference.write_result(workdir, name, {"step": seg.step, **result, **settings})
    prompted_inference.log(seg.step, result, "evaluate")
    return {**result, "step": seg.step, "path": path}
  name = output_name(seg.step, cfg.eval.num_steps, cfg.eval.mode)
  result, scorer = evaluate_segmenter(seg)
  settings = {"num_steps": cfg.eval.num_steps, "mode": cfg.eval.mode}
  path = write_outputs(cfg, result, scorer, workdir, seg.step, name=name, settings=settings)
  _log(seg.step, result, "evaluate")
  if path:
    logging.info("Wrote %s.", path)
  return {**result, "step": seg.step, "path": path}
