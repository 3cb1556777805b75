"""Building blocks of the PixNerd trunk: RMSNorm, SwiGLU, 2-D RoPE, attention, embedders.

Every module is flax.linen, channels-last, and keeps parameters in `param_dtype` while computing in
`dtype`. Parameters carry logical axis names (`nn.with_logical_partitioning`): "embed" for the
hidden size D, "mlp" for wide axes (SwiGLU hidden width, fused qkv / adaLN / generator outputs),
"vocab" for class-table rows, "norm" for norm scales.

Initialisers reproduce PyTorch's defaults where the official model keeps them (Linear weight and
bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))), so a model trained from scratch here starts from the
same distribution as the official one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

NORM_EPS = 1e-6
TIME_FREQ_DIM = 256
TIME_MAX_PERIOD = 10.0
ROPE_POSITION_SCALE = 16.0
ROPE_THETA = 10000.0

# Kaiming-uniform with a=sqrt(5) on the fan-in: bound = 1/sqrt(fan_in), PyTorch's Linear default.
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> Initializer:
  """PyTorch's Linear bias default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
  """Shorthand for `nn.with_logical_partitioning` with a tuple of logical axis names."""
  return nn.with_logical_partitioning(init, tuple(names))


def dense(
  features: int,
  fan_in: int,
  axes: tuple[str | None, str | None],
  *,
  use_bias: bool = True,
  kernel_init: Initializer | None = None,
  bias_init: Initializer | None = None,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  name: str | None = None,
) -> nn.Dense:
  """An `nn.Dense` with PyTorch-default initialisation and logical axis names.

  Args:
    features: output width.
    fan_in: input width (sets the PyTorch-default bias bound 1/sqrt(fan_in)).
    axes: logical names of the kernel's (in, out) axes; the bias takes the `out` name.
    use_bias: whether to add a bias.
    kernel_init: replaces the PyTorch-default kernel initialiser.
    bias_init: replaces the PyTorch-default bias initialiser.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    name: module name.

  Returns:
    The (unbound) Dense module; its kernel is (fan_in, features), i.e. torch's weight transposed.
  """
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=partitioned(kernel_init or torch_linear_kernel_init, axes),
    bias_init=partitioned(bias_init or torch_linear_bias_init(fan_in), (axes[1],)),
    name=name,
  )


def constrain_batch(x: jax.Array) -> jax.Array:
  """Shards an activation's leading (batch) axis by the logical rule 'batch', the rest replicated.

  Without it, XLA's sharding propagation lets activations follow the FSDP-sharded weights (embed
  axis split over 'fsdp') and all-reduces them after every matmul, instead of all-gathering the
  weights: XL/16 at 256², 8-way FSDP, moved ~45 GiB per device and step that way. A no-op
  outside `nn.logical_axis_rules` (single-device code, tests).
  """
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


class RMSNorm(nn.Module):
  """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * scale (no centring, no bias).

  The statistics are computed in float32; the normalised value is cast back to the input dtype
  before the learnable scale (initialised to ones) is applied, as in the official model.
  """

  eps: float = NORM_EPS
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., F) -> (..., F) in `dtype` (default: the input dtype)."""
    scale = self.param(
      "scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    dtype = self.dtype or x.dtype
    return normed.astype(x.dtype).astype(dtype) * scale.astype(dtype)


def swiglu_hidden_width(hidden_size: int, mlp_ratio: float = 4.0) -> int:
  """SwiGLU hidden width of the official DiT blocks: int(2 * int(mlp_ratio * D) / 3)."""
  return int(2 * int(mlp_ratio * hidden_size) / 3)


class SwiGLU(nn.Module):
  """w2(silu(w1 x) * w3 x), all three projections without bias."""

  hidden_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., D) -> (..., D)."""
    dim, hidden = x.shape[-1], self.hidden_features
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = dense(hidden, dim, ("embed", "mlp"), name="w1", **kw)(x)
    lin = dense(hidden, dim, ("embed", "mlp"), name="w3", **kw)(x)
    return dense(dim, hidden, ("mlp", "embed"), name="w2", **kw)(nn.silu(gate) * lin)


