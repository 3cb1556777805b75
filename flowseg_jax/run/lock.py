"""One writer per workdir: `workdir/LOCK` names the run holding it (host, pid, start time).

The lock is a file created with O_EXCL, so it also works where advisory locks do not (NFS, FUSE
mounts of object stores). A second trainer on the workdir stops at once and names the holder. The
holder of a lock on this host that no longer runs (killed, crashed, the host rebooted) is detected
from its pid and process start time, and the lock is taken over with a warning; a holder on another
host cannot be checked from here, so the message says how to release it by hand. In a multi-process
job process 0 takes the lock for the whole job and tells the others whether it got it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

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


class WorkdirLock:
  """Context manager: holds `workdir/LOCK` for the job (process 0), released on exit."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._held = False

  def _record(self) -> dict:
    pid = os.getpid()
    return {
      "host": socket.gethostname(),
      "pid": pid,
      "start_ticks": _process_start_ticks(pid),
      "start_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "process_count": jax.process_count(),
    }

  def _try_create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(self._record(), f)
    return True

  def _acquire_local(self) -> str | None:
    """Takes the lock; returns None, or the reason it is held by someone else."""
    for _ in range(3):  # a concurrent release or take-over can race us once or twice
      if self._try_create():
        return None
      try:
        with open(self.path) as f:
          holder = json.load(f)
      except FileNotFoundError:
        continue
      except (OSError, ValueError):
        holder = {}  # half-written by a holder that died while writing it
      if holder and (holder.get("host") != socket.gethostname() or _alive(holder)):
        return (
          f"workdir {os.path.dirname(self.path)} is in use by another run ({_describe(holder)}). "
          f"Wait for it, stop it, or use another --workdir; if that run is gone, delete {self.path}."
        )
      logging.warning(
        "Taking over the stale lock %s of a run that no longer runs (%s).",
        self.path,
        _describe(holder) if holder else "unreadable lock file",
      )
      try:
        os.remove(self.path)
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
        with open(self.path) as f:
          mine = json.load(f).get("pid") == os.getpid()
      except (OSError, ValueError):
        mine = False
      if mine:
        os.remove(self.path)
      self._held = False
