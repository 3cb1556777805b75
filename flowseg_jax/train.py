"""train_and_evaluate(config, workdir): mesh -> data -> state -> jit step -> loop -> checkpoints -> evals."""

from __future__ import annotations

import functools
import json
import os
import signal
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import checkpointing, evaluate, flow, models, optim, sharding
from flowseg_jax.data import pipeline
from flowseg_jax.models import repa
from flowseg_jax.train_state import TrainState

# ------------------------------------------------------------------------------------------------
# Static pieces: model, projector, teacher, optimizer, centroids.
# ------------------------------------------------------------------------------------------------


class Setup:
  """Everything the step closes over: built once, from the config."""

  def __init__(self, config: ml_collections.ConfigDict):
    validate_config(config)
    self.config = config
    self.model = models.create_model(config.model)
    self.num_classes = pipeline.num_classes(config.input)
    self.centroids = jnp.asarray(
      centroids_lib.class_centroids(
        self.num_classes, ignore_as_class=not config.objective.mask_ignored
      )
    )
    self.cond_label = self.model.num_classes if config.cond_label < 0 else int(config.cond_label)
    self.tx = optim.create_optimizer(config.optim, config.total_steps)
    self.lr_schedule = optim.learning_rate_schedule(config.optim, config.total_steps)
    self.projector = self.teacher = self.teacher_params = None
    if config.repa.enabled:
      self._setup_repa(config.repa)

  def _setup_repa(self, cfg):
    from flowseg_jax.convert import dinov2 as dinov2_convert

    if not cfg.teacher_dir:
      raise ValueError(
        "config.repa.enabled needs config.repa.teacher_dir: convert DINOv2 weights with "
        "`flowseg convert dinov2 --ckpt dinov2_vitb14_pretrain.pth --out DIR` (or set "
        "config.repa.enabled=False)."
      )
    if not 1 <= cfg.align_layer <= self.model.num_cond_blocks:
      raise ValueError(
        f"config.repa.align_layer={cfg.align_layer} must lie in [1, {self.model.num_cond_blocks}]"
      )
    dtype = models.DTYPES[cfg.teacher_dtype]
    self.teacher, self.teacher_params = dinov2_convert.load_orbax(cfg.teacher_dir, dtype=dtype)
    self.projector = repa.Projector(
      hidden_dim=cfg.proj_hidden_dim or self.model.hidden_size,
      out_dim=self.teacher.embed_dim,
      dtype=self.model.dtype,
    )

  def init_params(self, rng):
    """Boxed (logically partitioned) parameters {'denoiser': ..., ['projector': ...]}."""
    size = tuple(self.config.input.image_size)
    x = jnp.zeros((1, *size, 3), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    y = jnp.zeros((1,), jnp.int32)
    k1, k2 = jax.random.split(rng)
    params = {"denoiser": self.model.init(k1, x, t, y)["params"]}
    if self.projector is not None:
      tokens = jnp.zeros((1, 1, self.model.hidden_size), jnp.float32)
      params["projector"] = self.projector.init(k2, tokens)["params"]
    return params


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for values that would otherwise fail deep inside jit."""
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
      config.objective.prediction in flow.PREDICTIONS,
      f"config.objective.prediction must be one of {flow.PREDICTIONS}, got {config.objective.prediction!r}",
    ),
    (
      config.objective.transform in flow.TRANSFORMS,
      f"config.objective.transform must be one of {flow.TRANSFORMS}, got {config.objective.transform!r}",
    ),
    (
      config.objective.target in flow.TARGETS,
      f"config.objective.target must be one of {flow.TARGETS}, got {config.objective.target!r}",
    ),
    (
      config.objective.t_distribution in flow.T_DISTRIBUTIONS,
      f"config.objective.t_distribution must be one of {flow.T_DISTRIBUTIONS}, got {config.objective.t_distribution!r}",
    ),
    (config.objective.tau > 0, f"config.objective.tau must be > 0, got {config.objective.tau}"),
    (config.objective.eps >= 0, f"config.objective.eps must be >= 0, got {config.objective.eps}"),
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
# State creation: abstract first, born sharded.
# ------------------------------------------------------------------------------------------------


def _init_boxed_fn(setup: Setup):
  def init_boxed(rng):
    params = setup.init_params(rng)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=setup.tx.init(params),
      rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
      num_skipped=jnp.zeros((), jnp.int32),
    )

  return init_boxed


def abstract_train_state(setup: Setup, mesh, rules, seed: int):
  """(abstract state as ShapeDtypeStructs carrying shardings, state shardings); allocates nothing."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(_init_boxed_fn(setup), jax.random.key(seed))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  return abstract_with_shardings(nn.unbox(boxed), shardings), shardings


def create_train_state(setup: Setup, mesh, rules, seed: int):
  """(state, state_shardings): parameters initialised directly into their shardings."""
  _, shardings = abstract_train_state(setup, mesh, rules, seed)
  init_boxed = _init_boxed_fn(setup)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=shardings)(
      jax.random.key(seed)
    )
  sharding.assert_sufficiently_sharded(state.params, shardings.params, mesh)
  return state, shardings


