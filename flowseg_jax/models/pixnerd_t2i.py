"""PixNerd's text-to-image network (official `pixnerd_t2i.PixNerDiT`) in flax.linen.

Forward pass (channels-last; B images of H x W x C, patch p, N = (H/p)(W/p) image tokens, T text
tokens of width Dt):
  t_embedder(t) = temb (B, 1, D);  c = SiLU(temb)               (no class label: c is time only)
  text (B, T, Dt) -> y_embedder (Linear Dt -> D, RMSNorm) + y_pos_embedding (T, D)   -> y (B, T, D)
  num_text_blocks x TextRefineBlock(y, c)    (adaLN; self-attention over text, qk-norm, no RoPE)
  patches (B, N, p*p*C) -> s_embedder -> s (B, N, D)
  num_encoder_blocks x EncoderBlock(s, y, c) (adaLN; image queries attend to [image; text] keys)
  s = SiLU(temb + s)                          one conditioning vector per patch (B*N, D)
  pixels (B*N, p*p, C) ++ position features (p*p, 64) -> x_embedder -> (B*N, p*p, hx)
  num_decoder_blocks x NerfBlock (generated per-patch MLP, only its first matrix normalised)
  final_layer (Linear hx -> C, no norm) -> folded back to (B, H, W, C), float32.

What differs from the class-to-image model (`pixnerd.py`), all read off the official code:
- Joint attention: the image tokens' queries attend to the concatenation of image keys/values
  (`qkv_x`, qk-RMSNorm, RoPE) and text keys/values (`kv_y`, the same k-RMSNorm, no RoPE). No text
  mask: padded text positions are attended like any other (the official model does so).
- RoPE positions are not resolution-normalised: x (column) positions are linspace(0, gh, gw) and
  y (row) positions linspace(0, gw, gh) (the official table swaps the extents; square grids give
  the integer-spaced grid 0..n with spacing n/(n-1)).
- The SwiGLU is the fused `w12` (D -> 2F, gate first) / `w3` (F -> D) layout, F = 4 D.
- Decoder position features: the real part of the same 2-D RoPE table for head dim 128 on the
  patch's pixel grid (extents p, p): 32 frequencies 10000^(-4m/128), [cos(x w_m), cos(y w_m)]
  interleaved, 64 features per pixel (instead of the class-to-image DCT basis).
- NerfBlock (models/nerf.py): only the first generated matrix (fc1) is L2-normalised over its input axis; fc2 is
  used as generated.
- Final layer: a bare Linear(hx -> C) (no RMSNorm), zero-initialised.

Parameter names mirror the official state dict (`blocks_{i}`, `text_refine_blocks_{i}` when
unscanned; `encoder_blocks`, `decoder_blocks`, `text_refine_blocks` stacked along a leading
"layers" axis when scanned). The patch vector inside a token is ordered (row, column, channel);
`flowseg_jax.convert.pixnerd_t2i` permutes the official channel-major weight accordingly.
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

MLP_RATIO = 4
# (unscanned name prefix, scanned name, index of the first block) of the block groups; the
# decoder blocks continue the encoder's numbering, as in the official state dict.
_TEXT_BLOCKS = ("text_refine_blocks", "text_refine_blocks", 0)
_ENCODER_BLOCKS = ("blocks", "encoder_blocks", 0)
# Decoder position features: the real part of a 2-D RoPE table of this head dim (64 features).
DECODER_POS_DIM = 128
DECODER_POS_FEATURES = DECODER_POS_DIM // 2

ARCH_FIELDS = (
  "patch_size",
  "hidden_size",
  "num_heads",
  "num_encoder_blocks",
  "num_decoder_blocks",
  "num_text_blocks",
  "decoder_hidden_size",
  "decoder_mlp_ratio",
  "text_dim",
  "text_length",
  "in_channels",
)
# `released`: configs_t2i/{pretraining_res256,pretraining_res512,sft_res512}.yaml (the weights
# of the released PixNerd-XXL/16 T2I model); tiny: tests and CPU demos.
VARIANTS: dict[str, dict[str, int]] = {
  "released": dict(
    patch_size=16,
    hidden_size=1536,
    num_heads=24,
    num_encoder_blocks=16,
    num_decoder_blocks=2,
    num_text_blocks=4,
    decoder_hidden_size=64,
    decoder_mlp_ratio=2,
    text_dim=2048,
    text_length=128,
  ),
  "tiny": dict(
    patch_size=4,
    hidden_size=64,
    num_heads=2,
    num_encoder_blocks=2,
    num_decoder_blocks=2,
    num_text_blocks=1,
    decoder_hidden_size=16,
    decoder_mlp_ratio=2,
    text_dim=32,
    text_length=8,
  ),
}


def make_model(variant: str, **overrides: Any) -> PixNerdT2I:
  """Builds a `PixNerdT2I` from a named variant (see `VARIANTS`), with field overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown PixNerd-T2I variant {variant!r}; known: {sorted(VARIANTS)}.")
  return PixNerdT2I(**{**VARIANTS[variant], **overrides})


