"""train_and_evaluate(config, workdir): mesh -> data -> state -> jit step -> loop -> checkpoints -> evals."""

from __future__ import annotations

import functools
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
from clu import parameter_overview
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import (
  checkpointing,
  evaluate,
  flow,
  inference,
  models,
  optim,
  prompted_flow,
  run_status,
  sampling,
  sharding,
  tasks,
  writers,
)
from flowseg_jax import run_records as records
from flowseg_jax.data import pipeline, sources
from flowseg_jax.models import repa
from flowseg_jax.run_status import RunError
from flowseg_jax.train_state import (  # noqa: F401 - state creation is part of train's API
  TrainState,
  abstract_train_state,
  abstract_with_shardings,
  create_train_state,
  initialise,
  load_pretrained_denoiser,
  load_pretrained_projector,
  load_pretrained_t2i,
)
from flowseg_jax.workdir_lock import WorkdirLock

# ------------------------------------------------------------------------------------------------
# Static pieces: model, projector, teacher, optimizer, centroids.
# ------------------------------------------------------------------------------------------------


class Setup(inference.InferenceSetup):
  """Everything the step closes over: built once, from the config (the model, centroids and
  conditioning label as inference builds them, plus the optimiser and the REPA teacher)."""

  def __init__(self, config: ml_collections.ConfigDict, *, teacher=None):
    """teacher: optional REPA (DinoViT, params) used instead of loading config.repa.teacher_dir;
    the params may be `jax.ShapeDtypeStruct`s (AOT planning, benchmarks/scale.py)."""
    validate_config(config)
    super().__init__(config)
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
    if not 1 <= cfg.align_layer <= self.model.num_cond_blocks:
      raise ValueError(
        f"config.repa.align_layer={cfg.align_layer} must lie in [1, {self.model.num_cond_blocks}]"
      )
    if teacher is None:
      dtype = models.DTYPES[cfg.teacher_dtype]
      teacher = dinov2_convert.load_orbax(cfg.teacher_dir, dtype=dtype)
    self.teacher, self.teacher_params = teacher
    self.projector = repa.Projector(
      hidden_dim=cfg.proj_hidden_dim or self.model.hidden_size,
      out_dim=self.teacher.embed_dim,
      dtype=self.model.dtype,
    )

  def init_params(self, rng):
    """Boxed (logically partitioned) parameters {'denoiser': ..., ['projector': ...]}."""
    x, t, y = tasks.init_inputs(self.task, self.config.input.image_size)
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
# The train step.
# ------------------------------------------------------------------------------------------------


def loss_fn(params, teacher_params, images, labels, key, total_valid, cond=None, *, setup: Setup):
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
  metrics = {}
  if setup.projector is None:
    out = setup.task.apply(params["denoiser"], x_t, t, cond)
  else:
    out, tokens = setup.task.apply(
      params["denoiser"], x_t, t, cond, return_block_tokens=setup.config.repa.align_layer
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
  cond = setup.task.condition(batch)
  refine_metrics = {}
  if setup.task.name == "prompted" and config.prompted.refine.enabled:
    labels, refine_metrics = refine_targets(state, images, labels, cond, setup=setup)
  valid = labels != centroids_lib.IGNORE_LABEL if config.objective.mask_ignored else labels >= 0
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
    **refine_metrics,
  )
  return new_state, metrics


def refine_targets(state: TrainState, images, labels, cond, *, setup: Setup):
  """Label refinement (`prompted_flow.refine_labels`): the EMA network's one-step prediction from
  the clean image replaces confident, differing boundary targets after the warm-up."""
  cfg = setup.config.prompted.refine
  t0 = jnp.zeros((images.shape[0],), jnp.float32)
  out = setup.task.apply(jax.lax.stop_gradient(state.ema_params["denoiser"]), images, t0, cond)
  obj = setup.config.objective
  v = sampling.velocity(out, images, t0, prediction=obj.prediction, t_eps=obj.t_eps)
  refined, changed = prompted_flow.refine_labels(
    labels,
    images + v,
    setup.centroids,
    state.step,
    warmup_steps=cfg.warmup_steps,
    boundary_width=cfg.boundary_width,
    margin=cfg.margin,
  )
  return refined, {"refined_pixels": changed}


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
      {k: data_sharding for k in setup.task.batch_keys},
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


class NonFiniteError(RunError):
  """Too many consecutive updates were skipped for non-finite loss or gradients."""


