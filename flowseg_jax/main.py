"""`flowseg` command line: train | evaluate | predict | convert. The work happens in the library.

flowseg train    --config configs/demo.py --workdir DIR [--config.field=value ...]
flowseg evaluate --config configs/demo.py --workdir DIR [--config.eval.num_steps=25]
flowseg predict  --config configs/demo.py --workdir DIR --input IMG_OR_DIR --output DIR
flowseg convert  pixnerd --ckpt FILE --out DIR [--weights ema|online] [--model XL/16]
flowseg convert  dinov2  --ckpt FILE --out DIR

`flowseg train` exits 0 when finished, 75 when preempted (checkpointed; rerun to continue), 1 on a
fault (one message naming it); see run_status.py and README "Fault tolerance".
"""

from __future__ import annotations

import os
import sys

COMMANDS = ("train", "evaluate", "predict", "convert")


def _usage() -> str:
  return __doc__.strip() + "\n"


def _run_convert(argv: list[str]) -> int:
  if not argv or argv[0] not in ("pixnerd", "dinov2"):
    sys.stderr.write("usage: flowseg convert {pixnerd,dinov2} --ckpt FILE --out DIR ...\n")
    return 2
  if argv[0] == "pixnerd":
    from flowseg_jax.convert import pixnerd

    return pixnerd.cli(argv[1:])
  from flowseg_jax.convert import dinov2

  return dinov2.cli(argv[1:])


class _QuietLibraries:
  """Drops INFO records from orbax (dozens per checkpoint) and the per-array tracebacks its writer
  threads and asyncio log when a save fails (hundreds of lines; the trainer reports the failure in
  one line naming the directory and the OS error). Other warnings and errors pass."""

  def filter(self, record) -> bool:
    if "orbax" in record.pathname:
      return record.levelno > 20 and not record.exc_info
    return not ("asyncio" in record.pathname and "never retrieved" in record.getMessage())


def train_command(config, workdir: str) -> int:
  """`flowseg train`: the exit status says how the run ended (run_status.EXIT_STATUS)."""
  from flowseg_jax import run_status, train

  try:
    result = train.train_and_evaluate(config, workdir)
  except run_status.RunError as e:  # a known fault: its message says everything, no traceback
    sys.stderr.write(f"flowseg train: {e}\n")
    sys.stderr.flush()
    return run_status.EXIT_STATUS[run_status.FAILED]
  return run_status.EXIT_STATUS[result.get("status", run_status.FINISHED)]


def _run_absl(command: str, argv: list[str]) -> None:
  from absl import app, flags, logging
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:arg]).", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
  if command == "predict":
    flags.DEFINE_string("input", None, "An image file or a folder of images.")
    flags.DEFINE_string("output", None, "Folder for label PNGs, colour masks and overlays.")
    flags.mark_flags_as_required(["input", "output"])
  flags.mark_flags_as_required(["config", "workdir"])

  def main(_):
    # Keep TensorFlow (pulled in by tfds and clu) quiet, and orbax's per-save INFO lines out of the log.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax

    if flags.FLAGS.distributed:
      jax.distributed.initialize()
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    if command == "train":
      return train_command(config, workdir)
    elif command == "evaluate":
      from flowseg_jax import evaluate

      evaluate.evaluate(config, workdir)
    else:
      from flowseg_jax import predict

      predict.predict(config, workdir, flags.FLAGS.input, flags.FLAGS.output)

  app.run(main, argv=[f"flowseg {command}", *argv])


def run(argv: list[str] | None = None) -> int:
  """Console-script entry point."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    sys.stdout.write(_usage())
    return 0
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    sys.stderr.write(f"flowseg: unknown command {command!r}\n\n{_usage()}")
    return 2
  if command == "convert":
    return _run_convert(rest)
  _run_absl(command, rest)
  return 0


if __name__ == "__main__":
  sys.exit(run())
