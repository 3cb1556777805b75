"""What a command prints: absl logging at INFO without the libraries' noise, and no tracebacks of
event loops closed under tensorstore's callbacks.

When a checkpoint write fails (a full disk), orbax closes its asyncio loop while tensorstore still
has writes in flight; each of their completion callbacks then fails in `call_soon_threadsafe` with
`RuntimeError: Event loop is closed`, reported as an unraisable exception: a three-frame traceback
on stderr, hundreds of them, burying the trainer's one line that names the directory and the OS
error. Those, and only those, are dropped (sys.unraisablehook); other unraisable errors print.
"""

from __future__ import annotations

import logging as logging_std
import os
import sys


class QuietLibraries:
  """Drops INFO records from orbax (dozens per checkpoint) and from JAX's backend probing ("Unable
  to initialize backend 'tpu'" on every start-up), and the per-array tracebacks orbax's writer
  threads and asyncio log when a save fails (the trainer reports the failure in one line naming the
  directory and the OS error). Other warnings and errors pass."""

  def filter(self, record) -> bool:
    if record.pathname.endswith("xla_bridge.py") and record.levelno <= 20:
      return False
    if "orbax" in record.pathname:
      return record.levelno > 20 and not record.exc_info
    return not ("asyncio" in record.pathname and "never retrieved" in record.getMessage())


def _drop_closed_loop_errors(unraisable) -> None:
  """sys.unraisablehook: drops `RuntimeError: Event loop is closed`, passes everything else on."""
  value = unraisable.exc_value
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return
  sys.__unraisablehook__(unraisable)


def setup_logging() -> None:
  """absl at INFO through one handler with QuietLibraries; closed-loop unraisable errors dropped."""
  from absl import flags, logging

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.unraisablehook = _drop_closed_loop_errors
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  root = logging_std.getLogger()
  for stray in [h for h in root.handlers if type(h) is logging_std.StreamHandler]:
    root.removeHandler(stray)  # logging.basicConfig's, from an absl call before this set-up
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(QuietLibraries())
