"""orbax checkpoints of the train state with the data position, and the resume order.

A checkpoint step holds three items: `state` (the TrainState pytree), `data_iter` (grain's
per-process iterator state) and `meta` (JSON: step, topology and the data position: `data_start`,
the global example index the iterator was built at, and `data_position`, the global index of the
next example). Saves are asynchronous; the last `keep` steps and the best step by the task's eval score are kept.

Restoring (`restore_for_training`) walks from the newest step back:
- the step's own metadata (parameter paths, shapes) is compared with the state this config builds
  first: another structure is refused (`CheckpointMismatchError`), never restarted over silently;
- a step that cannot be read (a lost or truncated file, missing metadata: `is_read_error`) is moved
  to `checkpoints/damaged/<step>-<time>/` for inspection and the next older step is tried, so a
  damaged newest checkpoint costs one interval and no rerun meets it again;
- the state is restored into abstract arrays carrying this run's shardings, so orbax reshards it
  for any device or process count. On the process count it was written with, grain's iterator
  state continues the data stream exactly; on another one the stream is rebuilt at the global
  `data_position` (pipeline.create_train_iterator's `start`).

Resume order (first that applies): this workdir's own checkpoints > `config.init_from` (another run's
checkpoint: params and EMA only, e.g. stage 2 from stage 1) > `config.model_init` (a converted PixNerd
export) > random initialisation.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from flowseg_jax import checkpoint_faults as faults
from flowseg_jax import storage
from flowseg_jax.run import files

STATE, DATA_ITER, META = "state", "data_iter", "meta"
# The evaluation score that picks the best checkpoint: the task's `best_metric` (mIoU, gIoU).
BEST_METRIC = "eval_best"
_OLD_BEST_METRIC = "eval_miou"  # written by earlier versions
DAMAGED_DIR = "damaged"


def topology() -> dict[str, int]:
  return {"process_count": jax.process_count(), "device_count": jax.device_count()}


def _best_score(metrics: dict) -> float:
  return metrics[BEST_METRIC] if BEST_METRIC in metrics else metrics[_OLD_BEST_METRIC]


def create_manager(
  directory: storage.PathLike, *, keep: int = 3, async_save: bool = True
) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep` steps plus the best by eval score."""
  if keep < 1:
    raise ValueError(f"config.keep_checkpoints must be >= 1, got {keep}")
  policies = ocp.checkpoint_managers
  preservation = policies.AnyPreservationPolicy(
    [
      policies.LatestN(keep),
      policies.BestN(get_metric_fn=_best_score, n=1, keep_checkpoints_without_metrics=False),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    enable_async_checkpointing=async_save,
    preservation_policy=preservation,
    create=True,
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
    storage.path(directory), item_names=(STATE, DATA_ITER, META), options=options
  )


def _write_failed(manager, step: int, e: BaseException) -> faults.CheckpointWriteError | None:
  reason = faults.write_error_reason(e)
  if reason is None:
    return None
  return faults.CheckpointWriteError(
    f"checkpoint of step {faults.failed_step(e, step)} could not be written to {manager.directory}: "
    f"{reason}"
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iter: Any | None,
  *,
  meta: dict | None = None,
  metrics: dict | None = None,
) -> bool:
  """Starts an (async) save of state, iterator and meta at `step`.

  Raises CheckpointWriteError (one line: directory and OS error) when this or an earlier
  asynchronous save could not be written.
  """
  items = {
    STATE: ocp.args.StandardSave(state),
    META: ocp.args.JsonSave({"step": step, **topology(), **(meta or {})}),
  }
  if data_iter is not None:
    items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
  try:
    return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
  except Exception as e:
    error = _write_failed(manager, step, e)
    if error is None:
      raise
    raise error from None


def check_saved(manager: ocp.CheckpointManager, *, wait: bool = False) -> None:
  """Raises CheckpointWriteError if a finished asynchronous save failed (waits for it if `wait`)."""
  try:
    if wait:
      manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:
    error = _write_failed(manager, manager.latest_step() or 0, e)
    if error is None:
      raise
    raise error from None


def record_metrics(manager: ocp.CheckpointManager, step: int, metrics: dict) -> None:
  """Attaches eval metrics to an already written step (it was saved before its evaluation ran), so
  the best-score preservation sees them; orbax keeps them in <step>/metrics/metrics."""
  if jax.process_index() == 0:
    directory = epath.Path(manager.directory) / str(step) / "metrics"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics").write_text(json.dumps(metrics))
  _barrier(f"flowseg_record_metrics_{step}")  # every process reloads after the file exists
  manager.reload()


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------------
# Restoring.
# ------------------------------------------------------------------------------------------------


def _flat_shapes(tree) -> dict[tuple, tuple]:
  flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True))
  return {k: tuple(getattr(v, "shape", ()) or ()) for k, v in flat.items()}


def saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict[tuple, tuple]:
  """{parameter path: shape} of a step's state, from its metadata only (reads no arrays)."""
  path = epath.Path(manager.directory) / str(step) / STATE
  metadata = ocp.StandardCheckpointHandler().metadata(path)
  return _flat_shapes(metadata.tree if hasattr(metadata, "tree") else metadata)


def move_aside(manager: ocp.CheckpointManager, step: int, error: BaseException) -> str:
  """Moves an unreadable step to checkpoints/damaged/<step>-<time>/ (process 0) and forgets it."""
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
  directory = storage.path(manager.directory)
  target = str(directory / DAMAGED_DIR / f"{step}-{stamp}")
  if jax.process_index() == 0:
    storage.move(directory / str(step), target)
    first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    logging.warning(
      "Checkpoint %s step %d is unreadable (%s: %s); moved to %s, trying an older one.",
      manager.directory,
      step,
      type(error).__name__,
      first_line,
      target,
    )
  _barrier(f"flowseg_move_aside_{step}")
  manager.reload()
  return target


def _read_meta(manager, step: int) -> dict:
  path = epath.Path(manager.directory) / str(step) / META / "metadata"
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    if not (epath.Path(manager.directory) / str(step) / META).exists():
      return {}  # written before meta existed
    raise


def _newest_readable(steps, restore_step: Callable[[int], Any], on_unreadable: Callable):
  """(restore_step(step), step) for the first of `steps` (newest first) that can be read, or None.

  A step whose files cannot be read (`is_read_error`) goes to `on_unreadable(step, error)` and the
  next older one is tried; any other error (e.g. CheckpointMismatchError) is raised.
  """
  for step in steps:
    try:
      return restore_step(step), step
    except faults.CheckpointMismatchError:
      raise
    except Exception as e:
      if not faults.is_read_error(e):
        raise
      on_unreadable(step, e)
  return None


def restore_for_training(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  make_data_iter: Callable[[dict], Any] | None = None,
  *,
  config_diff: list[str] = (),
  move_damaged: bool = True,
) -> tuple[Any, int, dict, Any] | None:
  """(state, step, meta, data_iter) of the newest readable step, or None if there is none.

  `abstract_state`: ShapeDtypeStructs with this run's shardings (orbax reshards into them).
  `make_data_iter(meta)` builds the train iterator for the checkpoint's data position; grain's saved
  state is restored into it when the process count is the one the checkpoint was written with.
  Unreadable steps are moved aside (or only skipped when `move_damaged` is False, e.g. by readers
  of a workdir another process trains in); another parameter structure raises
  CheckpointMismatchError.
  """
  directory = str(manager.directory)
  wanted = _flat_shapes(abstract_state)

  def restore_step(step):
    meta = _read_meta(manager, step)
    difference = faults.first_difference(saved_shapes(manager, step), wanted)
    if difference:
      raise faults.CheckpointMismatchError(
        faults.mismatch_message(directory, step, difference, config_diff)
      )
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    data_iter = make_data_iter(meta) if make_data_iter is not None else None
    same_processes = meta.get("process_count", 1) == jax.process_count()
    if data_iter is not None and same_processes:
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None and not same_processes:
      logging.warning(
        "Checkpoint step %d was written by %s process(es), this run has %d: the data stream "
        "continues at global example %d.",
        step,
        meta.get("process_count"),
        jax.process_count(),
        meta.get("data_position", 0),
      )
    return restored[STATE], meta, data_iter

  def skip(step, error):
    logging.warning("Checkpoint %s step %d is unreadable (%s); skipped.", directory, step, error)

  found = _newest_readable(
    sorted(manager.all_steps(), reverse=True),
    restore_step,
    (lambda step, error: move_aside(manager, step, error)) if move_damaged else skip,
  )
  if found is None:
    return None
  (state, meta, data_iter), step = found
  logging.info("Restored %s step %d.", directory, step)
  return state, step, meta, data_iter


