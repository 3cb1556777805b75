"""Kronecker class colours: labels <-> colours in [-1, 1]^3 (FlowSeg eq 7-8).

Class k gets the colour mu_k = 2 * minmax(frac(k * (sqrt2, sqrt3, sqrt5))) - 1: a low-discrepancy sequence
that spreads any number of classes evenly over the colour cube. [ours: our reading of eq 8] The paper's
Norm(.) is read as a min-max normalisation per colour axis over the n points, so that mu spans the whole
cube for every n; the paper does not define Norm further. The table is computed in float64 on the host
(it is a constant of the run) and cast once, so JAX and PyTorch see bit-identical centroids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255
_KRONECKER_BASIS = np.sqrt(np.array([2.0, 3.0, 5.0], dtype=np.float64))


def kronecker_centroids(n: int, dtype=np.float32) -> np.ndarray:
  """Returns the (n, 3) Kronecker centroid table mu_0..mu_{n-1} in [-1, 1]; mu_0 = (-1, -1, -1).

  Args:
    n: number of centroids, >= 2 (min-max normalisation needs two distinct points).
    dtype: dtype of the returned NumPy array.
  """
  if isinstance(n, bool) or not isinstance(n, int | np.integer):
    raise TypeError(f"kronecker_centroids: n must be an int, got {type(n).__name__} {n!r}")
  if n < 2:
    raise ValueError(f"kronecker_centroids: need at least 2 classes, got n={n}")
  k = np.arange(n, dtype=np.float64)[:, None]
  points = np.mod(k * _KRONECKER_BASIS, 1.0)
  lo, hi = points.min(axis=0), points.max(axis=0)
  normalised = (points - lo) / (hi - lo)
  return (2.0 * normalised - 1.0).astype(dtype)


def class_centroids(
  num_classes: int, *, ignore_as_class: bool = False, dtype=np.float32
) -> np.ndarray:
  """The centroid table a run trains with.

  With `ignore_as_class` (the objective's `mask_ignored=False`), ignored pixels get their own colour: the
  table is built for num_classes + 1 entries and row `num_classes` is the ignore centroid.
  """
  return kronecker_centroids(num_classes + int(ignore_as_class), dtype=dtype)


def check_labels(labels, num_classes: int, *, name: str = "labels") -> None:
  """Raises ValueError if a concrete label array holds values outside [0, num_classes) other than 255.

  Does nothing for traced arrays (inside jit values are unknown; the input pipeline validates them).
  """
  if isinstance(labels, jax.core.Tracer):
    return
  arr = np.asarray(labels)
  if not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
  bad = (arr != IGNORE_LABEL) & ((arr < 0) | (arr >= num_classes))
  if bad.any():
    values = np.unique(arr[bad])[:10].tolist()
    raise ValueError(
      f"{name} hold {int(bad.sum())} value(s) outside [0, {num_classes}) that are not the ignore "
      f"label {IGNORE_LABEL}: {values}"
    )


def encode_labels(
  labels: jax.Array, centroids: jax.Array, *, ignore_index: int | None = None
) -> jax.Array:
  """Maps int labels (...,) to colours (..., 3).

  Ignored pixels (255) get centroid `ignore_index` if given, else centroid 0 (any finite value: the loss
  masks them).
  """
  labels = jnp.asarray(labels)
  fill = 0 if ignore_index is None else ignore_index
  safe = jnp.where(labels == IGNORE_LABEL, fill, labels)
  return jnp.take(jnp.asarray(centroids), safe, axis=0)


def squared_distances(x: jax.Array, centroids: jax.Array) -> jax.Array:
  """||x - mu_k||^2 for every centroid: (..., 3), (N, 3) -> (..., N), exact (no norm expansion).

  Summed channel by channel, so no (..., N, 3) temporary is materialised (the potential and the decoder
  run this on every pixel against every class).
  """
  d = 0.0
  for c in range(x.shape[-1]):
    d = d + jnp.square(x[..., c : c + 1] - centroids[:, c])
  return d


def _class_distance(x: jax.Array, centroids: jax.Array, k) -> jax.Array:
  """||x - mu_k||^2 (...,) for one class k (a traced index), summed channel by channel in the
  order `squared_distances` sums them, so both give the same float32 numbers."""
  d = 0.0
  for c in range(x.shape[-1]):
    d = d + jnp.square(x[..., c] - centroids[k, c])
  return d


def _check_decode(name: str, x, centroids, unroll: int) -> None:
  if x.shape[-1] != 3 or centroids.ndim != 2 or centroids.shape[-1] != 3:
    raise ValueError(
      f"{name}: expected colours (..., 3) and centroids (N, 3), got {x.shape}, {centroids.shape}"
    )
  if unroll < 1:
    raise ValueError(f"{name}: chunk_size must be >= 1, got {unroll}")


def decode_colours(x: jax.Array, centroids: jax.Array, *, chunk_size: int = 8) -> jax.Array:
  """Nearest-centroid decoding: colours (..., 3) -> int32 labels (...).

  A running minimum over the classes, `chunk_size` classes unrolled per loop step: nothing larger
  than the labels is materialised, every step is one elementwise pass over the pixels (XLA:CPU
  decodes a 512x512 image against 150 classes ~100x faster this way than with (pixels x classes)
  distance blocks), and the distances are `squared_distances`'s numbers, so the labels are
  `inference_host.decode_colours_host`'s. Ties go to the lower class index, as argmin does.
  """
  x = jnp.asarray(x)
  centroids = jnp.asarray(centroids, dtype=jnp.promote_types(x.dtype, jnp.float32))
  x = x.astype(centroids.dtype)
  _check_decode("decode_colours", x, centroids, chunk_size)

  def step(k, carry):
    best, index = carry
    d = _class_distance(x, centroids, k)
    better = d < best  # strict: the lower index keeps a tie
    return jnp.where(better, d, best), jnp.where(better, k, index)

  start = (jnp.full(x.shape[:-1], jnp.inf, centroids.dtype), jnp.zeros(x.shape[:-1], jnp.int32))
  n = centroids.shape[0]
  _, labels = jax.lax.fori_loop(0, n, step, start, unroll=min(chunk_size, n))
  return labels


def decode_views(
  views: jax.Array,
  centroids: jax.Array,
  *,
  tau: float = 1.0,
  eps: float = 1e-6,
  chunk_size: int = 8,
) -> jax.Array:
  """Several views' colours of the same pixels (V, ..., 3) -> int32 labels (...): the class of
  highest mean probability over views, p_k = (d_k + eps)^(-1/tau) / sum_j (d_j + eps)^(-1/tau)
  with d_k the squared distance to class k's colour (the potential's softmax, FlowSeg eq 9 with
  T = -log), as mmseg averages the logits of test-time views. Ties go to the lower class index.

  Worked in log space (a small tau would overflow the weights in float32), in two running passes
  over the classes (`chunk_size` unrolled per step, as `decode_colours`): every view's normaliser
  (a running log-sum-exp), then the summed probabilities with a running maximum. Nothing larger
  than (V, ...) is materialised.
  """
  x = jnp.asarray(views, jnp.float32)
  mu = jnp.asarray(centroids, jnp.float32)
  if x.ndim < 2:
    raise ValueError(f"decode_views: expected views (V, ..., 3), got {x.shape}")
  _check_decode("decode_views", x, mu, chunk_size)
  n = mu.shape[0]
  unroll = min(chunk_size, n)
  log_weight = lambda k: -jnp.log(_class_distance(x, mu, k) + eps) / tau  # (V, ...)

  def normaliser(k, carry):  # running log-sum-exp over classes, per view and pixel
    top, total = carry
    lw = log_weight(k)
    new_top = jnp.maximum(top, lw)
    return new_top, total * jnp.exp(top - new_top) + jnp.exp(lw - new_top)

  start = (log_weight(0), jnp.ones(x.shape[:-1]))
  top, total = jax.lax.fori_loop(1, n, normaliser, start, unroll=unroll)
  log_norm = top + jnp.log(total)

  def best_class(k, carry):
    best, index = carry
    score = jnp.exp(log_weight(k) - log_norm).sum(0)  # summed over views
    better = score > best  # strict: the lower index keeps a tie
    return jnp.where(better, score, best), jnp.where(better, k, index)

  start = (jnp.full(x.shape[1:-1], -jnp.inf), jnp.zeros(x.shape[1:-1], jnp.int32))
  _, labels = jax.lax.fori_loop(0, n, best_class, start, unroll=unroll)
  return labels


def palette(centroids) -> np.ndarray:
  """The centroid colours as a uint8 (N, 3) palette (what a perfect mask looks like)."""
  c = np.asarray(centroids, dtype=np.float64)
  return np.clip(np.round((c + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_uint8_image(x) -> np.ndarray:
  """Host-side: colours/images in [-1, 1] -> uint8 (clipped), e.g. the raw ODE output for pictures."""
  x = np.asarray(x, dtype=np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