def image_rope_table(grid_h: int, grid_w: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """The T2I trunk's RoPE: columns at linspace(0, grid_h, grid_w), rows at linspace(0, grid_w,
  grid_h) (the official extents, swapped as they are there)."""
  return layers.rope_2d_table(grid_h, grid_w, head_dim, y_extent=grid_w, x_extent=grid_h)


def decoder_position_features(patch_size: int) -> np.ndarray:
  """(p*p, 64) float32: cos of the RoPE angles of each pixel of a patch (head dim 128, extents p).

  Pixel n = ki * p + kj sits at (y, x) = (linspace(0, p, p)[ki], linspace(0, p, p)[kj]); feature
  2m is cos(x w_m), feature 2m + 1 is cos(y w_m), w_m = 10000^(-4m/128).
  """
  return image_rope_table(patch_size, patch_size, DECODER_POS_DIM)[0]


class FusedSwiGLU(nn.Module):
  """w3(silu(a) * b) with (a, b) = split(w12 x): the official T2I layout, all without bias."""

  hidden_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., D) -> (..., D)."""
    dim, hidden = x.shape[-1], self.hidden_features
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    gate, lin = jnp.split(dense(2 * hidden, dim, ("embed", "mlp"), name="w12", **kw)(x), 2, -1)
    return dense(dim, hidden, ("mlp", "embed"), name="w3", **kw)(nn.silu(gate) * lin)


class JointAttention(nn.Module):
  """Image queries over image keys (qk-norm + RoPE) and text keys (k-norm only), one softmax."""

  num_heads: int
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, N, D) image tokens, y (B, T, D) text tokens, cos/sin (N, hd/2) -> (B, N, D)."""
    b, n, dim = x.shape
    hd = dim // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = dense(3 * dim, dim, ("embed", "mlp"), use_bias=False, name="qkv_x", **kw)(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
    kv_y = dense(2 * dim, dim, ("embed", "mlp"), use_bias=False, name="kv_y", **kw)(y)
    kv_y = kv_y.reshape(b, y.shape[1], 2, self.num_heads, hd)
    q_norm = RMSNorm(param_dtype=self.param_dtype, name="q_norm")
    k_norm = RMSNorm(param_dtype=self.param_dtype, name="k_norm")
    q = layers.apply_rope(q_norm(qkv[:, :, 0]), cos, sin)
    kx = layers.apply_rope(k_norm(qkv[:, :, 1]), cos, sin)
    k = jnp.concatenate([kx, k_norm(kv_y[:, :, 0])], axis=1)
    v = jnp.concatenate([qkv[:, :, 2], kv_y[:, :, 1]], axis=1)
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    return dense(dim, dim, ("mlp", "embed"), name="proj", **kw)(out.reshape(b, n, dim))


class ModulatedBlock(nn.Module):
  """adaLN block: x + g1 attn(mod(norm1 x)), then x + g2 SwiGLU(mod(norm2 x)).

  With `joint` the attention is `JointAttention` over (x, text) with RoPE (an encoder block),
  otherwise self-attention without RoPE (a text-refine block).
  """

  num_heads: int
  joint: bool
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, y=None, cos=None, sin=None):
    """x (B, L, D), c (B, 1, D); y (B, T, D) and cos/sin (L, hd/2) when joint -> (B, L, D)."""
    dim = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mod = dense(6 * dim, dim, ("embed", "mlp"), name="adaLN_modulation", **kw)(c)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = RMSNorm(name="norm1", **kw)(x) * (1 + scale_msa) + shift_msa
    if self.joint:
      h = JointAttention(self.num_heads, self.attention_impl, name="attn", **kw)(h, y, cos, sin)
    else:
      h = layers.Attention(self.num_heads, self.attention_impl, name="attn", **kw)(h)
    x = x + gate_msa * h
    h = RMSNorm(name="norm2", **kw)(x) * (1 + scale_mlp) + shift_mlp
    return x + gate_mlp * FusedSwiGLU(MLP_RATIO * dim, name="mlp", **kw)(h)


