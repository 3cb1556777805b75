"""Per-example transforms: resize, random scale-crop, flip, normalisation (NumPy + PIL).

Images are resized with PIL's bilinear filter, which widens its support when shrinking, so
downscaling is antialiased; labels always use nearest neighbour (pixel-centre sampling, computed
in NumPy so that ids are never blended). Crops are taken as PIL resize boxes, so only the needed
region is resampled, and JPEGs are decoded at a reduced DCT scale (`draft`) when the output is at
most half their size.

Output convention: label int32 (H, W), 255 = ignore. Training images stay uint8 (H, W, 3) with
'image_hw', the size of the image's own content (the rest is padding): they cross to the accelerator
as bytes, a quarter of float32's, and `normalize_on_device` makes them float32 in [-1, 1] there,
padding set to IMAGE_PAD_VALUE, the exact values `normalize_image` gives on the host. Evaluation
examples carry the normalised float32 image and the original uint8 one.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
from PIL import Image

from flowseg_jax.centroids import IGNORE_LABEL
from flowseg_jax.data import sources

# Value of padded image pixels after normalisation (mid-grey).
IMAGE_PAD_VALUE = 0.0


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) in [0, 255] -> float32 in [-1, 1]."""
  out = np.array(image, np.float32)
  out *= np.float32(1.0 / 127.5)
  out -= np.float32(1.0)
  return out


def resize_image(
  image: Image.Image | np.ndarray,
  size: tuple[int, int],
  box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
  """Antialiased bilinear resize of an RGB image (optionally of a sub-box).

  Args:
    image: PIL RGB image or uint8 (h, w, 3).
    size: output (H, W).
    box: (x0, y0, x1, y1) region of the input in pixel coordinates; None = whole image.

  Returns:
    uint8 (H, W, 3). If neither size nor box change anything, the pixels are returned exactly.
  """
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  out_h, out_w = int(size[0]), int(size[1])
  whole = (0, 0, image.size[0], image.size[1])
  if (box is None or tuple(box) == whole) and (out_w, out_h) == image.size:
    return np.asarray(image, np.uint8)
  return np.asarray(image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box), np.uint8)


