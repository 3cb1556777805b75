"""The prompted task's denoiser: PixNerd-T2I whose condition is a prompt id, tokens or text features."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flowseg_jax.models import layers, pixnerd_t2i, qwen3


class PromptedDenoiser(nn.Module):
  """PixNerd-T2I whose condition is a prompt id (learned table), tokens (own text encoder) or
  text features.

  `__call__(x (B, H, W, 3), t (B,), cond)`, cond one of:
    int (B,) prompt ids, when num_prompts > 0: a learned (num_prompts, T, Dt) table gives the
      features;
    a pair (token ids int (B, T), attention mask (B, T)), when text_encoder is set: its last
      hidden state (width Dt) is the features (`encode`);
    float (B, T, Dt) text features.
  The T2I parameters live under 't2i' (the converter's tree, so released weights drop in), the text
  encoder's under 'text_encoder' (the Qwen3 converter's tree).
  """

  t2i: pixnerd_t2i.PixNerdT2I
  num_prompts: int = 0
  text_encoder: qwen3.Qwen3Model | None = None

  def setup(self):
    if self.num_prompts:
      self.prompt_table = self.param(
        "prompt_table",
        layers.partitioned(nn.initializers.normal(1.0), (None, None, None)),
        (self.num_prompts, self.t2i.text_length, self.t2i.text_dim),
        jnp.float32,
      )

  def encode(self, ids, mask):
    """Token ids and mask (B, T) -> text features float32 (B, T, Dt) of the own text encoder."""
    if self.text_encoder is None:
      raise ValueError("this denoiser has no text encoder (config.prompted.condition != 'text')")
    return self.text_encoder(ids, mask).astype(jnp.float32)

  def __call__(self, x, t, cond):
    if isinstance(cond, tuple | list):
      cond = self.encode(*cond)
    elif self.num_prompts:
      cond = jnp.take(self.prompt_table, cond, axis=0)
    return self.t2i(x, t, cond)
