"""How a training run ends: the status in `train_result.json` and the process exit status.

finished   0   total_steps reached (a rerun of a finished workdir is a no-op and also returns 0)
failed     1   a fault that needs a person: stopped with one line naming the cause
preempted  75  SIGTERM / orbax preemption notice: checkpointed, rerun the same command to continue
             (75 is EX_TEMPFAIL of sysexits.h, "try again later")
interrupted 130 SIGINT (Ctrl-C): checkpointed like a preemption, rerun the same command to continue.
             130 (128 + SIGINT) is what shells expect of a Ctrl-C'd program, so a script or a
             restart-on-75 wrapper stops instead of starting the run again. A second Ctrl-C
             stops at once, without a checkpoint.
(config)   2   a config that cannot train (unknown dataset, warm-up past total_steps, a mesh that does
             not fit the devices, ...): one line, before the workdir is created or touched

On many processes the status is agreed (run/agreement.py): a signal to any process stops all of
them at the same step, and an error on one makes every process exit 1 with its message.
"""

from __future__ import annotations

FINISHED, PREEMPTED, FAILED, INTERRUPTED = "finished", "preempted", "failed", "interrupted"
EXIT_STATUS = {FINISHED: 0, FAILED: 1, PREEMPTED: 75, INTERRUPTED: 130}
# Stop requests as agreed over processes: the largest code wins (a Ctrl-C outranks a preemption).
STOP_CODES = {PREEMPTED: 1, INTERRUPTED: 2}
STOP_STATUS = {code: status for status, code in STOP_CODES.items()}


class RunError(RuntimeError):
  """A fault that stops the run with one self-explaining message (printed without a traceback)."""


class ConfigError(RunError, ValueError):
  """The config cannot train; found before anything is written (exit status 2, like a usage error).
  A ValueError too, as the checks it wraps raise."""


CONFIG_ERROR_EXIT_STATUS = 2
