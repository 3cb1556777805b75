"""PixNerd's pixel neural-field decoder, shared by the class- and text-conditioned models: the
pixels' DCT position features, the NerfBlock whose per-patch MLP weights are generated from the
patch's token, the zero-initialised final layer, and the blocks' remat policies.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax.models import layers
from flowseg_jax.models.layers import RMSNorm, dense

Dtype = Any

DCT_MAX_FREQS = 8


def dct_features(patch_size: int, max_freqs: int = DCT_MAX_FREQS) -> np.ndarray:
  """PixNerd's DCT positional features of the pixels of one patch.

  Pixel n = ki * p + kj has pos_x = kj / (p - 1), pos_y = ki / (p - 1); frequencies
  phi = linspace(0, max_freqs, max_freqs); feature a * max_freqs + b is
  cos(pi pos_x phi_a) cos(pi pos_y phi_b) / (1 + phi_a phi_b).

  Returns:
    (p * p, max_freqs ** 2) float32.
  """
  f32 = np.float32
  pos = np.linspace(0.0, 1.0, patch_size, dtype=f32)
  pos_y, pos_x = (a.reshape(-1) for a in np.meshgrid(pos, pos, indexing="ij"))
  phi = np.linspace(0.0, max_freqs, max_freqs, dtype=f32)
  cx = np.cos(np.pi * pos_x[:, None] * phi[None, :]).astype(f32)  # (P, F) over a
  cy = np.cos(np.pi * pos_y[:, None] * phi[None, :]).astype(f32)  # (P, F) over b
  feats = cx[:, :, None] * cy[:, None, :] / (1.0 + phi[:, None] * phi[None, :])
  return feats.reshape(patch_size * patch_size, max_freqs * max_freqs).astype(f32)


def inverse_column_norms(w: jax.Array) -> jax.Array:
  """1 / max(||w[:, :, j]||_2, 1e-12) over axis 1 of (N, I, J), in float32: (N, 1, J)."""
  sq = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=1, keepdims=True)
  return 1.0 / jnp.maximum(jnp.sqrt(sq), 1e-12)


class NerfBlock(nn.Module):
  """One neural-field block: a per-patch MLP whose weights are generated from the patch token.

  Attributes:
    nerf_hidden_size: pixel feature width hx.
    mlp_ratio: hidden width of the generated MLP is hx * mlp_ratio.
    normalize_fc2: L2-normalise the second generated matrix too (class-to-image model); the
      text-to-image model normalises only the first.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  nerf_hidden_size: int
  mlp_ratio: int
  normalize_fc2: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, s: jax.Array) -> jax.Array:
    """x (N, P, hx) pixel features, s (N, D) per-patch conditioning -> (N, P, hx)."""
    n, hx, hr = s.shape[0], self.nerf_hidden_size, self.nerf_hidden_size * self.mlp_ratio
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.constrain_batch(x)
    g = dense(2 * hx * hr, s.shape[-1], ("embed", "mlp"), name="param_generator1", **kw)(s)
    g = layers.constrain_batch(g)
    fc1 = g[:, : hx * hr].reshape(n, hx, hr)
    fc2 = g[:, hx * hr :].reshape(n, hr, hx)
    # The official model L2-normalises each generated matrix over its input axis. Scaling the
    # matmul outputs by the inverse column norms is the same product without materialising
    # normalised copies of the (large) generated weights.
    h = RMSNorm(name="norm", **kw)(x)
    u = jnp.einsum("npi,nij->npj", h, fc1, preferred_element_type=jnp.float32)
    u = nn.silu(u * inverse_column_norms(fc1)).astype(self.dtype)
    v = jnp.einsum("npj,njk->npk", u, fc2, preferred_element_type=jnp.float32)
    if self.normalize_fc2:
      v = v * inverse_column_norms(fc2)
    return layers.constrain_batch(x + v.astype(x.dtype))


class PixelEmbedder(nn.Module):
  """Linear(C + F -> hx) of each pixel's values concatenated with its position features.

  The parameters are those of a Dense over the concatenation (kernel (C + F, hx), bias (hx,),
  PyTorch-default initialisation), so checkpoints convert as before. The position rows' product
  depends only on the pixel's place in the patch: it is computed once for the p*p positions and
  broadcast over the patches, instead of being recomputed (and its weight gradient summed) over
  every pixel of the batch: on the S/16 128² b4 CPU step the embedding with its gradients went
  from 53 ms (the concatenation, the 67-wide matmul and its weight gradient) to 26 ms.

  Attributes:
    features: hx.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array, positions: jax.Array) -> jax.Array:
    """pixels (N, P, C), positions (P, F) -> (N, P, hx)."""
    ch, fan_in = pixels.shape[-1], pixels.shape[-1] + positions.shape[-1]
    kernel = self.param(
      "kernel",
      layers.partitioned(layers.torch_linear_kernel_init, (None, None)),
      (fan_in, self.features),
      self.param_dtype,
    )
    bias = self.param(
      "bias",
      layers.partitioned(layers.torch_linear_bias_init(fan_in), (None,)),
      (self.features,),
      self.param_dtype,
    )
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    per_position = jnp.dot(positions.astype(self.dtype), kernel[ch:]) + bias  # (P, hx)
    # The C (3) pixel rows as a broadcast multiply-add, not a 3-deep matmul: XLA:CPU took 21 ms for
    # that matmul's weight gradient (a (B*H*W, 3) x (B*H*W, hx) contraction), 3 ms this way.
    pixels = pixels.astype(self.dtype)
    out = per_position
    for c in range(ch):
      out = out + pixels[..., c : c + 1] * kernel[c]
    return out


class FinalLayer(nn.Module):
  """RMSNorm then Linear(hx -> C), zero-initialised (the untrained model outputs 0)."""

  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(N, P, hx) -> (N, P, C)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = RMSNorm(name="norm", **kw)(x)
    zeros = nn.initializers.zeros
    return dense(
      self.out_channels,
      x.shape[-1],
      (None, None),
      kernel_init=zeros,
      bias_init=zeros,
      name="linear",
      **kw,
    )(x)


def checkpoint_policy(name: str):
  """A block's remat policy by name: 'full' (save nothing) or a jax.checkpoint_policies entry."""
  if name == "full":
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None or name.startswith("_"):
    raise ValueError(
      f"PixNerDiT.remat_policy={name!r} is not 'none', 'full' or a jax.checkpoint_policies entry."
    )
  return policy
