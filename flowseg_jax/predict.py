"""`flowseg predict`: image files or folders of any size -> label PNGs, colour masks and overlays.

For every input image `NAME.ext` it writes, in the output folder:
  NAME_label.png    uint8 class ids at the image's own size (mode L),
  NAME_mask.png     the mask in the centroid palette,
  NAME_overlay.png  the image blended 50/50 with the mask.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from PIL import Image

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import evaluate
from flowseg_jax.data import classes, transforms

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(path: str) -> list[str]:
  """One image file, or the images of a folder (sorted, not recursive)."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--input {path!r} is neither an image file nor a folder")
  files = sorted(
    os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES)
  )
  if not files:
    raise FileNotFoundError(
      f"--input folder {path!r} holds no images ({', '.join(IMAGE_SUFFIXES)})"
    )
  return files


def load_example(path: str, image_size) -> dict:
  try:
    with Image.open(path) as img:
      rgb = np.asarray(img.convert("RGB"), np.uint8)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from e
  image = transforms.normalize_image(transforms.resize_image(rgb, tuple(image_size)))
  name = os.path.splitext(os.path.basename(path))[0]
  return {"image": image, "image_orig": rgb, "name": name}


def save_outputs(out_dir: str, example: dict, pred: np.ndarray, pal: np.ndarray) -> None:
  name = example["name"]
  Image.fromarray(pred.astype(np.uint8), mode="L").save(os.path.join(out_dir, f"{name}_label.png"))
  mask = classes.colorize(pred, pal)
  Image.fromarray(mask).save(os.path.join(out_dir, f"{name}_mask.png"))
  blend = (0.5 * example["image_orig"].astype(np.float32) + 0.5 * mask).round().astype(np.uint8)
  Image.fromarray(blend).save(os.path.join(out_dir, f"{name}_overlay.png"))


def predict(config, workdir: str, input_path: str, output_dir: str) -> list[str]:
  """Segments the images at input_path with workdir's newest checkpoint; returns the names written."""
  files = list_images(input_path)
  setup, mesh, state, step = evaluate.restore_for_inference(config, workdir)
  params = evaluate.inference_params(config, state)
  # Every process segments its own share of the files.
  mine = files[jax.process_index() :: jax.process_count()]
  examples = (load_example(f, config.input.image_size) for f in mine)
  pal = centroids_lib.palette(evaluate.scorer_centroids(config))
  os.makedirs(output_dir, exist_ok=True)
  names = []
  with jax.set_mesh(mesh):
    for ex, _, pred in evaluate.predict_examples(config, setup, params, mesh, examples, len(mine)):
      save_outputs(output_dir, ex, pred, pal)
      names.append(ex["name"])
  logging.info("Segmented %d image(s) with step %d into %s.", len(names), step, output_dir)
  return names
