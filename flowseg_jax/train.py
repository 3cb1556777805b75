"""train_and_evaluate(config, workdir): mesh -> data -> state -> jit step -> loop -> checkpoints -> evals."""

from __future__ import annotations

import signal
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview

from flowseg_jax import checkpoint_faults, checkpointing, evaluate, sharding, storage, train_state
from flowseg_jax.data import datasets, pipeline, preflight, sources
from flowseg_jax.run import files, hosts, writers
from flowseg_jax.run import status as run_status
from flowseg_jax.run.agreement import Agreement
from flowseg_jax.run.lock import WorkdirLock
from flowseg_jax.run.progress import Progress
from flowseg_jax.run.status import RunError
from flowseg_jax.train_step import TrainSetup, check_batch_fits_mesh, compile_train_step

# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


class _StopSignals:
  """SIGTERM (a preemption notice) and SIGINT (Ctrl-C) ask the loop to checkpoint and stop at its
  next agreement point; `code` is the request (run.status.STOP_CODES), agreed over processes by the
  loop. A second Ctrl-C stops at once (KeyboardInterrupt, no checkpoint).

  The Python SIGTERM handler replaces the notifier JAX's preemption sync manager installs; the loop
  still asks orbax (`reached_preemption`) for notices JAX receives in other ways, and that answer is
  agreed by JAX itself."""

  _SIGNALS = {signal.SIGTERM: run_status.PREEMPTED, signal.SIGINT: run_status.INTERRUPTED}

  def __init__(self):
    self.code = 0
    self._previous = {}

  def __enter__(self):
    for signum in self._SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): rely on orbax's check
        pass
    return self

  def _handle(self, signum, frame):
    status = self._SIGNALS[signum]
    if signum == signal.SIGINT and self.code == run_status.STOP_CODES[run_status.INTERRUPTED]:
      raise KeyboardInterrupt
    logging.warning(
      "%s received: checkpointing and exiting at the next step (status %s).",
      signal.Signals(signum).name,
      status,
    )
    self.code = max(self.code, run_status.STOP_CODES[status])

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


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


def _check_data(config, agreement: Agreement) -> None:
  """The data pre-flight, before step 1 of a new or resumed run: every mask of the training and
  evaluation splits is read (data.preflight: folder, ADE20K and COCO-Stuff datasets), then every
  evaluation example decoded. Each process checks its share; a bad example on any process stops
  every process with its one line ('raise'), or is counted and skipped ('skip')."""
  splits = [config.input.train_split]
  if config.eval_every_steps:
    splits.append(config.input.eval_split)
  reports = []
  with agreement.hold():
    for split in dict.fromkeys(splits):
      reports.append(_preflight(config, split, training=split == config.input.train_split))
  agreement.agree()
  names = datasets.class_names(config.input) if any(reports) else []
  for report in filter(None, reports):
    logging.info(
      "Pre-flight, %s split: %d example(s) on this process; classes: %s.",
      report.split,
      report.num_examples,
      report.class_summary(names),
    )
    if report.bad:
      logging.warning(
        "Pre-flight, %s split: %d bad example(s) or unpaired file(s) skipped; the first: %s",
        report.split,
        len(report.bad),
        report.bad[0][1],
      )
  _check_eval_data(config, agreement)


def _preflight(config, split: str, *, training: bool):
  error = TrainDataError if training else EvalDataError
  what = f"{'training' if training else 'evaluation'} data ({split} split, pre-flight)"
  try:
    return pipeline.check_split(config.input, split)
  except preflight.SplitError as e:
    raise error(f"{what}: {e}") from None
  except sources.BadExampleError as e:
    raise error(
      f"{what}: {e} (config.input.on_bad_example='skip' would leave bad examples out)"
    ) from None
  except (OSError, ValueError) as e:  # a folder that cannot be listed
    raise error(f"{what}: {e}") from None