def resize_label(
  label: np.ndarray,
  size: tuple[int, int],
  box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
  """Nearest-neighbour resize of a label map (optionally of a sub-box).

  Output pixel (i, j) takes the input pixel containing the point
  (y0 + (i + 0.5) * (y1 - y0) / H, x0 + (j + 0.5) * (x1 - x0) / W).

  Args:
    label: integer (h, w).
    size: output (H, W).
    box: (x0, y0, x1, y1) in input pixel coordinates; None = whole map.

  Returns:
    int32 (H, W).
  """
  h, w = label.shape[:2]
  x0, y0, x1, y1 = (0.0, 0.0, float(w), float(h)) if box is None else box
  out_h, out_w = int(size[0]), int(size[1])
  if (out_h, out_w) == (h, w) and (x0, y0, x1, y1) == (0.0, 0.0, float(w), float(h)):
    return np.asarray(label, np.int32)
  rows = np.floor(y0 + (np.arange(out_h) + 0.5) * ((y1 - y0) / out_h)).astype(np.int64)
  cols = np.floor(x0 + (np.arange(out_w) + 0.5) * ((x1 - x0) / out_w)).astype(np.int64)
  rows = np.clip(rows, 0, h - 1)
  cols = np.clip(cols, 0, w - 1)
  # Two 1-D gathers (whole rows, then columns) are several times faster than one 2-D gather.
  return np.asarray(label.take(rows, axis=0).take(cols, axis=1), np.int32)


@dataclasses.dataclass(frozen=True)
class Window:
  """Where a training crop comes from.

  Attributes:
    box: (x0, y0, x1, y1) in original-image pixels.
    content_hw: size (H', W') the box is resized to; H' <= H, W' <= W of the output.
    flip: whether to mirror horizontally.
  """

  box: tuple[float, float, float, float]
  content_hw: tuple[int, int]
  flip: bool


def sample_window(
  image_hw: tuple[int, int],
  out_hw: tuple[int, int],
  random_scale: tuple[float, float] | None,
  random_flip: bool,
  rng: np.random.Generator,
) -> Window:
  """Draws the geometry of one training example.

  Without `random_scale` the whole image is resized to `out_hw` (the paper's "resized to a
  uniform resolution"). With `random_scale=(lo, hi)` the image is scaled so that it just covers
  `out_hw`, times r ~ U(lo, hi), and a random `out_hw` crop is taken (padded when r < 1 leaves the
  image smaller than the crop).

  Args:
    image_hw: original (h0, w0).
    out_hw: output (H, W).
    random_scale: (lo, hi) with 0 < lo <= hi, or None.
    random_flip: mirror with probability 1/2.
    rng: NumPy generator (from grain's random_map; determines the example's augmentation).

  Returns:
    A Window.
  """
  h0, w0 = image_hw
  out_h, out_w = out_hw
  if random_scale is None:
    box, content = (0.0, 0.0, float(w0), float(h0)), (out_h, out_w)
  else:
    lo, hi = random_scale
    ratio = rng.uniform(lo, hi)
    scale = ratio * max(out_h / h0, out_w / w0)
    sh, sw = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    ch, cw = min(out_h, sh), min(out_w, sw)
    oy, ox = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    fy, fx = h0 / sh, w0 / sw
    box, content = (ox * fx, oy * fy, (ox + cw) * fx, (oy + ch) * fy), (ch, cw)
  flip = bool(random_flip) and bool(rng.uniform() < 0.5)
  return Window(box=box, content_hw=content, flip=flip)


def train_example(
  opened: Image.Image | np.ndarray,
  label: np.ndarray,
  *,
  image_size: tuple[int, int],
  random_scale: tuple[float, float] | None,
  random_flip: bool,
  rng: np.random.Generator,
  name: str,
  src=None,
  label_src=None,
) -> dict[str, np.ndarray]:
  """Decodes (at reduced scale where possible), crops, resizes and flips (normalised on device).

  Args:
    opened: result of `sources.open_image` (header read, pixels not decoded yet).
    label: integer (h0, w0) train ids, already validated.
    image_size: output (H, W).
    random_scale: see `sample_window`.
    random_flip: see `sample_window`.
    rng: NumPy generator.
    name: example name (errors).
    src: image source (errors).
    label_src: annotation source (errors).

  Returns:
    {'image': uint8 (H, W, 3), 'label': int32 (H, W), 'image_hw': int32 (2,) the content's size
    (H, W unless a crop smaller than the output was padded)}.

  Raises:
    sources.BadExampleError: corrupt/truncated image or image/label size mismatch.
  """
  image_hw = sources.image_size_hw(opened)
  sources.check_same_size(image_hw, label, name, src, label_src)
  out_h, out_w = int(image_size[0]), int(image_size[1])
  win = sample_window(image_hw, (out_h, out_w), random_scale, random_flip, rng)
  ch, cw = win.content_hw
  box = win.box
  if isinstance(opened, Image.Image) and opened.format == "JPEG":
    # Reduced-scale DCT decoding when the box is shrunk by >= 2x: much faster, still antialiased.
    bw, bh = box[2] - box[0], box[3] - box[1]
    want = (max(1, int(opened.size[0] * cw / bw)), max(1, int(opened.size[1] * ch / bh)))
    drafted = opened.draft("RGB", want)
    if drafted is not None:
      factor = drafted[1][2] / image_hw[1]  # 1/s for DCT scale s.
      box = tuple(c * factor for c in box)
  pil = sources.finish_image(opened, name, src)
  image = resize_image(pil, (ch, cw), box)
  lab = resize_label(label, (ch, cw), win.box)
  if win.flip:
    image, lab = image[:, ::-1], lab[:, ::-1]
  if (ch, cw) != (out_h, out_w):
    padded = np.zeros((out_h, out_w, 3), np.uint8)  # normalize_on_device sets IMAGE_PAD_VALUE
    padded[:ch, :cw] = image
    padded_label = np.full((out_h, out_w), IGNORE_LABEL, np.int32)
    padded_label[:ch, :cw] = lab
    image, lab = padded, padded_label
  return {
    "image": np.ascontiguousarray(image, np.uint8),
    "label": np.ascontiguousarray(lab, np.int32),
    "image_hw": np.array([ch, cw], np.int32),
  }


def normalize_on_device(images, image_hw=None):
  """uint8 (B, H, W, 3) training images -> float32 in [-1, 1] on the accelerator, as
  `normalize_image` (x * (1 / 127.5) - 1 in float32), with pixels outside each image's
  `image_hw` (B, 2) content set to IMAGE_PAD_VALUE. Float images pass through unchanged."""
  if images.dtype != jnp.uint8:
    return images
  out = images.astype(jnp.float32) * jnp.float32(1.0 / 127.5) - jnp.float32(1.0)
  if image_hw is None:
    return out
  rows = jnp.arange(images.shape[1])[None, :, None] < image_hw[:, 0, None, None]
  cols = jnp.arange(images.shape[2])[None, None, :] < image_hw[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], out, jnp.float32(IMAGE_PAD_VALUE))


def eval_example(
  opened: Image.Image | np.ndarray,
  label: np.ndarray,
  *,
  image_size: tuple[int, int],
  name: str,
  src=None,
  label_src=None,
) -> dict[str, np.ndarray]:
  """Whole-image evaluation example; the label keeps the annotation's resolution.

  Args:
    opened: result of `sources.open_image`.
    label: integer (h0, w0) train ids.
    image_size: (H, W) the network input is resized to.
    name: example name.
    src: image source (errors).
    label_src: annotation source (errors).

  Returns:
    {'image': float32 (H, W, 3) in [-1, 1], 'image_orig': uint8 (h0, w0, 3),
     'label': int32 (h0, w0)}.
  """
  sources.check_same_size(sources.image_size_hw(opened), label, name, src, label_src)
  pil = sources.finish_image(opened, name, src)
  image_orig = np.asarray(pil, np.uint8)
  image = normalize_image(resize_image(pil, image_size))
  return {"image": image, "image_orig": image_orig, "label": np.asarray(label, np.int32)}
