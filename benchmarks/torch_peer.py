"""The PyTorch side of the train-step comparison: an eager step (network + loss + AdamW + clipping + EMA)
around our reference PixNerDiT or the official one, and an efficient FlowSeg loss for it.

The parity reference of the objective (`tests/torch_reference/flowseg.py`) follows the paper's
equations literally: a (B, N, 3, H, W) difference array and autograd through a log-softmax. At S/16
128² b4 with 150 classes its forward + backward costs a quarter of the official step, which made the
comparison measure that loss rather than the network. `flowseg_loss` here computes the same numbers
(tests/torch_peer_test.py checks it against the reference) the way a PyTorch user would write it for
speed: no autograd for ∇Φ (closed form, and no exp or log for the default log potential at τ = 1),
a few whole-tensor ops per block of pixels sized for the cache, no Python work per pixel or class.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import numpy as np
import torch

from benchmarks import hardware
from flowseg_jax import train_step
from tests.torch_reference import flowseg as reference

LOSSES = ("flowseg", "reference", "mse")
# Pixels per block of the potential's (pixels x classes) work: the (3, 1024, 150) float32 differences
# take 1.8 MB, inside a core's L2 (2 MiB on the benchmark VM); 2048 ran 2.4x slower per pixel there.
# Like potential.resolve_pixel_chunk on the JAX side: scheduling only.
PIXEL_BLOCK = 1024


def _grad_phi_block(x, lab, centroids, *, tau: float, eps: float, transform: str):
  """∇Φ for one block of pixels: x (P, 3), lab (P,) valid indices, centroids (N, 3) -> (P, 3).

  ∇Φ = (2/τ) Σ_k (y_k - p_k) g_k (x - μ_k), with g_k = -T'(d_k) (log: 1/(d+ε), sqrt: 1/(2√(d+ε)),
  linear: 1) and p = softmax(T(d)/τ). The label's column is taken out of the (P, N) arrays and
  computed from its own (P, 3) difference, so 1 - p_y = Σ_{k≠y} p_k has no cancellation when the
  pixel sits on its centroid. For log with τ = 1, p_k ∝ 1/(d_k+ε) needs no exp or log at all.
  """
  # Direct differences (3, P, N), kept for the gradient: |x|² - 2x·μ + |μ|² would lose the small
  # distances in float32, and x Σ q_k - Σ q_k μ_k would cancel near another class's centroid.
  diff = x.T[:, :, None] - centroids.T[:, None, :]
  d = diff.square().sum(0)
  diff_y = x - centroids[lab]
  d_y = diff_y.square().sum(1, keepdim=True)
  if transform in ("log", "norm_reduced") and tau == 1.0:
    e = d.add_(eps).reciprocal_()  # unnormalised p_k; g_k is the same 1/(d+ε)
    e_y = g_y = (d_y + eps).reciprocal()
    e.scatter_(1, lab[:, None], 0.0)
    s_other = e.sum(1, keepdim=True)
    q = e.square_()  # e_k g_k
  else:
    if transform in ("log", "norm_reduced"):
      logits, g, g_y = -torch.log(d + eps), (d + eps).reciprocal(), (d_y + eps).reciprocal()
      logits_y = -torch.log(d_y + eps)
    elif transform == "sqrt":
      root, root_y = (d + eps).sqrt(), (d_y + eps).sqrt()
      logits, g, g_y, logits_y = -root, 0.5 / root, 0.5 / root_y, -root_y
    elif transform == "linear":
      logits, g, g_y, logits_y = -d, torch.ones_like(d), torch.ones_like(d_y), -d_y
    else:
      raise ValueError(f"transform must be log, sqrt, linear or norm_reduced, got {transform!r}")
    top = torch.maximum(logits.amax(1, keepdim=True), logits_y) / tau
    e = torch.exp(logits / tau - top)
    e_y = torch.exp(logits_y / tau - top)
    e.scatter_(1, lab[:, None], 0.0)
    s_other = e.sum(1, keepdim=True)
    q = e.mul_(g)
  total = s_other + e_y
  pull = g_y * (s_other / total) * diff_y  # (1 - p_y) g_y (x - μ_y)
  push = (q * diff).sum(2).T / total  # Σ_{k≠y} p_k g_k (x - μ_k)
  return (2.0 / tau) * (pull - push)


def potential_grad(
  x1_hat, labels, centroids, tau, eps, transform, max_grad_norm=1.0, *, block=PIXEL_BLOCK
):
  """The reference's `potential_grad` in closed form: x1_hat (B, 3, H, W), valid labels (B, H, W)
  -> ∇Φ (B, 3, H, W), without autograd. The pixels go through in blocks of `block` (a handful of
  whole-tensor ops per block, no per-pixel or per-class Python work)."""
  b, c, h, w = x1_hat.shape
  with torch.no_grad():
    x = x1_hat.detach().permute(0, 2, 3, 1).reshape(-1, c)
    lab = labels.reshape(-1)
    grad = torch.cat(
      [
        _grad_phi_block(xb, lb, centroids, tau=tau, eps=eps, transform=transform)
        for xb, lb in zip(x.split(block), lab.split(block))
      ]
    )
    if transform == "norm_reduced":
      length = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
      grad = torch.where(length > max_grad_norm, grad * (max_grad_norm / length), grad)
    return grad.reshape(b, h, w, c).permute(0, 3, 1, 2)


def flowseg_loss(out, x0, labels, t, centroids, **options):
  """The reference's `flowseg_loss` (same keywords and returns) with this module's ∇Φ: the loss
  around ∇Φ is a few ops on (B, 3, H, W) tensors; ∇Φ is where the reference spends its time."""
  return reference.flowseg_loss(out, x0, labels, t, centroids, **options, grad_fn=potential_grad)


class TorchTrainStep:
  """Eager PyTorch: a PixNerDiT + a loss + AdamW + clipping + EMA, on one fixed batch.

  model: our reference PixNerDiT (tests/torch_reference/pixnerd.py) when None, or the official one.
  loss: 'flowseg' (this module's efficient FlowSeg loss: the full step), 'reference' (the parity
  reference's loss, slow) or 'mse' (|v_theta - v|² over all pixels: the network + optimiser alone).
  """

  def __init__(
    self,
    setup: train_step.TrainSetup,
    batch: dict[str, np.ndarray],
    device,
    *,
    bf16: bool,
    model=None,
    loss: str = "flowseg",
  ):
    from tests.torch_reference import pixnerd as torch_pixnerd

    if loss not in LOSSES:
      raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    cfg, task = setup.config, setup.task
    self.device, self.cfg, self.objective, self.loss_kind = device, cfg, task.objective, loss
    torch.manual_seed(cfg.seed)
    if model is None:
      model = torch_pixnerd.PixNerDiT(**task.model.arch_config())
    self.model = model.to(device)
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.ema = [p.detach().clone() for p in self.params]
    self.opt = torch.optim.AdamW(
      self.params,
      lr=cfg.optim.learning_rate,
      betas=(cfg.optim.b1, cfg.optim.b2),
      eps=cfg.optim.eps,
      weight_decay=cfg.optim.weight_decay,
      fused=device.type == "cuda",
    )
    self.centroids = torch.tensor(np.asarray(task.centroids), device=device)
    self.x0 = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    self.labels = torch.from_numpy(batch["label"]).long().to(device)
    n = self.centroids.shape[0]
    ignored = self.labels == reference.IGNORE
    lab = torch.where(ignored, 0 if cfg.objective.mask_ignored else n - 1, self.labels)
    self.x1 = self.centroids[lab].permute(0, 3, 1, 2)
    b = self.x0.shape[0]
    self.y = torch.full((b,), task.cond_label, dtype=torch.long, device=device)
    self.autocast = functools.partial(
      torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16
    )
    self.loss = None

  def _sample_t(self, b: int):
    obj = self.cfg.objective
    if obj.t_distribution == "uniform":
      t = torch.rand(b, device=self.device)
    else:
      t = torch.sigmoid(obj.t_mean + obj.t_std * torch.randn(b, device=self.device))
    return t if obj.t_shift == 1.0 else t / (t + (1 - t) * obj.t_shift)

  def loss_fn(self, out, t):
    """The chosen loss of the network output (float32) at times t."""
    if self.loss_kind == "flowseg":
      fn = flowseg_loss
    elif self.loss_kind == "reference":
      fn = reference.flowseg_loss
    else:
      return (out - (self.x1 - self.x0)).square().mean()
    return fn(out, self.x0, self.labels, t, self.centroids, **self.objective.reference_options())[0]

  def step(self) -> None:
    t = self._sample_t(self.x0.shape[0])
    tb = t[:, None, None, None]
    x_t = (1 - tb) * self.x0 + tb * self.x1
    with self.autocast():
      out = self.model(x_t, t, self.y)
    loss = self.loss_fn(out.float(), t)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.cfg.optim.grad_clip_norm:
      torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip_norm)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - self.cfg.optim.ema_decay)
    self.loss = loss

  def run(self, n: int) -> None:
    for _ in range(n):
      self.step()
    hardware.torch_sync(self.device)

  def peak_bytes(self) -> int | None:
    if self.device.type != "cuda":
      return None
    return int(torch.cuda.max_memory_allocated())


class LossStep:
  """A step's loss alone, forward + backward, on a network output of the step's shape (a leaf)."""

  def __init__(self, step: TorchTrainStep):
    self.step_ = step
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = torch.randn(step.x0.shape, generator=gen).to(step.device)
    self.out = out.requires_grad_(True)
    self.t = step._sample_t(step.x0.shape[0])
    self.loss = None

  def run(self, n: int) -> None:
    for _ in range(n):
      self.out.grad = None
      self.loss = self.step_.loss_fn(self.out, self.t)
      self.loss.backward()
    hardware.torch_sync(self.step_.device)


def official_source(src: str) -> str:
  """The official class-to-image model file inside a checkout of MCG-NJU/PixNerd."""
  path = os.path.join(src, "src", "models", "transformer", "pixnerd_c2i.py")
  if not os.path.isfile(path):
    raise ValueError(f"--official-src {src!r}: {path} not found (a checkout of MCG-NJU/PixNerd)")
  return path


def official_model(src: str, setup: train_step.TrainSetup):
  """The official PixNerd class-to-image network, from a local checkout, with JAX's initial weights.

  Imports `src/models/transformer/pixnerd_c2i.py` of the checkout by path (it needs only torch)
  and loads the parameters `train_state.create_train_state` starts from (the same seed), converted by
  `convert.pixnerd.flax_to_torch`, so both frameworks train the same network from the same point.
  """
  import importlib.util

  from flowseg_jax.convert import pixnerd as pixnerd_convert

  path = official_source(src)
  spec = importlib.util.spec_from_file_location("pixnerd_official_c2i", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  arch = setup.task.model.arch_config()
  model = module.PixNerDiT(
    in_channels=arch["in_channels"],
    num_groups=arch["num_heads"],
    hidden_size=arch["hidden_size"],
    hidden_size_x=arch["nerf_hidden_size"],
    nerf_mlpratio=arch["nerf_mlp_ratio"],
    num_blocks=arch["num_blocks"],
    num_cond_blocks=arch["num_cond_blocks"],
    patch_size=arch["patch_size"],
    num_classes=arch["num_classes"],
  )
  params = nn.unbox(jax.jit(setup.init_params)(jax.random.key(setup.config.seed)))["denoiser"]
  state = pixnerd_convert.flax_to_torch(jax.device_get(params), setup.task.model)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
  return model
