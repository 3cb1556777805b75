"""`flowseg` command line: train | evaluate | predict | convert | export. The work happens in the library.

flowseg train    --config configs/demo.py --workdir DIR [--config.FIELD=VALUE ...]
flowseg evaluate --workdir DIR [--config.eval.num_steps=25] [--config.eval.mode=slide] [--config.eval.tta=flip]
flowseg predict  --workdir DIR --input IMG_OR_DIR --output DIR [--prompt TEXT (prompted runs)]
flowseg convert  pixnerd --ckpt FILE --out DIR [--weights ema|online] [--model XL/16]
flowseg convert  dinov2  --ckpt FILE --out DIR
flowseg export   --workdir DIR --out DIR [--push_to_hub USER/NAME] [--format stablehlo]
flowseg cache-text --config FILE[:ARG] --split SPLIT [--config.FIELD=VALUE ...]  (prompted runs:
                 encode a split's sentences into config.input.text_features; resumes when rerun)

`flowseg COMMAND --help` lists a command's flags. evaluate and predict read the config training wrote
(WORKDIR/config.json); --config is needed only for a workdir without one.
`flowseg train` exits 0 when finished, 75 when preempted and 130 when interrupted by Ctrl-C (both
checkpointed; rerun to continue), 1 on a fault (one message naming it); see run/status.py and README
"Fault tolerance".
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import sys

import ml_collections

from flowseg_jax.run import console

COMMANDS = ("train", "evaluate", "predict", "convert", "export", "cache-text")

OVERRIDES_HELP = """\
config overrides:
  --config.FIELD=VALUE  sets any field of the config, e.g.
                          --config.optim.learning_rate=3e-4 --config.total_steps=500
                          --config.input.image_size=512,512 --config.eval.mode=slide
                        VALUE is parsed as the field's type (bool: true/false; tuples: 1,2 or
                        "(1, 2)"). The fields and their defaults: flowseg_jax/defaults.py and the
                        config file. An unknown field is an error that names the closest ones.
"""


class UsageError(Exception):
  """A mistake on the command line: reported in one line, exit status 2, nothing created."""


def _usage() -> str:
  return __doc__.strip() + "\n"


# ------------------------------------------------------------------------------------------------
# Config: file or workdir, then --config.FIELD=VALUE overrides.
# ------------------------------------------------------------------------------------------------


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """(other arguments, [(field path, value string)]) from `--config.a.b=v` / `--config.a.b v`."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config.") :].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise UsageError(f"--config.{key} needs a value (--config.{key}=VALUE)")
        value = argv[i + 1]
        i += 1
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(_field_paths(value, prefix + key + "."))
  return out


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_value(text: str, field_type: type, current) -> object:
  """The string of an override as the field's type."""
  if field_type is bool:
    if text.lower() in _TRUE + _FALSE:
      return text.lower() in _TRUE
    raise ValueError(f"expected true or false, got {text!r}")
  if field_type is int:
    return int(text)
  if field_type is float:
    return float(text)
  if field_type is str:
    return text
  if text.lower() in ("none", "null"):
    return None
  if field_type in (tuple, list):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = tuple(p.strip() for p in text.strip("()[]").split(","))
    value = tuple(value) if isinstance(value, list | tuple) else (value,)
    if current:  # elements take the type of the current ones ("512,512" -> ints)
      kind = type(current[0])
      if kind in (int, float) and all(isinstance(v, str) for v in value):
        value = tuple(kind(v) for v in value)
    return value if field_type is tuple else list(value)
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
  """Sets each (dotted field, value string); an unknown field names its closest matches."""
  for key, text in overrides:
    node = config
    *parents, leaf = key.split(".")
    for depth, part in enumerate([*parents, leaf]):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = _field_paths(config)
        guess = difflib.get_close_matches(key, known, n=2, cutoff=0.8)
        hint = f"; did you mean {' or '.join('--config.' + g for g in guess)}?" if guess else ""
        raise UsageError(f"unknown config field --config.{key}{hint}")
      if depth < len(parents):
        node = node[part]
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise UsageError(
        f"--config.{key} is a group of fields; set its fields (--config.{key}.X=...)"
      )
    try:
      value = parse_value(text, node.get_type(leaf), current)
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise UsageError(f"--config.{key}={text}: {e}") from e


