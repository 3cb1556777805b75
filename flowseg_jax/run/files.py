"""A workdir's files, named here once, and the ones a run writes besides checkpoints (process 0).

config.json        the run's config (written after the resume checks, so a refused run leaves it);
                   `load_config` reads it back typed like the base config
metrics.jsonl      one JSON line per log step; on resume lines beyond the restored step are dropped,
                   so after any number of resumes every step appears once
train_result.json  {"status": finished | preempted | failed, "step", ...final eval metrics}
LOCK               the holder of the workdir (run/lock.py)
checkpoints/       orbax steps (checkpointing.py); eval/ and pictures/: evaluation results
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from flowseg_jax import defaults, storage

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "train_result.json"
LOCK_FILE = "LOCK"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
PICTURES_DIR = "pictures"


def read_json(path: storage.PathLike) -> dict | None:
  try:
    return json.loads(storage.path(path).read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    logging.warning("Ignoring unreadable %s (%s).", path, e)
    return None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mapping -> {'optim.learning_rate': 1e-4, ...} (leaves as they are)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_differences(
  workdir: storage.PathLike, config: ml_collections.ConfigDict, limit: int = 8
) -> list[str]:
  """'field: old -> new' for the config fields that differ from workdir/config.json."""
  old = read_json(storage.path(workdir) / CONFIG_FILE)
  if old is None:
    return []
  new = json.loads(config.to_json_best_effort())
  a, b = flatten(old), flatten(new)
  diffs = [
    f"{k}: {a.get(k, 'absent')!r} -> {b.get(k, 'absent')!r}"
    for k in sorted(set(a) | set(b))
    if a.get(k, "absent") != b.get(k, "absent")
  ]
  return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


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


def load_config(workdir: storage.PathLike) -> ml_collections.ConfigDict:
  """workdir/config.json (written by training) as a ConfigDict."""
  path = storage.join(workdir, CONFIG_FILE)
  if not storage.path(path).is_file():
    raise FileNotFoundError(
      f"{path} does not exist: pass --config (or config=) for a workdir that training did not write"
    )
  try:
    return config_from_json(storage.path(path).read_text())
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def _is_writer() -> bool:
  return jax.process_index() == 0


def write_config(workdir: storage.PathLike, config: ml_collections.ConfigDict) -> None:
  if _is_writer():
    (storage.path(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))


def _logged_step(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a line a kill cut off."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return None


def truncate_metrics(workdir: storage.PathLike, step: int) -> None:
  """Drops metrics.jsonl lines of steps after `step` (the work a resume repeats)."""
  path = storage.path(workdir) / METRICS_FILE
  if not _is_writer() or not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    logged = _logged_step(line)
    if logged is not None and logged <= step:
      kept.append(line)
  if len(kept) != len(lines):
    storage.write_atomic(path, "".join(kept))
    logging.info("metrics.jsonl: dropped %d line(s) after step %d.", len(lines) - len(kept), step)


def append_metrics(workdir: storage.PathLike, record: dict) -> None:
  if _is_writer():
    storage.append_text(storage.path(workdir) / METRICS_FILE, json.dumps(record) + "\n")


def write_result(workdir: storage.PathLike, result: dict) -> None:
  """train_result.json, scalars only, replaced atomically."""
  if not _is_writer():
    return
  scalars = {k: v for k, v in result.items() if np.isscalar(v)}
  storage.write_atomic(storage.path(workdir) / RESULT_FILE, json.dumps(scalars, indent=2))


def finished_result(workdir: storage.PathLike, step: int, total_steps: int) -> dict | None:
  """The saved result when the workdir already holds the finished run (step == total_steps)."""
  if step < total_steps:
    return None
  result = read_json(storage.path(workdir) / RESULT_FILE)
  if result and result.get("status") == "finished" and result.get("step") == step:
    return result
  return None
