"""Evaluation: Euler ODE from each image to its colour mask, nearest centroid, mmseg metrics.

Whole-image mode resizes the image to `config.input.image_size`; sliding-window mode resizes the original
so its short side is `config.eval.slide_short_side` and averages the predicted colours of overlapping
windows (the colour analogue of mmseg's logit averaging) before decoding. Either way the prediction is
resized (nearest) to the annotation's own size and scored there, summed over the dataset in int64.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import checkpointing, metrics, sampling, sharding
from flowseg_jax.data import classes, pipeline, transforms


def make_sample_fn(setup, mesh):
  """jit: (denoiser params, images (B, H, W, 3)) -> (colours (B, H, W, 3) f32, labels (B, H, W) int32).

  Compiled once per (setup, mesh, sampler settings): periodic evaluations reuse it, and a changed
  config.eval / config.objective setting gives a new one.
  """
  cfg = setup.config
  options = (
    cfg.eval.num_steps,
    cfg.eval.shift,
    cfg.eval.method,
    cfg.objective.prediction,
    cfg.objective.t_eps,
  )
  return _sample_fn(setup, mesh, options)


@functools.lru_cache(maxsize=8)
def _sample_fn(setup, mesh, options):
  num_steps, shift, method, prediction, t_eps = options
  real_centroids = setup.centroids[: setup.num_classes]  # the ignore centroid is never predicted

  def sample_fn(params, images):
    y = jnp.full((images.shape[0],), setup.cond_label, jnp.int32)
    apply = lambda x, t: setup.model.apply({"params": params}, x, t, y)
    x1 = sampling.sample(
      apply,
      images,
      num_steps=num_steps,
      shift=shift,
      prediction=prediction,
      t_eps=t_eps,
      method=method,
    )
    return x1, centroids_lib.decode_colors(x1, real_centroids)

  data = sharding.batch_sharding(mesh)
  return jax.jit(sample_fn, in_shardings=(None, data), out_shardings=(data, data))


def _local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in the order they were given."""
  shards = {}
  for shard in array.addressable_shards:
    start = shard.index[0].start or 0
    shards.setdefault(start, np.asarray(shard.data))
  return np.concatenate([shards[k] for k in sorted(shards)], axis=0)


def _padded_batches(items: Iterator, local_batch: int, num_batches: int, make_pad):
  """Yields exactly num_batches lists of length local_batch; (item, True) real, (pad, False) padding."""
  items = iter(items)
  for _ in range(num_batches):
    batch = []
    for item in items:
      batch.append((item, True))
      if len(batch) == local_batch:
        break
    while len(batch) < local_batch:
      batch.append((make_pad(), False))
    yield batch


def _global_max(value: int) -> int:
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.asarray(value))))


def _slide_windows(h: int, w: int, crop: tuple[int, int], stride: tuple[int, int]):
  """mmseg's grid: the last window is shifted to end at the border; (y0, x0) corners."""
  ch, cw = crop
  sh, sw = stride
  rows = max(h - ch + sh - 1, 0) // sh + 1
  cols = max(w - cw + sw - 1, 0) // sw + 1
  for r in range(rows):
    for c in range(cols):
      y0 = max(min(r * sh, h - ch), 0)
      x0 = max(min(c * sw, w - cw), 0)
      yield y0, x0


def _slide_input(image_orig: np.ndarray, short_side: int, crop: tuple[int, int]) -> np.ndarray:
  """Resize so the short side is `short_side` (and no side is below the crop), to [-1, 1]."""
  h, w = image_orig.shape[:2]
  scale = max(short_side / min(h, w), crop[0] / h, crop[1] / w)
  size = (max(int(round(h * scale)), crop[0]), max(int(round(w * scale)), crop[1]))
  return transforms.normalize_image(transforms.resize_image(image_orig, size))


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


