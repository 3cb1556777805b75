"""Deterministic ODE samplers from the image (t = 0) to the colour mask (t = 1).

`apply_fn(x_t, t) -> out` is the network with its parameters closed over: x_t (B, H, W, 3), t (B,).
The loop is a `lax.scan` over a static time grid, so the step count does not unroll the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax import flow

ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]
METHODS = ("euler", "heun")


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """How inference integrates the ODE: `sample`'s settings (hashable: compiled samplers are cached
  per setting). Tasks build it from `config.eval` and their objective (`Task.sampler_options`).

  adaptive: (dt_min, dt_max, iterations) of the prompted task's adaptive one-step rule, applied by
  that task when num_steps == 1; None: plain Euler / Heun.
  """

  num_steps: int = 10
  shift: float = 1.0
  method: str = "euler"
  prediction: str = "v"
  t_eps: float = 0.05
  adaptive: tuple[float, float, int] | None = None

  def sample(self, apply_fn: ApplyFn, x0: jax.Array, *, return_trajectory: bool = False):
    """`sample` with these settings."""
    return sample(
      apply_fn,
      x0,
      num_steps=self.num_steps,
      shift=self.shift,
      prediction=self.prediction,
      t_eps=self.t_eps,
      method=self.method,
      return_trajectory=return_trajectory,
    )


def time_grid(num_steps: int, *, shift: float = 1.0) -> np.ndarray:
  """The num_steps + 1 times 0 = t_0 < ... < t_n = 1, respaced by the time shift (float64, host)."""
  if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
  grid = np.linspace(0.0, 1.0, num_steps + 1, dtype=np.float64)
  return grid if shift == 1.0 else np.asarray(flow.shift_time(grid, shift))


def velocity(
  out: jax.Array, x_t: jax.Array, t: jax.Array, *, prediction: str, t_eps: float
) -> jax.Array:
  """The network's velocity: out itself ('v') or (out - x_t) / max(1 - t, t_eps) ('x'); t (B,)."""
  if prediction == "v":
    return out
  if prediction == "x":
    return (out - x_t) / jnp.maximum(1.0 - t, t_eps)[:, None, None, None]
  raise ValueError(f"prediction must be 'v' or 'x', got {prediction!r}")


def sample(
  apply_fn: ApplyFn,
  x0: jax.Array,
  *,
  num_steps: int = 10,
  shift: float = 1.0,
  prediction: str = "v",
  t_eps: float = 0.05,
  method: str = "euler",
  return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Integrates dx/dt = v(x, t) from x(0) = x0 (the image) to t = 1.

  Args:
    apply_fn: network, (B, H, W, 3), (B,) -> (B, H, W, 3).
    x0: images (B, H, W, 3) in [-1, 1].
    num_steps: number of steps (static).
    shift: time-grid shift (1 = uniform steps; > 1 takes more steps near the image).
    prediction: what the network outputs, 'v' or 'x'.
    t_eps: clamp of 1 - t for 'x' prediction.
    method: 'euler' (one evaluation per step) or 'heun' (two; second order).
    return_trajectory: also return the states after each step, (num_steps, B, H, W, 3).

  Returns:
    x1 (B, H, W, 3) float32: the predicted colour mask, or (x1, trajectory).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  x0 = jnp.asarray(x0)
  if x0.ndim != 4:
    raise ValueError(f"sample: x0 must be (B, H, W, C), got shape {x0.shape}")
  dtype = jnp.promote_types(x0.dtype, jnp.float32)
  grid = time_grid(num_steps, shift=shift)
  t_start = jnp.asarray(grid[:-1], dtype)
  t_end = jnp.asarray(grid[1:], dtype)
  batch = x0.shape[0]

  def v_at(x, t_scalar):
    t = jnp.full((batch,), t_scalar, dtype)
    out = apply_fn(x, t).astype(dtype)
    return velocity(out, x, t, prediction=prediction, t_eps=t_eps)

  def step(x, ts):
    t0, t1 = ts
    dt = t1 - t0
    v0 = v_at(x, t0)
    if method == "euler":
      x_next = x + dt * v0
    else:
      x_pred = x + dt * v0
      x_next = x + 0.5 * dt * (v0 + v_at(x_pred, t1))
    return x_next, (x_next if return_trajectory else None)

  x1, trajectory = jax.lax.scan(step, x0.astype(dtype), (t_start, t_end))
  return (x1, trajectory) if return_trajectory else x1