def rope_2d_table(
  grid_h: int,
  grid_w: int,
  head_dim: int,
  *,
  y_extent: float = ROPE_POSITION_SCALE,
  x_extent: float = ROPE_POSITION_SCALE,
) -> tuple[np.ndarray, np.ndarray]:
  """Cosine and sine tables of PixNerd's 2-D RoPE.

  Token l = i * grid_w + j sits at (y, x) = (linspace(0, y_extent, grid_h)[i], linspace(0,
  x_extent, grid_w)[j]). Frequencies w_m = 10000^(-4m/head_dim), m < head_dim/4; complex pair 2m
  rotates by x*w_m and pair 2m+1 by y*w_m (x and y interleaved per frequency). The class-to-image
  model spans [0, 16] on both axes (resolution-normalised); the text-to-image model uses other
  extents (see `pixnerd_t2i`).

  Args:
    grid_h: number of token rows.
    grid_w: number of token columns.
    head_dim: per-head channel count, a multiple of 4.
    y_extent: position of the last row.
    x_extent: position of the last column.

  Returns:
    (cos, sin), each float32 of shape (grid_h * grid_w, head_dim // 2).
  """
  if head_dim % 4:
    raise ValueError(f"2-D RoPE needs head_dim % 4 == 0, got head_dim={head_dim}.")
  f32 = np.float32
  freqs = (1.0 / (ROPE_THETA ** (np.arange(0, head_dim, 4, dtype=f32) / f32(head_dim)))).astype(f32)
  ys = np.linspace(0.0, y_extent, grid_h, dtype=f32)
  xs = np.linspace(0.0, x_extent, grid_w, dtype=f32)
  yy, xx = np.meshgrid(ys, xs, indexing="ij")
  ang_x = xx.reshape(-1, 1) * freqs[None, :]  # (L, hd/4)
  ang_y = yy.reshape(-1, 1) * freqs[None, :]
  angles = np.stack([ang_x, ang_y], axis=-1).reshape(grid_h * grid_w, head_dim // 2)
  return np.cos(angles).astype(f32), np.sin(angles).astype(f32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates adjacent channel pairs (2j, 2j+1) of x by the angles of the table, in float32.

  Args:
    x: (B, L, heads, head_dim).
    cos: (L, head_dim // 2) float32.
    sin: (L, head_dim // 2) float32.

  Returns:
    Array like x, same dtype.
  """
  b, seq, heads, hd = x.shape
  pairs = x.astype(jnp.float32).reshape(b, seq, heads, hd // 2, 2)
  re, im = pairs[..., 0], pairs[..., 1]
  cos = cos[None, :, None, :]
  sin = sin[None, :, None, :]
  rotated = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with qk-RMSNorm (shared over heads) and optional 2-D RoPE.

  Attributes:
    num_heads: number of heads G; head_dim = D / G.
    attention_impl: `implementation` of `jax.nn.dot_product_attention` (None, 'xla', 'cudnn').
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  num_heads: int
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, cos: jax.Array | None = None, sin: jax.Array | None = None
  ) -> jax.Array:
    """(B, L, D) tokens -> (B, L, D); cos/sin are (L, head_dim // 2) RoPE tables or None."""
    b, seq, dim = x.shape
    hd = dim // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = dense(3 * dim, dim, ("embed", "mlp"), use_bias=False, name="qkv", **kw)(x)
    qkv = qkv.reshape(b, seq, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = RMSNorm(param_dtype=self.param_dtype, name="q_norm")(q)
    k = RMSNorm(param_dtype=self.param_dtype, name="k_norm")(k)
    if cos is not None:
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    out = out.reshape(b, seq, dim)
    return dense(dim, dim, ("mlp", "embed"), name="proj", **kw)(out)


def timestep_features(t: jax.Array, dim: int = TIME_FREQ_DIM) -> jax.Array:
  """Sinusoidal features [cos(t f_k), sin(t f_k)], f_k = 10^(-k/(dim/2)), in float32.

  Args:
    t: (B,) times in [0, 1] (used unscaled).
    dim: even feature count.

  Returns:
    (B, dim) float32, cosines first.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(TIME_MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
  """Linear(256 -> D) -> SiLU -> Linear(D -> D) on the sinusoidal features of t."""

  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    """(B,) float -> (B, D)."""
    kw = dict(
      kernel_init=nn.initializers.normal(0.02), dtype=self.dtype, param_dtype=self.param_dtype
    )
    d = self.hidden_size
    h = dense(d, TIME_FREQ_DIM, (None, "mlp"), name="mlp_0", **kw)(timestep_features(t))
    return dense(d, d, ("mlp", "embed"), name="mlp_2", **kw)(nn.silu(h))


class LabelEmbedder(nn.Module):
  """Class table with num_classes + 1 rows; row `num_classes` is the null (unconditional) class."""

  num_classes: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    """(B,) int in [0, num_classes] -> (B, D)."""
    return nn.Embed(
      self.num_classes + 1,
      self.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
      name="embedding_table",
    )(y)
