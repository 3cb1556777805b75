"""PyTorch-convention bicubic resize in JAX, for DINOv2's position embeddings.

`jax.image.resize(method="bicubic")` uses Keys' A = -0.5 kernel and antialiases when downsampling,
so it does not match PyTorch; `bicubic_resize_weights` / `resize_bicubic_torch` reproduce
`torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` (with or without
`antialias`) as separable matrix products whose weights are computed on the host in float32
arithmetic, as PyTorch's CPU kernel does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's bicubic convolution constant (Keys' kernel) without antialiasing, and the one its
# antialiased path uses (PIL's).
TORCH_CUBIC_A = -0.75
TORCH_CUBIC_AA_A = -0.5


def _cubic_near(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic kernel for |x| <= 1 (float32 in, float32 out)."""
  return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic kernel for 1 < |x| < 2."""
  return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def _torch_source_scale(in_size: int, out_size: int, scale_factor: float | None) -> np.float32:
  """Input-per-output step PyTorch uses (align_corners=False), as a float32."""
  if scale_factor is not None and scale_factor > 0:
    return np.float32(1.0 / scale_factor)
  return np.float32(in_size) / np.float32(out_size)


def bicubic_resize_weights(
  in_size: int,
  out_size: int,
  *,
  scale_factor: float | None = None,
  antialias: bool = False,
) -> np.ndarray:
  """Matrix W (out_size, in_size), float32, with y = W @ x along one axis, as PyTorch's bicubic.

  Reproduces `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` on one axis.
  Without antialias: source coordinate s = r * (i + 0.5) - 0.5 with r = 1 / scale_factor when a
  scale factor is given, else in_size / out_size; taps floor(s) - 1 ... floor(s) + 2 clamped to
  the border, weighted by Keys' kernel with A = -0.75. With antialias: PyTorch's separable
  antialiasing filter (Keys' kernel with A = -0.5 stretched by r when downsampling, support
  2 * max(r, 1), weights normalised to sum 1). Arithmetic is float32, like PyTorch's CPU kernel.

  Args:
    in_size: input length along the axis (>= 1).
    out_size: output length along the axis (>= 1).
    scale_factor: the `scale_factor` passed to torch (its reciprocal sets the sampling step), or
      None when torch was given an output size.
    antialias: torch's `antialias` flag.

  Returns:
    (out_size, in_size) float32 numpy array.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"bicubic resize needs positive sizes, got in={in_size}, out={out_size}.")
  f32 = np.float32
  scale = _torch_source_scale(in_size, out_size, scale_factor)
  out_idx = np.arange(out_size, dtype=f32)
  weights = np.zeros((out_size, in_size), f32)
  rows = np.arange(out_size)
  if not antialias:
    src = scale * (out_idx + f32(0.5)) - f32(0.5)
    base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - base.astype(f32), f32(0.0), f32(1.0))
    a = TORCH_CUBIC_A
    coeffs = (
      _cubic_far(t + f32(1.0), a),
      _cubic_near(t, a),
      _cubic_near(f32(1.0) - t, a),
      _cubic_far(f32(2.0) - t, a),
    )
    for k, c in enumerate(coeffs):
      np.add.at(weights, (rows, np.clip(base - 1 + k, 0, in_size - 1)), c.astype(f32))
    return weights
  support = f32(2.0) * scale if scale >= 1.0 else f32(2.0)
  inv_scale = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
  center = scale * (out_idx + f32(0.5))
  lo = np.maximum((center - support + f32(0.5)).astype(np.int64), 0)
  hi = np.minimum((center + support + f32(0.5)).astype(np.int64), in_size)
  width = int((hi - lo).max())
  taps = lo[:, None] + np.arange(width)[None, :]
  valid = taps < hi[:, None]
  x = np.abs((taps.astype(f32) - center[:, None] + f32(0.5)) * inv_scale)
  a = TORCH_CUBIC_AA_A
  w = np.where(x < 1.0, _cubic_near(x, a), np.where(x < 2.0, _cubic_far(x, a), f32(0.0)))
  w = np.where(valid, w, f32(0.0)).astype(f32)
  total = np.zeros(out_size, f32)
  for k in range(width):  # sequential float32 accumulation, as torch
    total = total + w[:, k]
  w = np.where(total[:, None] != 0, w / np.where(total == 0, f32(1.0), total)[:, None], w)
  np.add.at(weights, (np.repeat(rows, width), np.clip(taps, 0, in_size - 1).ravel()), w.ravel())
  return weights


def torch_interpolate_size(in_hw: Sequence[int], scale_factor: Sequence[float]) -> tuple[int, int]:
  """Output (h, w) of `F.interpolate(..., scale_factor=...)`: floor(in * scale) in float64."""
  return tuple(int(math.floor(float(n) * float(s))) for n, s in zip(in_hw, scale_factor))


def resize_bicubic_torch(
  x: jax.Array,
  size: Sequence[int] | None = None,
  *,
  scale_factor: Sequence[float] | None = None,
  antialias: bool = False,
) -> jax.Array:
  """Channels-last bicubic resize matching `F.interpolate(mode="bicubic", align_corners=False)`.

  Exactly one of `size` and `scale_factor` must be given, as for torch. The two separable passes
  are matrix products at HIGHEST precision in float32 (the result is cast back to x.dtype).

  Args:
    x: (..., H, W, C) array (any leading batch axes).
    size: output (h, w).
    scale_factor: (sh, sw) torch scale factors; the output size is floor(H * sh), floor(W * sw) and
      the sampling step 1 / s (this differs from passing the rounded size).
    antialias: torch's `antialias` flag.

  Returns:
    (..., h, w, C) array of x.dtype.
  """
  if x.ndim < 3:
    raise ValueError(f"resize_bicubic_torch expects (..., H, W, C), got shape {x.shape}.")
  if (size is None) == (scale_factor is None):
    raise ValueError("resize_bicubic_torch: give exactly one of `size` and `scale_factor`.")
  in_h, in_w = x.shape[-3], x.shape[-2]
  if scale_factor is not None:
    if len(scale_factor) != 2 or min(scale_factor) <= 0:
      raise ValueError(f"scale_factor must be two positive floats, got {scale_factor!r}.")
    out_h, out_w = torch_interpolate_size((in_h, in_w), scale_factor)
    s_h, s_w = float(scale_factor[0]), float(scale_factor[1])
  else:
    if len(size) != 2:
      raise ValueError(f"size must be (h, w), got {size!r}.")
    (out_h, out_w), s_h, s_w = (int(size[0]), int(size[1])), None, None
  if out_h < 1 or out_w < 1:
    raise ValueError(f"resize to ({out_h}, {out_w}) from ({in_h}, {in_w}) is empty.")
  w_h = bicubic_resize_weights(in_h, out_h, scale_factor=s_h, antialias=antialias)
  w_w = bicubic_resize_weights(in_w, out_w, scale_factor=s_w, antialias=antialias)
  hi = jax.lax.Precision.HIGHEST
  y = x.astype(jnp.float32)
  y = jnp.einsum("oh,...hwc->...owc", jnp.asarray(w_h), y, precision=hi)
  y = jnp.einsum("pw,...owc->...opc", jnp.asarray(w_w), y, precision=hi)
  return y.astype(x.dtype)