def _fetch_window(history: list[dict]) -> tuple[dict[str, float], list[int]]:
  """Fetches a window of per-step device metrics at once: (summary, per-step skipped flags)."""
  fetched = jax.device_get(history)
  out = {}
  for k in fetched[0]:
    values = np.asarray([m[k] for m in fetched], np.float64)
    out[k] = float(values.sum()) if k in ("skipped", "num_bad_labels") else float(values.mean())
  return out, [int(m["skipped"]) for m in fetched]


class _SkipWatch:
  """Counts consecutive skipped updates from the fetched log windows (no extra host syncs)."""

  def __init__(self, limit: int):
    self.limit = int(limit)
    self.run = 0

  def update(self, flags: list[int], step: int) -> None:
    for flag in flags:
      self.run = self.run + 1 if flag else 0
    if self.limit > 0 and self.run >= self.limit:
      raise NonFiniteError(
        f"stopped at step {step}: the last {self.run} updates were all skipped for a non-finite "
        f"loss or gradient (config.max_consecutive_skipped={self.limit}). Lower "
        "config.optim.learning_rate, check config.optim.grad_clip_norm and the data, then rerun: "
        "training resumes from the last checkpoint."
      )


def _data_iterator_for(config, global_batch: int):
  """make_data_iter(meta) for checkpointing.restore_for_training, and the new-run iterator."""

  def make(meta: dict):
    if meta.get("process_count", 1) == jax.process_count():
      start = int(meta.get("data_start", 0))  # grain's saved state continues from there
    else:
      start = int(meta.get("data_position", int(meta.get("step", 0)) * global_batch))
    return pipeline.create_train_iterator(config.input, seed=config.seed, start=start)

  return make


def _check_eval_data(config) -> None:
  """Every evaluation example is read once before step 1: bad ones stop the run now ('raise') or
  are counted and skipped ('skip'), not at the first evaluation hours later."""
  if not config.eval_every_steps:
    return
  try:
    bad = pipeline.check_eval_examples(config.input)
  except sources.BadExampleError as e:
    raise EvalDataError(
      f"evaluation data: {e} (found before training; fix the example, or set "
      "config.input.on_bad_example='skip' to leave bad examples out of the evaluation)"
    ) from None
  if bad:
    logging.warning("%d bad evaluation example(s) will be skipped (counted in eval results).", bad)


class EvalDataError(RunError):
  """An evaluation example cannot be used."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from workdir if it holds checkpoints), evaluates, and returns the last metrics.

  The result's "status" is run_status.FINISHED or PREEMPTED (also in workdir/train_result.json);
  faults raise a run_status.RunError with a one-line (or few-line) explanation.
  """
  os.makedirs(workdir, exist_ok=True)
  setup = Setup(config)
  mesh = sharding.mesh_from_config(config.mesh)
  check_batch_fits_mesh(config, mesh)
  with WorkdirLock(workdir):
    return _train_locked(config, workdir, setup, mesh)


