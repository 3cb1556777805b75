"""The train step and what it closes over: `TrainSetup` (the task, the optimiser, the REPA teacher),
the loss with REPA, the donated jit step with gradient accumulation, non-finite skip and EMA. What
differs between tasks (the network call, conditions, centroids, refined targets) comes from the task."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import flow, models, optim, sharding, tasks
from flowseg_jax.data import transforms
from flowseg_jax.models import repa

# ------------------------------------------------------------------------------------------------
# Static pieces: model, projector, teacher, optimizer, centroids.
# ------------------------------------------------------------------------------------------------


class TrainSetup:
  """Everything the step closes over, built once from the config: the task (network, conditions,
  centroids, objective, as inference builds it), the optimiser and the REPA teacher."""

  def __init__(self, config: ml_collections.ConfigDict, *, teacher=None):
    """teacher: optional REPA (DinoViT, params) used instead of loading config.repa.teacher_dir;
    the params may be `jax.ShapeDtypeStruct`s (AOT planning, tools/scale.py)."""
    validate_config(config)
    self.config = config
    self.task = tasks.create_task(config)
    self.tx = optim.create_optimizer(config.optim, config.total_steps)
    self.lr_schedule = optim.learning_rate_schedule(config.optim, config.total_steps)
    self.projector = self.teacher = self.teacher_params = None
    if config.repa.enabled:
      self._setup_repa(config.repa, teacher)

  def _setup_repa(self, cfg, teacher):
    from flowseg_jax.convert import dinov2 as dinov2_convert

    if teacher is None and not cfg.teacher_dir:
      raise ValueError(
        "config.repa.enabled needs config.repa.teacher_dir: convert DINOv2 weights with "
        "`flowseg convert dinov2 --ckpt dinov2_vitb14_pretrain.pth --out DIR` (or set "
        "config.repa.enabled=False)."
      )
    model = self.task.model
    if not 1 <= cfg.align_layer <= model.num_cond_blocks:
      raise ValueError(
        f"config.repa.align_layer={cfg.align_layer} must lie in [1, {model.num_cond_blocks}]"
      )
    if teacher is None:
      dtype = models.DTYPES[cfg.teacher_dtype]
      teacher = dinov2_convert.load_orbax(cfg.teacher_dir, dtype=dtype)
    self.teacher, self.teacher_params = teacher
    self.projector = repa.Projector(
      hidden_dim=cfg.proj_hidden_dim or model.hidden_size,
      out_dim=self.teacher.embed_dim,
      dtype=model.dtype,
    )

  def init_params(self, rng):
    """Boxed (logically partitioned) parameters {'denoiser': ..., ['projector': ...]}."""
    x, t, cond = self.task.init_inputs(self.config.input.image_size)
    k1, k2 = jax.random.split(rng)
    params = {"denoiser": self.task.model.init(k1, x, t, cond)["params"]}
    if self.projector is not None:
      tokens = jnp.zeros((1, 1, self.task.model.hidden_size), jnp.float32)
      params["projector"] = self.projector.init(k2, tokens)["params"]
    return params


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for values that would otherwise fail deep inside jit (the objective's own fields
  are checked by `flow.Objective.from_config`, when the task is built)."""
  checks = [
    (config.total_steps > 0, f"config.total_steps must be > 0, got {config.total_steps}"),
    (
      config.log_every_steps > 0,
      f"config.log_every_steps must be > 0, got {config.log_every_steps}",
    ),
    (
      config.ckpt_every_steps > 0,
      f"config.ckpt_every_steps must be > 0, got {config.ckpt_every_steps}",
    ),
    (
      config.eval_every_steps >= 0,
      f"config.eval_every_steps must be >= 0, got {config.eval_every_steps}",
    ),
    (
      0 <= config.optim.ema_decay < 1,
      f"config.optim.ema_decay must lie in [0, 1), got {config.optim.ema_decay}",
    ),
    (
      config.optim.grad_accum_steps >= 1,
      f"config.optim.grad_accum_steps must be >= 1, got {config.optim.grad_accum_steps}",
    ),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
  batch = config.input.batch_size
  if batch % config.optim.grad_accum_steps:
    raise ValueError(
      f"config.input.batch_size={batch} must be divisible by config.optim.grad_accum_steps="
      f"{config.optim.grad_accum_steps}"
    )


def check_batch_fits_mesh(config: ml_collections.ConfigDict, mesh) -> None:
  micro = config.input.batch_size // config.optim.grad_accum_steps
  if micro % mesh.size:
    raise ValueError(
      f"the micro-batch config.input.batch_size / grad_accum_steps = {micro} must be divisible by "
      f"the {mesh.size} devices of the mesh"
    )


# ------------------------------------------------------------------------------------------------
# The train step.
# ------------------------------------------------------------------------------------------------


def loss_fn(params, teacher_params, images, labels, key, total_valid, cond, *, setup: TrainSetup):
  """Loss of one micro-batch, scaled so that summing micro-batches gives the global-batch loss."""
  task = setup.task
  objective = task.objective
  t = objective.sample_t(key, (images.shape[0],))
  x_t = flow.interpolant(
    images,
    labels,
    t,
    task.centroids,
    mask_ignored=objective.mask_ignored,
    ignored_input=objective.ignored_input,
  )
  metrics = {}
  if setup.projector is None:
    out = setup.task.apply(params["denoiser"], x_t, t, cond)
  else:
    out, tokens = setup.task.apply(
      params["denoiser"], x_t, t, cond, return_block_tokens=setup.config.repa.align_layer
    )
    projected = setup.projector.apply({"params": params["projector"]}, tokens)
    target_tokens = repa.teacher_tokens(
      setup.teacher, teacher_params, images, denoiser_patch=task.model.patch_size
    )
    metrics["repa_loss"] = repa.repa_loss(
      projected, target_tokens, eps=setup.config.repa.cosine_eps
    )
  loss, aux = flow.flowseg_loss(out, images, labels, t, task.centroids, **objective.loss_options())
  # flowseg_loss normalises by this micro-batch's valid pixels; the objective normalises by the whole
  # global batch's, so weight by the share of valid pixels (exact for any accumulation).
  share = aux["num_valid"].astype(jnp.float32) / jnp.maximum(total_valid, 1).astype(jnp.float32)
  accum = setup.config.optim.grad_accum_steps
  total = share * loss
  metrics["flow_loss"] = share * loss
  metrics["fm_loss"] = share * aux["fm_loss"]
  metrics["grad_phi_norm"] = share * aux["grad_phi_norm"]
  metrics["decode_accuracy"] = share * aux["decode_accuracy"]
  metrics["num_bad_labels"] = aux["num_bad_labels"]
  if "repa_loss" in metrics:
    metrics["repa_loss"] = metrics["repa_loss"] / accum
    total = total + setup.config.repa.loss_weight * metrics["repa_loss"]
  metrics["loss"] = total
  return total, metrics


def train_step(state, batch, teacher_params, *, setup: TrainSetup):
  """One optimiser step on the global batch; non-finite updates are skipped and counted."""
  config = setup.config
  accum = config.optim.grad_accum_steps
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images = transforms.normalize_on_device(batch["image"], batch.get("image_hw"))
  labels = batch["label"]
  task = setup.task
  cond = task.condition(batch)
  labels, target_metrics = task.train_targets(
    state.ema_params["denoiser"], images, labels, cond, state.step
  )
  valid = labels != centroids_lib.IGNORE_LABEL if task.objective.mask_ignored else labels >= 0
  total_valid = jnp.sum(valid.astype(jnp.int32))

  def micro(x):  # (B, ...) -> (accum, B / accum, ...): micro-batch i takes rows i, i + accum, ...
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)

  grad_fn = jax.grad(functools.partial(loss_fn, setup=setup), has_aux=True)

  def accumulate(carry, xs):
    grads, metrics = carry
    mb_images, mb_labels, mb_key, mb_cond = xs
    g, m = grad_fn(state.params, teacher_params, mb_images, mb_labels, mb_key, total_valid, mb_cond)
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)), None

  keys = jax.random.split(key, accum)
  zero_grads = jax.tree.map(jnp.zeros_like, state.params)
  _, zero_metrics = jax.eval_shape(
    grad_fn,
    state.params,
    teacher_params,
    micro(images)[0],
    micro(labels)[0],
    keys[0],
    total_valid,
    jax.tree.map(lambda c: micro(c)[0], cond),
  )
  zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics)
  (grads, metrics), _ = jax.lax.scan(
    accumulate,
    (zero_grads, zero_metrics),
    (micro(images), micro(labels), keys, jax.tree.map(micro, cond)),
  )

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

  def apply(params, ema_params, opt_state):
    updates, opt_state = setup.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema_params = optax.incremental_update(params, ema_params, 1.0 - config.optim.ema_decay)
    return params, ema_params, opt_state

  # A conditional, not a select between new and old state: the skip branch returns the donated
  # buffers untouched, whereas `where(finite, new, old)` keeps both alive and costs a copy of every
  # parameter, EMA and Adam leaf (S/16 64² b2 on CPU: 552 -> 408 ms per step).
  params, ema_params, opt_state = jax.lax.cond(
    finite, apply, lambda *old: old, state.params, state.ema_params, state.opt_state
  )
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    ema_params=ema_params,
    opt_state=opt_state,
    num_skipped=state.num_skipped + (~finite).astype(jnp.int32),
  )
  metrics.update(
    grad_norm=grad_norm,
    learning_rate=optim.applied_learning_rate(state.opt_state, setup.lr_schedule),
    skipped=(~finite).astype(jnp.int32),
    num_valid=total_valid,
    **target_metrics,
  )
  return new_state, metrics


def compile_train_step(setup: TrainSetup, mesh, state_shardings):
  data_sharding = sharding.batch_sharding(mesh)
  repl = NamedSharding(mesh, P())
  teacher_sharding = None
  if setup.teacher_params is not None:
    teacher_sharding = jax.tree.map(lambda _: repl, setup.teacher_params)
  return jax.jit(
    functools.partial(train_step, setup=setup),
    in_shardings=(
      state_shardings,
      data_sharding,  # every array of the batch (a uint8 pipeline batch also has image_hw)
      teacher_sharding,
    ),
    out_shardings=(state_shardings, repl),
    donate_argnums=0,
  )
