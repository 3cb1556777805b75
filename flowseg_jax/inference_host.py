"""The host side of inference: images in, windows out, colours back to labels (no JAX).

`to_rgb` reads what a user hands over (a path, local or gs://, a PIL image, a uint8 array);
`network_input` makes an image the network's input, whole (resized to `config.input.image_size`)
or as mmseg's grid of sliding windows (`slide_settings`, `slide_windows`); `resize_colours` brings
the network's continuous colours to the image's size and `decode_colours_host` decodes them to the
nearest class colour, optionally with a confidence margin (the Segmenter's stream decodes on
device, `scoring.py`; this is `return_confidence`'s decoder). Test-time augmentation: `tta_views`
lists the (scale, mirrored) views, `mean_colours` averages their colours for pictures (the labels
decode the views together, `centroids.decode_views`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from flowseg_jax import storage
from flowseg_jax.data import transforms

MODES = ("whole", "slide")
TTA = ("none", "flip", "ms_flip")


def to_rgb(image: Any) -> np.ndarray:
  """A path, PIL image or uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8 (H, W, 3)."""
  if isinstance(image, str | os.PathLike):
    try:
      with storage.open_image(image) as img:
        img.load()
        return np.asarray(img.convert("RGB"), np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
      raise ValueError(f"cannot read image {os.fspath(image)!r}: {e}") from e
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"), np.uint8)
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(f"an image array must be uint8 in [0, 255], got dtype {array.dtype}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    return np.repeat(array[..., None], 3, axis=-1)
  if array.ndim == 3 and array.shape[-1] in (3, 4):
    return np.ascontiguousarray(array[..., :3])
  raise ValueError(
    f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}"
  )


def resize_colours(colours: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of float colours (h, w, 3) to (H, W) per channel (PIL 'F', antialiased when
  shrinking, the filter `transforms.resize_image` uses for images)."""
  h, w = size
  if colours.shape[:2] == (h, w):
    return np.asarray(colours, np.float32)
  channels = [
    np.asarray(
      Image.fromarray(np.ascontiguousarray(colours[..., c], np.float32), mode="F").resize(
        (w, h), Image.Resampling.BILINEAR
      )
    )
    for c in range(colours.shape[-1])
  ]
  return np.stack(channels, axis=-1)


def decode_colours_host(colours: np.ndarray, centroids: np.ndarray, *, confidence: bool = False):
  """Nearest centroid on the host, (H, W, 3) -> int32 (H, W): the arithmetic of
    `centroids.squared_distances` (channel by channel, float32), ties to the lower index, so its labels
  are `centroids.decode_colours`'s. One class at a
    time over channel planes, in place: no (pixels x classes) array.

    confidence=True also returns float32 (H, W) in [0, 1]: with mu_1, mu_2 the nearest and the
    second-nearest class colour, (|x - mu_2| - |x - mu_1|) / |mu_1 - mu_2|. It is 1 where the colour
    sits on its class's colour and 0 on the plane halfway to the runner-up, where one class is as
    likely as the other (the triangle inequality bounds it by 1).
  """
  x = np.asarray(colours, np.float32)
  mu = np.asarray(centroids, np.float32)
  planes = [np.ascontiguousarray(x[..., c]).ravel() for c in range(x.shape[-1])]
  best = np.full(planes[0].shape, np.inf, np.float32)
  second = np.full(planes[0].shape, np.inf, np.float32)
  index = np.zeros(planes[0].shape, np.int32)
  runner_up = np.zeros(planes[0].shape, np.int32)
  d, term = np.empty_like(best), np.empty_like(best)
  for k in range(len(mu)):
    np.subtract(planes[0], mu[k, 0], out=d)
    np.square(d, out=d)
    for c in range(1, len(planes)):
      np.subtract(planes[c], mu[k, c], out=term)
      np.square(term, out=term)
      d += term
    better = d < best
    if confidence:  # the old best becomes the runner-up, or d does where it beats only that
      between = ~better & (d < second)
      np.copyto(second, best, where=better)
      np.copyto(runner_up, index, where=better)
      np.copyto(second, d, where=between)
      runner_up[between] = k
    np.copyto(best, d, where=better)
    index[better] = k
  labels = index.reshape(x.shape[:-1])
  if not confidence:
    return labels
  gap = np.linalg.norm(mu[index] - mu[runner_up], axis=-1)
  margin = (np.sqrt(second) - np.sqrt(best)) / np.maximum(gap, 1e-12)
  return labels, np.clip(margin, 0.0, 1.0).astype(np.float32).reshape(labels.shape)