class PixNerdT2I(nn.Module):
  """PixNerd text-conditioned pixel neural-field DiT (velocity network).

  Attributes:
    patch_size: p; H and W must be multiples of it.
    hidden_size: trunk width D.
    num_heads: attention heads; D / heads must be a multiple of 4 (2-D RoPE).
    num_encoder_blocks: joint-attention trunk blocks.
    num_decoder_blocks: NeRF decoder blocks.
    num_text_blocks: text-refine blocks.
    decoder_hidden_size: NeRF pixel feature width hx.
    decoder_mlp_ratio: hidden width ratio of the generated per-patch MLPs (2 officially).
    text_dim: text feature width Dt (2048: Qwen3-1.7B's hidden size).
    text_length: text tokens T; the learned text position table has T rows and text inputs must
      have exactly T tokens (128 officially).
    in_channels: image channels C.
    dtype: compute dtype; the output is always float32.
    param_dtype: parameter dtype.
    attention_impl: `jax.nn.dot_product_attention` implementation (None, 'xla', 'cudnn').
    remat_policy: 'none', 'full' or a `jax.checkpoint_policies` name, applied per block.
    scan_blocks: run identical blocks with `nn.scan` (stacked parameters, fast compilation).
  """

  patch_size: int
  hidden_size: int
  num_heads: int
  num_encoder_blocks: int
  num_decoder_blocks: int
  num_text_blocks: int
  decoder_hidden_size: int
  text_dim: int
  text_length: int
  decoder_mlp_ratio: int = 2
  in_channels: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  remat_policy: str = "none"
  scan_blocks: bool = False

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def arch_config(self) -> dict[str, int]:
    """The architecture fields (those a checkpoint's shapes determine)."""
    return {k: getattr(self, k) for k in ARCH_FIELDS}

  def check_config(self) -> None:
    """Raises ValueError when the fields are inconsistent."""
    if self.hidden_size % self.num_heads or self.head_dim % 4:
      raise ValueError(
        f"PixNerdT2I: hidden_size={self.hidden_size} / num_heads={self.num_heads} must give an "
        "integer head dim that is a multiple of 4 (2-D RoPE)."
      )
    if self.num_encoder_blocks < 1 or self.num_decoder_blocks < 0 or self.num_text_blocks < 0:
      raise ValueError(
        "PixNerdT2I: need num_encoder_blocks >= 1 and non-negative decoder/text block counts, got "
        f"{self.num_encoder_blocks}, {self.num_decoder_blocks}, {self.num_text_blocks}."
      )
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise ValueError(
        f"PixNerdT2I.attention_impl={self.attention_impl!r}; expected None, 'xla' or 'cudnn'."
      )
    if self.remat_policy != "none":
      nerf.checkpoint_policy(self.remat_policy)

  def _check_inputs(self, x, t, text) -> None:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"PixNerdT2I: x must be (B, H, W, {self.in_channels}), got {x.shape}.")
    b, h, w, _ = x.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(
        f"PixNerdT2I: image size {h}x{w} is not divisible by patch_size={self.patch_size}."
      )
    if t.shape != (b,):
      raise ValueError(f"PixNerdT2I: t must be ({b},), got {t.shape}.")
    want = (b, self.text_length, self.text_dim)
    if text.shape != want:
      raise ValueError(
        f"PixNerdT2I: text must be (B, text_length, text_dim) = {want}, got {text.shape} (pad or "
        "cut the text encoder's output to text_length tokens and text_dim features)."
      )
    if not jnp.issubdtype(text.dtype, jnp.floating):
      raise ValueError(f"PixNerdT2I: text must be float features, got dtype {text.dtype}.")

  def _blocks(
    self, cls, names: tuple[str, str, int], count: int, x, broadcast: tuple, unroll=1, **kw
  ):
    """Applies `count` blocks `cls(**kw)(x, *broadcast)`, unrolled or with nn.scan.

    `names` = (unscanned prefix, scanned name, index of the first block): block i is called
    f"{prefix}_{first + i}" unscanned (the official numbering) and all are stacked under the
    scanned name otherwise. `unroll`: blocks per iteration of the scanned loop.
    """
    prefix, scan_name, first = names
    if self.remat_policy != "none":
      policy = nerf.checkpoint_policy(self.remat_policy)
      cls = nn.remat(cls, policy=policy, prevent_cse=not self.scan_blocks)
    kw = dict(kw, dtype=self.dtype, param_dtype=self.param_dtype)
    if not self.scan_blocks:
      for i in range(count):
        x = cls(name=f"{prefix}_{first + i}", **kw)(x, *broadcast)
      return x
    if count == 0:
      return x

    def body(block, x, _, *args):
      return block(x, *args), None

    scan = nn.scan(
      body,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(0,) + (nn.broadcast,) * len(broadcast),
      length=count,
      unroll=max(1, min(unroll, count)),
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = scan(cls(name=scan_name, **kw), x, jnp.arange(count), *broadcast)
    return x

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, text: jax.Array) -> jax.Array:
    """Predicts the velocity at (x_t, t) for the text condition.

    Args:
      x: (B, H, W, C) state x_t; H, W multiples of patch_size.
      t: (B,) float times in [0, 1].
      text: (B, text_length, text_dim) float text-encoder features (Qwen3 last hidden state,
        padded/cut to text_dim features).

    Returns:
      (B, H, W, C) float32.
    """
    self.check_config()
    t, text = jnp.asarray(t), jnp.asarray(text)
    self._check_inputs(x, t, text)
    b, h, w, ch = x.shape
    p, d = self.patch_size, self.hidden_size
    gh, gw = h // p, w // p
    seq = gh * gw
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    heads = dict(num_heads=self.num_heads, attention_impl=self.attention_impl)

    temb = layers.TimestepEmbedder(d, name="t_embedder", **kw)(t)[:, None, :]
    c = nn.silu(temb)

    y = _TextEmbedder(d, name="y_embedder", **kw)(text)
    y = y + self.param(
      "y_pos_embedding",
      layers.partitioned(nn.initializers.normal(1.0), (None, None, "embed")),
      (1, self.text_length, d),
      self.param_dtype,
    ).astype(y.dtype)
    y = self._blocks(ModulatedBlock, _TEXT_BLOCKS, self.num_text_blocks, y, (c,),
                     joint=False, **heads)  # fmt: skip

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
    cos, sin = image_rope_table(gh, gw, self.head_dim)
    rope = (jnp.asarray(cos), jnp.asarray(sin))
    s = self._blocks(ModulatedBlock, _ENCODER_BLOCKS, self.num_encoder_blocks, s, (c, y) + rope,
                     joint=True, **heads)  # fmt: skip
    s = nn.silu(temb + s).reshape(b * seq, d)

    pixels = patches.reshape(b * seq, p * p, ch)
    pos = jnp.asarray(decoder_position_features(p))
    hx = self.decoder_hidden_size
    xe = nerf.PixelEmbedder(hx, name="x_embedder", **kw)(pixels, pos)
    decoder_names = ("blocks", "decoder_blocks", self.num_encoder_blocks)
    # The decoder's loop is unrolled without remat, as in the class-to-image model (pixnerd.py).
    unroll = self.num_decoder_blocks if self.remat_policy == "none" else 1
    xe = self._blocks(nerf.NerfBlock, decoder_names, self.num_decoder_blocks, xe, (s,), unroll=unroll,
                      nerf_hidden_size=hx, mlp_ratio=self.decoder_mlp_ratio,
                      normalize_fc2=False)  # fmt: skip
    zeros = nn.initializers.zeros
    out = dense(ch, hx, (None, None), kernel_init=zeros, bias_init=zeros, name="final_layer", **kw)(
      xe
    )  # (B*N, P, C)
    out = out.reshape(b, gh, gw, p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, ch)
    return out.astype(jnp.float32)


class _TextEmbedder(nn.Module):
  """Linear(Dt -> D) then RMSNorm (official `Embed(..., norm_layer=RMSNorm)`)."""

  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array) -> jax.Array:
    """(B, T, Dt) -> (B, T, D)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = dense(self.hidden_size, text.shape[-1], (None, "embed"), name="proj", **kw)(text)
    return RMSNorm(name="norm", **kw)(y)


@functools.cache
def _abstract_params_cached(arch: tuple, scan_blocks: bool):
  model = PixNerdT2I(**dict(arch), scan_blocks=scan_blocks)
  p = model.patch_size
  x = jax.ShapeDtypeStruct((1, p, p, model.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  text = jax.ShapeDtypeStruct((1, model.text_length, model.text_dim), jnp.float32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, text)["params"])


def abstract_params(model: PixNerdT2I) -> dict:
  """Unboxed parameter tree of `model` as `jax.ShapeDtypeStruct`s (no memory, no FLOPs)."""
  tree = _abstract_params_cached(tuple(sorted(model.arch_config().items())), model.scan_blocks)
  if model.param_dtype != jnp.float32:
    tree = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, model.param_dtype), tree)
  return tree
