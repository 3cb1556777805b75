"""Prompted segmentation (RLFSeg on PixNerd-T2I): an image and a text prompt give a binary mask.

x1 is the binary mask drawn with `kronecker_centroids(2)` (background mu_0 = (-1, -1, -1),
foreground mu_1 = (1, 1, 1)); labels 0 / 1 / 255; the condition is the prompt: `batch['prompt']`
int32 (B,) ids into the task's prompt list. The network sees text features (B, T, Dt) of each
prompt, from either
  'table': a learned (num_prompts, T, Dt) embedding table, one entry per prompt (the CPU demo: no
    language model, but no generalisation to unseen prompts either), or
  'cache': frozen Qwen3 last hidden states, computed once per prompt set through
    `prompts.cached_prompt_embeddings` and kept as a non-trained constant (RefCOCO).
Metrics gIoU / cIoU (`evaluators.refer_iou`). The flow is FlowSeg's with two centroids; this module
adds what RLFSeg adds, as pure jit-able functions. RLFSeg's paper gives no equations for either;
these are our definitions.
Label refinement (`refine_labels`): after `warmup_steps`, a training target pixel is replaced by
the model's own decoded prediction when all of these hold:
  1. it lies on an annotation boundary: within `boundary_width` pixels (Chebyshev distance) of a
     pixel of the other class (ignored pixels count as background for this test), where
     annotations are least reliable;
  2. the prediction is confident: the one-step prediction x1_hat = x0 + v(x0, t=0) of the EMA
     network (clean image in, no label information) has relative margin
     |d_0 - d_1| / (d_0 + d_1) >= `margin`, d_k = ||x1_hat - mu_k||^2;
  3. it is consistent: the EMA parameters average the recent training steps, so a prediction of
     theirs is one the model has held over many steps, not one step's fluctuation;
  4. the prediction differs from the annotation, which is not ignored (255 stays 255).
Off (`enabled=False`) the targets are the annotations.

Adaptive one-step sampling (`adaptive_one_step`): one network evaluation v = v(x0, t=0); instead
of the Euler step x1 = x0 + 1 * v, the step size dt is chosen per image as the least-squares fit
of the step's end point to the centroid grid:
  k*(p) = nearest centroid of x0(p) + dt * v(p)          (starting from dt = 1)
  dt    = sum_p <v(p), mu_k*(p) - x0(p)> / sum_p ||v(p)||^2,   clipped to [dt_min, dt_max]
iterated `iterations` times (assignment, then the closed-form fit: each iteration cannot increase
the mean squared distance to the assigned centroids before clipping), so a network that stops
short of (or overshoots) the centroids everywhere by a common factor is rescaled back onto them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import models, sampling
from flowseg_jax.data import pipeline
from flowseg_jax.evaluators import refer_iou
from flowseg_jax.models import pixnerd_t2i
from flowseg_jax.models.prompted import PromptedDenoiser
from flowseg_jax.tasks import base

CONDITIONS = ("table", "cache")


def boundary_mask(labels: jax.Array, width: int) -> jax.Array:
  """bool (B, H, W): pixels within `width` pixels (Chebyshev) of a pixel of the other class.

  labels (B, H, W) int in {0, 1, 255}; 255 counts as background here. width 0: nothing.
  """
  if width <= 0:
    return jnp.zeros(labels.shape, bool)
  fg = (labels == 1).astype(jnp.float32)
  window = (1, 2 * width + 1, 2 * width + 1)
  pad = ((0, 0), (width, width), (width, width))
  hi = jax.lax.reduce_window(fg, -jnp.inf, jax.lax.max, window, (1, 1, 1), pad)
  lo = jax.lax.reduce_window(fg, jnp.inf, jax.lax.min, window, (1, 1, 1), pad)
  return hi != lo


def decode_with_margin(x1_hat: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(nearest centroid int32 (B, H, W), relative margin |d0 - d1| / (d0 + d1) in [0, 1]) for two
  centroids."""
  d = centroids_lib.squared_distances(x1_hat, centroids)  # (B, H, W, 2)
  decoded = jnp.argmin(d, axis=-1).astype(jnp.int32)
  margin = jnp.abs(d[..., 0] - d[..., 1]) / jnp.maximum(d[..., 0] + d[..., 1], 1e-12)
  return decoded, margin