def abstract_with_shardings(state, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
  )


def load_pretrained_denoiser(setup: Setup, model_init: str):
  """PixNerd params from a converted export, re-laid-out for this model (scan or not)."""
  from flowseg_jax.convert import pixnerd as pixnerd_convert

  src_model, src_params = pixnerd_convert.load_converted(model_init)
  if src_model.arch_config() != setup.model.arch_config():
    raise ValueError(
      f"config.model_init={model_init!r} holds architecture {src_model.arch_config()}, but "
      f"config.model builds {setup.model.arch_config()}"
    )
  _, params = pixnerd_convert.relayout(src_params, src_model, scan_blocks=setup.model.scan_blocks)
  return params


def load_pretrained_projector(setup: Setup, model_init: str, params):
  """The REPA projector stored in a converted PixNerd export, when REPA is on and asks for it."""
  if setup.projector is None or not setup.config.repa.init_projector:
    return None
  from flowseg_jax.convert import pixnerd as pixnerd_convert

  projector = pixnerd_convert.load_converted_projector(model_init)
  if projector is None:
    logging.info("%s holds no REPA projector: it starts from scratch.", model_init)
    return None
  want = jax.tree.map(lambda a: a.shape, params["projector"])
  got = jax.tree.map(lambda a: a.shape, projector)
  if want != got:
    raise ValueError(
      f"config.model_init={model_init!r} holds a REPA projector of shapes {got}, but config.repa "
      f"builds {want}; set config.repa.init_projector=False to start it from scratch"
    )
  logging.info("Initialised the REPA projector from %s.", model_init)
  return projector


def initialise_or_restore(setup, state, shardings, manager, data_iter):
  """Resume order: own checkpoint > config.init_from > config.model_init > scratch."""
  config = setup.config
  abstract = abstract_with_shardings(state, shardings)
  restored = checkpointing.restore_latest(manager, abstract, data_iter)
  if restored is not None:
    return restored[0], "workdir"
  if config.init_from:
    params, ema, step = checkpointing.restore_params_from(config.init_from, abstract)
    logging.info("Initialised params/EMA from %s step %d.", config.init_from, step)
    return state.replace(params=params, ema_params=ema), f"init_from:{step}"
  if config.model_init:
    denoiser = load_pretrained_denoiser(setup, config.model_init)
    placed = jax.device_put(denoiser, shardings.params["denoiser"])
    params = {**state.params, "denoiser": placed}
    # A separate copy: params and EMA are donated to the train step as distinct buffers.
    ema = {
      **state.ema_params,
      "denoiser": jax.device_put(denoiser, shardings.ema_params["denoiser"]),
    }
    logging.info("Initialised the denoiser from %s.", config.model_init)
    projector = load_pretrained_projector(setup, config.model_init, state.params)
    if projector is not None:
      params["projector"] = jax.device_put(projector, shardings.params["projector"])
      ema["projector"] = jax.device_put(projector, shardings.ema_params["projector"])
    return state.replace(params=params, ema_params=ema), "model_init"
  return state, "scratch"