def _check_eval_batch(config) -> int:
  pc = jax.process_count()
  batch = int(config.input.eval_batch_size)
  if batch % pc or batch % jax.device_count():
    raise ValueError(
      f"config.input.eval_batch_size={batch} must be a multiple of the {jax.device_count()} devices "
      f"and {pc} processes"
    )
  return batch // pc


def predict_examples(config, setup, params, mesh, examples, num_local: int, *, sample_fn=None):
  """Yields (example, colours, labels at the original image size) for examples with 'image_orig'.

  Whole mode also needs 'image' (float32 at input.image_size). Every process must call this with its own
  examples: the number of device calls is agreed over processes (shorter shards are padded).
  """
  sample_fn = sample_fn or make_sample_fn(setup, mesh)
  local_batch = _check_eval_batch(config)
  size = tuple(config.input.image_size)

  def run(images: np.ndarray):
    x1, pred = sample_fn(params, sharding.shard_batch({"image": images}, mesh)["image"])
    return _local_rows(x1), _local_rows(pred)

  if config.eval.mode == "whole":
    num_batches = _global_max(-(-num_local // local_batch))
    pad = lambda: {"image": np.zeros((*size, 3), np.float32)}
    for batch in _padded_batches(examples, local_batch, num_batches, pad):
      colours, preds = run(np.stack([ex["image"] for ex, _ in batch]))
      for (ex, real), c, p in zip(batch, colours, preds, strict=True):
        if real:
          yield ex, c, transforms.resize_label(p, ex["image_orig"].shape[:2])
  elif config.eval.mode == "slide":
    yield from _predict_slide(config, examples, run, local_batch, size)
  else:
    raise ValueError(f"config.eval.mode must be 'whole' or 'slide', got {config.eval.mode!r}")


def evaluate_params(
  config, setup, params, mesh, *, sample_fn=None
) -> tuple[dict[str, Any], _Scorer]:
  """Runs the eval split through the ODE and scores it; returns (metrics dict, scorer with pictures)."""
  pc = jax.process_count()
  dataset = pipeline.create_eval_dataset(config.input)
  total = pipeline.num_eval_examples(config.input)
  limit = config.eval.max_examples
  if limit is not None and limit >= 0:
    total = min(total, limit)
  num_local = min(len(dataset), -(-total // pc))
  examples = (ex for _, ex in zip(range(num_local), dataset, strict=False))
  scorer = _Scorer(setup.num_classes, config.eval.num_pictures)
  for ex, colours, pred in predict_examples(
    config, setup, params, mesh, examples, num_local, sample_fn=sample_fn
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


def _predict_slide(config, examples, run, local_batch, crop):
  """Windows of every example streamed through fixed-size batches; colours averaged per example."""
  stride = tuple(config.eval.slide_stride)
  if any(s <= 0 for s in stride):
    raise ValueError(f"config.eval.slide_stride must be positive, got {stride}")
  examples = list(examples)
  inputs = [_slide_input(ex["image_orig"], config.eval.slide_short_side, crop) for ex in examples]
  windows = [
    (i, y0, x0)
    for i, img in enumerate(inputs)
    for y0, x0 in _slide_windows(*img.shape[:2], crop, stride)
  ]
  num_batches = _global_max(-(-len(windows) // local_batch))
  sums = [np.zeros(img.shape, np.float64) for img in inputs]
  counts = [np.zeros(img.shape[:2], np.int32) for img in inputs]
  remaining = np.bincount([w[0] for w in windows], minlength=len(inputs))
  real_centroids = scorer_centroids(config)
  for batch in _padded_batches(windows, local_batch, num_batches, lambda: None):
    crops = [
      inputs[w[0]][w[1] : w[1] + crop[0], w[2] : w[2] + crop[1]]
      if real
      else np.zeros((*crop, 3), np.float32)
      for w, real in batch
    ]
    colours, _ = run(np.stack(crops))
    for (w, real), c in zip(batch, colours, strict=True):
      if not real:
        continue
      i, y0, x0 = w
      sums[i][y0 : y0 + crop[0], x0 : x0 + crop[1]] += c
      counts[i][y0 : y0 + crop[0], x0 : x0 + crop[1]] += 1
      remaining[i] -= 1
      if remaining[i] == 0:
        mean = (sums[i] / counts[i][..., None]).astype(np.float32)
        pred = np.asarray(centroids_lib.decode_colors(mean, real_centroids))
        yield examples[i], mean, transforms.resize_label(pred, examples[i]["image_orig"].shape[:2])
        sums[i] = counts[i] = None


def scorer_centroids(config) -> np.ndarray:
  n = pipeline.num_classes(config.input)
  return centroids_lib.class_centroids(n, ignore_as_class=not config.objective.mask_ignored)[:n]


def write_outputs(
  config, result: dict[str, Any], scorer: _Scorer, workdir: str, step: int, writer=None
) -> str:
  """eval/step_<k>.json (metrics, per-class IoU by name) and pictures/step_<k>/<name>.png."""
  if jax.process_index() != 0:
    return ""
  names = pipeline.class_names(config.input)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  summary = {
    "step": step,
    **{k: result[k] for k in ("aAcc", "mIoU", "mAcc", "num_examples", "num_skipped_examples")},
    "percent": metrics.summary_percent(result),
    "per_class_IoU": {
      name: (None if np.isnan(v) else float(v))
      for name, v in zip(names, result["IoU"], strict=True)
    },
    "num_steps": config.eval.num_steps,
    "mode": config.eval.mode,
  }
  path = os.path.join(out_dir, f"step_{step}.json")
  with open(path, "w") as f:
    json.dump(summary, f, indent=2)
  pal = centroids_lib.palette(scorer_centroids(config))
  pic_dir = os.path.join(workdir, "pictures", f"step_{step}")
  os.makedirs(pic_dir, exist_ok=True)
  images = {}
  for name, image, colours, pred, label in scorer.pictures:
    panel = picture_panel(image, colours, pred, label, pal)
    Image.fromarray(panel).save(os.path.join(pic_dir, f"{name}.png"))
    images[f"eval/{name}"] = panel[None]
  if writer is not None:
    writer.write_scalars(step, {f"eval/{k}": result[k] for k in ("aAcc", "mIoU", "mAcc")})
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


def evaluate_state(config, setup, state, mesh, *, workdir: str, step: int, writer=None) -> dict:
  """Evaluates a TrainState (EMA parameters unless config.eval.use_ema is False) and writes outputs."""
  result, scorer = evaluate_params(config, setup, inference_params(config, state), mesh)
  write_outputs(config, result, scorer, workdir, step, writer)
  logging.info(
    "eval step %d: %s over %d examples",
    step,
    metrics.summary_percent(result),
    result["num_examples"],
  )
  return result


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str):
  """(setup, mesh, state, step) from the newest readable checkpoint of workdir (no optimiser work)."""
  from flowseg_jax import train

  setup = train.Setup(config)
  mesh = sharding.mesh_from_config(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  abstract, _ = train.abstract_train_state(setup, mesh, rules, config.seed)
  manager = checkpointing.create_manager(
    os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints, async_save=False
  )
  restored = checkpointing.restore_latest(manager, abstract, None)
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no readable checkpoint")
  state, step = restored
  return setup, mesh, state, step


def inference_params(config, state):
  """The denoiser parameters inference uses: EMA unless config.eval.use_ema is False."""
  return (state.ema_params if config.eval.use_ema else state.params)["denoiser"]


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`flowseg evaluate`: restore the newest readable checkpoint of workdir and evaluate it."""
  setup, mesh, state, step = restore_for_inference(config, workdir)
  with jax.set_mesh(mesh):
    return evaluate_state(config, setup, state, mesh, workdir=workdir, step=step)
