"""The potential's gradient: its scheduling, its closed form (eq 11), and the geometry the reshaped
target relies on (attraction to the true centroid, repulsion from the others, no vanishing near it)."""

import jax
import numpy as np
import pytest

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import potential


def test_pixel_chunks_change_scheduling_only():
  """Chunked and unchunked grad Phi agree to float32 rounding on a batch, on a flat (pixels, 3) array
  (one 'image') and with ignored pixels; auto picks cache-sized chunks on CPU; bad values are named."""
  rng = np.random.default_rng(0)
  cents = centroids_lib.kronecker_centroids(150)
  x = rng.uniform(-1.2, 1.2, size=(3, 17, 13, 3)).astype(np.float32)
  labels = rng.integers(0, 150, size=(3, 17, 13)).astype(np.int32)
  labels[rng.uniform(size=labels.shape) < 0.1] = 255
  whole = np.asarray(potential.potential_grad(x, labels, cents, pixel_chunk=0))
  assert np.abs(whole).max() > 1.0
  for chunk in (1, 50, 10**6, None):
    got = np.asarray(
      jax.jit(lambda a, b, c=chunk: potential.potential_grad(a, b, cents, pixel_chunk=c))(x, labels)
    )
    np.testing.assert_allclose(
      got, whole, rtol=5e-6, atol=5e-6 * np.abs(whole).max(), err_msg=str(chunk)
    )
    np.testing.assert_array_equal(got[labels == 255], 0.0)
  flat = np.asarray(
    potential.potential_grad(x.reshape(-1, 3), labels.reshape(-1), cents, pixel_chunk=64)
  )
  np.testing.assert_allclose(flat, whole.reshape(-1, 3), rtol=5e-6, atol=5e-6 * np.abs(whole).max())
  assert potential.resolve_pixel_chunk(None, 150) == 2**17 // 150  # the tests run on CPU
  assert potential.resolve_pixel_chunk(0, 150) == 0
  with pytest.raises(ValueError, match="pixel_chunk must be >= 0"):
    potential.resolve_pixel_chunk(-3, 150)


def test_grad_phi_equals_eq11_closed_form():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    for n, tau in [(2, 1.0), (19, 0.5), (150, 2.0)]:
      cents = centroids_lib.kronecker_centroids(n, dtype=np.float64)
      x = rng.uniform(-1.2, 1.2, size=(64, 3))
      x[: min(n, 5)] = cents[:5]  # on a centroid
      labels = rng.integers(0, n, size=64)
      got = potential.potential_grad(x, labels, cents, tau=tau, eps=1e-6)
      want = potential.potential_grad_closed_form(x, labels, cents, tau=tau, eps=1e-6)
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_ignored_pixels_get_zero_potential_gradient():
  cents = centroids_lib.kronecker_centroids(5)
  x = np.zeros((2, 3), np.float32)
  g = potential.potential_grad(x, np.array([255, 2]), cents)
  np.testing.assert_array_equal(g[0], 0.0)
  assert np.linalg.norm(g[1]) > 0


def test_minus_grad_phi_points_to_true_centroid_and_away_from_wrong_one():
  """Between the true centroid and a nearby wrong one, -grad Phi points toward the true one."""
  with jax.enable_x64(True):
    cents = centroids_lib.kronecker_centroids(19, dtype=np.float64)
    true_k = 4
    d_all = np.linalg.norm(cents - cents[true_k], axis=1)
    d_all[true_k] = np.inf
    wrong_k = int(np.argmin(d_all))  # the nearest wrong centroid
    for alpha in (0.1, 0.3, 0.5, 0.7, 0.9):  # includes points closer to the wrong centroid
      x = (1 - alpha) * cents[true_k] + alpha * cents[wrong_k]
      for transform in potential.TRANSFORMS:
        step = -np.asarray(
          potential.potential_grad(x[None], np.array([true_k]), cents, transform=transform)
        )[0]
        to_true = cents[true_k] - x
        to_wrong = cents[wrong_k] - x
        assert step @ to_true > 0, (alpha, transform)
        assert step @ to_wrong < 0, (alpha, transform)


def test_reshaped_correction_does_not_vanish_near_true_centroid():
  """Fig 1c: as x1_hat -> mu_y the vanilla FM error |x1_hat - mu_y| = r -> 0, but the correction does not
  fade with it. Default (log, tau=1): |grad Phi| / r tends to a constant gain (~21 here), so the reshaped
  target keeps pulling 20x harder than the FM error alone. tau = 2 (log) and the sqrt/linear transforms:
  |grad Phi| itself stays of order 0.1-10 while r shrinks 300x."""
  with jax.enable_x64(True):
    cents = centroids_lib.kronecker_centroids(19, dtype=np.float64)
    k = 7
    direction = np.array([1.0, -1.0, 0.5]) / np.linalg.norm([1.0, -1.0, 0.5])
    radii = np.array([1e-1, 3e-2, 1e-2, 1e-3])

    def norms(**kw):
      x = cents[k] + radii[:, None] * direction
      g = potential.potential_grad(x, np.full(len(radii), k), cents, **kw)
      return np.linalg.norm(np.asarray(g), axis=-1)

    gain = norms() / radii
    assert np.all(gain > 15), gain
    np.testing.assert_allclose(gain[-1], gain[-2], rtol=0.05)  # converged, not decaying
    for kw in (dict(tau=2.0), dict(transform="sqrt"), dict(transform="linear")):
      magnitude = norms(**kw)
      assert np.all(magnitude > 0.05), (kw, magnitude)
      assert magnitude[-1] > 0.3 * magnitude[0], (kw, magnitude)
    # The sharper tau = 0.5 does let it vanish (p_y -> 1 faster than 1/r grows): the knob matters.
    assert norms(tau=0.5)[-1] < 1e-6


def test_norm_reduced_bounds_the_log_gradient_and_keeps_its_direction():
  """Fig 5c's gradient-norm reduction (our definition, potential.potential_grad): the log transform's grad Phi,
  shortened per pixel to at most max_grad_norm. Points at radii 1e-3..0.3 from a centroid and between two
  centroids give log gradients of norm ~0.02 to ~20, so both branches (kept, shortened) are exercised."""
  with jax.enable_x64(True):
    cents = centroids_lib.kronecker_centroids(19, dtype=np.float64)
    k, other = 7, 3
    direction = np.array([1.0, -1.0, 0.5]) / np.linalg.norm([1.0, -1.0, 0.5])
    near = cents[k] + np.array([1e-3, 1e-2, 0.1, 0.3])[:, None] * direction
    between = cents[k] + np.linspace(0.2, 0.9, 4)[:, None] * (cents[other] - cents[k])
    x = np.concatenate([near, between])
    labels = np.full(len(x), k)
    log_g = np.asarray(potential.potential_grad(x, labels, cents, transform="log"))
    log_norm = np.linalg.norm(log_g, axis=-1)
    for cap in (0.5, 1.0, 4.0):
      red = np.asarray(
        potential.potential_grad(x, labels, cents, transform="norm_reduced", max_grad_norm=cap)
      )
      red_norm = np.linalg.norm(red, axis=-1)
      short = log_norm > cap
      assert short.any() and (~short).any(), (cap, log_norm)
      np.testing.assert_array_equal(red[~short], log_g[~short])
      np.testing.assert_allclose(red_norm[short], cap, rtol=1e-12)
      cos = np.sum(red * log_g, axis=-1) / (red_norm * log_norm)
      np.testing.assert_allclose(cos, 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="max_grad_norm"):
      potential.potential_grad(x, labels, cents, transform="norm_reduced", max_grad_norm=0.0)
