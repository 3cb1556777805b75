"""Qwen3 decoder (the text encoder of PixNerd-T2I) in flax.linen: last hidden state only.

Computes what `transformers.Qwen3Model(input_ids, attention_mask).last_hidden_state` computes:
  h = embed_tokens[input_ids]
  num_layers x: h += o_proj(attn(q_norm(q_proj x), k_norm(k_proj x), v_proj x)), x = RMSNorm(h)
                h += down_proj(silu(gate_proj x) * up_proj x),                   x = RMSNorm(h)
  out = RMSNorm(h)                       (the final norm is applied at every position)
- Grouped-query attention: query head n reads key/value head n // (heads / kv_heads).
- q/k RMSNorm over each head's channels (one scale shared by the heads), before RoPE.
- RoPE "rotate half" (channel i pairs with i + head_dim/2), theta from the config, positions
  0..L-1 whatever the padding (as Hugging Face does without explicit position_ids), computed in
  float32.
- Mask: causal AND attention_mask on the keys. A query with no allowed key (a left-padding
  position) gets a zero attention output, as PyTorch's SDPA (the Hugging Face default) gives; the
  valid positions are unaffected by padding either way. PixNerd pads on the right.
Sliding-window attention and RoPE scaling are not used by Qwen3-1.7B and are refused by
`Qwen3Config.from_hf`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax.models.layers import RMSNorm

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  """The architecture fields of a Hugging Face Qwen3 `config.json`."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  attention_bias: bool = False

  @classmethod
  def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json") -> Qwen3Config:
    """Reads a Hugging Face config dict; raises ValueError for options this port lacks."""
    if hf.get("model_type", "qwen3") != "qwen3":
      raise ValueError(f"{source}: model_type={hf.get('model_type')!r}, expected 'qwen3'.")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' is supported.")
    if hf.get("use_sliding_window", False):
      raise ValueError(f"{source}: use_sliding_window=true is not supported.")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
      raise ValueError(f"{source}: RoPE type {rope_type!r} is not supported (only 'default').")
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
      raise ValueError(f"{source}: no rope_theta (nor rope_parameters.rope_theta).")
    missing = [
      k
      for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
      )
      if k not in hf
    ]
    if missing:
      raise ValueError(f"{source}: missing fields {missing}.")
    heads = int(hf["num_attention_heads"])
    return cls(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_hidden_layers=int(hf["num_hidden_layers"]),
      num_attention_heads=heads,
      num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=float(theta),
      attention_bias=bool(hf.get("attention_bias", False)),
    )


def rope_half_table(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (length, head_dim) float32: angle p * theta^(-2i/hd), repeated twice."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
  angles = np.concatenate([angles, angles], axis=-1)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, L, heads, hd) * cos + rotate_half(x) * sin, with rotate_half(a, b) = (-b, a)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[None, :, None, :].astype(x.dtype)
  sin = sin[None, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def _dense(features: int, name: str, use_bias: bool, dtype, param_dtype) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class Qwen3Attention(nn.Module):
  config: Qwen3Config
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, cos, sin):
    """x (B, L, D), mask (B, 1, L, L) bool -> (B, L, D)."""
    cfg = self.config
    b, length, _ = x.shape
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    kw = dict(use_bias=cfg.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = dict(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype)
    q = _dense(nh * hd, "q_proj", **kw)(x).reshape(b, length, nh, hd)
    k = _dense(nkv * hd, "k_proj", **kw)(x).reshape(b, length, nkv, hd)
    v = _dense(nkv * hd, "v_proj", **kw)(x).reshape(b, length, nkv, hd)
    q = apply_rope_half(RMSNorm(name="q_norm", **norm)(q), cos, sin)
    k = apply_rope_half(RMSNorm(name="k_norm", **norm)(k), cos, sin)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
    # Queries with no allowed key: zero output (PyTorch SDPA), not a uniform average.
    out = out * jnp.any(mask, axis=-1)[:, 0, :, None, None].astype(out.dtype)
    return _dense(cfg.hidden_size, "o_proj", **kw)(out.reshape(b, length, nh * hd))


class Qwen3MLP(nn.Module):
  """down_proj(silu(gate_proj x) * up_proj x), all without bias."""

  config: Qwen3Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = _dense(cfg.intermediate_size, "gate_proj", False, **kw)(x)
    up = _dense(cfg.intermediate_size, "up_proj", False, **kw)(x)
    return _dense(cfg.hidden_size, "down_proj", False, **kw)(nn.silu(gate) * up)


class Qwen3DecoderLayer(nn.Module):
  config: Qwen3Config
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, mask, cos, sin):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = dict(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype)
    x = RMSNorm(name="input_layernorm", **norm)(h)
    h = h + Qwen3Attention(cfg, self.attention_impl, name="self_attn", **kw)(x, mask, cos, sin)
    x = RMSNorm(name="post_attention_layernorm", **norm)(h)
    return h + Qwen3MLP(cfg, name="mlp", **kw)(x)


class Qwen3Model(nn.Module):
  """Qwen3 decoder stack; `__call__` returns the last hidden state (B, L, hidden).

  Attributes:
    config: the architecture.
    dtype: compute dtype (the returned hidden state has this dtype).
    param_dtype: parameter dtype.
    attention_impl: `jax.nn.dot_product_attention` implementation (None, 'xla', 'cudnn').
  """

  config: Qwen3Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Args:
      input_ids: (B, L) int token ids in [0, vocab_size).
      attention_mask: (B, L) 1 for real tokens, 0 for padding (default: all 1).

    Returns:
      (B, L, hidden_size) in `dtype`: the final-norm output at every position, padded ones
      included (as Hugging Face returns them).
    """
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(
        f"Qwen3Model: input_ids must be (B, L) integers, got {input_ids.shape} {input_ids.dtype}."
      )
    b, length = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, length), jnp.bool_)
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != (b, length):
      raise ValueError(
        f"Qwen3Model: attention_mask must be {(b, length)} like input_ids, got "
        f"{attention_mask.shape}."
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens", **kw)(input_ids)
    causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
    mask = causal[None, None] & attention_mask.astype(jnp.bool_)[:, None, None, :]
    cos, sin = (jnp.asarray(a) for a in rope_half_table(length, cfg.head_dim, cfg.rope_theta))
    for i in range(cfg.num_hidden_layers):
      h = Qwen3DecoderLayer(cfg, self.attention_impl, name=f"layers_{i}", **kw)(h, mask, cos, sin)
    return RMSNorm(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype, name="norm")(h)
