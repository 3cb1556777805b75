"""DINOv2 ViT in flax.linen: the frozen teacher of the REPA loss.

The architecture is the official facebookresearch/dinov2 `DinoVisionTransformer` as built by the
torch-hub entry points (`dinov2_vits14`, `dinov2_vitb14`, `dinov2_vitl14`; `block_chunks=0`,
MLP feed-forward, LayerScale initialised at 1.0) evaluated in inference mode:

  image (B, H, W, 3), already ImageNet-normalised, H and W multiples of the patch size p
  -> patch_embed: Conv p x p, stride p, with bias                          (B, N, D), N = (H/p)(W/p)
  -> prepend cls_token, add pos_embed (bicubically interpolated to the (H/p, W/p) grid)
  -> insert register tokens after the cls token (only for the `_reg` models)
  -> depth x Block: x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))
     (pre-norm LayerNorm eps 1e-6, fused qkv with bias, exact-erf GELU MLP, LayerScale gammas)
  -> final LayerNorm -> {"x_norm_clstoken": (B, D), "x_norm_patchtokens": (B, N, D), ...}

Position-embedding interpolation follows the official `interpolate_pos_encoding`: the learned
embedding covers the (pretrain_img_size / p)^2 grid (37 x 37 for 518 / 14); it is used unchanged
when the input has that many patches and is square, otherwise it is resized with PyTorch's
bicubic interpolation (align_corners=False, A = -0.75). With `interpolate_offset` > 0 (0.1 for the
no-register hub models) the resize is specified by scale factors ((g + offset) / M) rather than by
output size, so the sampling grid is stretched by M / (g + offset) instead of M / g — we reproduce
that convention exactly. The `_reg` hub models use offset 0 with antialiasing; both are supported.

The resize reproduces PyTorch's bicubic interpolation exactly (`models/bicubic.py`).

Parameter names mirror the official state dict: `cls_token`, `pos_embed`, `register_tokens`,
`patch_embed/{kernel,bias}`, `blocks_{i}/{norm1,attn/qkv,attn/proj,ls1/gamma,norm2,mlp/fc1,
mlp/fc2,ls2/gamma}`, `norm`. The official `mask_token` (only used for masked training inputs) has
no counterpart here. `flowseg_jax.convert.dinov2` converts the official checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flowseg_jax.models import bicubic

Dtype = Any

LAYER_NORM_EPS = 1e-6

# Architectures of the official hub models (ViT-g/14 uses a SwiGLU feed-forward: not supported)
# and tiny ones for tests. `pretrain_img_size / patch_size` is the learned position grid.
VARIANTS: dict[str, dict[str, Any]] = {
  "S/14": dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, pretrain_img_size=518),
  "B/14": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, pretrain_img_size=518),
  "L/14": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, pretrain_img_size=518),
  "test/14": dict(patch_size=14, embed_dim=64, depth=2, num_heads=4, pretrain_img_size=56),
  "tiny/14": dict(patch_size=14, embed_dim=32, depth=1, num_heads=2, pretrain_img_size=28),
}

# Fields that define the architecture (what `convert.dinov2.infer_dinov2_config` returns and the
# orbax export records); `dtype` is a run-time choice.
ARCH_FIELDS = (
  "patch_size",
  "embed_dim",
  "depth",
  "num_heads",
  "mlp_ratio",
  "num_register_tokens",
  "pretrain_img_size",
  "layerscale",
  "interpolate_offset",
  "interpolate_antialias",
)


# ---------------------------------------------------------------------------------------------
# PyTorch-convention bicubic interpolation.
# ------------------------------------------------------------


def _partitioned(init, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init, names)


# Official init: Linear weights trunc-normal(0.02) and zero biases, pos_embed trunc-normal(0.02),
# cls/register tokens normal(1e-6). Irrelevant for the frozen teacher (a converter overwrites it)
# but keeps a freshly initialised model sensible.
_linear_init = nn.initializers.truncated_normal(0.02)


def _dense(features: int, axes: tuple[str | None, str | None], name: str, dtype: Dtype):
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=_partitioned(_linear_init, axes),
    bias_init=_partitioned(nn.initializers.zeros, (axes[1],)),
    name=name,
  )


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  # Two-pass variance like torch (the fast E[x^2] - E[x]^2 form loses precision on DINOv2's
  # high-norm tokens).
  return nn.LayerNorm(
    epsilon=LAYER_NORM_EPS,
    dtype=dtype,
    param_dtype=jnp.float32,
    use_fast_variance=False,
    scale_init=_partitioned(nn.initializers.ones, ("norm",)),
    bias_init=_partitioned(nn.initializers.zeros, ("norm",)),
    name=name,
  )


class LayerScale(nn.Module):
  """x * gamma with a learned per-channel gamma (initialised to `init_value`)."""

  init_value: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., D) -> (..., D)."""
    gamma = self.param(
      "gamma", _partitioned(nn.initializers.constant(self.init_value), ("norm",)), (x.shape[-1],)
    )
    return x * gamma.astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with a fused, biased qkv projection laid out (3, heads, head_dim)."""

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, T, D)."""
    b, t, d = x.shape
    qkv = _dense(3 * d, ("embed", "mlp"), "qkv", self.dtype)(x)
    qkv = qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return _dense(d, ("mlp", "embed"), "proj", self.dtype)(out.reshape(b, t, d))


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2, both with bias."""

  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., D) -> (..., D)."""
    h = _dense(self.hidden_dim, ("embed", "mlp"), "fc1", self.dtype)(x)
    h = nn.gelu(h, approximate=False)
    return _dense(x.shape[-1], ("mlp", "embed"), "fc2", self.dtype)(h)


