"""Tasks: what the shared trainer and evaluator do differently for semantic and prompted segmentation.

A task turns a batch into (x0 = image, labels, condition), builds the network and its call, fixes the
centroid table, and names the metric that picks the best checkpoint. `config.task` selects it:
- 'semantic' (default): FlowSeg. PixNerd class-to-image model conditioned on `config.cond_label`,
  N class centroids, labels = train ids, metric mIoU.
- 'prompted': RLFSeg on PixNerd-T2I. x1 is the binary mask drawn with `kronecker_centroids(2)`
  (background (-1, -1, -1), foreground (1, 1, 1)); labels 0 / 1 / 255; the condition is the
  prompt: `batch['prompt']` int32 (B,) ids into the task's prompt list. The network sees text
  features (B, T, Dt) of each prompt, from either
    'table': a learned (num_prompts, T, Dt) embedding table, one entry per prompt (the CPU demo:
      no language model, but no generalisation to unseen prompts either), or
    'cache': frozen Qwen3 last hidden states, computed once per prompt set through
      `prompts.cached_prompt_embeddings` and stored as a non-trained constant (RefCOCO).
  Metrics gIoU / cIoU (`prompted_metrics`).
Inference code uses tasks too, so this module imports no training code.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import models
from flowseg_jax.models import layers, pixnerd_t2i

TASKS = ("semantic", "prompted")
CONDITIONS = ("table", "cache")


def task_name(config) -> str:
  name = config.get("task", "semantic")
  if name not in TASKS:
    raise ValueError(f"config.task must be one of {TASKS}, got {name!r}")
  return name


def prompted_config() -> ml_collections.ConfigDict:
  """`config.prompted`: the prompted task's network, prompts, refinement and one-step sampling."""
  c = ml_collections.ConfigDict()
  c.variant = "tiny"  # a name in models.pixnerd_t2i.VARIANTS ('tiny', 'released')
  c.overrides = ml_collections.ConfigDict()  # PixNerd-T2I architecture fields to override
  c.condition = "table"  # 'table' (learned per-prompt features) | 'cache' (Qwen3 features)
  c.encoder_dir = ""  # 'cache': Qwen3 Hugging Face directory (config.json + safetensors)
  c.cache_dir = ""  # 'cache': where prompt embeddings are cached
  # Label refinement (prompted_flow.refine_labels).
  c.refine = ml_collections.ConfigDict(
    dict(enabled=False, warmup_steps=500, boundary_width=1, margin=0.5)
  )
  # Adaptive one-step sampling (prompted_flow.adaptive_one_step), used when eval.num_steps == 1.
  c.adaptive = ml_collections.ConfigDict(dict(enabled=False, dt_min=0.5, dt_max=2.0, iterations=2))
  # Evaluation also scores every example with another example's prompt (`wrong_giou`): a model
  # that uses its prompt drops to near 0 there (prompted_inference.wrong_prompts).
  c.eval_wrong_prompt = True
  return c


class PromptedDenoiser(nn.Module):
  """PixNerd-T2I whose condition is a prompt id (learned table) or text features.

  `__call__(x (B, H, W, 3), t (B,), cond)`: cond int (B,) prompt ids when num_prompts > 0 (a
  learned (num_prompts, T, Dt) table gives the features), else float features (B, T, Dt).
  The T2I parameters live under 't2i' (the converter's tree, so released weights drop in).
  """

  t2i: pixnerd_t2i.PixNerdT2I
  num_prompts: int = 0

  @nn.compact
  def __call__(self, x, t, cond):
    if self.num_prompts:
      table = self.param(
        "prompt_table",
        layers.partitioned(nn.initializers.normal(1.0), (None, None, None)),
        (self.num_prompts, self.t2i.text_length, self.t2i.text_dim),
        jnp.float32,
      )
      cond = jnp.take(table, cond, axis=0)
    return self.t2i(x, t, cond)


class SemanticTask:
  """FlowSeg semantic segmentation (the trainer's behaviour before tasks existed)."""

  name = "semantic"
  best_metric = "mIoU"
  batch_keys = ("image", "label")

  def __init__(self, config, num_classes: int):
    self.config = config
    self.model = models.create_model(config.model)
    self.num_classes = num_classes
    self.centroids = jnp.asarray(
      centroids_lib.class_centroids(num_classes, ignore_as_class=not config.objective.mask_ignored)
    )
    self.cond_label = self.model.num_classes if config.cond_label < 0 else int(config.cond_label)

  def condition(self, batch):
    """The per-example condition in a batch (None: unconditional)."""
    return None

  def dummy_condition(self, batch: int):
    return None

  def apply(self, params, x, t, cond, **kw):
    y = jnp.full((x.shape[0],), self.cond_label, jnp.int32)
    return self.model.apply({"params": params}, x, t, y, **kw)


class PromptedTask:
  """Text-prompted binary segmentation (see the module docstring)."""

  name = "prompted"
  best_metric = "giou"
  batch_keys = ("image", "label", "prompt")
  num_classes = 2

  def __init__(self, config, prompts: list[str] | None = None):
    self.config = config
    cfg = config.prompted
    if cfg.condition not in CONDITIONS:
      raise ValueError(
        f"config.prompted.condition must be one of {CONDITIONS}, got {cfg.condition!r}"
      )
    self.prompts = list(prompts or [])
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
      self.features = jnp.asarray(self._cached_features(t2i))
    self.model = PromptedDenoiser(t2i, len(self.prompts) if cfg.condition == "table" else 0)
    self.centroids = jnp.asarray(centroids_lib.kronecker_centroids(2))
    self.cond_label = -1

  def _cached_features(self, t2i) -> np.ndarray:
    from flowseg_jax import prompts as prompts_lib

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

  def dummy_condition(self, batch: int):
    return jnp.zeros((batch,), jnp.int32)

  def apply(self, params, x, t, cond, **kw):
    if kw:
      raise ValueError(f"the prompted task does not support {sorted(kw)} (e.g. REPA)")
    if self.features is not None:
      cond = jnp.take(self.features, cond, axis=0)
    return self.model.apply({"params": params}, x, t, cond)


def create_task(config, num_classes: int, prompts: list[str] | None = None):
  if task_name(config) == "semantic":
    return SemanticTask(config, num_classes)
  return PromptedTask(config, prompts)


def init_inputs(task, image_size) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Dummy (x, t, cond) of batch 1 for `task.model.init`."""
  x = jnp.zeros((1, *tuple(image_size), 3), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  cond = task.dummy_condition(1)
  if cond is None:
    cond = jnp.zeros((1,), jnp.int32)
  return x, t, cond
