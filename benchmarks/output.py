"""What a benchmark prints and writes: the machine and versions, aligned tables, JSON files."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import hardware
from flowseg_jax.run import host_memory


def environment(torch_threads: int | None = None) -> dict[str, Any]:
  """Machine, date and versions, for RESULTS.md and the JSON files."""
  import flax

  info = hardware.cpu_info()
  env = {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "host_cpu": info["model"],
    "host_cores": info["cores"],
    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    "python": platform.python_version(),
    "jax": jax.__version__,
    "flax": flax.__version__,
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "host_malloc": host_memory.applied(),
  }
  try:
    import torch

    env["torch"] = torch.__version__
    env["torch_threads"] = torch.get_num_threads() if torch_threads is None else torch_threads
    env["torch_cuda"] = torch.cuda.is_available()
  except ImportError:
    env["torch"] = None
  return env


def fmt(value: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
  return "n/a" if value is None else format(value * scale, spec)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
  """Prints rows as an aligned table; columns are (key, header) pairs, values already strings."""
  widths = [max(len(h), *(len(str(r.get(k, ""))) for r in rows)) for k, h in columns]
  print("  ".join(h.rjust(w) for (_, h), w in zip(columns, widths)))
  for r in rows:
    print("  ".join(str(r.get(k, "")).rjust(w) for (k, _), w in zip(columns, widths)))


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, set):
    return sorted(value)
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, jnp.ndarray | np.ndarray):
    return np.asarray(value).tolist()
  return value


def write_json(path: str | None, result: dict) -> None:
  if path:
    with open(path, "w") as f:
      json.dump(_jsonable(result), f, indent=2)
    print(f"wrote {path}")


def finish(benchmark: str, args, env: dict, rows: list[dict], **extra) -> dict:
  """A script's result ({"benchmark", "args", "environment", extra..., "rows"}), written to
  `args.json` when given."""
  result = {"benchmark": benchmark, "args": vars(args), "environment": env, **extra, "rows": rows}
  write_json(args.json, result)
  return result
