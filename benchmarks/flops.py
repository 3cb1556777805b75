"""FLOPs: the analytic PixNerDiT count, the exact count of a traced program, and XLA's count.

`pixnerd_forward_flops` counts the matrix-multiply FLOPs of one PixNerDiT forward pass from
the architecture (2 FLOPs per multiply-add; norms, activations, RoPE, softmax and the FlowSeg
potential are not counted). For B images of H x W, patch p, L = HW / p^2 tokens, P = p^2 pixels
per patch, width D, F = int(2 int(4D) / 3) SwiGLU width, NeRF widths hx and hr = hx * ratio:

  patch embedding          2 B L (3 P) D
  timestep embedding       2 B (256 D + D^2)
  per trunk block          2 B D (6 D)                         adaLN (one vector per image)
                           2 B L D (3 D) + 2 B L D^2           qkv and output projections
                           4 B L^2 D                           QK^T and AV
                           6 B L D F                           SwiGLU (three projections)
  pixel embedding          2 B L P (3 + 64) hx
  per NeRF block           2 B L D (2 hx hr)                   weight generator
                           4 B L P hx hr                       the two generated per-patch MLPs
  final layer              2 B L P hx 3

The pixel embedding is counted as the official model computes it (a Linear over the pixel values
and the position features of every pixel). Ours (`nerf.PixelEmbedder`) multiplies the position
rows once per position in the patch, 2 P 64 hx, and the 3 value rows elementwise: 'executed'
is the total with that difference, what `jaxpr_matmul_flops` counts of our forward.

A train step counts 3x the forward (the backward computes two products per forward product), the
usual "model FLOPs" convention; MFU = model FLOPs per second / the device's peak (`device.py`), so
recomputation (remat) costs time but is not credited. `jaxpr_matmul_flops` counts the dot products
of a traced function exactly (scans multiplied by their length) and cross-checks the formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax


def swiglu_width(hidden: int) -> int:
  return int(2 * int(4.0 * hidden) / 3)


def pixnerd_forward_flops(arch: dict[str, int], batch: int, height: int, width: int) -> dict:
  """Matmul FLOPs of one PixNerDiT forward pass, by part (see the module docstring).

  Args:
    arch: architecture fields (`PixNerDiT.arch_config()` or `pixnerd.VARIANTS[name]`).
    batch: images B.
    height: image height H (a multiple of the patch).
    width: image width W.

  Returns:
    {part: FLOPs} for 'embed', 'trunk', 'attention' (QK^T and AV, part of the trunk), 'decoder',
    'total' (the model FLOPs) and 'executed' (the matmul FLOPs our implementation runs); Python
    ints.
  """
  p, d = arch["patch_size"], arch["hidden_size"]
  if height % p or width % p:
    raise ValueError(f"image {height}x{width} is not divisible by patch_size={p}")
  c = arch.get("in_channels", 3)
  n_cond = arch["num_cond_blocks"]
  n_nerf = arch["num_blocks"] - n_cond
  hx = arch["nerf_hidden_size"]
  hr = hx * arch["nerf_mlp_ratio"]
  b, L, P = batch, (height // p) * (width // p), p * p
  f = swiglu_width(d)
  embed = 2 * b * L * (c * P) * d + 2 * b * (256 * d + d * d)
  attention = n_cond * 4 * b * L * L * d
  per_block = 2 * b * d * 6 * d + 2 * b * L * d * 3 * d + 2 * b * L * d * d + 6 * b * L * d * f
  trunk = n_cond * per_block + attention
  pixel_embedding = 2 * b * L * P * (c + 64) * hx
  decoder = (
    pixel_embedding
    + n_nerf * (2 * b * L * d * 2 * hx * hr + 4 * b * L * P * hx * hr)
    + 2 * b * L * P * hx * c
  )
  return {
    "embed": embed,
    "trunk": trunk,
    "attention": attention,
    "decoder": decoder,
    "total": embed + trunk + decoder,
    "executed": embed + trunk + decoder - pixel_embedding + 2 * P * 64 * hx,
  }


def train_step_flops(arch: dict[str, int], batch: int, height: int, width: int) -> int:
  """Model FLOPs of one training step: 3x the forward's matmul FLOPs."""
  return 3 * pixnerd_forward_flops(arch, batch, height, width)["total"]


def _sub_jaxprs(value):
  """Jaxprs held in an equation parameter (a Jaxpr, a ClosedJaxpr, or tuples of them)."""
  if hasattr(value, "eqns"):
    return [value]
  if hasattr(value, "jaxpr") and hasattr(value, "consts"):
    return [value.jaxpr]
  if isinstance(value, tuple | list):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _count_jaxpr(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      contract = math.prod(lhs[i] for i in lhs_contract)
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * contract
    elif name == "while":
      if any(_count_jaxpr(j) for j in _sub_jaxprs(eqn.params["body_jaxpr"])):
        raise ValueError("jaxpr_matmul_flops: a while loop with matmuls has no static trip count")
    elif name == "cond":
      total += max(_count_jaxpr(j) for j in _sub_jaxprs(eqn.params["branches"]))
    else:
      inner = sum(_count_jaxpr(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def jaxpr_matmul_flops(fn: Callable, *args, **kwargs) -> int:
  """Exact dot_general FLOPs (2 per multiply-add) of `fn(*args)`, looking into jit, scan, remat, cond.

  Args are arrays or `jax.ShapeDtypeStruct`s; nothing runs. Recomputation inside remat'ed
  backward passes is counted (these are executed FLOPs). Custom calls (cuDNN attention) are not.
  """
  return _count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def xla_flops(compiled) -> float | None:
  """FLOPs XLA's cost model assigns to a compiled program (dots plus elementwise), if available."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])
