"""REPA: align an intermediate trunk block of the denoiser with a frozen DINOv2 teacher.

As in PixNerd's `REPATrainer` (reference/pixnerd_facts.md section 5.1):

  feat    = output of trunk block `align_layer` (1-based; 8 -> blocks[7])         (B, L, D)
  proj    = Projector(feat): Linear(D->h) SiLU Linear(h->h) SiLU Linear(h->Dt)       (B, L, Dt)
  teacher = DinoViT(preprocess_for_teacher(image))["x_norm_patchtokens"], no grad (B, N, Dt)
  loss    = mean over batch and tokens of 1 - cos(proj[:, :N], teacher)             scalar
  total   = flow loss + loss_weight * loss                                          (0.5)

`preprocess_for_teacher` maps our [-1, 1] images to PixNerd's teacher input: [0, 1], ImageNet
mean/std, then a PyTorch-convention bicubic resize to 14/16 of the size (224 for 256 inputs), so
a 16-pixel denoiser token and a 14-pixel teacher patch cover the same image area (N = L).
Everything here computes in float32 by default.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from flowseg_jax.models.bicubic import resize_bicubic_torch
from flowseg_jax.models.dinov2 import DinoViT

Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COSINE_EPS = 1e-8


def get_config() -> ml_collections.ConfigDict:
  """Default REPA settings (PixNerd XL values); nest as `config.repa = repa.get_config()`."""
  config = ml_collections.ConfigDict()
  # Add the REPA auxiliary loss.
  config.enabled = True
  # 1-based trunk block whose output is aligned (PixNerd: 8 -> the output of blocks[7]).
  config.align_layer = 8
  # Weight of the cosine loss in the total loss (PixNerd `feat_loss_weight`).
  config.loss_weight = 0.5
  # Projector hidden width; None -> the denoiser width D (PixNerd XL: 1152 = D).
  config.proj_hidden_dim = ml_collections.config_dict.placeholder(int)
  # Start the projector from the one a converted PixNerd export holds (`config.model_init` converted from
  # a checkpoint with `diffusion_trainer.proj.*`), as the denoiser does; False or none stored: scratch.
  config.init_projector = True
  # Teacher architecture (`models.dinov2.VARIANTS`) and the converted export directory written by
  # `flowseg convert dinov2 --ckpt dinov2_vitb14_pretrain.pth --out DIR`.
  config.teacher_variant = "B/14"
  config.teacher_dir = ""
  # Teacher compute dtype ("float32" or "bfloat16"; PixNerd runs it under bf16 autocast).
  config.teacher_dtype = "float32"
  # Denoiser patch size: the teacher input is resized to teacher_patch / denoiser_patch.
  config.denoiser_patch = 16
  # eps of the cosine similarity (torch's default).
  config.cosine_eps = COSINE_EPS
  return config


def teacher_input_size(
  height: int, width: int, *, patch_size: int = 14, denoiser_patch: int = 16
) -> tuple[int, int]:
  """(int(p * H / denoiser_patch), int(p * W / denoiser_patch)), PixNerd's teacher input size."""
  return int(patch_size * height / denoiser_patch), int(patch_size * width / denoiser_patch)


def preprocess_for_teacher(
  image: jax.Array, *, patch_size: int = 14, denoiser_patch: int = 16
) -> jax.Array:
  """Our images -> DINOv2 input, as PixNerd's `DINOv2.forward`.

  Args:
    image: (B, H, W, 3) in [-1, 1]. For the teacher to accept the result, H and W should be
      multiples of `denoiser_patch` (then the output is a multiple of `patch_size`).
    patch_size: teacher patch size.
    denoiser_patch: denoiser patch size.

  Returns:
    (B, int(p*H/dp), int(p*W/dp), 3) float32: ((image + 1) / 2 - mean) / std, then bicubic
    resized (align_corners=False, no antialias, A = -0.75, like torch).
  """
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"preprocess_for_teacher expects (B, H, W, 3), got shape {image.shape}.")
  x = (image.astype(jnp.float32) + 1.0) / 2.0
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  size = teacher_input_size(
    image.shape[1], image.shape[2], patch_size=patch_size, denoiser_patch=denoiser_patch
  )
  return resize_bicubic_torch(x, size)


