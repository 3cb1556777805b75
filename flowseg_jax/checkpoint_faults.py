"""What a checkpoint fault is and how it is reported: read failures (the step is damaged), write
failures (disk full, permission denied: the run stops with one line) and another model's checkpoint
(refused with the first differing parameter).

orbax and tensorstore report failures as exceptions of general types whose messages carry status
codes or OS error numbers; these helpers read them, walking the exception's cause chain.
"""

from __future__ import annotations

import json
import os
import re

from flowseg_jax.run.status import RunError

# Read failures as tensorstore and orbax report them (status codes, or their wording).
_READ_FAILURE = re.compile(
  r"\b(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|UNAVAILABLE)\b|error while reading|Error reading|"
  r"Error opening|does not exist|Metadata file"
)
_WRITE_FAILURE = re.compile(
  r"\b(PERMISSION_DENIED|RESOURCE_EXHAUSTED)\b|No space left|Permission denied|File too large|"
  r"Read-only file system|Disk quota"
)


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_TMP_STEP = re.compile(r"/(\d+)\.orbax-checkpoint-tmp")


class CheckpointMismatchError(RunError):
  """The workdir's checkpoint holds another parameter structure than this config builds."""


class CheckpointWriteError(RunError):
  """A checkpoint could not be written (disk full, permission denied, ...)."""


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def is_read_error(e: BaseException) -> bool:
  """True for errors that mean 'these files cannot be read': missing, truncated, corrupt."""
  for err in _chain(e):
    if isinstance(err, OSError | json.JSONDecodeError | UnicodeDecodeError):
      return True
    if type(err) in (Exception, ValueError) and _READ_FAILURE.search(str(err)):
      return True
  return False


def write_error_reason(e: BaseException) -> str | None:
  """The OS-level reason of a failed write ('[Errno 28] No space left on device'), or None."""
  for err in _chain(e):
    if isinstance(err, OSError) and err.errno is not None:
      return f"[Errno {err.errno}] {err.strerror or os.strerror(err.errno)}"
    code = _OS_ERROR_CODE.search(str(err))  # tensorstore: "... [os_error_code='28' ...]"
    if code:
      return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
    match = _WRITE_FAILURE.search(str(err))
    if match:
      return match.group(0)
  return None


def failed_step(e: BaseException, default: int) -> int:
  """The step whose temporary directory a write error names (async saves fail a step later)."""
  match = _TMP_STEP.search(str(e))
  return int(match.group(1)) if match else default


def first_difference(saved: dict, wanted: dict) -> str | None:
  """'path: checkpoint (shape) vs this config (shape)' for the first differing path, or None."""
  for key in sorted(set(saved) | set(wanted)):
    a, b = saved.get(key, "absent"), wanted.get(key, "absent")
    if a != b:
      return f"{'/'.join(key)}: checkpoint {a} vs this config {b}"
  return None


def mismatch_message(directory: str, step: int, difference: str, config_diff: list[str]) -> str:
  lines = [
    f"{directory} step {step} holds another model than this config builds; nothing was changed.",
    f"  first difference: {difference}",
  ]
  if config_diff:
    lines.append(
      "  config fields that differ from the run's config.json: " + ", ".join(config_diff)
    )
  lines.append(
    "  Start fresh with a new --workdir, or fine-tune from this run with a new --workdir and "
    f"--config.init_from={os.path.dirname(directory)}"
  )
  return "\n".join(lines)
