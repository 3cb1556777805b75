"""Config overrides given as KEY=VALUE flags (`--set repa.enabled=true`).

Imports nothing of JAX: the planner's driver (scale.py) parses them before deciding in which
process, with how many host devices, JAX may start.
"""

from __future__ import annotations

import json


def parse_override(text: str):
  """'model.dtype=bfloat16' -> ('model.dtype', 'bfloat16'); values are JSON when they parse."""
  key, _, value = text.partition("=")
  try:
    return key, json.loads(value)
  except json.JSONDecodeError:
    return key, value


def apply_overrides(config, overrides: dict) -> None:
  """Sets dotted config leaves in place: {'repa.enabled': True}."""
  for key, value in overrides.items():
    target = config
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
