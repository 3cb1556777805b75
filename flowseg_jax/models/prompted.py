"""The prompted task's denoiser: PixNerd-T2I whose condition is a prompt id or text features."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flowseg_jax.models import layers, pixnerd_t2i


class PromptedDenoiser(nn.Module):
  """PixNerd-T2I whose condition is a prompt id (learned table) or text features.

  `__call__(x (B, H, W, 3), t (B,), cond)`: cond int (B,) prompt ids when num_prompts > 0 (a
  learned (num_prompts, T, Dt) table gives the features), else float features (B, T, Dt).
  The T2I parameters live under 't2i' (the converter's tree, so released weights drop in).
  """

  t2i: pixnerd_t2i.PixNerdT2I
  num_prompts: int = 0

  @nn.compact
  def __call__(self, x, t, cond):
    if self.num_prompts:
      table = self.param(
        "prompt_table",
        layers.partitioned(nn.initializers.normal(1.0), (None, None, None)),
        (self.num_prompts, self.t2i.text_length, self.t2i.text_dim),
        jnp.float32,
      )
      cond = jnp.take(table, cond, axis=0)
    return self.t2i(x, t, cond)
