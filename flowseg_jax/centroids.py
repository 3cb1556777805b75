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


def decode_colours(x: jax.Array, centroids: jax.Array, *, chunk_size: int = 64) -> jax.Array:
  """Nearest-centroid decoding: colours (..., 3) -> int32 labels (...).

  Memory is bounded by (pixels x chunk_size): classes are scanned in chunks of `chunk_size` with a running
  minimum, so a 16x512x512 batch with 171 classes never materialises the full (pixels x N) distance array.
  Ties go to the lower class index, as argmin does.
  """
  x = jnp.asarray(x)
  centroids = jnp.asarray(centroids, dtype=jnp.promote_types(x.dtype, jnp.float32))
  x = x.astype(centroids.dtype)
  if x.shape[-1] != 3 or centroids.ndim != 2 or centroids.shape[-1] != 3:
    raise ValueError(
      f"decode_colours: expected x (..., 3) and centroids (N, 3), got {x.shape}, {centroids.shape}"
    )
  if chunk_size < 1:
    raise ValueError(f"decode_colours: chunk_size must be >= 1, got {chunk_size}")
  n = centroids.shape[0]
  if n <= chunk_size:
    return jnp.argmin(squared_distances(x, centroids), axis=-1).astype(jnp.int32)

  num_chunks = -(-n // chunk_size)
  pad = num_chunks * chunk_size - n
  # Padded centroids sit at +inf distance so they never win.
  padded = jnp.concatenate([centroids, jnp.full((pad, 3), jnp.inf, centroids.dtype)], axis=0)
  chunks = padded.reshape(num_chunks, chunk_size, 3)

  def body(carry, inputs):
    best_d, best_i = carry
    chunk, offset = inputs
    d = squared_distances(x, chunk)
    i = jnp.argmin(d, axis=-1)
    d_min = jnp.take_along_axis(d, i[..., None], axis=-1)[..., 0]
    better = d_min < best_d  # strict: earlier chunks win ties
    return (jnp.where(better, d_min, best_d), jnp.where(better, i + offset, best_i)), None

  init = (jnp.full(x.shape[:-1], jnp.inf, centroids.dtype), jnp.zeros(x.shape[:-1], jnp.int32))
  offsets = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size
  (_, labels), _ = jax.lax.scan(body, init, (chunks, offsets))
  return labels


def decode_views(
  views: jax.Array,
  centroids: jax.Array,
  *,
  tau: float = 1.0,
  eps: float = 1e-6,
  chunk_size: int = 16,
) -> jax.Array:
  """Several views' colours of the same pixels (V, ..., 3) -> int32 labels (...): the class of
  highest mean probability over views, p_k = (d_k + eps)^(-1/tau) / sum_j (d_j + eps)^(-1/tau)
  with d_k the squared distance to class k's colour (the potential's softmax, FlowSeg eq 9 with
  T = -log), as mmseg averages the logits of test-time views. Ties go to the lower class index.

  Worked in log space (a small tau would overflow the weights in float32) and in chunks of
  `chunk_size` classes, twice: the normaliser of every view, then the mean probabilities with a
  running maximum, so no (V x pixels x N) array is materialised.
  """
  x = jnp.asarray(views, jnp.float32)
  mu = jnp.asarray(centroids, jnp.float32)
  if x.ndim < 2 or x.shape[-1] != 3 or mu.ndim != 2 or mu.shape[-1] != 3:
    raise ValueError(
      f"decode_views: expected views (V, ..., 3) and centroids (N, 3), got {x.shape}, {mu.shape}"
    )
  n = mu.shape[0]
  num_chunks = -(-n // chunk_size)
  # Padded centroids sit at +inf distance: weight 0, never chosen.
  padded = jnp.concatenate([mu, jnp.full((num_chunks * chunk_size - n, 3), jnp.inf)], axis=0)
  chunks = padded.reshape(num_chunks, chunk_size, 3)
  offsets = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size

  def log_weights(chunk):  # (V, ..., chunk_size)
    return -jnp.log(squared_distances(x, chunk) + eps) / tau

  def normaliser(carry, chunk):  # a running log-sum-exp over classes, per view and pixel
    top, total = carry
    lw = log_weights(chunk)
    new_top = jnp.maximum(top, lw.max(-1))
    total = total * jnp.exp(top - new_top) + jnp.exp(lw - new_top[..., None]).sum(-1)
    return (new_top, total), None

  start = (jnp.full(x.shape[:-1], -jnp.inf), jnp.zeros(x.shape[:-1]))
  (top, total), _ = jax.lax.scan(normaliser, start, chunks)
  log_norm = top + jnp.log(total)

  def best_class(carry, inputs):
    best, index = carry
    chunk, offset = inputs
    score = jnp.exp(log_weights(chunk) - log_norm[..., None]).sum(0)  # summed over views
    i = jnp.argmax(score, axis=-1)
    s = jnp.take_along_axis(score, i[..., None], axis=-1)[..., 0]
    better = s > best  # strict: earlier chunks win ties
    return (jnp.where(better, s, best), jnp.where(better, i + offset, index)), None

  start = (jnp.full(x.shape[1:-1], -jnp.inf), jnp.zeros(x.shape[1:-1], jnp.int32))
  (_, labels), _ = jax.lax.scan(best_class, start, (chunks, offsets))
  return labels.astype(jnp.int32)


def palette(centroids) -> np.ndarray:
  """The centroid colours as a uint8 (N, 3) palette (what a perfect mask looks like)."""
  c = np.asarray(centroids, dtype=np.float64)
  return np.clip(np.round((c + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_uint8_image(x) -> np.ndarray:
  """Host-side: colours/images in [-1, 1] -> uint8 (clipped), e.g. the raw ODE output for pictures."""
  x = np.asarray(x, dtype=np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
