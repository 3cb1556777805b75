"""Evaluation images/s against training images/s on the same config, in one process.

Eval side: `MiouEvaluator.run` on a synthetic eval split at the case's resolution (the dataset's
examples, the Euler sampler at `config.eval.num_steps`, colours resized to the annotation's size,
decoding and the confusion matrix, the sum over processes and the metrics), with
`config.eval.batch_per_device` set so that one sampler call carries the case's batch. Train side:
the project's AOT-compiled train step (`compiled_step.JaxTrainStep`) on a random batch of the same
size. Both are timed in rounds, taking turns (`timing.interleaved_rounds`); prints images/s of
each and eval/train. Evaluation runs the network `num_steps` times forward per image, training
once forward and backward (~3 forwards): with 10 steps, eval at ~0.3x the train rate is what
the arithmetic allows, so a ratio far below that means the decoding and scoring hold it back.

  python -m benchmarks.eval_rate                                        # CPU: demo and S/16 128
  python -m benchmarks.eval_rate --cases S/16:256:4 --annotation-scale 2
  python -m benchmarks.eval_rate --cases XL/16:512:32 --json eval.json     # one accelerator
"""

from __future__ import annotations

import argparse
import gc

import jax
import jax.numpy as jnp

from benchmarks import compiled_step, configs, flags, output, timing
from flowseg_jax import inference, train_step
from flowseg_jax.evaluators import miou

DEFAULT_CPU_CASES = "tiny/4:32:16,S/16:128:4"
DEFAULT_ACCEL_CASES = "XL/16:512:32,S/16:256:64"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  flags.add_common_flags(p, torch=False)
  p.add_argument(
    "--eval-batches", type=int, default=2, help="sampler calls per evaluation (images: x batch)"
  )
  p.add_argument(
    "--annotation-scale",
    type=int,
    default=1,
    help="eval images and annotations at this multiple of the network's size (1: no resize)",
  )
  p.add_argument("--num-steps", type=int, default=None, help="Euler steps (config.eval.num_steps)")
  p.set_defaults(config="configs/demo.py", warmup=1, steps=1, rounds=3)
  args = p.parse_args(argv)
  flags.host_allocation(args)
  if args.cases is None:
    args.cases = DEFAULT_CPU_CASES if jax.default_backend() == "cpu" else DEFAULT_ACCEL_CASES
  return args


def eval_config(config, case: configs.Case, args, num_devices: int):
  """The case's config evaluated on a synthetic split of --eval-batches batches (whole mode)."""
  if case.batch % num_devices:
    raise ValueError(f"case {case.label}: batch must be a multiple of {num_devices} devices")
  config = config.copy_and_resolve_references()
  config.input.dataset = "synthetic"
  config.input.synthetic.num_eval = args.eval_batches * case.batch
  config.input.synthetic.size = (
    args.annotation_scale * case.height,
    args.annotation_scale * case.width,
  )
  config.eval.batch_per_device = case.batch // num_devices
  config.eval.max_examples = -1
  config.eval.mode = "whole"
  config.eval.tta = "none"
  config.eval.num_pictures = 0
  if args.num_steps is not None:
    config.eval.num_steps = args.num_steps
  return config


def bench_case(case: configs.Case, base, args, dtype: str) -> dict:
  config = configs.case_config(
    base, case, dtype=dtype, remat=args.remat, scan=args.scan, attention_impl=args.attention_impl
  )
  setup = train_step.TrainSetup(config)
  batch = configs.random_batch(config, setup.task.num_classes, seed=config.seed)
  jstep = compiled_step.JaxTrainStep(setup, batch, count_flops=False)
  # A copy: the train step donates the state it is given.
  params = jax.tree.map(jnp.copy, jstep.state.ema_params["denoiser"])
  econfig = eval_config(config, case, args, jstep.mesh.size)
  seg = inference.Segmenter(econfig, params, task=setup.task, mesh=jstep.mesh)
  evaluator = miou.MiouEvaluator(seg)
  settings = evaluator.settings()
  results = []

  def evaluate(n: int) -> None:
    for _ in range(n):
      results.append(evaluator.run(settings))

  times = timing.interleaved_rounds(
    {"train": jstep.run, "eval": evaluate}, rounds=args.rounds, steps=args.steps, warmup=args.warmup
  )
  train_s, eval_s = timing.summarize(times["train"]), timing.summarize(times["eval"])
  num_images = results[-1]["num_examples"]
  ratios = [(num_images / e) / (case.batch / t) for t, e in zip(times["train"], times["eval"])]
  row = {
    "case": case.label,
    "num_steps": settings["num_steps"],
    "annotation": tuple(econfig.input.synthetic.size),
    "eval_images": num_images,
    "train_step_s": train_s,
    "eval_run_s": eval_s,
    "train_images_per_s": case.batch / train_s["median"],
    "eval_images_per_s": num_images / eval_s["median"],
    "ratio": (num_images / eval_s["median"]) / (case.batch / train_s["median"]),
    "ratio_per_round": timing.summarize(ratios),
  }
  return row


def main(argv=None) -> dict:
  args = parse_args(argv)
  cases, dtype, _ = flags.setup_run(args)
  base = configs.load_config(args.config)
  env = output.environment()
  print(
    f"eval_rate: {args.config} on {env['backend']} ({env['device_kind']} x{env['device_count']}), "
    f"{dtype}; load {env['load_average']}"
  )
  rows = []
  for case in cases:
    rows.append(bench_case(case, base, args, dtype))
    gc.collect()  # the case's state and evaluator
    print(f"  done {case.label}", flush=True)
  table = [
    {
      "case": r["case"],
      "steps": str(r["num_steps"]),
      "annotation": "x".join(map(str, r["annotation"])),
      "train": f"{r['train_images_per_s']:.1f}±{r['train_step_s']['spread'] * 100:.0f}%",
      "eval": f"{r['eval_images_per_s']:.1f}±{r['eval_run_s']['spread'] * 100:.0f}%",
      "ratio": f"{r['ratio']:.3f} ({r['ratio_per_round']['min']:.3f}–"
      f"{r['ratio_per_round']['max']:.3f})",
    }
    for r in rows
  ]
  output.print_table(
    table,
    [
      ("case", "case (train batch = eval batch)"),
      ("steps", "Euler steps"),
      ("annotation", "annotation"),
      ("train", "train img/s"),
      ("eval", "eval img/s"),
      ("ratio", "eval/train (per-round range)"),
    ],
  )
  return output.finish("eval_rate", args, env, rows)


if __name__ == "__main__":
  main()
