"""Label refinement and adaptive one-step sampling: hand-checked cases."""

import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax import centroids
from flowseg_jax.tasks import prompted

MU = jnp.asarray(centroids.kronecker_centroids(2))


def test_two_centroids_are_black_and_white():
  np.testing.assert_array_equal(np.asarray(MU), [[-1, -1, -1], [1, 1, 1]])


def _square_labels():
  labels = np.zeros((1, 8, 8), np.int32)
  labels[0, 2:6, 2:6] = 1
  return labels


def test_boundary_mask_marks_both_sides_within_width():
  b = np.asarray(prompted.boundary_mask(jnp.asarray(_square_labels()), 1))[0]
  expect = np.zeros((8, 8), bool)
  expect[1:7, 1:7] = True
  expect[3:5, 3:5] = False  # interior of the square, 2 pixels from the background
  np.testing.assert_array_equal(b, expect)
  assert not np.asarray(prompted.boundary_mask(jnp.asarray(_square_labels()), 0)).any()


def _prediction(fg):
  """x1_hat: confident foreground where fg, confident background elsewhere."""
  return jnp.where(jnp.asarray(fg)[..., None], 0.9, -0.9) * jnp.ones((1, 8, 8, 3))


def test_refine_replaces_only_confident_differing_boundary_pixels_after_warmup():
  labels = _square_labels()
  labels[0, 0, 0] = 255
  pred = np.zeros((1, 8, 8), bool)
  pred[0, 2:7, 2:6] = True  # the model extends the square by one row (row 6: boundary)
  pred[0, 0, 0] = True  # disagrees on an ignored pixel: stays ignored
  pred[0, 7, 7] = True  # disagrees far from the boundary: kept
  x1_hat = _prediction(pred)
  kw = dict(warmup_steps=10, boundary_width=1, margin=0.5)
  out, n = prompted.refine_labels(jnp.asarray(labels), x1_hat, MU, jnp.asarray(10), **kw)
  expect = labels.copy()
  expect[0, 6, 2:6] = 1
  np.testing.assert_array_equal(np.asarray(out), expect)
  assert int(n) == 4
  # Before the warm-up: nothing changes.
  out, n = prompted.refine_labels(jnp.asarray(labels), x1_hat, MU, jnp.asarray(9), **kw)
  np.testing.assert_array_equal(np.asarray(out), labels)
  assert int(n) == 0
  # An unconfident prediction (near the midpoint) changes nothing.
  weak = 0.05 * x1_hat
  out, n = prompted.refine_labels(jnp.asarray(labels), weak, MU, jnp.asarray(10), **kw)
  assert int(n) == 0


def test_refine_is_jittable():
  labels = jnp.asarray(_square_labels())
  fn = jax.jit(
    lambda lab, x, s: prompted.refine_labels(
      lab, x, MU, s, warmup_steps=0, boundary_width=1, margin=0.5
    )
  )
  out, n = fn(labels, _prediction(np.ones((1, 8, 8), bool)), jnp.asarray(0))
  assert int(n) == 20  # background pixels next to the square: the 6x6 block minus the 4x4 square
  assert out.dtype == jnp.int32


def test_adaptive_step_rescales_a_uniformly_short_velocity():
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-0.3, 0.3, (2, 4, 4, 3)), jnp.float32)
  target = jnp.where(jnp.asarray(rng.uniform(size=(2, 4, 4, 1)) > 0.5), 1.0, -1.0) * jnp.ones(3)
  v = (target - x0) / jnp.asarray([1.6, 0.8])[:, None, None, None]  # image 0 short, 1 long
  x1, dt = prompted.adaptive_one_step(x0, v, MU, dt_min=0.5, dt_max=2.0)
  np.testing.assert_allclose(np.asarray(dt), [1.6, 0.8], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(x1), np.asarray(target), atol=1e-5)
  # Clipped to the range.
  _, dt = prompted.adaptive_one_step(x0, v, MU, dt_min=0.9, dt_max=1.2)
  np.testing.assert_allclose(np.asarray(dt), [1.2, 0.9], rtol=1e-6)
