"""Many hosts: how `--distributed` finds the job, and the pre-flight every host runs before compiling.

Launch: `--coordinator_address HOST:PORT --num_processes N --process_id I` (flags), else the
environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (as torchrun
reads its own), else JAX's auto-detection (Cloud TPU, SLURM, Open MPI, Kubernetes). jax 0.10 reads
only JAX_COORDINATOR_ADDRESS itself, so a plain multi-node launch with all three set failed with
"Number of processes must be defined"; here they are read together, and a missing piece is one line.

Pre-flight: every path the run reads (data, weights, the teacher) and the workdir must be visible to
every host: a path on one host's local disk is the classic pod failure, found hours later or never
(a workdir on local disks gives each host its own half-written checkpoints). Every host checks the
inputs before anything reads them; after the config's own checks, process 0 creates the workdir and
every host checks that it sees it. The answers are gathered, so each process stops with the same
line naming the host and the path.
"""

from __future__ import annotations

import argparse
import os

from flowseg_jax.run.status import RunError

# jax, numpy and etils are imported where used: the CLI builds its parser (and answers --help and
# usage errors) before importing them.

ENV = {
  "coordinator_address": "JAX_COORDINATOR_ADDRESS",
  "num_processes": "JAX_NUM_PROCESSES",
  "process_id": "JAX_PROCESS_ID",
}


class LaunchError(ValueError):
  """The job cannot be described from the flags and environment (a usage error: exit 2)."""


class PreflightError(RunError):
  """A path the run needs is missing on some host."""


def add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--distributed",
    action="store_true",
    help="multi-host: call jax.distributed.initialize() with the three flags below, else the "
    "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables, else "
    "auto-detection (Cloud TPU, SLURM, Open MPI, Kubernetes)",
  )
  parser.add_argument("--coordinator_address", metavar="HOST:PORT", help="process 0's address")
  parser.add_argument("--num_processes", type=int, help="number of processes in the job")
  parser.add_argument("--process_id", type=int, help="this process's index, 0..num_processes-1")


def launch_arguments(args: argparse.Namespace, environ=os.environ) -> dict | None:
  """The keyword arguments of jax.distributed.initialize (None: not distributed; {}: auto-detect).
  Raises LaunchError for an incomplete or inconsistent description."""
  given = {k: getattr(args, k, None) for k in ENV}
  if not getattr(args, "distributed", False) and all(v is None for v in given.values()):
    return None
  if all(v is None for v in given.values()):  # the environment, read as one description
    for key, name in ENV.items():
      if environ.get(name):
        given[key] = environ[name]
    source = "environment variables " + "/".join(ENV.values())
  else:
    source = "flags --" + "/--".join(ENV)
  if all(v is None for v in given.values()):
    return {}
  missing = [k for k, v in given.items() if v is None]
  if missing:
    names = ", ".join(ENV[k] if source.startswith("env") else f"--{k}" for k in missing)
    raise LaunchError(
      f"--distributed: {names} missing; the {source} come together (or give none of them to "
      "auto-detect Cloud TPU, SLURM, Open MPI or Kubernetes)"
    )
  try:
    num, index = int(given["num_processes"]), int(given["process_id"])
  except ValueError:
    raise LaunchError(
      f"--distributed: the number of processes and the process id must be integers, got "
      f"{given['num_processes']!r} and {given['process_id']!r} ({source})"
    ) from None
  if not 0 <= index < num:
    raise LaunchError(f"--distributed: process id {index} is not in [0, {num}) ({source})")
  address = str(given["coordinator_address"])
  if ":" not in address:
    raise LaunchError(f"--distributed: coordinator address {address!r} needs a port (HOST:PORT)")
  return {"coordinator_address": address, "num_processes": num, "process_id": index}


def initialize(args: argparse.Namespace) -> None:
  """jax.distributed.initialize as the flags and environment say (nothing for a one-host run)."""
  kwargs = launch_arguments(args)
  if kwargs is None:
    return
  import jax

  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # auto-detection found no cluster
    raise LaunchError(
      f"--distributed: {e} No cluster was detected: give --coordinator_address, --num_processes "
      "and --process_id (or the JAX_* environment variables)"
    ) from None


def input_paths(config) -> dict[str, str]:
  """What each host reads: {config field: path}, for the fields that are set."""
  paths = {}
  fields = ["input.data_dir", "input.text_features", "init_from", "model_init"]
  if config.repa.enabled:
    fields.append("repa.teacher_dir")
  prompted = config.get("prompted")
  if prompted is not None and prompted.get("condition") == "cache" and prompted.get("encoder_dir"):
    fields.append("prompted.encoder_dir")
  for field in fields:
    node = config
    for part in field.split("."):
      node = node.get(part) if node is not None else None
    if node:
      paths[f"config.{field}"] = str(node)
  return paths