def _check_eval_data(config, agreement: Agreement) -> None:
  """Every evaluation example is read once before step 1: bad ones stop the run now ('raise') or
  are counted and skipped ('skip'), not at the first evaluation hours later. Each process reads
  its own share; a bad one stops every process."""
  if not config.eval_every_steps:
    return
  bad = 0
  with agreement.hold():
    try:
      bad = pipeline.check_eval_examples(config.input)
    except sources.BadExampleError as e:
      raise EvalDataError(
        f"evaluation data: {e} (found before training; fix the example, or set "
        "config.input.on_bad_example='skip' to leave bad examples out of the evaluation)"
      ) from None
  agreement.agree()
  if bad:
    logging.warning("%d bad evaluation example(s) will be skipped (counted in eval results).", bad)


class EvalDataError(RunError):
  """An evaluation example cannot be used."""


class TrainDataError(RunError):
  """A training example cannot be used."""


def _next_batch(data_iter) -> dict:
  try:
    return next(data_iter)
  except sources.BadExampleError as e:
    raise TrainDataError(
      f"training data: {e} (fix the example, or set config.input.on_bad_example='skip' to leave "
      "bad examples out; the run resumes from its last checkpoint)"
    ) from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from workdir if it holds checkpoints), evaluates, and returns the last metrics.

  The result's "status" is run_status.FINISHED or PREEMPTED (also in workdir/train_result.json);
  faults raise a run_status.RunError with a one-line (or few-line) explanation.
  """
  hosts.check_inputs(config)  # every host sees the data and weights, before anything reads them
  try:  # every check that needs no workdir runs before one is created
    setup = TrainSetup(config)
    splits = [config.input.train_split] + [config.input.eval_split] * bool(config.eval_every_steps)
    setup.task.check_inputs(splits)  # e.g. text-feature caches of another encoder
    mesh = sharding.mesh_from_config(config.mesh)
    check_batch_fits_mesh(config, mesh)
  except ValueError as e:
    raise run_status.ConfigError(str(e)) from None
  hosts.share_workdir(str(storage.path(workdir)))  # created by process 0, seen by every host
  with WorkdirLock(workdir):
    return _train_locked(config, workdir, setup, mesh)


def _train_locked(config, workdir, setup, mesh) -> dict[str, Any]:
  agreement = Agreement()
  rules = sharding.rules_from_config(config.sharding_rules)
  logging.info(
    "Mesh %s over %d devices, %d process(es).",
    dict(mesh.shape),
    jax.device_count(),
    jax.process_count(),
  )
  abstract, state_shardings = train_state.abstract_train_state(setup, mesh, rules, config.seed)
  manager = checkpointing.create_manager(
    storage.path(workdir) / files.CHECKPOINTS_DIR,
    keep=config.keep_checkpoints,
    async_save=config.async_checkpointing,
  )
  global_batch = int(config.input.batch_size)
  make_data_iter = _data_iterator_for(config, global_batch)
  restored = checkpointing.restore_for_training(
    manager,
    abstract,
    make_data_iter,
    config_diff=files.config_differences(workdir, config),
  )
  if restored is not None:
    state, start_step, meta, data_iter = restored
    done = files.finished_result(workdir, start_step, config.total_steps)
    if done is not None:
      manager.close()
      data_iter.close()
      logging.info("%s already finished at step %d: nothing to do.", workdir, start_step)
      return done
    _check_data(config, agreement)
    origin = "workdir"
    position = int(meta.get("data_position", start_step * global_batch))
    data_start = data_iter.get_state()["input"]["start"]
  else:
    _check_data(config, agreement)
    state, origin = train_state.initialise(setup, mesh, rules, state_shardings)
    data_iter = make_data_iter({})
    start_step, position, data_start = 0, 0, 0
  parameter_overview.log_parameter_overview(abstract.params, include_stats="sharding")
  files.write_config(workdir, config)
  files.truncate_metrics(workdir, start_step)
  logging.info("Starting at step %d (%s), data position %d.", start_step, origin, position)
  if setup.teacher_params is not None:
    # From each process's own copy: a device_put onto a mesh spanning processes is a cross-host
    # transfer, which the CPU and GPU runtimes refuse.
    setup.teacher_params = sharding.place_host_tree(setup.teacher_params, sharding.replicated(mesh))

  step_fn = compile_train_step(setup, mesh, state_shardings)
  writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(config.to_dict())
  progress = Progress("train", config.total_steps, start=start_step)

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
    with agreement.hold():
      checkpointing.check_saved(manager, wait=True)
    agreement.agree()  # a failed write on any process stops all before the evaluation's collectives
    params = (state.ema_params if config.eval.use_ema else state.params)["denoiser"]
    result = evaluate.evaluate_params(
      config, setup.task, params, mesh, workdir=workdir, step=step, writer=writer
    )
    with agreement.hold():
      checkpointing.record_metrics(
        manager, step, {checkpointing.BEST_METRIC: result[setup.task.best_metric]}
      )
    return result

  try:
    with (
      _StopSignals() as signals,
      writers.ensure_flushes(writer),
      jax.set_mesh(mesh),
      nn.logical_axis_rules(rules),
    ):
      while step < config.total_steps:
        with agreement.hold():  # this process's host work; on many processes a failure is agreed
          checkpointing.check_saved(manager)  # a failed asynchronous save stops the run here
          local = _next_batch(data_iter)
        # Once per step, before the step's collectives: any process's error stops all of them
        # here, and a stop request seen by any process stops all after this same step.
        stop_code = agreement.agree(signals.code)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          skipped_examples += int(local.pop("num_skipped", 0))
          batch = sharding.shard_batch(local, mesh)
          state, metrics = step_fn(state, batch, setup.teacher_params)
        step += 1
        position += global_batch
        history.append(metrics)
        progress.update()

        if step % config.log_every_steps == 0 or step == config.total_steps:
          with agreement.hold():
            summary, skipped_flags = _fetch_window(history)
            history = []
            summary["skipped_examples"] = skipped_examples
            if not np.isfinite(summary["loss"]):
              logging.warning(
                "Non-finite mean loss at step %d (updates skipped: %d).", step, summary["skipped"]
              )
            writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
            files.append_metrics(workdir, {"step": step, **summary})
            skip_watch.update(skipped_flags, step)
          stop_code = max(stop_code, agreement.agree(signals.code))

        if not agreement.multi_process:  # nothing to agree: act on a signal after this step
          stop_code = max(stop_code, signals.code)
        is_last = step == config.total_steps
        if not stop_code and manager.reached_preemption(step):  # agreed by JAX itself
          stop_code = run_status.STOP_CODES[run_status.PREEMPTED]
        eval_due = config.eval_every_steps and (step % config.eval_every_steps == 0 or is_last)
        if step % config.ckpt_every_steps == 0 or is_last or stop_code:
          with agreement.hold():
            save()
        if stop_code and (eval_due or not is_last):  # no evaluation in a preemption's grace period
          status = run_status.STOP_STATUS[stop_code]
          logging.warning("Stopped (%s) at step %d: checkpoint written, exiting.", status, step)
          break
        if eval_due:
          last_eval = evaluate_now()
      final_eval_missing = config.eval_every_steps and not last_eval
      if status == run_status.FINISHED and step == config.total_steps and final_eval_missing:
        last_eval = evaluate_now()  # the final checkpoint was written, its evaluation was not
    with agreement.hold():
      checkpointing.check_saved(manager, wait=True)
    agreement.agree()  # every process ends with the same status
  except run_status.RunError as e:
    if not isinstance(e, checkpoint_faults.CheckpointWriteError):
      _close_quietly(manager)
    records_failed = {"status": run_status.FAILED, "step": step, "error": str(e)}
    try:
      files.write_result(workdir, records_failed)
    except OSError:
      pass  # e.g. the disk that failed the checkpoint is full
    data_iter.close()
    raise
  manager.close()
  data_iter.close()  # data workers stop now, their shared memory released (not at exit)
  # The last evaluation may be of an earlier step (a run stopped between evaluations): its metrics
  # keep their own step as eval_step, and "step" is where training stopped.
  evaluated = {**last_eval, "eval_step": last_eval["step"]} if last_eval else {}
  result = {
    **evaluated,
    "status": status,
    "step": step,
    "num_skipped_updates": int(jax.device_get(state.num_skipped)),
  }
  files.write_result(workdir, result)
  return result


def _close_quietly(manager) -> None:
  try:
    manager.close()
  except Exception as e:  # noqa: BLE001 - already stopping for the error being raised
    logging.warning("Closing the checkpoint manager: %s", e)
