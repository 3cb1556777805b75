"""First run on an accelerator: the numbers to read off one GPU (or TPU VM) in a few minutes.

In one process, with the paper's XL/16 and bfloat16 compute:
  1. train step (forward, backward, AdamW, EMA; `benchmarks/train_step.py`): 256² b64 and 512²
     b16, step time, images/s and MFU against the device's datasheet peak;
  2. bf16 vs float32: the training loss of the same parameters and batch in both compute dtypes;
  3. cuDNN vs XLA attention: the network output with `attention_impl='cudnn'` and `'xla'` (GPU only);
  4. the objective's overhead: the FlowSeg step vs vanilla flow matching
     (`benchmarks/objective_overhead.py`);
  5. inference: 1-step and 10-step Euler sampling at 512², images/s (`benchmarks/sampling.py`).
Agreement thresholds: relative loss difference bf16/f32 <= 2e-2 (bf16 keeps 8 mantissa bits; the
loss is a mean over millions of terms, so rounding averages out), relative L2 difference of the
outputs cuDNN/XLA <= 2e-2 (both compute in bf16 with float32 softmax statistics, in different
orders). `--tiny` runs every stage on a tiny model at 32² (CPU, for tests).

  bash tools/accelerator_check.sh           # wraps this, logs to accelerator_check.log
  python -m tools.accelerator_check --tiny  # from the repository root, no log file
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import configs, objective_overhead, sampling
from benchmarks import train_step as train_step_benchmark
from flowseg_jax import tasks, train_step

FULL = {
  "train": "XL/16:256:64,XL/16:512:16",
  "objective": "XL/16:256:64",
  "sampling": "XL/16:512:16",
  "agreement": "XL/16:256:8",
}
TINY = {
  "train": "tiny/4:32:8",
  "objective": "tiny/4:32:8",
  "sampling": "tiny/4:32:4",
  "agreement": "tiny/4:32:4",
}
LOSS_RTOL = 2e-2
ATTENTION_RTOL = 2e-2


def _params_and_batch(config, seed: int = 0):
  """Initial parameters with a random (not zero) output layer, and a random batch."""
  setup = train_step.TrainSetup(config)
  params = jax.jit(lambda k: nn.unbox(setup.init_params(k)))(jax.random.key(seed))
  final = params["denoiser"]["final_layer"]["linear"]
  final["kernel"] = 0.02 * jax.random.normal(jax.random.key(seed + 1), final["kernel"].shape)
  batch = configs.random_batch(config, setup.task.num_classes, seed=seed)
  return params, jax.tree.map(jnp.asarray, batch)


def _loss(config, params, batch) -> float:
  setup = train_step.TrainSetup(config)
  valid = jnp.sum((batch["label"] != 255).astype(jnp.int32))
  cond = setup.task.condition(batch)
  fn = jax.jit(
    lambda p, x, y: train_step.loss_fn(p, None, x, y, jax.random.key(0), valid, cond, setup=setup)
  )
  return float(fn(params, batch["image"], batch["label"])[0])


def _output(config, params, batch) -> np.ndarray:
  task = tasks.create_task(config)
  b = batch["image"].shape[0]
  t = jnp.linspace(0.1, 0.9, b)
  y = jnp.full((b,), task.cond_label, jnp.int32)
  fn = jax.jit(lambda p, x: task.apply(p["denoiser"], x, t, y))
  return np.asarray(fn(params, batch["image"]), np.float32)


def agreement(base, case_text: str, remat: str) -> dict:
  """bf16-vs-float32 loss and cuDNN-vs-XLA attention on the same parameters and batch."""
  case = configs.parse_cases(case_text)[0]
  f32 = configs.case_config(base, case, dtype="float32", remat=remat, attention_impl="xla")
  bf16 = configs.case_config(base, case, dtype="bfloat16", remat=remat, attention_impl="xla")
  params, batch = _params_and_batch(f32)
  loss32, loss16 = _loss(f32, params, batch), _loss(bf16, params, batch)
  out = {
    "case": case.label,
    "loss_float32": loss32,
    "loss_bfloat16": loss16,
    "loss_rel_diff": abs(loss16 - loss32) / max(abs(loss32), 1e-12),
  }
  out["loss_ok"] = out["loss_rel_diff"] <= LOSS_RTOL
  if jax.default_backend() != "gpu":
    out["attention"] = f"skipped: cuDNN attention needs a GPU (backend {jax.default_backend()})"
    return out
  cudnn = configs.case_config(base, case, dtype="bfloat16", remat=remat, attention_impl="cudnn")
  a, b = _output(bf16, params, batch), _output(cudnn, params, batch)
  out["attention_rel_l2"] = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
  out["attention_ok"] = out["attention_rel_l2"] <= ATTENTION_RTOL
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="tiny model at 32² (CPU smoke run)")
  p.add_argument("--config", default=configs.DEFAULT_CONFIG)
  p.add_argument("--remat", default="nothing_saveable", help="train-step remat policy")
  p.add_argument("--attention-impl", default=None, choices=["xla", "cudnn"])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--out-dir", default=None, help="JSON of every stage goes here")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  cases = TINY if args.tiny else FULL
  attn = args.attention_impl or ("cudnn" if jax.default_backend() == "gpu" else None)
  timing = ["--rounds", str(args.rounds), "--steps", str(args.steps), "--warmup", "1"]
  # CPU compiles bf16 programs slowly: the tiny smoke run times float32 (agreement still uses bf16).
  dtype = "float32" if args.tiny else "bfloat16"
  common_flags = ["--config", args.config, "--dtype", dtype, *timing]
  if attn:
    common_flags += ["--attention-impl", attn]

  def json_flag(name):
    return ["--json", os.path.join(args.out_dir, f"{name}.json")] if args.out_dir else []

  start, results = time.perf_counter(), {}
  print(f"== accelerator check on {jax.devices()[0].device_kind} ({jax.device_count()} devices)")
  print(f"== 1. train step, {dtype}, remat {args.remat}, attention {attn or 'default'}", flush=True)
  results["train_step"] = train_step_benchmark.main(
    [
      *common_flags,
      "--cases",
      cases["train"],
      "--remat",
      args.remat,
      "--no-torch",
      "--data",
      "none",
      *json_flag("train_step"),
    ]
  )
  print("== 2-3. agreement: bf16 vs float32 loss, cuDNN vs XLA attention", flush=True)
  base = configs.load_config(args.config)
  results["agreement"] = agreement(base, cases["agreement"], args.remat)
  for k, v in results["agreement"].items():
    print(f"  {k}: {v}")
  print("== 4. objective overhead (FlowSeg vs vanilla FM step)", flush=True)
  results["objective"] = objective_overhead.main(
    [*common_flags, "--cases", cases["objective"], "--remat", args.remat, *json_flag("objective")]
  )
  print("== 5. sampling at 512², 1 and 10 Euler steps", flush=True)
  results["sampling"] = sampling.main(
    [*common_flags, "--cases", cases["sampling"], "--num-steps", "1,10", "--no-torch"]
    + json_flag("sampling")
  )
  print(f"== done in {time.perf_counter() - start:.0f} s")
  ok = results["agreement"]["loss_ok"] and results["agreement"].get("attention_ok", True)
  print("== agreement " + ("OK" if ok else "FAILED"))
  return results


if __name__ == "__main__":
  main()
