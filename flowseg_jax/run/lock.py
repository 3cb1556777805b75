"""One writer per workdir: `workdir/LOCK` names the run holding it (host, pid, start time).

Taking the lock is an atomic create-if-absent, so it also works where advisory locks do not:
  - a local (or NFS, or FUSE-mounted) workdir: the file is created with O_EXCL;
  - an object store (`gs://`): the object is uploaded with a generation-match precondition
    (`ifGenerationMatch=0`, gcsfs's `mode="create"`): of two trainers starting at once, GCS lets one
    upload succeed and answers the other 412 (FileExistsError). The holder record is then read back
    and must be ours, which also stops the second trainer on a store that ignores the precondition
    (the stock gcp-storage-emulator does; tests/gcs_emulator.py adds it) unless both write before
    either reads.
A second trainer on the workdir stops at once and names the holder. The holder of a lock on this host
that no longer runs (killed, crashed, the host rebooted) is detected from its pid and process start
time, and the lock is taken over with a warning. A holder on another host (a pod's earlier job, a
preempted VM) cannot be checked from here: the error names it and says how to release the lock once
that job is known to be gone: `rm WORKDIR/LOCK`, or `gcloud storage rm gs://BUCKET/RUN/LOCK` (or
`gsutil rm ...`) on object storage. In a multi-process job process 0 takes the lock for the whole
job and tells the others whether it got it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import uuid

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from flowseg_jax import storage
from flowseg_jax.run.files import LOCK_FILE
from flowseg_jax.run.status import RunError


class WorkdirLockedError(RunError):
  """Another live run holds the workdir."""


def _process_start_ticks(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _alive(holder: dict) -> bool:
  pid = int(holder.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  ticks = holder.get("start_ticks")
  return ticks is None or _process_start_ticks(pid) in (None, ticks)


def _describe(holder: dict) -> str:
  return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('start_time')}"


def _release_hint(path: str) -> str:
  if storage.is_url(path):
    return f"delete it: gcloud storage rm {path} (or gsutil rm {path})"
  return f"delete {path}"


class WorkdirLock:
  """Context manager: holds `workdir/LOCK` for the job (process 0), released on exit."""

  def __init__(self, workdir: storage.PathLike):
    self.path = storage.join(os.fspath(workdir), LOCK_FILE)
    self._file = storage.path(self.path)
    self._token = uuid.uuid4().hex  # tells our record from another run's with the same pid
    self._held = False

  def _record(self) -> dict:
    pid = os.getpid()
    return {
      "host": socket.gethostname(),
      "pid": pid,
      "start_ticks": _process_start_ticks(pid),
      "start_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "process_count": jax.process_count(),
      "token": self._token,
    }

  def _read(self) -> dict:
    return json.loads(self._file.read_text())

  def _try_create(self) -> bool:
    if not storage.create_new(self.path, json.dumps(self._record()).encode()):
      return False
    if not storage.is_url(self.path):
      return True
    try:  # ours, also on a store that ignores the precondition (unless both wrote before reading)
      return self._read().get("token") == self._token
    except (OSError, ValueError):
      return False

  def _acquire_local(self) -> str | None:
    """Takes the lock; returns None, or the reason it is held by someone else."""
    for _ in range(3):  # a concurrent release or take-over can race us once or twice
      if self._try_create():
        return None
      try:
        holder = self._read()
      except FileNotFoundError:
        continue
      except (OSError, ValueError):
        holder = {}  # half-written by a holder that died while writing it
      if holder and (holder.get("host") != socket.gethostname() or _alive(holder)):
        return (
          f"workdir {os.path.dirname(self.path)} is in use by another run ({_describe(holder)}). "
          f"Wait for it, stop it, or use another --workdir; if that run is gone, "
          f"{_release_hint(self.path)}."
        )
      logging.warning(
        "Taking over the stale lock %s of a run that no longer runs (%s).",
        self.path,
        _describe(holder) if holder else "unreadable lock file",
      )
      try:
        self._file.unlink()
      except FileNotFoundError:
        pass
    return f"could not take the lock {self.path} (it keeps changing: another run is starting?)"

  def __enter__(self) -> WorkdirLock:
    reason = self._acquire_local() if jax.process_index() == 0 else None
    self._held = jax.process_index() == 0 and reason is None
    if jax.process_count() > 1:  # the job's other processes share process 0's answer
      ok = multihost_utils.broadcast_one_to_all(np.int32(reason is None))
      if not int(ok) and reason is None:
        reason = f"process 0 could not lock {self.path} (see its log)"
    if reason:
      raise WorkdirLockedError(reason)
    return self

  def __exit__(self, *exc) -> None:
    if self._held:
      try:
        mine = self._read().get("token") == self._token
      except (OSError, ValueError):
        mine = False
      if mine:
        self._file.unlink()
      self._held = False
