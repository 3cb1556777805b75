"""The files a training run keeps in its workdir besides checkpoints, written by process 0.

config.json        the run's config (written after the resume checks, so a refused run leaves it)
metrics.jsonl      one JSON line per log step; on resume lines beyond the restored step are dropped,
                   so after any number of resumes every step appears once
train_result.json  {"status": finished | preempted | failed, "step", ...final eval metrics}
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

CONFIG, METRICS, RESULT = "config.json", "metrics.jsonl", "train_result.json"


def read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    logging.warning("Ignoring unreadable %s (%s).", path, e)
    return None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(
  workdir: str, config: ml_collections.ConfigDict, limit: int = 8
) -> list[str]:
  """'field: old -> new' for the config fields that differ from workdir/config.json."""
  old = read_json(os.path.join(workdir, CONFIG))
  if old is None:
    return []
  new = json.loads(config.to_json_best_effort())
  a, b = _flatten(old), _flatten(new)
  diffs = [
    f"{k}: {a.get(k, 'absent')!r} -> {b.get(k, 'absent')!r}"
    for k in sorted(set(a) | set(b))
    if a.get(k, "absent") != b.get(k, "absent")
  ]
  return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


def _is_writer() -> bool:
  return jax.process_index() == 0


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if _is_writer():
    with open(os.path.join(workdir, CONFIG), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl lines of steps after `step` (the work a resume repeats)."""
  path = os.path.join(workdir, METRICS)
  if not _is_writer() or not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a line cut off by a kill
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
    logging.info("metrics.jsonl: dropped %d line(s) after step %d.", len(lines) - len(kept), step)


def append_metrics(workdir: str, record: dict) -> None:
  if _is_writer():
    with open(os.path.join(workdir, METRICS), "a") as f:
      f.write(json.dumps(record) + "\n")


def write_result(workdir: str, result: dict) -> None:
  """train_result.json, scalars only, replaced atomically."""
  if not _is_writer():
    return
  path = os.path.join(workdir, RESULT)
  scalars = {k: v for k, v in result.items() if np.isscalar(v)}
  with open(path + ".tmp", "w") as f:
    json.dump(scalars, f, indent=2)
  os.replace(path + ".tmp", path)


def finished_result(workdir: str, step: int, total_steps: int) -> dict | None:
  """The saved result when the workdir already holds the finished run (step == total_steps)."""
  if step < total_steps:
    return None
  result = read_json(os.path.join(workdir, RESULT))
  if result and result.get("status") == "finished" and result.get("step") == step:
    return result
  return None
