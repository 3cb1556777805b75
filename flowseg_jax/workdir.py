"""Reading a training workdir for inference: its config.json, its checkpoint steps, and the denoiser's
weights alone (a partial restore of the checkpoint's `state` item: no optimiser state, no teacher).

Nothing here creates a file or folder: a misspelled workdir is one clear error.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from flowseg_jax import defaults

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


def _typed_like(value: Any, like: Any) -> Any:
  """JSON value -> the Python type of the base config's field (lists back to tuples, nested dicts)."""
  if isinstance(like, ml_collections.ConfigDict) and isinstance(value, dict):
    out = ml_collections.ConfigDict(like.to_dict(preserve_field_references=True))
    for k, v in value.items():
      if k in out:
        out[k] = _typed_like(v, out[k])
      else:
        out[k] = v
    return out
  if isinstance(like, tuple) and isinstance(value, list):
    return tuple(value)
  return value


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A ConfigDict from `config.to_json_best_effort()` output.

  Fields are typed by `defaults.get_base_config()` where it has them: tuples come back as tuples, and
  fields that were None keep their declared type, so `--config.FIELD=VALUE` overrides parse as they do
  on a config file. Fields the base config lacks are taken as JSON gives them.
  """
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"not a JSON config: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"a JSON config must be an object, got {type(data).__name__}")
  return _typed_like(data, defaults.get_base_config())


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """workdir/config.json (written by training) as a ConfigDict."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} does not exist: pass --config (or config=) for a workdir that training did not write"
    )
  with open(path) as f:
    try:
      return config_from_json(f.read())
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e


def checkpoint_steps(workdir: str) -> list[int]:
  """Finalised checkpoint steps of workdir (newest first); orbax's temporary folders are not steps."""
  directory = os.path.join(workdir, CHECKPOINTS)
  if not os.path.isdir(directory):
    return []
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
  return sorted(
    (s for s in steps if os.path.isdir(os.path.join(directory, str(s), "state"))), reverse=True
  )


def check_has_checkpoint(workdir: str) -> None:
  """One clear error, creating nothing, when workdir has no checkpoint to restore."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir!r} does not exist")
  if not checkpoint_steps(workdir):
    raise FileNotFoundError(
      f"workdir {workdir!r} holds no checkpoint (no {CHECKPOINTS}/<step>/state)"
    )


def restore_denoiser(
  workdir: str, abstract_params, *, use_ema: bool = True, step: int | None = None
):
  """(denoiser params, step) from the newest readable checkpoint of workdir, or from `step`.

  A partial restore of the `state` item: only `ema_params/denoiser` (or `params/denoiser`) is read,
  into `abstract_params` (ShapeDtypeStructs carrying their shardings). Unreadable steps are skipped
  with a warning, as training's resume does.
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
  with ocp.PyTreeCheckpointer() as checkpointer:
    for s in steps:
      path = os.path.abspath(os.path.join(workdir, CHECKPOINTS, str(s), "state"))
      try:
        restored = checkpointer.restore(
          path,
          args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
      except Exception as e:  # noqa: BLE001 - any unreadable step means: try the previous one
        logging.warning("Checkpoint %s is unreadable (%s); trying an older one.", path, e)
        errors.append(f"step {s}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        continue
      return restored[which]["denoiser"], s
  raise FileNotFoundError(f"workdir {workdir!r} holds no readable checkpoint: {'; '.join(errors)}")
