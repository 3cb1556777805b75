"""PixNerDiT: PixNerd's patch transformer trunk plus pixel neural-field decoder, in flax.linen.

Forward pass (channels-last; shapes for B images of H x W x C, patch p, L = (H/p)(W/p) tokens):
  patches (B, L, p*p*C) -> s_embedder -> tokens s (B, L, D)
  c = SiLU(t_embedder(t) + y_embedder(y))                                     (B, 1, D)
  num_cond_blocks x CondBlock (adaLN-modulated RMSNorm -> qk-norm RoPE attention, SwiGLU)
  s = SiLU(t_embedder(t) + s)                     one conditioning vector per patch (B*L, D)
  pixels (B*L, p*p, C) ++ DCT features (p*p, 64) -> x_embedder -> (B*L, p*p, hx)
  (num_blocks - num_cond_blocks) x NerfBlock (an MLP whose weights are generated from s)
  final_layer (RMSNorm, Linear hx -> C) -> folded back to (B, H, W, C), float32.

Parameter names mirror the official state dict (`blocks_{i}` for the unscanned layout; the scanned
layout stacks the blocks as `cond_blocks` and `nerf_blocks` with a leading "layers" axis). The
patch vector inside a token is ordered (row, column, channel), the natural channels-last order;
`flowseg_jax.convert.pixnerd` permutes the official channel-major weight accordingly.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax.models import layers, nerf
from flowseg_jax.models.layers import RMSNorm, dense

Dtype = Any

DIT_MLP_RATIO = 4.0

_FIELDS = (
  "patch_size",
  "hidden_size",
  "num_heads",
  "num_blocks",
  "num_cond_blocks",
  "nerf_hidden_size",
  "nerf_mlp_ratio",
  "num_classes",
)
# Architecture of each named model, in _FIELDS order. XL/16 and L/16 are the official PixNerd
# class-to-image configs; B/16 and S/16 follow the usual DiT widths with two NeRF blocks (not
# released officially); tiny/* are for tests and CPU demos.
VARIANTS: dict[str, dict[str, int]] = {
  name: dict(zip(_FIELDS, values))
  for name, values in {
    "XL/16": (16, 1152, 16, 30, 26, 64, 2, 1000),
    "L/16": (16, 1024, 16, 24, 22, 64, 2, 1000),
    "B/16": (16, 768, 12, 12, 10, 64, 2, 1000),
    "S/16": (16, 384, 6, 12, 10, 64, 2, 1000),
    "tiny/8": (8, 64, 2, 4, 3, 16, 2, 10),
    "tiny/4": (4, 64, 2, 4, 3, 16, 2, 10),
  }.items()
}

ARCH_FIELDS = _FIELDS + ("in_channels",)


def make_model(variant: str, **overrides: Any) -> PixNerDiT:
  """Builds a `PixNerDiT` from a named variant (see `VARIANTS`), with field overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown PixNerd variant {variant!r}; known: {sorted(VARIANTS)}.")
  return PixNerDiT(**{**VARIANTS[variant], **overrides})