def slide_windows(h: int, w: int, crop: tuple[int, int], stride: tuple[int, int]):
  """mmseg's grid: the last window is shifted to end at the border; (y0, x0) corners."""
  ch, cw = crop
  sh, sw = stride
  rows = max(h - ch + sh - 1, 0) // sh + 1
  cols = max(w - cw + sw - 1, 0) // sw + 1
  for r in range(rows):
    for c in range(cols):
      yield max(min(r * sh, h - ch), 0), max(min(c * sw, w - cw), 0)


def slide_settings(config) -> tuple[tuple[int, int], tuple[int, int], int]:
  """(window, stride, short side) of slide mode: the window is the model's training size
  (config.input.image_size); an unset short side or stride follows it (the window's short side, 2/3
  of the window). ValueError, one line naming the fields, for a combination that cannot work."""
  crop = tuple(int(s) for s in config.input.image_size)
  stride = tuple(int(s) for s in config.eval.slide_stride) or tuple(2 * c // 3 for c in crop)
  short = int(config.eval.slide_short_side) or min(crop)
  if len(stride) != 2 or not all(0 < s <= c for s, c in zip(stride, crop, strict=True)):
    raise ValueError(
      f"config.eval.slide_stride={stride} must be positive and at most the window "
      f"config.input.image_size={crop} (a larger stride leaves pixels no window covers; leave it "
      "empty for 2/3 of the window)"
    )
  if short <= 0:
    raise ValueError(f"config.eval.slide_short_side={short} must be positive (0: the window's)")
  return crop, stride, short


def network_input(
  rgb: np.ndarray, config, mode: str, scale: float = 1.0
) -> tuple[np.ndarray, list[tuple[int, int]], tuple[int, int]]:
  """(float32 input image in [-1, 1], window corners, valid (h, w)) of one image for `mode`.

  At scale 1, whole mode is the image resized to config.input.image_size (one window) and slide
  mode the image resized to its short side (at least the window) cut into windows. A multi-scale
  view (test-time augmentation) resizes to `scale` times that size; where the result is smaller
  than the window it is padded with 0 (grey, as mmseg pads the normalised image) and only the
  first `valid` rows and columns are the image's; where larger, it is cut into windows."""
  crop = tuple(int(s) for s in config.input.image_size)
  if mode not in MODES:
    raise ValueError(f"mode (config.eval.mode) must be one of {MODES}, got {mode!r}")
  if mode == "whole" and scale == 1.0:
    return transforms.normalize_image(transforms.resize_image(rgb, crop)), [(0, 0)], crop
  crop, stride, short = slide_settings(config)
  if mode == "whole":
    base = crop
  else:
    h, w = rgb.shape[:2]
    f = max(short / min(h, w), crop[0] / h, crop[1] / w)
    base = (max(int(round(h * f)), crop[0]), max(int(round(w * f)), crop[1]))
  valid = tuple(max(int(round(b * scale)), 1) for b in base)
  padded = tuple(max(v, c) for v, c in zip(valid, crop, strict=True))
  image = np.zeros((*padded, 3), np.float32)
  image[: valid[0], : valid[1]] = transforms.normalize_image(transforms.resize_image(rgb, valid))
  return image, list(slide_windows(*padded, crop, stride)), valid


def tta_views(config, tta: str | None = None) -> list[tuple[float, bool]]:
  """The (scale, mirrored) views of test-time augmentation `tta` (default config.eval.tta):
  'none' [(1, no)], 'flip' [(1, no), (1, yes)], 'ms_flip' both mirrorings at every scale of
  config.eval.tta_scales (mmseg's ADE20K ratios by default)."""
  tta = config.eval.get("tta", "none") if tta is None else tta
  if tta not in TTA:
    raise ValueError(f"tta (config.eval.tta) must be one of {TTA}, got {tta!r}")
  if tta == "none":
    return [(1.0, False)]
  scales = [float(s) for s in config.eval.get("tta_scales", ())] if tta == "ms_flip" else [1.0]
  if not scales or any(not s > 0 for s in scales):
    raise ValueError(
      f"config.eval.tta_scales={tuple(scales)} must be positive ratios, e.g. (0.5, 1.0)"
    )
  return [(s, flip) for s in scales for flip in (False, True)]


def mean_colours(views: list[np.ndarray], ref: int) -> np.ndarray:
  """The views' mean colour at view `ref`'s size (for pictures; labels decode probabilities)."""
  size = views[ref].shape[:2]
  return np.mean([v if v.shape[:2] == size else resize_colours(v, size) for v in views], axis=0)