def load_config(spec: str | None, workdir: str | None, overrides, *, from_workdir: bool):
  """The config from --config FILE[:ARG] or (evaluate, predict) workdir/config.json, overridden."""
  from flowseg_jax import defaults

  if spec:
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
      raise UsageError(f"config file {path!r} does not exist")
    try:
      config = defaults.load_config_file(path, arg or None)
    except ValueError as e:
      raise UsageError(f"--config {spec}: {e}") from e
  elif from_workdir:
    from flowseg_jax import storage
    from flowseg_jax.run import files

    if not (storage.path(workdir) / files.CONFIG_FILE).is_file():
      raise UsageError(
        f"workdir {workdir!r} has no {files.CONFIG_FILE} (training writes it): pass --config"
      )
    try:
      config = files.load_config(workdir)
    except ValueError as e:
      raise UsageError(str(e)) from e
  else:
    raise UsageError("--config is required")
  apply_overrides(config, overrides)
  config.lock()
  return config


# ------------------------------------------------------------------------------------------------
# Commands.
# ------------------------------------------------------------------------------------------------


def _parser(command: str) -> argparse.ArgumentParser:
  descriptions = {
    "train": "Train (or resume) a run in WORKDIR from a config file.",
    "evaluate": "Score WORKDIR's newest checkpoint on the eval split; writes "
    "eval/step_<k>_steps<n>_<mode>.json and pictures/ (never training's step_<k> files).",
    "predict": "Segment an image or a folder of images with WORKDIR's newest checkpoint.",
  }
  p = argparse.ArgumentParser(
    prog=f"flowseg {command}",
    description=descriptions[command],
    epilog=OVERRIDES_HELP,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  need_config = command == "train"
  p.add_argument(
    "--config",
    required=need_config,
    metavar="FILE[:ARG]",
    help="config file (configs/*.py, optionally :ARG for its variant)"
    + ("" if need_config else "; default: WORKDIR/config.json, written by training"),
  )
  p.add_argument("--workdir", required=True, help="run directory: checkpoints, logs, outputs")
  if command == "predict":
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="folder for label PNGs, masks and overlays")
    p.add_argument(
      "--prompt",
      default=None,
      help="prompted (RLFSeg) runs: the text prompt (required there): any sentence for a text "
      "model, one of its prompt list for a learned-table model",
    )
  if command != "train":
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  from flowseg_jax.run import hosts

  hosts.add_flags(p)
  return p


def _run_command(command: str, argv: list[str]) -> int:
  from flowseg_jax.run import host_memory

  try:  # before anything starts JAX's threads (see host_memory)
    memory_line = host_memory.reuse_host_allocations()
  except ValueError as e:
    raise UsageError(str(e)) from e
  console.setup_logging()  # before any library logs through absl (orbax does on import)
  from absl import logging

  logging.info(memory_line)
  rest, overrides = split_overrides(argv)
  args = _parser(command).parse_args(rest)  # exits 2 with one line on a usage error
  if command != "train":
    from flowseg_jax import checkpointing

    try:
      checkpointing.check_has_checkpoint(args.workdir)
    except FileNotFoundError as e:
      raise UsageError(str(e)) from e
  config = load_config(args.config, args.workdir, overrides, from_workdir=command != "train")
  from flowseg_jax.run import hosts

  try:
    hosts.initialize(args)
  except hosts.LaunchError as e:
    raise UsageError(str(e)) from e
  if command == "train":
    return train_command(config, args.workdir)
  if config.eval.mode == "slide":  # an impossible window, stride or resize: one line, now
    from flowseg_jax import inference_host

    try:
      inference_host.slide_settings(config)
    except ValueError as e:
      raise UsageError(str(e)) from e
  if command == "evaluate":
    from flowseg_jax import evaluate

    result = evaluate.evaluate(config, args.workdir, step=args.step)
    print(f"step {result['step']}: {result['summary']} -> {result['path']}")
    return 0
  from flowseg_jax import inference, predict

  try:
    files = predict.list_images(args.input)
  except FileNotFoundError as e:
    raise UsageError(str(e)) from e
  del files
  segmenter = inference.Segmenter.from_workdir(args.workdir, config, step=args.step)
  try:
    segmenter.conditions([args.prompt])
  except ValueError as e:
    raise UsageError(f"--prompt: {e}") from e
  result = predict.predict(
    config, args.workdir, args.input, args.output, segmenter=segmenter, prompt=args.prompt
  )
  print(
    f"predict: wrote {len(result.written)} image(s) to {args.output}; {len(result.failed)} failed"
  )
  for path, reason in result.failed:
    print(f"  failed: {path}: {reason}", file=sys.stderr)
  return 1 if result.failed else 0


