"""Our own PyTorch reference of the FlowSeg objective, written from the paper's equations (DESIGN.md).

Independent of flowseg_jax: NCHW tensors, torch.autograd.grad for grad Phi, float64 or float32 as given.
Used only by parity tests.
"""

from __future__ import annotations

import math

import torch

IGNORE = 255


def kronecker_centroids(n: int, dtype=torch.float64) -> torch.Tensor:
  """Eq 7-8: frac(k * (sqrt2, sqrt3, sqrt5)), per-channel min-max to [0, 1], then 2x - 1."""
  k = torch.arange(n, dtype=torch.float64)[:, None]
  basis = torch.tensor([math.sqrt(2.0), math.sqrt(3.0), math.sqrt(5.0)], dtype=torch.float64)
  c = torch.remainder(k * basis, 1.0)
  c = (c - c.min(0).values) / (c.max(0).values - c.min(0).values)
  return (2 * c - 1).to(dtype)


def _logits(d: torch.Tensor, tau: float, eps: float, transform: str) -> torch.Tensor:
  if transform in ("log", "norm_reduced"):  # norm_reduced: log potential, gradient shortened after
    return -torch.log(d + eps) / tau
  if transform == "sqrt":
    return -torch.sqrt(d + eps) / tau
  if transform == "linear":
    return -d / tau
  raise ValueError(transform)


def potential_grad(x1_hat, labels, centroids, tau, eps, transform, max_grad_norm=1.0):
  """grad_x Phi(x) for x1_hat (B, 3, H, W), labels (B, H, W) valid indices -> (B, 3, H, W), detached.

  norm_reduced: each pixel's 3-vector of the log potential's gradient, if longer than max_grad_norm,
  is rescaled to length max_grad_norm.
  """
  x = x1_hat.detach().clone().requires_grad_(True)
  d = ((x[:, None] - centroids[None, :, :, None, None]) ** 2).sum(2)  # (B, N, H, W)
  log_p = torch.log_softmax(_logits(d, tau, eps, transform), dim=1)
  phi = -log_p.gather(1, labels[:, None]).squeeze(1)
  (grad,) = torch.autograd.grad(phi.sum(), x)
  grad = grad.detach()
  if transform == "norm_reduced":
    length = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
    grad = torch.where(length > max_grad_norm, grad * (max_grad_norm / length), grad)
  return grad


def flowseg_loss(
  out,
  x0,
  labels,
  t,
  centroids,
  *,
  prediction="v",
  tau=1.0,
  eps=1e-6,
  transform="log",
  target="static",
  mask_ignored=True,
  t_eps=0.05,
  reshape=True,
  max_grad_norm=1.0,
  grad_fn=None,
):
  """Returns (loss, grad_phi, v_target, v_theta) with tensors in NCHW; `out` may require grad.

  grad_fn: another implementation of `potential_grad` (same arguments) to use instead; the benchmark's
  efficient peer (benchmarks/torch_peer.py) passes its closed form.
  """
  n = centroids.shape[0]
  ignored = labels == IGNORE
  if mask_ignored:
    valid = ~ignored
    lab = torch.where(ignored, torch.zeros_like(labels), labels)
  else:
    valid = torch.ones_like(ignored)
    lab = torch.where(ignored, torch.full_like(labels, n - 1), labels)
  x1 = centroids[lab].permute(0, 3, 1, 2)  # (B, 3, H, W)
  tb = t[:, None, None, None]
  x_t = (1 - tb) * x0 + tb * x1
  v = x1 - x0
  if prediction == "v":
    v_theta = out
    x1_hat = x_t + (1 - tb) * v_theta
  else:
    x1_hat = out
    v_theta = (x1_hat - x_t) / torch.clamp(1 - tb, min=t_eps)
  grad_phi = (grad_fn or potential_grad)(x1_hat, lab, centroids, tau, eps, transform, max_grad_norm)
  if not reshape:
    v_target = v
  elif target == "static":
    v_target = v - grad_phi
  else:
    v_target = v - tb * grad_phi
  v_target = v_target.detach()
  w = valid[:, None].to(out.dtype)
  count = valid.sum()
  sq = (w * (v_theta - v_target) ** 2).sum()
  loss = sq / (3 * count) if count > 0 else sq * 0
  return loss, grad_phi * w, v_target, v_theta
