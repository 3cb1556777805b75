"""How a training run ends: the status in `train_result.json` and the process exit status.

finished   0   total_steps reached (a rerun of a finished workdir is a no-op and also returns 0)
failed     1   a fault that needs a person: stopped with one line naming the cause
preempted  75  SIGTERM / orbax preemption notice: checkpointed, rerun the same command to continue
             (75 is EX_TEMPFAIL of sysexits.h, "try again later")
(config)   2   a config that cannot train (unknown dataset, warm-up past total_steps, a mesh that does
             not fit the devices, ...): one line, before the workdir is created or touched
"""

from __future__ import annotations

FINISHED, PREEMPTED, FAILED = "finished", "preempted", "failed"
EXIT_STATUS = {FINISHED: 0, FAILED: 1, PREEMPTED: 75}


class RunError(RuntimeError):
  """A fault that stops the run with one self-explaining message (printed without a traceback)."""


class ConfigError(RunError, ValueError):
  """The config cannot train; found before anything is written (exit status 2, like a usage error).
  A ValueError too, as the checks it wraps raise."""


CONFIG_ERROR_EXIT_STATUS = 2
