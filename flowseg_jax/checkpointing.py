"""orbax checkpoints of the train state together with the grain iterator, and the resume order.

A checkpoint step holds three items: `state` (the TrainState pytree), `data_iter` (grain's per-process
iterator state) and `meta` (JSON: topology and step). Saves are asynchronous; the last `keep` steps and the
best step by eval mIoU are preserved. Restoring walks from the newest step back, so a damaged latest
checkpoint (a preempted half-written save, a lost file) costs one interval, not the run.

Resume order (first that applies): this workdir's own checkpoints > `config.init_from` (another run's
checkpoint: params and EMA only, e.g. stage 2 from stage 1) > `config.model_init` (a converted PixNerd
export) > random initialisation.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

STATE, DATA_ITER, META = "state", "data_iter", "meta"
BEST_METRIC = "eval_miou"


class TopologyError(ValueError):
  """A checkpoint cannot be resumed on this process layout (grain's iterator state is per process)."""


def topology() -> dict[str, int]:
  return {"process_count": jax.process_count(), "device_count": jax.device_count()}


def create_manager(
  directory: str, *, keep: int = 3, async_save: bool = True
) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep` steps plus the best by eval mIoU."""
  if keep < 1:
    raise ValueError(f"config.keep_checkpoints must be >= 1, got {keep}")
  policies = ocp.checkpoint_managers
  preservation = policies.AnyPreservationPolicy(
    [
      policies.LatestN(keep),
      policies.BestN(
        get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    enable_async_checkpointing=async_save,
    preservation_policy=preservation,
    create=True,
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
    os.path.abspath(directory), item_names=(STATE, DATA_ITER, META), options=options
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iter: Any | None,
  *,
  metrics: dict | None = None,
) -> bool:
  """Starts an (async) save of state, iterator and topology at `step`."""
  items = {
    STATE: ocp.args.StandardSave(state),
    META: ocp.args.JsonSave({"step": step, **topology()}),
  }
  if data_iter is not None:
    items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def _check_topology(meta: dict, directory: str, step: int) -> None:
  now = topology()
  if meta.get("process_count") != now["process_count"]:
    raise TopologyError(
      f"checkpoint {directory} step {step} was written by {meta.get('process_count')} process(es), "
      f"this run has {now['process_count']}: grain's data-iterator state is per process and cannot be "
      "resumed on another process count. Resume on the original topology, or start a new workdir with "
      "config.init_from pointing at this one (parameters only)."
    )


def restore_latest(
  manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None
) -> tuple[Any, int] | None:
  """Restores the newest readable step into `abstract_state` (ShapeDtypeStructs with shardings).

  The data iterator, if given, is restored in place. Unreadable steps are skipped with a warning.
  Returns (state, step), or None when the directory has no readable checkpoint.
  """
  directory = str(manager.directory)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: try the previous one
      logging.warning(
        "Checkpoint %s step %d is unreadable (%s); trying an older one.", directory, step, e
      )
      continue
    _check_topology(meta, directory, step)
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001
      logging.warning(
        "Checkpoint %s step %d is damaged (%s); trying an older one.", directory, step, e
      )
      continue
    logging.info("Restored %s step %d.", directory, step)
    return restored[STATE], step
  return None


def restore_params_from(directory: str, abstract_state: Any) -> tuple[Any, Any, int]:
  """(params, ema_params, step) of the newest readable checkpoint in another run's directory."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"config.init_from={directory!r} is not a directory")
  manager = ocp.CheckpointManager(
    os.path.abspath(directory),
    item_names=(STATE, DATA_ITER, META),
    options=ocp.CheckpointManagerOptions(read_only=True),
  )
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
      )[STATE]
    except Exception as e:  # noqa: BLE001
      logging.warning(
        "init_from %s step %d is unreadable (%s); trying an older one.", directory, step, e
      )
      continue
    manager.close()
    return restored.params, restored.ema_params, step
  manager.close()
  raise FileNotFoundError(f"config.init_from={directory!r} holds no readable checkpoint")