# ------------------------------------------------------------------------------------------------
# The train step.
# ------------------------------------------------------------------------------------------------


def loss_fn(params, teacher_params, images, labels, key, total_valid, *, setup: Setup):
  """Loss of one micro-batch, scaled so that summing micro-batches gives the global-batch loss."""
  cfg = setup.config.objective
  b = images.shape[0]
  t = flow.sample_t(
    key,
    (b,),
    distribution=cfg.t_distribution,
    mean=cfg.t_mean,
    std=cfg.t_std,
    shift=cfg.t_shift,
  )
  x_t = flow.interpolant(images, labels, t, setup.centroids, mask_ignored=cfg.mask_ignored)
  y = jnp.full((b,), setup.cond_label, jnp.int32)
  metrics = {}
  if setup.projector is None:
    out = setup.model.apply({"params": params["denoiser"]}, x_t, t, y)
  else:
    out, tokens = setup.model.apply(
      {"params": params["denoiser"]},
      x_t,
      t,
      y,
      return_block_tokens=setup.config.repa.align_layer,
    )
    projected = setup.projector.apply({"params": params["projector"]}, tokens)
    target_tokens = repa.teacher_tokens(
      setup.teacher, teacher_params, images, denoiser_patch=setup.model.patch_size
    )
    metrics["repa_loss"] = repa.repa_loss(
      projected, target_tokens, eps=setup.config.repa.cosine_eps
    )
  loss, aux = flow.flowseg_loss(out, images, labels, t, setup.centroids, **flow.loss_kwargs(cfg))
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


def train_step(state: TrainState, batch, teacher_params, *, setup: Setup):
  """One optimiser step on the global batch; non-finite updates are skipped and counted."""
  config = setup.config
  accum = config.optim.grad_accum_steps
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images, labels = batch["image"], batch["label"]
  valid = labels != centroids_lib.IGNORE_LABEL if config.objective.mask_ignored else labels >= 0
  total_valid = jnp.sum(valid.astype(jnp.int32))

  def micro(x):  # (B, ...) -> (accum, B / accum, ...): micro-batch i takes rows i, i + accum, ...
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)

  grad_fn = jax.grad(functools.partial(loss_fn, setup=setup), has_aux=True)

  def accumulate(carry, xs):
    grads, metrics = carry
    mb_images, mb_labels, mb_key = xs
    g, m = grad_fn(state.params, teacher_params, mb_images, mb_labels, mb_key, total_valid)
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
  )
  zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics)
  (grads, metrics), _ = jax.lax.scan(
    accumulate, (zero_grads, zero_metrics), (micro(images), micro(labels), keys)
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
    learning_rate=setup.lr_schedule(state.step),
    skipped=(~finite).astype(jnp.int32),
    num_valid=total_valid,
  )
  return new_state, metrics


def compile_train_step(setup: Setup, mesh, state_shardings):
  data_sharding = sharding.batch_sharding(mesh)
  repl = NamedSharding(mesh, P())
  teacher_sharding = None
  if setup.teacher_params is not None:
    teacher_sharding = jax.tree.map(lambda _: repl, setup.teacher_params)
  return jax.jit(
    functools.partial(train_step, setup=setup),
    in_shardings=(
      state_shardings,
      {"image": data_sharding, "label": data_sharding},
      teacher_sharding,
    ),
    out_shardings=(state_shardings, repl),
    donate_argnums=0,
  )


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