def _run_convert(argv: list[str]) -> int:
  if not argv or argv[0] not in ("pixnerd", "dinov2"):
    sys.stderr.write("usage: flowseg convert {pixnerd,dinov2} --ckpt FILE --out DIR ...\n")
    return 2
  if argv[0] == "pixnerd":
    from flowseg_jax.convert import pixnerd

    return pixnerd.cli(argv[1:])
  from flowseg_jax.convert import dinov2

  return dinov2.cli(argv[1:])


def _run_cache_text(argv: list[str]) -> int:
  """`flowseg cache-text`: one split's text-feature cache (tasks.prompts.build_split_features)."""
  console.setup_logging()
  rest, overrides = split_overrides(argv)
  p = argparse.ArgumentParser(
    prog="flowseg cache-text",
    description="Encode every sentence of a split with config.prompted.encoder_dir into "
    "config.input.text_features/SPLIT (chunked; a rerun finishes a stopped build).",
    epilog=OVERRIDES_HELP,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--config", required=True, metavar="FILE[:ARG]", help="the training config")
  p.add_argument("--split", required=True, help="e.g. the config's train_split or eval_split")
  p.add_argument("--chunk_size", type=int, default=1024, help="sentences per file and per write")
  p.add_argument("--batch_size", type=int, default=64, help="sentences per encoder call")
  p.add_argument("--storage_dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
  args = p.parse_args(rest)
  config = load_config(args.config, None, overrides, from_workdir=False)
  from flowseg_jax.tasks import prompts

  try:
    manifest = prompts.build_split_features(
      config,
      args.split,
      chunk_size=args.chunk_size,
      storage_dtype=args.storage_dtype,
      batch_size=args.batch_size,
    )
  except (ValueError, FileNotFoundError) as e:  # includes a stale cache (ConfigError)
    raise UsageError(str(e)) from e
  print(f"cache-text: {manifest['num_rows']} sentences of {args.split!r} are cached")
  return 0


def train_command(config, workdir: str) -> int:
  """`flowseg train`: the exit status says how the run ended (run.status.EXIT_STATUS)."""
  from flowseg_jax import train
  from flowseg_jax.run import status as run_status

  try:
    result = train.train_and_evaluate(config, workdir)
  except run_status.ConfigError as e:
    sys.stderr.write(f"flowseg train: error: {e}\n")
    return run_status.CONFIG_ERROR_EXIT_STATUS
  except run_status.RunError as e:  # a known fault: its message says everything, no traceback
    sys.stderr.write(f"flowseg train: {e}\n")
    sys.stderr.flush()
    return run_status.EXIT_STATUS[run_status.FAILED]
  except KeyboardInterrupt:  # Ctrl-C before the loop started, or a second one: no checkpoint
    sys.stderr.write(
      "flowseg train: interrupted before a checkpoint could be written; rerun to resume from the "
      "last one\n"
    )
    return run_status.EXIT_STATUS[run_status.INTERRUPTED]
  return run_status.EXIT_STATUS[result.get("status", run_status.FINISHED)]


def run(argv: list[str] | None = None) -> int:
  """Console-script entry point; returns the exit status (2: usage error)."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv:  # a command is missing: usage on stderr, the status of a usage error
    sys.stderr.write(_usage())
    return 2
  if argv[0] in ("-h", "--help", "help"):
    sys.stdout.write(_usage())
    return 0
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    sys.stderr.write(f"flowseg: unknown command {command!r}\n\n{_usage()}")
    return 2
  if command == "convert":
    return _run_convert(rest)
  if command == "export":
    console.setup_logging()
    from flowseg_jax import export

    try:
      return export.cli(rest)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
      return e.code if isinstance(e.code, int) else 2
  try:
    if command == "cache-text":
      return _run_cache_text(rest)
    return _run_command(command, rest)
  except UsageError as e:
    sys.stderr.write(f"flowseg {command}: error: {e}\n")
    return 2
  except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
    return e.code if isinstance(e.code, int) else 2


if __name__ == "__main__":
  sys.exit(run())