def restore_latest(
  manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None = None
) -> tuple[Any, int] | None:
  """(state, step) of the newest readable step for readers (inference): nothing is moved."""
  restored = restore_for_training(
    manager,
    abstract_state,
    None if data_iter is None else (lambda meta: data_iter),
    move_damaged=False,
  )
  return None if restored is None else restored[:2]


def restore_params_from(directory: str, abstract_state: Any) -> tuple[Any, Any, int]:
  """(params, ema_params, step) of the newest readable checkpoint in another run's directory."""
  if not storage.path(directory).is_dir():
    raise FileNotFoundError(f"config.init_from={directory!r} is not a directory")
  if (storage.path(directory) / files.CHECKPOINTS_DIR).is_dir():  # a workdir, not its checkpoints
    directory = storage.join(directory, files.CHECKPOINTS_DIR)
  manager = ocp.CheckpointManager(
    storage.path(directory),
    item_names=(STATE, DATA_ITER, META),
    options=ocp.CheckpointManagerOptions(read_only=True),
  )
  try:
    restored = restore_latest(manager, abstract_state)
  finally:
    manager.close()
  if restored is None:
    raise FileNotFoundError(f"config.init_from={directory!r} holds no readable checkpoint")
  state, step = restored
  return state.params, state.ema_params, step


# ------------------------------------------------------------------------------------------------
# Reading a workdir for inference: its steps, and the denoiser's weights alone.
# ------------------------------------------------------------------------------------------------


def checkpoint_steps(workdir: storage.PathLike) -> list[int]:
  """Finalised checkpoint steps of workdir (newest first); orbax's temporary folders are not steps."""
  directory = storage.path(workdir) / files.CHECKPOINTS_DIR
  if not directory.is_dir():
    return []
  steps = [int(d.name) for d in directory.iterdir() if d.name.isdigit()]
  return sorted((s for s in steps if (directory / str(s) / STATE).is_dir()), reverse=True)


def check_has_checkpoint(workdir: storage.PathLike) -> None:
  """One clear error, creating nothing, when workdir has no checkpoint to restore."""
  if not storage.path(workdir).is_dir():
    raise FileNotFoundError(f"workdir {workdir!r} does not exist")
  if not checkpoint_steps(workdir):
    raise FileNotFoundError(
      f"workdir {workdir!r} holds no checkpoint (no {files.CHECKPOINTS_DIR}/<step>/{STATE})"
    )


def restore_denoiser(
  workdir: str, abstract_params, *, use_ema: bool = True, step: int | None = None
):
  """(denoiser params, step) from the newest readable checkpoint of workdir, or from `step`.

  A partial restore of the `state` item: only `ema_params/denoiser` (or `params/denoiser`) is read,
  into `abstract_params` (ShapeDtypeStructs carrying their shardings); no optimiser state, no
  teacher. Unreadable steps are skipped with a warning, as training's resume does. Creates nothing.
  """
  check_has_checkpoint(workdir)
  steps = checkpoint_steps(workdir)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"workdir {workdir!r} has no checkpoint of step {step} (has {steps})")
    steps = [step]
  which = "ema_params" if use_ema else "params"
  item = {which: {"denoiser": abstract_params}}
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  errors = []

  def state_path(s: int) -> epath.Path:
    return storage.path(workdir) / files.CHECKPOINTS_DIR / str(s) / STATE

  def unreadable(s: int, e: BaseException) -> None:
    logging.warning("Checkpoint %s is unreadable (%s); trying an older one.", state_path(s), e)
    errors.append(f"step {s}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

  with ocp.PyTreeCheckpointer() as checkpointer:
    found = _newest_readable(
      steps,
      lambda s: checkpointer.restore(
        state_path(s),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
      ),
      unreadable,
    )
  if found is None:
    raise FileNotFoundError(
      f"workdir {workdir!r} holds no readable checkpoint: {'; '.join(errors)}"
    )
  restored, s = found
  return restored[which]["denoiser"], s
