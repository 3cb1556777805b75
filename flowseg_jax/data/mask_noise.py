"""Annotation noise for prompted training masks: the noisy-annotation ablation of label refinement.

Real masks are drawn by annotators whose outlines run a pixel or two inside or outside the object.
`perturb_mask` imitates that on a binary mask (1 = object, 0 = other annotated pixels, 255 =
ignored): the object is dilated or eroded (one of the two, equally likely) by r pixels, r uniform
in 1..radius, with a square structuring element (the image border does not erode an object cut by
it), then every pixel within one pixel of the new outline flips with probability `JITTER`. Ignored
pixels stay ignored and no pixel becomes ignored, so only labels within radius + 1 pixels
(Chebyshev) of the clean outline change. The noise is a fixed property of an example (drawn from
(seed, image, class)), not redrawn each epoch: the same annotation error is seen every time, as
with a real dataset. `data.prompted.PromptedSource` applies it to training records only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from flowseg_jax.centroids import IGNORE_LABEL

JITTER = 0.25


def perturb_mask(mask: np.ndarray, rng: np.random.Generator, radius: int) -> np.ndarray:
  """uint8 (H, W) noisy copy of `mask` (uint8 (H, W) in {0, 1, 255}); radius 0 returns it unchanged."""
  if radius < 0:
    raise ValueError(f"config.input.prompted.mask_noise must be >= 0, got {radius}")
  if radius == 0:
    return mask
  fg = mask == 1
  r = int(rng.integers(1, radius + 1))
  square = np.ones((2 * r + 1, 2 * r + 1), bool)
  if rng.integers(2):
    noisy = ndimage.binary_dilation(fg, structure=square)
  else:
    noisy = ndimage.binary_erosion(fg, structure=square, border_value=1)
  ring = np.ones((3, 3), bool)
  band = ndimage.binary_dilation(noisy, structure=ring) & ~ndimage.binary_erosion(
    noisy, structure=ring, border_value=1
  )
  noisy = noisy ^ (band & (rng.uniform(size=mask.shape) < JITTER))
  out = noisy.astype(np.uint8)
  out[mask == IGNORE_LABEL] = IGNORE_LABEL
  return out
