"""ODE samplers: exactness, convergence order, prediction modes, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowseg_jax import sampling


def test_constant_velocity_is_exact_in_one_step():
  x0 = np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  target = np.random.default_rng(1).uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  v = target - x0
  x1 = sampling.sample(lambda x, t: jnp.asarray(v), x0, num_steps=1)
  np.testing.assert_allclose(x1, target, rtol=0, atol=1e-6)
  x1_heun = sampling.sample(lambda x, t: jnp.asarray(v), x0, num_steps=1, method="heun")
  np.testing.assert_allclose(x1_heun, target, rtol=0, atol=1e-6)


def test_rectified_x_prediction_reaches_the_target():
  """An 'x'-prediction network that always outputs the clean target flows exactly onto it."""
  x0 = np.zeros((1, 2, 2, 3), np.float32)
  target = np.full((1, 2, 2, 3), 0.5, np.float32)
  for n in (1, 4, 10):
    x1 = sampling.sample(lambda x, t: jnp.asarray(target), x0, num_steps=n, prediction="x")
    np.testing.assert_allclose(x1, target, atol=1e-6)


def test_euler_is_first_order_and_heun_second_order_on_linear_ode():
  """dx/dt = a x has x(1) = e^a x0; Euler errs O(1/n), Heun O(1/n^2)."""
  a = -1.5
  x0 = np.ones((1, 1, 1, 3), np.float32)
  exact = np.exp(a)
  errs = {}
  for method in sampling.METHODS:
    errs[method] = []
    for n in (10, 20, 40, 80):
      x1 = sampling.sample(lambda x, t: a * x, x0, num_steps=n, method=method)
      errs[method].append(abs(float(x1[0, 0, 0, 0]) - exact))
    errs[method] = np.array(errs[method])
  # Euler: (1 + a/n)^n; halving the step halves the error.
  np.testing.assert_allclose(errs["euler"][:-1] / errs["euler"][1:], 2.0, rtol=0.1)
  np.testing.assert_allclose(errs["euler"][0], abs((1 + a / 10) ** 10 - exact), rtol=1e-4)
  np.testing.assert_allclose(errs["heun"][:-1] / errs["heun"][1:], 4.0, rtol=0.15)


def test_time_grid_and_shift():
  np.testing.assert_allclose(sampling.time_grid(4), [0, 0.25, 0.5, 0.75, 1.0])
  g = sampling.time_grid(4, shift=3.0)
  u = np.linspace(0, 1, 5)
  np.testing.assert_allclose(g, u / (u + (1 - u) * 3.0))
  assert g[0] == 0.0 and g[-1] == 1.0
  assert np.all(np.diff(g) > 0)
  with pytest.raises(ValueError, match="num_steps"):
    sampling.time_grid(0)


def test_network_sees_the_grid_times_and_trajectory_shape():
  seen = []

  def apply_fn(x, t):
    jax.debug.callback(lambda tt: seen.append(np.asarray(tt)), t)
    return jnp.zeros_like(x)

  x0 = np.zeros((2, 2, 2, 3), np.float32)
  x1, traj = sampling.sample(apply_fn, x0, num_steps=5, return_trajectory=True)
  assert traj.shape == (5, 2, 2, 2, 3)
  np.testing.assert_allclose(np.stack(seen)[:, 0], [0, 0.2, 0.4, 0.6, 0.8], atol=1e-7)
  assert all(s.shape == (2,) for s in seen)


def test_deterministic_and_jittable():
  w = jax.random.normal(jax.random.key(0), (3, 3))
  apply_fn = lambda x, t: jnp.tanh(x @ w) * (1 - t)[:, None, None, None]
  x0 = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3), minval=-1, maxval=1)
  run = jax.jit(lambda x: sampling.sample(apply_fn, x, num_steps=7))
  a, b = run(x0), run(x0)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, sampling.sample(apply_fn, x0, num_steps=7), rtol=1e-6, atol=1e-6)


def test_bad_arguments():
  x0 = np.zeros((1, 2, 2, 3), np.float32)
  with pytest.raises(ValueError, match="method"):
    sampling.sample(lambda x, t: x, x0, method="rk4")
  with pytest.raises(ValueError, match="prediction"):
    sampling.sample(lambda x, t: x, x0, prediction="eps")
  with pytest.raises(ValueError, match="x0 must be"):
    sampling.sample(lambda x, t: x, x0[0])
