"""The softmax potential over class centroids and its gradient, the correction of FlowSeg's target.

  Phi(x1_hat) = -log softmax_k(T(||x1_hat - mu_k||^2) / tau)[label]   (shared/DESIGN.md)
  T: 'log' -log(d + eps) | 'sqrt' -sqrt(d + eps) | 'linear' -d | 'norm_reduced' (log, |grad| bounded)

`potential_grad` is what the objective (`flow.flowseg_loss`) subtracts from the target velocity:
`jax.grad` of the summed per-pixel potential, under `lax.stop_gradient`, in float32 (float64 for
float64 inputs), scheduled in cache-sized pixel chunks on CPU.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from flowseg_jax import centroids as centroids_lib

Transform = Literal["log", "sqrt", "linear", "norm_reduced"]
TRANSFORMS = ("log", "sqrt", "linear", "norm_reduced")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
  """value if it is one of `allowed`, else a ValueError naming the option."""
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
  return value


def compute_dtype(*arrays) -> jnp.dtype:
  """float32, or float64 when the inputs already are (parity tests run in x64)."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def distance_logits(d: jax.Array, *, tau: float, eps: float, transform: Transform) -> jax.Array:
  """logits_k = T(d_k) / tau for squared distances d (..., N).

  'norm_reduced' has the log transform's logits: it changes grad Phi's magnitude, not the potential.
  """
  check_choice("transform", transform, TRANSFORMS)
  if transform in ("log", "norm_reduced"):
    transformed = -jnp.log(d + eps)
  elif transform == "sqrt":
    transformed = -jnp.sqrt(d + eps)
  else:
    transformed = -d
  return transformed / tau


def potential(
  x1_hat: jax.Array,
  labels: jax.Array,
  centroids: jax.Array,
  *,
  tau: float = 1.0,
  eps: float = 1e-6,
  transform: Transform = "log",
) -> jax.Array:
  """Per-pixel softmax potential Phi = -log p(label | x1_hat): (..., 3), (...) -> (...).

  Labels must be valid centroid indices here (map or mask ignored pixels first).
  """
  d = centroids_lib.squared_distances(x1_hat, centroids)
  logits = distance_logits(d, tau=tau, eps=eps, transform=transform)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


# Auto chunk on CPU: about 2**17 (pixel, class) pairs, so that each float32 (pixels, N) temporary of the
# potential and its gradient (~512 KiB) stays in a core's L2 cache. S/16 128x128 b8 with 150 classes on one
# core: 399 -> 47 ms for grad Phi. On GPU/TPU the same work is bandwidth-bound and parallel: no chunks.
_CPU_CHUNK_PAIRS = 2**17


