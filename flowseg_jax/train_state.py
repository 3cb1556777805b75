"""The one train-state pytree: arrays only, so it checkpoints and shards as a whole."""

from __future__ import annotations

from typing import Any

import flax
import jax


class TrainState(flax.struct.PyTreeNode):
  """step () int32; params / ema_params {'denoiser': ..., ['projector': ...]} float32; opt_state (optax);
  rng: raw uint32 key data (typed keys do not checkpoint), folded with the step inside the train step;
  num_skipped () int32: updates skipped for non-finite loss or gradients."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  num_skipped: jax.Array
