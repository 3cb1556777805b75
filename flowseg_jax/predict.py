"""`flowseg predict`: image files or folders of any size -> label PNGs, colour masks and overlays.

For every input image `NAME.ext` it writes, in the output folder:
  NAME_label.png    uint8 class ids at the image's own size (mode L),
  NAME_mask.png     the mask in the model's palette (classes.json's colours, else the centroids'),
  NAME_overlay.png  the image blended 50/50 with the mask.
Files that cannot be read are reported and skipped; the others are written.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from absl import logging
from PIL import Image

from flowseg_jax import inference, inference_host, storage
from flowseg_jax.run import progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclasses.dataclass
class PredictResult:
  """Names written, and (path, reason) of the files that failed, on this process."""

  written: list[str]
  failed: list[tuple[str, str]]
  step: int


def list_images(path: str) -> list[str]:
  """One image file, or the images of a folder (sorted, not recursive); local or e.g. gs://."""
  if storage.path(path).is_file():
    return [path]
  if not storage.path(path).is_dir():
    raise FileNotFoundError(f"--input {path!r} is neither an image file nor a folder")
  files = sorted(
    storage.join(path, f.name)
    for f in storage.path(path).iterdir()
    if f.name.lower().endswith(IMAGE_SUFFIXES)
  )
  if not files:
    raise FileNotFoundError(
      f"--input folder {path!r} holds no images ({', '.join(IMAGE_SUFFIXES)})"
    )
  return files


def save_outputs(out_dir: str, name: str, rgb: np.ndarray, pred: np.ndarray, segmenter) -> None:
  out = storage.path(out_dir)
  storage.save_image(Image.fromarray(pred.astype(np.uint8), mode="L"), out / f"{name}_label.png")
  storage.save_image(Image.fromarray(segmenter.colourise(pred)), out / f"{name}_mask.png")
  storage.save_image(Image.fromarray(segmenter.overlay(rgb, pred)), out / f"{name}_overlay.png")


def predict(
  config,
  workdir: str,
  input_path: str,
  output_dir: str,
  *,
  segmenter: inference.Segmenter | None = None,
  prompt: str | None = None,
) -> PredictResult:
  """Segments the images at input_path with workdir's newest checkpoint (config defaults to
  workdir/config.json). Unreadable files are logged and skipped. A prompted run needs `prompt`
  (labels 1 = the prompt's region)."""
  files = list_images(input_path)
  seg = segmenter or inference.Segmenter.from_workdir(workdir, config)
  # Every process segments its own share of the files.
  mine = files[jax.process_index() :: jax.process_count()]
  failed: list[tuple[str, str]] = []

  def readable():
    for path in mine:
      try:
        rgb = inference_host.to_rgb(path)
      except ValueError as e:
        logging.error("Skipping %s: %s", path, e)
        failed.append((path, str(e)))
        continue
      yield (path, rgb), rgb, prompt

  seg.conditions([prompt])  # a missing, unknown or unwanted prompt fails before any work
  storage.path(output_dir).mkdir(parents=True, exist_ok=True)
  written = []
  report = progress.Progress("predict", len(mine))
  stream = seg.segment_stream(readable(), len(mine), progress=report)
  for (path, rgb), _, pred, _ in stream:
    name = os.path.splitext(os.path.basename(path))[0]
    save_outputs(output_dir, name, rgb, pred, seg)
    written.append(name)
  logging.info(
    "Segmented %d image(s) with step %d into %s; %d failed.",
    len(written),
    seg.step,
    output_dir,
    len(failed),
  )
  return PredictResult(written=written, failed=failed, step=seg.step)