class _Preemption:
  """SIGTERM sets a flag; the loop checkpoints and exits cleanly at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): rely on orbax's check
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: checkpointing and exiting at the next step.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _mean_metrics(history: list[dict]) -> dict[str, float]:
  """Fetches a window of per-step device metrics at once and summarises them."""
  fetched = jax.device_get(history)
  out = {}
  for k in fetched[0]:
    values = np.asarray([m[k] for m in fetched], np.float64)
    out[k] = float(values.sum()) if k in ("skipped", "num_bad_labels") else float(values.mean())
  return out


def _append_jsonl(workdir: str, record: dict) -> None:
  """One JSON line per log step in workdir/metrics.jsonl (process 0): easy to plot or diff."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from workdir if it holds checkpoints), evaluates, and returns the last metrics."""
  os.makedirs(workdir, exist_ok=True)
  setup = Setup(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  rules = sharding.rules_from_config(config.sharding_rules)
  check_batch_fits_mesh(config, mesh)
  if setup.teacher_params is not None:
    setup.teacher_params = jax.device_put(setup.teacher_params, sharding.replicated(mesh))
  logging.info(
    "Mesh %s over %d devices, %d process(es).",
    dict(mesh.shape),
    jax.device_count(),
    jax.process_count(),
  )
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  data_iter = pipeline.create_train_iterator(config.input, seed=config.seed)
  state, state_shardings = create_train_state(setup, mesh, rules, config.seed)
  manager = checkpointing.create_manager(
    os.path.join(workdir, "checkpoints"),
    keep=config.keep_checkpoints,
    async_save=config.async_checkpointing,
  )
  state, origin = initialise_or_restore(setup, state, state_shardings, manager, data_iter)
  start_step = int(jax.device_get(state.step))
  logging.info("Starting at step %d (%s).", start_step, origin)
  parameter_overview.log_parameter_overview(jax.device_get(state.params))

  step_fn = compile_train_step(setup, mesh, state_shardings)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(
      {k: str(v) for k, v in config.to_dict().items() if not isinstance(v, dict)}
    )
  hooks = []
  if jax.process_index() == 0:
    hooks.append(
      periodic_actions.ReportProgress(
        num_train_steps=config.total_steps, writer=writer, every_steps=config.log_every_steps
      )
    )

  history: list[dict] = []
  skipped_examples = 0
  last_eval: dict[str, Any] = {}
  step = start_step
  with (
    _Preemption() as preemption,
    metric_writers.ensure_flushes(writer),
    jax.set_mesh(mesh),
    nn.logical_axis_rules(rules),
  ):
    while step < config.total_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        local = next(data_iter)
        skipped_examples += int(local.pop("num_skipped", 0))
        batch = sharding.shard_batch(local, mesh)
        state, metrics = step_fn(state, batch, setup.teacher_params)
      step += 1
      history.append(metrics)
      for hook in hooks:
        hook(step)

      if step % config.log_every_steps == 0 or step == config.total_steps:
        summary = _mean_metrics(history)
        history = []
        summary["skipped_examples"] = skipped_examples
        if not np.isfinite(summary["loss"]):
          logging.warning(
            "Non-finite mean loss at step %d (updates skipped: %d).", step, summary["skipped"]
          )
        writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
        _append_jsonl(workdir, {"step": step, **summary})

      is_last = step == config.total_steps
      do_eval = config.eval_every_steps and (step % config.eval_every_steps == 0 or is_last)
      eval_metrics = None
      if do_eval:
        last_eval = evaluate.evaluate_state(
          config, setup, state, mesh, workdir=workdir, step=step, writer=writer
        )
        eval_metrics = {checkpointing.BEST_METRIC: last_eval["mIoU"]}
      stop = preemption.requested or manager.reached_preemption(step)
      if step % config.ckpt_every_steps == 0 or is_last or stop or eval_metrics is not None:
        checkpointing.save(manager, step, state, data_iter, metrics=eval_metrics)
      if stop:
        logging.warning("Preempted at step %d: checkpoint written, exiting.", step)
        break

  manager.wait_until_finished()
  manager.close()
  result = {
    "step": step,
    "num_skipped_updates": int(jax.device_get(state.num_skipped)),
    **last_eval,
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "train_result.json"), "w") as f:
      json.dump({k: v for k, v in result.items() if np.isscalar(v)}, f, indent=2)
  return result