def resolve_pixel_chunk(pixel_chunk: int | None, num_classes: int) -> int:
  """Pixels per chunk of the potential's (pixels x classes) work; 0 means all pixels at once.

  None picks by backend: about 2**17 / N pixels on CPU, 0 on accelerators.
  """
  if pixel_chunk is None:
    return max(1, _CPU_CHUNK_PAIRS // num_classes) if jax.default_backend() == "cpu" else 0
  if pixel_chunk < 0:
    raise ValueError(f"pixel_chunk must be >= 0 (0: no chunks) or None (auto), got {pixel_chunk}")
  return int(pixel_chunk)


def _map_pixel_chunks(fn, x: jax.Array, labels: jax.Array, pixel_chunk: int) -> jax.Array:
  """fn(x (b, n, 3), labels (b, n)) -> (b, n, 3) over chunks of about `pixel_chunk` pixels (lax.map).

  The leading (batch) axis stays whole in every chunk, so a batch sharded over devices is chunked on
  each device without moving data; pixels are padded up to a whole number of chunks.
  """
  shape = x.shape
  b = shape[0] if x.ndim >= 3 else 1
  x, labels = x.reshape(b, -1, shape[-1]), labels.reshape(b, -1)
  p = labels.shape[1]
  per_image = max(1, pixel_chunk // b)
  if per_image >= p:
    return fn(x, labels).reshape(shape)
  n = -(-p // per_image)
  pad = n * per_image - p
  x = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(b, n, per_image, shape[-1])
  labels = jnp.pad(labels, ((0, 0), (0, pad))).reshape(b, n, per_image)
  out = jax.lax.map(lambda a: fn(*a), (jnp.moveaxis(x, 1, 0), jnp.moveaxis(labels, 1, 0)))
  return jnp.moveaxis(out, 0, 1).reshape(b, n * per_image, shape[-1])[:, :p].reshape(shape)


def potential_grad(
  x1_hat: jax.Array,
  labels: jax.Array,
  centroids: jax.Array,
  *,
  tau: float = 1.0,
  eps: float = 1e-6,
  transform: Transform = "log",
  pixel_chunk: int | None = 0,
  max_grad_norm: float = 1.0,
) -> jax.Array:
  """grad Phi with respect to x1_hat, per pixel, as a constant: (..., 3), (...) -> (..., 3).

  Computed with `jax.grad` (each pixel's Phi depends only on its own x1_hat, so the gradient of the sum is
  the per-pixel gradient) and wrapped in `lax.stop_gradient`. Pixels labelled 255 get a zero gradient.
  For transform='log' it equals eq 11: (2/tau) sum_k (y_k - p_k)(x1_hat - mu_k)/(d_k + eps).
  `pixel_chunk` (see `resolve_pixel_chunk`) only changes how the work is scheduled, not the result
  beyond float rounding.

  transform='norm_reduced' is the "potential gradient norm reduction" of the paper's Fig 5c, which the
  paper names but does not define; our definition: g = grad Phi of the log transform, then per pixel
  g * min(1, max_grad_norm / ||g||). The direction (attraction to the true centroid, repulsion from the
  others) is kept and only the magnitude is bounded, so it isolates the paper's claim that the log
  potential's large gradients near centroids are what helps. Far from centroids, where ||g|| <=
  max_grad_norm (default 1, the scale of one channel of the FM velocity), it equals the log variant.
  `max_grad_norm` is used by this transform only.
  """
  dtype = compute_dtype(x1_hat, centroids)
  x1_hat = jnp.asarray(x1_hat, dtype)
  centroids = jnp.asarray(centroids, dtype)
  labels = jnp.asarray(labels)
  ignored = labels == centroids_lib.IGNORE_LABEL
  safe_labels = jnp.where(ignored, 0, labels)

  def grad_phi(x, lab):
    def total_potential(x):
      return jnp.sum(potential(x, lab, centroids, tau=tau, eps=eps, transform=transform))

    return jax.grad(total_potential)(x)

  x1_hat = jax.lax.stop_gradient(x1_hat)
  chunk = resolve_pixel_chunk(pixel_chunk, centroids.shape[0])
  if chunk and x1_hat.ndim >= 2:
    grad = _map_pixel_chunks(grad_phi, x1_hat, safe_labels, chunk)
  else:
    grad = grad_phi(x1_hat, safe_labels)
  if transform == "norm_reduced":
    grad = reduce_norm(grad, max_grad_norm)
  return jax.lax.stop_gradient(jnp.where(ignored[..., None], jnp.zeros_like(grad), grad))


def reduce_norm(g: jax.Array, max_norm: float) -> jax.Array:
  """g * min(1, max_norm / ||g||) over the last axis: vectors longer than max_norm shortened to it."""
  if max_norm <= 0:
    raise ValueError(f"max_grad_norm must be > 0, got {max_norm}")
  norm = jnp.linalg.norm(g, axis=-1, keepdims=True)
  return g * jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(g.dtype).tiny))


def potential_grad_closed_form(
  x1_hat: jax.Array, labels: jax.Array, centroids: jax.Array, *, tau: float = 1.0, eps: float = 1e-6
) -> jax.Array:
  """Eq 11 for the log transform: (2/tau) sum_k (y_k - p_k)(x1_hat - mu_k)/(d_k + eps). For tests/plots."""
  d = centroids_lib.squared_distances(x1_hat, centroids)
  p = jax.nn.softmax(distance_logits(d, tau=tau, eps=eps, transform="log"), axis=-1)
  y = jax.nn.one_hot(labels, centroids.shape[0], dtype=p.dtype)
  diff = x1_hat[..., None, :] - centroids  # (..., N, 3)
  return (2.0 / tau) * jnp.sum(((y - p) / (d + eps))[..., None] * diff, axis=-2)