class Block(nn.Module):
  """Pre-norm transformer block with LayerScale on both residual branches."""

  num_heads: int
  mlp_hidden_dim: int
  layerscale: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, T, D)."""
    h = Attention(self.num_heads, self.dtype, name="attn")(_layer_norm("norm1", self.dtype)(x))
    if self.layerscale:
      h = LayerScale(name="ls1")(h)
    x = x + h
    h = Mlp(self.mlp_hidden_dim, self.dtype, name="mlp")(_layer_norm("norm2", self.dtype)(x))
    if self.layerscale:
      h = LayerScale(name="ls2")(h)
    return x + h


class DinoViT(nn.Module):
  """DINOv2 vision transformer (inference forward of the official `DinoVisionTransformer`).

  Attributes:
    patch_size: patch side p (14 for the released models).
    embed_dim: token width D.
    depth: number of blocks.
    num_heads: attention heads (head_dim = D / num_heads; 64 for all released models).
    mlp_ratio: MLP hidden width = int(D * mlp_ratio).
    num_register_tokens: extra learned tokens after cls (4 for the `_reg` models, else 0).
    pretrain_img_size: image side the learned position grid was made for (grid M = size / p).
    layerscale: whether blocks have LayerScale gammas (`ls1`, `ls2`); True for all hub models.
    interpolate_offset: the official `interpolate_offset` (0.1 without registers, 0.0 with).
    interpolate_antialias: the official `interpolate_antialias` (False without registers).
    dtype: compute dtype (parameters stay float32; position interpolation runs in float32).
  """

  patch_size: int = 14
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  num_register_tokens: int = 0
  pretrain_img_size: int = 518
  layerscale: bool = True
  interpolate_offset: float = 0.1
  interpolate_antialias: bool = False
  dtype: Dtype = jnp.float32

  @property
  def pos_grid(self) -> int:
    """Side M of the learned (M x M) position-embedding grid."""
    return self.pretrain_img_size // self.patch_size

  @property
  def arch_config(self) -> dict[str, Any]:
    """The architecture fields as a JSON-serialisable dict (see `ARCH_FIELDS`)."""
    return {k: getattr(self, k) for k in ARCH_FIELDS}

  def check_input(self, shape: Sequence[int]) -> None:
    """Raises ValueError unless `shape` is (B, H, W, 3) with H, W multiples of the patch size."""
    p = self.patch_size
    if len(shape) != 4 or shape[-1] != 3:
      raise ValueError(f"DinoViT expects images (B, H, W, 3), got shape {tuple(shape)}.")
    h, w = shape[1], shape[2]
    if h < p or w < p or h % p or w % p:
      raise ValueError(
        f"DinoViT: image height and width must be positive multiples of the patch size {p}, "
        f"got {h}x{w}."
      )
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}.")

  def interpolate_pos_encoding(self, pos_embed: jax.Array, h: int, w: int) -> jax.Array:
    """Official position-embedding interpolation for an h x w (pixel) input.

    Args:
      pos_embed: (1, 1 + M*M, D) learned embedding (cls first).
      h: input height in pixels.
      w: input width in pixels.

    Returns:
      (1, 1 + (h/p)(w/p), D) float32.
    """
    pos_embed = pos_embed.astype(jnp.float32)
    m = self.pos_grid
    gh, gw = h // self.patch_size, w // self.patch_size
    if gh * gw == m * m and h == w:
      return pos_embed
    grid = pos_embed[0, 1:].reshape(m, m, -1)
    if self.interpolate_offset:
      scale = (
        float(gh + self.interpolate_offset) / m,
        float(gw + self.interpolate_offset) / m,
      )
      out_hw = bicubic.torch_interpolate_size((m, m), scale)
      if out_hw != (gh, gw):
        raise ValueError(f"pos-embed interpolation gave {out_hw}, expected {(gh, gw)}.")
      grid = bicubic.resize_bicubic_torch(
        grid, scale_factor=scale, antialias=self.interpolate_antialias
      )
    else:
      grid = bicubic.resize_bicubic_torch(grid, (gh, gw), antialias=self.interpolate_antialias)
    return jnp.concatenate([pos_embed[:, :1], grid.reshape(1, gh * gw, -1)], axis=1)

  @nn.compact
  def __call__(self, image: jax.Array) -> dict[str, jax.Array]:
    """Runs the teacher.

    Args:
      image: (B, H, W, 3) float, ImageNet-normalised; H and W multiples of `patch_size`.

    Returns:
      Dict of arrays in `dtype`: "x_norm_clstoken" (B, D), "x_norm_regtokens" (B, R, D),
      "x_norm_patchtokens" (B, N, D) with N = (H/p)(W/p) in row-major patch order, and
      "x_prenorm" (B, 1 + R + N, D).
    """
    self.check_input(image.shape)
    b, h, w, _ = image.shape
    p, d = self.patch_size, self.embed_dim
    x = nn.Conv(
      d,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=_partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
      bias_init=_partitioned(nn.initializers.zeros, ("embed",)),
      name="patch_embed",
    )(image.astype(self.dtype))
    x = x.reshape(b, -1, d)
    cls_token = self.param(
      "cls_token", _partitioned(nn.initializers.normal(1e-6), (None, None, "embed")), (1, 1, d)
    )
    pos_embed = self.param(
      "pos_embed",
      _partitioned(nn.initializers.truncated_normal(0.02), (None, None, "embed")),
      (1, self.pos_grid**2 + 1, d),
    )
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (b, 1, d)), x], axis=1)
    x = x + self.interpolate_pos_encoding(pos_embed, h, w).astype(x.dtype)
    r = self.num_register_tokens
    if r:
      reg = self.param(
        "register_tokens",
        _partitioned(nn.initializers.normal(1e-6), (None, None, "embed")),
        (1, r, d),
      )
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg.astype(x.dtype), (b, r, d)), x[:, 1:]], 1)
    hidden = int(d * self.mlp_ratio)
    for i in range(self.depth):
      x = Block(self.num_heads, hidden, self.layerscale, self.dtype, name=f"blocks_{i}")(x)
    x_norm = _layer_norm("norm", self.dtype)(x)
    return {
      "x_norm_clstoken": x_norm[:, 0],
      "x_norm_regtokens": x_norm[:, 1 : r + 1],
      "x_norm_patchtokens": x_norm[:, r + 1 :],
      "x_prenorm": x,
    }


def make_model(variant: str, **overrides: Any) -> DinoViT:
  """Builds a `DinoViT` from a named variant (see `VARIANTS`), with field overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown DINOv2 variant {variant!r}; known: {sorted(VARIANTS)}.")
  return DinoViT(**{**VARIANTS[variant], **overrides})


def abstract_params(model: DinoViT) -> dict:
  """Parameter shapes/dtypes of `model` (a pytree of `jax.ShapeDtypeStruct`, unboxed)."""
  p = model.patch_size
  dummy = jax.ShapeDtypeStruct((1, p, p, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), dummy)
  return nn.unbox(variables["params"])


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