class CondBlock(nn.Module):
  """One trunk block (official `FlattenDiTBlock`): adaLN-modulated attention and SwiGLU.

  Attributes:
    num_heads: attention heads.
    attention_impl: `jax.nn.dot_product_attention` implementation.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  num_heads: int
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, s: jax.Array, c: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """s (B, L, D) tokens, c (B, 1, D) conditioning, cos/sin (L, hd/2) -> (B, L, D)."""
    dim = s.shape[-1]
    s = layers.constrain_batch(s)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mod = dense(6 * dim, dim, ("embed", "mlp"), name="adaLN_modulation", **kw)(c)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = RMSNorm(name="norm1", **kw)(s) * (1 + scale_msa) + shift_msa
    attn = layers.Attention(self.num_heads, self.attention_impl, name="attn", **kw)
    s = s + gate_msa * attn(h, cos, sin)
    h = RMSNorm(name="norm2", **kw)(s) * (1 + scale_mlp) + shift_mlp
    mlp = layers.SwiGLU(layers.swiglu_hidden_width(dim, DIT_MLP_RATIO), name="mlp", **kw)
    return layers.constrain_batch(s + gate_mlp * mlp(h))


class PixNerDiT(nn.Module):
  """PixNerd pixel neural-field diffusion transformer (class-conditional velocity network).

  Attributes:
    patch_size: p; H and W must be multiples of it.
    hidden_size: trunk width D.
    num_heads: attention heads G; D / G must be a multiple of 4 (2-D RoPE).
    num_blocks: total blocks (trunk + NeRF).
    num_cond_blocks: trunk (DiT) blocks; the remaining blocks are NeRF blocks.
    nerf_hidden_size: NeRF pixel feature width hx.
    nerf_mlp_ratio: hidden width ratio of the generated per-patch MLPs.
    num_classes: K; the label table has K + 1 rows, label K is the null class.
    in_channels: image channels C.
    dtype: compute dtype (bfloat16 for mixed precision); the output is always float32.
    param_dtype: parameter dtype.
    attention_impl: `jax.nn.dot_product_attention` implementation: None (let JAX choose), 'xla'
      or 'cudnn' (GPU flash attention; needs bfloat16/float16 compute).
    remat_policy: 'none', 'full' (save nothing) or a `jax.checkpoint_policies` name, applied
      per block.
    scan_blocks: stack identical blocks and run them with `nn.scan` (fast compilation).
    scan_unroll: blocks per loop iteration (`nn.scan(unroll=)`); without remat the NeRF decoder's
      loop is always fully unrolled.
  """

  patch_size: int
  hidden_size: int
  num_heads: int
  num_blocks: int
  num_cond_blocks: int
  nerf_hidden_size: int
  nerf_mlp_ratio: int
  num_classes: int
  in_channels: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  remat_policy: str = "none"
  scan_blocks: bool = False
  scan_unroll: int = 1

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_nerf_blocks(self) -> int:
    return self.num_blocks - self.num_cond_blocks

  def arch_config(self) -> dict[str, int]:
    """The architecture fields (those a checkpoint's shapes determine)."""
    return {k: getattr(self, k) for k in ARCH_FIELDS}

  def check_config(self) -> None:
    """Raises ValueError when the architecture fields are inconsistent."""
    if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
      raise ValueError(
        f"PixNerDiT: hidden_size={self.hidden_size} / num_heads={self.num_heads} must give an "
        "integer head dim that is a multiple of 4 (2-D RoPE)."
      )
    if not 1 <= self.num_cond_blocks <= self.num_blocks:
      raise ValueError(
        f"PixNerDiT: need 1 <= num_cond_blocks={self.num_cond_blocks} <= "
        f"num_blocks={self.num_blocks}."
      )
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise ValueError(
        f"PixNerDiT.attention_impl={self.attention_impl!r}; expected None, 'xla' or 'cudnn'."
      )
    if self.remat_policy != "none":
      nerf.checkpoint_policy(self.remat_policy)

  def _check_inputs(self, x, t, y, return_block_tokens) -> None:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"PixNerDiT: x must be (B, H, W, {self.in_channels}), got {x.shape}.")
    b, h, w, _ = x.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(
        f"PixNerDiT: image size {h}x{w} is not divisible by patch_size={self.patch_size}."
      )
    if t.shape != (b,) or y.shape != (b,):
      raise ValueError(f"PixNerDiT: t and y must be ({b},), got t {t.shape} and y {y.shape}.")
    if not jnp.issubdtype(y.dtype, jnp.integer):
      raise ValueError(f"PixNerDiT: y must be integer class ids, got dtype {y.dtype}.")
    if not isinstance(y, jax.core.Tracer):
      yv = np.asarray(y)
      if yv.size and (yv.min() < 0 or yv.max() > self.num_classes):
        raise ValueError(
          f"PixNerDiT: labels must lie in [0, {self.num_classes}] ({self.num_classes} = null "
          f"class), got min {yv.min()} max {yv.max()}."
        )
    if return_block_tokens is not None and not 1 <= return_block_tokens <= self.num_cond_blocks:
      raise ValueError(
        f"PixNerDiT: return_block_tokens={return_block_tokens} must be in "
        f"[1, num_cond_blocks={self.num_cond_blocks}]."
      )

  def _block_class(self, cls):
    if self.remat_policy == "none":
      return cls
    return nn.remat(
      cls, policy=nerf.checkpoint_policy(self.remat_policy), prevent_cse=not self.scan_blocks
    )

  def _scan(self, body, length: int, num_broadcast: int, unroll: int):
    return nn.scan(
      body,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(0,) + (nn.broadcast,) * num_broadcast,
      length=length,
      unroll=max(1, min(unroll, length)),
      metadata_params={nn.PARTITION_NAME: "layers"},
    )

  def _trunk(self, s, c, cos, sin, capture):
    """Runs the trunk blocks; returns (tokens, tokens after block `capture` or None)."""
    kw = dict(
      num_heads=self.num_heads,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    block_cls = self._block_class(CondBlock)
    if not self.scan_blocks:
      feat = None
      for i in range(self.num_cond_blocks):
        s = block_cls(name=f"blocks_{i}", **kw)(s, c, cos, sin)
        if capture == i + 1:
          feat = s
      return s, feat

    def body(block, carry, index, c, cos, sin):
      s, feat = carry
      s = block(s, c, cos, sin)
      if capture is not None:
        feat = jnp.where(index == capture - 1, s, feat)
      return (s, feat), None

    feat = jnp.zeros_like(s) if capture is not None else None
    scan = self._scan(body, self.num_cond_blocks, 3, self.scan_unroll)
    (s, feat), _ = scan(
      block_cls(name="cond_blocks", **kw),
      (s, feat),
      jnp.arange(self.num_cond_blocks),
      c,
      jnp.asarray(cos),
      jnp.asarray(sin),
    )
    return s, feat

  def _decoder(self, x, s):
    """Runs the NeRF blocks on pixel features x (N, P, hx) conditioned on s (N, D)."""
    kw = dict(
      nerf_hidden_size=self.nerf_hidden_size,
      mlp_ratio=self.nerf_mlp_ratio,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    block_cls = self._block_class(nerf.NerfBlock)
    if not self.scan_blocks:
      for j in range(self.num_nerf_blocks):
        x = block_cls(name=f"blocks_{self.num_cond_blocks + j}", **kw)(x, s)
      return x
    if self.num_nerf_blocks == 0:
      return x

    def body(block, x, _, s):
      return block(x, s), None

    # Without remat the decoder's loop is fully unrolled (its parameters stay stacked): its
    # activations are per pixel (B*H*W x nerf width), and in a loop XLA zero-fills and copies a
    # stacked buffer for each saved one every step, ~25% of the S/16 128^2 CPU train step. With
    # remat the loop stays: it keeps one block's recomputed activations alive at a time, where the
    # unrolled form let XLA hold both (XL/16 256^2 b8 per device: 21.2 vs 17.0 GiB).
    unroll = self.num_nerf_blocks if self.remat_policy == "none" else self.scan_unroll
    scan = self._scan(body, self.num_nerf_blocks, 1, unroll)
    x, _ = scan(block_cls(name="nerf_blocks", **kw), x, jnp.arange(self.num_nerf_blocks), s)
    return x

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    y: jax.Array,
    *,
    return_block_tokens: int | None = None,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Predicts the velocity at (x_t, t) for class y.

    Args:
      x: (B, H, W, C) state x_t; H, W multiples of patch_size.
      t: (B,) float times in [0, 1].
      y: (B,) int class ids in [0, num_classes]; num_classes is the null class.
      return_block_tokens: k in [1, num_cond_blocks] to also return the tokens after the k-th
        trunk block (REPA aligns block 8).

    Returns:
      out (B, H, W, C) float32, or (out, tokens (B, L, D) in the compute dtype) when
      return_block_tokens is given. Tokens are patch-row-major (l = row * W/p + column).
    """
    self.check_config()
    t, y = jnp.asarray(t), jnp.asarray(y)
    self._check_inputs(x, t, y, return_block_tokens)
    b, h, w, ch = x.shape
    p, d = self.patch_size, self.hidden_size
    gh, gw = h // p, w // p
    seq = gh * gw
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    patches = x.reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5)  # (B, gh, gw, p, p, C)
    s = dense(
      d,
      p * p * ch,
      (None, "embed"),
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.zeros,
      name="s_embedder",
      **kw,
    )(patches.reshape(b, seq, p * p * ch))
    temb = layers.TimestepEmbedder(d, name="t_embedder", **kw)(t)[:, None, :]
    yemb = layers.LabelEmbedder(self.num_classes, d, name="y_embedder", **kw)(y)[:, None, :]
    c = nn.silu(temb + yemb)

    cos, sin = layers.rope_2d_table(gh, gw, self.head_dim)
    s, feat = self._trunk(s, c, cos, sin, return_block_tokens)
    s = layers.constrain_batch(nn.silu(temb + s).reshape(b * seq, d))

    pixels = patches.reshape(b * seq, p * p, ch)
    dct = jnp.asarray(nerf.dct_features(p))
    xe = nerf.PixelEmbedder(self.nerf_hidden_size, name="x_embedder", **kw)(pixels, dct)
    xe = layers.constrain_batch(xe)
    xe = self._decoder(xe, s)
    out = nerf.FinalLayer(ch, name="final_layer", **kw)(xe)  # (B*L, P, C)
    out = out.reshape(b, gh, gw, p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, ch)
    out = out.astype(jnp.float32)
    if return_block_tokens is None:
      return out
    return out, feat


@functools.cache
def _abstract_params_cached(arch: tuple, scan_blocks: bool):
  model = PixNerDiT(**dict(arch), scan_blocks=scan_blocks)
  p = model.patch_size
  x = jax.ShapeDtypeStruct((1, p, p, model.in_channels), jnp.float32)
  vec = jax.ShapeDtypeStruct((1,), jnp.float32)
  lab = jax.ShapeDtypeStruct((1,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, vec, lab)
  return nn.unbox(variables["params"])


def abstract_params(model: PixNerDiT) -> dict:
  """Unboxed parameter tree of `model` as `jax.ShapeDtypeStruct`s (no memory, no FLOPs)."""
  tree = _abstract_params_cached(tuple(sorted(model.arch_config().items())), model.scan_blocks)
  if model.param_dtype != jnp.float32:
    tree = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, model.param_dtype), tree)
  return tree


def count_params(params) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