def _train_locked(config, workdir, setup, mesh) -> dict[str, Any]:
  rules = sharding.rules_from_config(config.sharding_rules)
  logging.info(
    "Mesh %s over %d devices, %d process(es).",
    dict(mesh.shape),
    jax.device_count(),
    jax.process_count(),
  )
  abstract, state_shardings = abstract_train_state(setup, mesh, rules, config.seed)
  parameter_overview.log_parameter_overview(abstract.params, include_stats="sharding")
  manager = checkpointing.create_manager(
    os.path.join(workdir, "checkpoints"),
    keep=config.keep_checkpoints,
    async_save=config.async_checkpointing,
  )
  global_batch = int(config.input.batch_size)
  make_data_iter = _data_iterator_for(config, global_batch)
  restored = checkpointing.restore_for_training(
    manager,
    abstract,
    make_data_iter,
    config_diff=records.config_differences(workdir, config),
  )
  if restored is not None:
    state, start_step, meta, data_iter = restored
    done = records.finished_result(workdir, start_step, config.total_steps)
    if done is not None:
      manager.close()
      logging.info("%s already finished at step %d: nothing to do.", workdir, start_step)
      return done
    _check_eval_data(config)
    origin = "workdir"
    position = int(meta.get("data_position", start_step * global_batch))
    data_start = data_iter.get_state()["input"]["start"]
  else:
    _check_eval_data(config)
    state, origin = initialise(setup, mesh, rules, state_shardings)
    data_iter = make_data_iter({})
    start_step, position, data_start = 0, 0, 0
  records.write_config(workdir, config)
  records.truncate_metrics(workdir, start_step)
  logging.info("Starting at step %d (%s), data position %d.", start_step, origin, position)
  if setup.teacher_params is not None:
    setup.teacher_params = jax.device_put(setup.teacher_params, sharding.replicated(mesh))

  step_fn = compile_train_step(setup, mesh, state_shardings)
  writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(config.to_dict())
  progress = inference.Progress(
    "train", config.total_steps, config.log_every_steps, start=start_step
  )

  history: list[dict] = []
  skipped_examples = 0
  skip_watch = _SkipWatch(config.max_consecutive_skipped)
  last_eval: dict[str, Any] = {}
  step = start_step
  status = run_status.FINISHED

  def save(metrics=None):
    meta = {"data_start": data_start, "data_position": position + skipped_examples}
    checkpointing.save(manager, step, state, data_iter, meta=meta, metrics=metrics)

  def evaluate_now():
    # The step's checkpoint is on disk before its evaluation starts: whatever the evaluation
    # does, a rerun resumes after this step rather than repeating it.
    if step not in manager.all_steps():
      save()
    checkpointing.check_saved(manager, wait=True)
    result = evaluate.evaluate_state(
      config, setup, state, mesh, workdir=workdir, step=step, writer=writer
    )
    checkpointing.record_metrics(
      manager, step, {checkpointing.BEST_METRIC: result[setup.task.best_metric]}
    )
    return result

  try:
    with (
      _Preemption() as preemption,
      writers.ensure_flushes(writer),
      jax.set_mesh(mesh),
      nn.logical_axis_rules(rules),
    ):
      while step < config.total_steps:
        checkpointing.check_saved(manager)  # a failed asynchronous save stops the run here
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          local = next(data_iter)
          skipped_examples += int(local.pop("num_skipped", 0))
          batch = sharding.shard_batch(local, mesh)
          state, metrics = step_fn(state, batch, setup.teacher_params)
        step += 1
        position += global_batch
        history.append(metrics)
        progress.update()

        if step % config.log_every_steps == 0 or step == config.total_steps:
          summary, skipped_flags = _fetch_window(history)
          history = []
          summary["skipped_examples"] = skipped_examples
          if not np.isfinite(summary["loss"]):
            logging.warning(
              "Non-finite mean loss at step %d (updates skipped: %d).", step, summary["skipped"]
            )
          writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
          records.append_metrics(workdir, {"step": step, **summary})
          skip_watch.update(skipped_flags, step)

        is_last = step == config.total_steps
        stop = preemption.requested or manager.reached_preemption(step)
        eval_due = config.eval_every_steps and (step % config.eval_every_steps == 0 or is_last)
        if step % config.ckpt_every_steps == 0 or is_last or stop:
          save()
        if stop and (eval_due or not is_last):  # no evaluation in a preemption's grace period
          logging.warning("Preempted at step %d: checkpoint written, exiting.", step)
          status = run_status.PREEMPTED
          break
        if eval_due:
          last_eval = evaluate_now()
      final_eval_missing = config.eval_every_steps and not last_eval
      if status == run_status.FINISHED and step == config.total_steps and final_eval_missing:
        last_eval = evaluate_now()  # the final checkpoint was written, its evaluation was not
    checkpointing.check_saved(manager, wait=True)
  except run_status.RunError as e:
    if not isinstance(e, checkpointing.CheckpointWriteError):
      _close_quietly(manager)
    records_failed = {"status": run_status.FAILED, "step": step, "error": str(e)}
    try:
      records.write_result(workdir, records_failed)
    except OSError:
      pass  # e.g. the disk that failed the checkpoint is full
    raise
  manager.close()
  result = {
    "status": status,
    "step": step,
    "num_skipped_updates": int(jax.device_get(state.num_skipped)),
    **last_eval,
  }
  records.write_result(workdir, result)
  return result


def restore_train_state(config: ml_collections.ConfigDict, workdir: str):
  """(setup, mesh, state, step) of the newest readable checkpoint of workdir: the whole TrainState
  (online and EMA parameters, optimiser), e.g. to compare runs. Inference uses `Segmenter`."""
  setup = Setup(config)
  mesh = sharding.mesh_from_config(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  abstract, _ = abstract_train_state(setup, mesh, rules, config.seed)
  manager = checkpointing.create_manager(
    os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints, async_save=False
  )
  restored = checkpointing.restore_latest(manager, abstract, None)
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no readable checkpoint")
  state, step = restored
  return setup, mesh, state, step


def _close_quietly(manager) -> None:
  try:
    manager.close()
  except Exception as e:  # noqa: BLE001 - already stopping for the error being raised
    logging.warning("Closing the checkpoint manager: %s", e)