def _raise_missing(seen, names: list[tuple[str, str]]) -> None:
  """PreflightError naming the first (process, path) not seen; `seen`: (processes, paths) of 0/1."""
  import numpy as np

  missing = np.argwhere(seen == 0)
  if not missing.size:
    return
  process, which = (int(i) for i in missing[0])
  field, path = names[which]
  where = f"process {process} of {seen.shape[0]}" if seen.shape[0] > 1 else "this host"
  shared = (
    " (it must be visible to every host: gs:// or a shared mount)" if seen.shape[0] > 1 else ""
  )
  raise PreflightError(f"pre-flight: {field}={path} does not exist on {where}{shared}")


def _gather(flags):
  """(processes, n) int32 of every process's flags, the same array on every process."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  flags = np.asarray(flags, np.int32)
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(flags))
  return flags[None]


def check_inputs(config) -> None:
  """Pre-flight, first half: every host sees the data, the weights and the teacher. Runs before
  anything reads them or creates the workdir, so a path missing on one host stops every host with
  one line instead of leaving the others waiting in a collective."""
  import numpy as np
  from etils import epath

  paths = input_paths(config)
  if paths:
    _raise_missing(_gather([epath.Path(p).exists() for p in paths.values()]), list(paths.items()))
  need = shm_needed(config)
  free = shm_free_bytes() if need else None
  short = _gather([free is not None and free < need])[:, 0]
  if short.any():
    process = int(np.flatnonzero(short)[0])
    where = f"process {process} of {len(short)}" if len(short) > 1 else "this host"
    mib = 2**20
    raise PreflightError(
      f"pre-flight: /dev/shm on {where} has {free / mib:.0f} MiB free but grain's "
      f"{config.input.num_workers} workers (config.input.num_workers) pass batches through it and "
      f"need ~{need / mib:.0f} MiB: give the container more (docker run --shm-size={_gib(need)}g, "
      "Kubernetes: an emptyDir with medium Memory at /dev/shm), or lower config.input.num_workers "
      "/ config.input.prefetch_buffer"
    )


SHM_DIR = "/dev/shm"


def shm_needed(config) -> int:
  """Bytes of shared memory grain's worker processes hold at once: each keeps prefetch_buffer + 1
  of this host's batches (uint8 image, int32 label, float32 text features when streamed) in
  /dev/shm on their way to the trainer."""
  import jax

  cfg = config.input
  workers = int(cfg.get("num_workers", 0))
  if workers <= 0:
    return 0
  h, w = (int(s) for s in cfg.image_size)
  local_batch = -(-int(cfg.batch_size) // jax.process_count())
  batch_bytes = local_batch * (h * w * (3 + 4) + 8 + _text_bytes(config))
  return workers * (max(1, int(cfg.get("prefetch_buffer", 1))) + 1) * batch_bytes


def _text_bytes(config) -> int:
  """float32 bytes of one example's streamed text features (config.input.text_features)."""
  if not config.input.get("text_features") or config.get("prompted") is None:
    return 0
  from flowseg_jax.models import pixnerd_t2i

  arch = {**pixnerd_t2i.VARIANTS[config.prompted.variant], **config.prompted.overrides}
  return 4 * int(arch["text_length"]) * int(arch["text_dim"])


def shm_free_bytes() -> int | None:
  """Free bytes of /dev/shm; None where there is none (not Linux): nothing to check."""
  import os
  import shutil

  return shutil.disk_usage(SHM_DIR).free if os.path.isdir(SHM_DIR) else None


def _gib(n: int) -> int:
  return max(1, -(-2 * n // 2**30))  # twice the need, whole GiB


PROBE_FILE = ".preflight"


def share_workdir(workdir: str) -> None:
  """Pre-flight, second half: process 0 creates the workdir and writes a probe holding a number
  drawn for this start; every host must read that number back (a workdir on each host's own disk
  would give each its own half of every checkpoint, and on object storage a folder "exists" only
  through its objects). The probe is removed again."""
  import secrets

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from flowseg_jax import storage

  probe = storage.path(workdir) / PROBE_FILE
  nonce = np.int32(secrets.randbits(31))
  if jax.process_count() > 1:
    nonce = multihost_utils.broadcast_one_to_all(nonce)
  if jax.process_index() == 0:
    probe.parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(probe, str(int(nonce)))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("flowseg preflight: probe written")
  try:
    seen = probe.read_text() == str(int(nonce))
  except OSError:
    seen = False
  seen = _gather([seen])
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("flowseg preflight: probe read")
  if jax.process_index() == 0:
    probe.unlink(missing_ok=True)
  _raise_missing(seen, [("workdir", workdir)])