def teacher_tokens(
  teacher: DinoViT, teacher_params: Any, image: jax.Array, *, denoiser_patch: int = 16
) -> jax.Array:
  """Frozen-teacher targets: (B, H, W, 3) in [-1, 1] -> patch tokens (B, N, Dt) float32, no grad."""
  x = preprocess_for_teacher(image, patch_size=teacher.patch_size, denoiser_patch=denoiser_patch)
  out = teacher.apply({"params": jax.lax.stop_gradient(teacher_params)}, x)
  return jax.lax.stop_gradient(out["x_norm_patchtokens"].astype(jnp.float32))


def _torch_bias_init(fan_in: int):
  """PyTorch's Linear bias default U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Projector(nn.Module):
  """REPA projector: Linear(D->h) -> SiLU -> Linear(h->h) -> SiLU -> Linear(h->out), with biases.

  Submodules are named `layers_0`, `layers_2`, `layers_4` after the indices of PixNerd's
  `proj.0.{0,2,4}` (see `convert.dinov2.projector_from_torch`). Initialisation is PyTorch's Linear
  default, as the official projector is trained from it.

  Attributes:
    hidden_dim: hidden width h (PixNerd: the denoiser width D).
    out_dim: teacher width Dt (768 for DINOv2 ViT-B/14).
    dtype: compute dtype (parameters are float32).
  """

  hidden_dim: int
  out_dim: int = 768
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., D) -> (..., out_dim) in `dtype`."""
    widths = ((0, self.hidden_dim), (2, self.hidden_dim), (4, self.out_dim))
    fan_in = x.shape[-1]
    x = x.astype(self.dtype)
    for n, (index, width) in enumerate(widths):
      x = nn.Dense(
        width,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), ("embed", "mlp")
        ),
        bias_init=nn.with_logical_partitioning(_torch_bias_init(fan_in), ("mlp",)),
        name=f"layers_{index}",
      )(x)
      fan_in = width
      if n < len(widths) - 1:
        x = nn.silu(x)
    return x


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
  """torch.nn.functional.cosine_similarity along the last axis (PyTorch 2.x formula).

  sum(a / max(|a|, eps) * b / max(|b|, eps)): each norm is clamped separately (not the product of
  the norms, as older releases documented). Float32; finite gradients also for zero vectors.
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  # sqrt(max(|x|^2, eps^2)) == max(|x|, eps), with a zero (not NaN) gradient at x = 0.
  na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1, keepdims=True), eps * eps))
  nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=-1, keepdims=True), eps * eps))
  return jnp.sum((a / na) * (b / nb), axis=-1)


def repa_loss(projected: jax.Array, teacher: jax.Array, *, eps: float = COSINE_EPS) -> jax.Array:
  """Mean over batch and tokens of 1 - cosine_similarity(projected, teacher) along features.

  Args:
    projected: (B, L, Dt) projected denoiser tokens.
    teacher: (B, N, Dt) teacher patch tokens (treated as constants: wrap them in stop_gradient, as
      `teacher_tokens` does).
    eps: cosine-similarity eps (torch default 1e-8).

  Returns:
    Scalar float32. If L > N the projected tokens are truncated to the first N, as PixNerd does.

  Raises:
    ValueError: on rank/batch/feature mismatch or L < N.
  """
  if projected.ndim != 3 or teacher.ndim != 3:
    raise ValueError(
      f"repa_loss expects (B, L, D) and (B, N, D), got {projected.shape} and {teacher.shape}."
    )
  (b, seq, d), (bt, n, dt) = projected.shape, teacher.shape
  if b != bt or d != dt:
    raise ValueError(
      f"repa_loss: batch/feature mismatch, projected {projected.shape} vs teacher {teacher.shape}."
    )
  if seq < n:
    raise ValueError(
      f"repa_loss: projected has {seq} tokens, fewer than the teacher's {n}; check the teacher "
      "input size (14/16 of the image) and the denoiser patch size."
    )
  return jnp.mean(1.0 - cosine_similarity(projected[:, :n], teacher, eps))