def refine_labels(
  labels: jax.Array,
  x1_hat: jax.Array,
  centroids: jax.Array,
  step: jax.Array,
  *,
  warmup_steps: int,
  boundary_width: int,
  margin: float,
) -> tuple[jax.Array, jax.Array]:
  """Refined training targets (see the module docstring) and the number of pixels changed.

  Args:
    labels: int (B, H, W) in {0, 1, 255}.
    x1_hat: (B, H, W, 3) the EMA network's one-step prediction from the clean image.
    centroids: (2, 3).
    step: scalar int, the training step (no change before warmup_steps).
  Returns:
    (labels int32 (B, H, W), number of changed pixels int32 ()).
  """
  labels = labels.astype(jnp.int32)
  decoded, m = decode_with_margin(jax.lax.stop_gradient(x1_hat), centroids)
  change = (
    boundary_mask(labels, boundary_width)
    & (m >= margin)
    & (decoded != labels)
    & (labels != centroids_lib.IGNORE_LABEL)
    & (step >= warmup_steps)
  )
  return jnp.where(change, decoded, labels), jnp.sum(change.astype(jnp.int32))


def adaptive_one_step(
  x0: jax.Array,
  v: jax.Array,
  centroids: jax.Array,
  *,
  dt_min: float = 0.5,
  dt_max: float = 2.0,
  iterations: int = 2,
) -> tuple[jax.Array, jax.Array]:
  """(x1 = x0 + dt * v (B, H, W, 3), dt (B,)) with dt fitted per image (module docstring)."""
  x0 = x0.astype(jnp.float32)
  v = v.astype(jnp.float32)
  centroids = jnp.asarray(centroids, jnp.float32)
  dt = jnp.ones((x0.shape[0],), jnp.float32)
  vv = jnp.maximum(jnp.sum(v * v, axis=(1, 2, 3)), 1e-12)
  for _ in range(iterations):
    x1 = x0 + dt[:, None, None, None] * v
    k = jnp.argmin(centroids_lib.squared_distances(x1, centroids), axis=-1)
    mu = jnp.take(centroids, k, axis=0)
    dt = jnp.clip(jnp.sum(v * (mu - x0), axis=(1, 2, 3)) / vv, dt_min, dt_max)
  return x0 + dt[:, None, None, None] * v, dt


