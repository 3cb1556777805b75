"""Prompted (RLFSeg-style) pieces on top of the shared flow: label refinement, adaptive one-step.

The prompted flow itself is FlowSeg's with two centroids (`flow.flowseg_loss` with
`centroids.kronecker_centroids(2)`: background mu_0 = (-1, -1, -1), foreground mu_1 = (1, 1, 1);
labels 0 / 1 / 255) and the network conditioned on the prompt. This module holds only what RLFSeg
adds, as pure jit-able functions. RLFSeg's paper gives no equations for either; these are our
definitions.

Label refinement (`refine_labels`): after `warmup_steps`, a training target pixel is replaced by
the model's own decoded prediction when all of these hold:
  1. it lies on an annotation boundary: within `boundary_width` pixels (Chebyshev distance) of a
     pixel of the other class (ignored pixels count as background for this test), where
     annotations are least reliable;
  2. the prediction is confident: the one-step prediction x1_hat = x0 + v(x0, t=0) of the EMA
     network (clean image in, no label information) has relative margin
     |d_0 - d_1| / (d_0 + d_1) >= `margin`, d_k = ||x1_hat - mu_k||^2;
  3. it is consistent: the EMA parameters average the recent training steps, so a prediction of
     theirs is one the model has held over many steps, not one step's fluctuation;
  4. the prediction differs from the annotation, which is not ignored (255 stays 255).
Off (`enabled=False`) the targets are the annotations.

Adaptive one-step sampling (`adaptive_one_step`): one network evaluation v = v(x0, t=0); instead
of the Euler step x1 = x0 + 1 * v, the step size dt is chosen per image as the least-squares fit
of the step's end point to the centroid grid:
  k*(p) = nearest centroid of x0(p) + dt * v(p)          (starting from dt = 1)
  dt    = sum_p <v(p), mu_k*(p) - x0(p)> / sum_p ||v(p)||^2,   clipped to [dt_min, dt_max]
iterated `iterations` times (assignment, then the closed-form fit: each iteration cannot increase
the mean squared distance to the assigned centroids before clipping), so a network that stops
short of (or overshoots) the centroids everywhere by a common factor is rescaled back onto them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flowseg_jax import centroids as centroids_lib

IGNORE = centroids_lib.IGNORE_LABEL


def boundary_mask(labels: jax.Array, width: int) -> jax.Array:
  """bool (B, H, W): pixels within `width` pixels (Chebyshev) of a pixel of the other class.

  labels (B, H, W) int in {0, 1, 255}; 255 counts as background here. width 0: nothing.
  """
  if width <= 0:
    return jnp.zeros(labels.shape, bool)
  fg = (labels == 1).astype(jnp.float32)
  window = (1, 2 * width + 1, 2 * width + 1)
  pad = ((0, 0), (width, width), (width, width))
  hi = jax.lax.reduce_window(fg, -jnp.inf, jax.lax.max, window, (1, 1, 1), pad)
  lo = jax.lax.reduce_window(fg, jnp.inf, jax.lax.min, window, (1, 1, 1), pad)
  return hi != lo


def decode_with_margin(x1_hat: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(nearest centroid int32 (B, H, W), relative margin |d0 - d1| / (d0 + d1) in [0, 1]) for two
  centroids."""
  d = centroids_lib.squared_distances(x1_hat, centroids)  # (B, H, W, 2)
  decoded = jnp.argmin(d, axis=-1).astype(jnp.int32)
  margin = jnp.abs(d[..., 0] - d[..., 1]) / jnp.maximum(d[..., 0] + d[..., 1], 1e-12)
  return decoded, margin


def refine_labels(
  labels: jax.Array,
  x1_hat: jax.Array,
  centroids: jax.Array,
  step: jax.Array,
  *,
  warmup_steps: int,
  boundary_width: int,
  margin: float,
) -> tuple[jax.Array, jax.Array]:
  """Refined training targets (see the module docstring) and the number of pixels changed.

  Args:
    labels: int (B, H, W) in {0, 1, 255}.
    x1_hat: (B, H, W, 3) the EMA network's one-step prediction from the clean image.
    centroids: (2, 3).
    step: scalar int, the training step (no change before warmup_steps).
  Returns:
    (labels int32 (B, H, W), number of changed pixels int32 ()).
  """
  labels = labels.astype(jnp.int32)
  decoded, m = decode_with_margin(jax.lax.stop_gradient(x1_hat), centroids)
  change = (
    boundary_mask(labels, boundary_width)
    & (m >= margin)
    & (decoded != labels)
    & (labels != IGNORE)
    & (step >= warmup_steps)
  )
  return jnp.where(change, decoded, labels), jnp.sum(change.astype(jnp.int32))


def adaptive_one_step(
  x0: jax.Array,
  v: jax.Array,
  centroids: jax.Array,
  *,
  dt_min: float = 0.5,
  dt_max: float = 2.0,
  iterations: int = 2,
) -> tuple[jax.Array, jax.Array]:
  """(x1 = x0 + dt * v (B, H, W, 3), dt (B,)) with dt fitted per image (module docstring)."""
  x0 = x0.astype(jnp.float32)
  v = v.astype(jnp.float32)
  centroids = jnp.asarray(centroids, jnp.float32)
  dt = jnp.ones((x0.shape[0],), jnp.float32)
  vv = jnp.maximum(jnp.sum(v * v, axis=(1, 2, 3)), 1e-12)
  for _ in range(iterations):
    x1 = x0 + dt[:, None, None, None] * v
    k = jnp.argmin(centroids_lib.squared_distances(x1, centroids), axis=-1)
    mu = jnp.take(centroids, k, axis=0)
    dt = jnp.clip(jnp.sum(v * (mu - x0), axis=(1, 2, 3)) / vv, dt_min, dt_max)
  return x0 + dt[:, None, None, None] * v, dt