class PromptedTask(base.Task):
  """Text-prompted binary segmentation (see the module docstring)."""

  name = "prompted"
  best_metric = "giou"
  batch_keys = ("image", "label", "prompt")
  evaluator = refer_iou.ReferIouEvaluator
  num_classes = 2

  def __init__(self, config, vocabulary: base.Vocabulary | None = None):
    super().__init__(config, vocabulary)
    cfg = config.prompted
    if cfg.condition not in CONDITIONS:
      raise ValueError(
        f"config.prompted.condition must be one of {CONDITIONS}, got {cfg.condition!r}"
      )
    if vocabulary is None:
      self.prompts = list(pipeline.prompt_list(config.input) or [])
    else:
      self.prompts = list(vocabulary.prompts)
    if not self.prompts:
      raise ValueError("the prompted task needs its prompt list (config.input.prompted)")
    t2i = pixnerd_t2i.make_model(
      cfg.variant,
      **cfg.overrides.to_dict(),
      dtype=models.DTYPES[config.model.dtype],
      scan_blocks=bool(config.model.scan_blocks),
    )
    t2i.check_config()
    self.features = None
    if cfg.condition == "cache":
      cached = None if vocabulary is None else vocabulary.prompt_features
      self.features = jnp.asarray(self._cached_features(t2i) if cached is None else cached)
    self.model = PromptedDenoiser(t2i, len(self.prompts) if cfg.condition == "table" else 0)
    self.centroids = jnp.asarray(centroids_lib.kronecker_centroids(2))

  def _cached_features(self, t2i) -> np.ndarray:
    from flowseg_jax.tasks import prompts as prompts_lib  # the text stack only when used

    cfg = self.config.prompted
    if not cfg.encoder_dir or not cfg.cache_dir:
      raise ValueError(
        "config.prompted.condition='cache' needs config.prompted.encoder_dir (a Qwen3 Hugging "
        "Face directory) and config.prompted.cache_dir"
      )
    encoder = prompts_lib.TextEncoder.from_pretrained(
      cfg.encoder_dir, max_length=t2i.text_length, embed_dim=t2i.text_dim
    )
    features, _ = prompts_lib.cached_prompt_embeddings(cfg.cache_dir, self.prompts, encoder)
    return features

  @property
  def class_names(self) -> list[str]:
    """What a mask's labels mean: 0 outside the prompt's region, 1 inside."""
    if self._vocabulary is not None:
      return list(self._vocabulary.class_names)
    return ["background", "foreground"]

  def architecture(self) -> dict:
    return {**self.model.t2i.arch_config(), "num_prompts": self.model.num_prompts}

  def prompt_id(self, prompt: str) -> int:
    """The id of a prompt text (exact match, then case/space-insensitive)."""
    if prompt in self.prompts:
      return self.prompts.index(prompt)
    norm = {" ".join(p.lower().split()): i for i, p in enumerate(self.prompts)}
    key = " ".join(prompt.lower().split())
    if key not in norm:
      shown = ", ".join(repr(p) for p in self.prompts[:8])
      raise ValueError(
        f"prompt {prompt!r} is not one this model knows ({len(self.prompts)} prompts: {shown}"
        f"{', ...' if len(self.prompts) > 8 else ''})"
      )
    return norm[key]

  def condition(self, batch):
    return batch["prompt"]

  def pretrained_params(self, path: str):
    """The official PixNerd-T2I checkpoint's EMA weights."""
    from flowseg_jax.convert import pixnerd_t2i as t2i_convert  # torch-format code only when used

    t2i = self.model.t2i
    src_model, params = t2i_convert.load_torch_checkpoint(path, "ema", scan_blocks=t2i.scan_blocks)
    if src_model.arch_config() != t2i.arch_config():
      raise ValueError(
        f"config.model_init={path!r} holds architecture {src_model.arch_config()}, but "
        f"config.prompted builds {t2i.arch_config()}"
      )
    if self.model.num_prompts:
      raise ValueError(
        "config.model_init with a learned prompt table (config.prompted.condition='table') would "
        "leave the table untrained against pretrained text features; use condition='cache'"
      )
    return {"t2i": params}

  def condition_of(self, prompt) -> int:
    """A prompt text of the model's list, or its int id; None is an error."""
    if prompt is None:
      raise ValueError("a prompted model needs a prompt (a text of its prompt list or an id)")
    if isinstance(prompt, int | np.integer):
      if not 0 <= int(prompt) < len(self.prompts):
        raise ValueError(f"prompt id {prompt} not in [0, {len(self.prompts)})")
      return int(prompt)
    return self.prompt_id(str(prompt))

  def apply(self, params, x, t, cond, **kw):
    if kw:
      raise ValueError(f"the prompted task does not support {sorted(kw)} (e.g. REPA)")
    if self.features is not None:
      cond = jnp.take(self.features, cond, axis=0)
    return self.model.apply({"params": params}, x, t, cond)

  def train_targets(self, ema_params, images, labels, cond, step):
    """Label refinement (`refine_labels`) when `config.prompted.refine.enabled`: the EMA network's
    one-step prediction from the clean image replaces confident, differing boundary targets."""
    cfg = self.config.prompted.refine
    if not cfg.enabled:
      return labels, {}
    t0 = jnp.zeros((images.shape[0],), jnp.float32)
    out = self.apply(jax.lax.stop_gradient(ema_params), images, t0, cond)
    obj = self.objective
    v = sampling.velocity(out, images, t0, prediction=obj.prediction, t_eps=obj.t_eps)
    refined, changed = refine_labels(
      labels,
      images + v,
      self.centroids,
      step,
      warmup_steps=cfg.warmup_steps,
      boundary_width=cfg.boundary_width,
      margin=cfg.margin,
    )
    return refined, {"refined_pixels": changed}

  def sampler_options(self, num_steps=None, adaptive=None) -> sampling.SamplerOptions:
    """The base sampler, with the adaptive one-step rule when `adaptive` (default
    `config.prompted.adaptive.enabled`)."""
    options = super().sampler_options(num_steps)
    cfg = self.config.prompted.adaptive
    if not (bool(cfg.enabled) if adaptive is None else adaptive):
      return options
    rule = (float(cfg.dt_min), float(cfg.dt_max), int(cfg.iterations))
    return dataclasses.replace(options, adaptive=rule)

  def integrate(self, apply_fn, x0, options: sampling.SamplerOptions):
    if options.adaptive is None or options.num_steps != 1:
      return super().integrate(apply_fn, x0, options)
    t0 = jnp.zeros((x0.shape[0],), jnp.float32)
    v = sampling.velocity(
      apply_fn(x0, t0), x0, t0, prediction=options.prediction, t_eps=options.t_eps
    )
    dt_min, dt_max, iterations = options.adaptive
    return adaptive_one_step(
      x0, v, self.centroids, dt_min=dt_min, dt_max=dt_max, iterations=iterations
    )
