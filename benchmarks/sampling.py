"""Inference throughput: images/s of the Euler sampler (image -> colour mask -> labels), JAX vs PyTorch.

JAX side: `inference.sample_fn` (the jitted sampler evaluation and `Segmenter` run: the task's ODE
over `task.sampler_options(num_steps)`, then nearest-centroid decoding), compiled ahead of time, for
each step count in `--num-steps`. PyTorch side, same process: the reference PixNerDiT in an Euler loop
under `no_grad` (bf16 autocast on CUDA) followed by an argmin over centroid distances. Prints
images/s, model FLOPs (steps x forward), MFU and XLA's peak memory. Goal on one H100: 10 steps at
512x512 >= 40 images/s.

  python -m benchmarks.sampling                                          # CPU: S/16 at 64, b4
  python -m benchmarks.sampling --cases XL/16:512:32 --json sampling.json   # one GPU
"""

from __future__ import annotations

import argparse
import gc
import time

import flax.linen as nn
import jax
import numpy as np

from benchmarks import configs, flags, flops, hardware, output, timing
from flowseg_jax import inference, sampling, sharding, train_step

DEFAULT_CPU_CASES = "S/16:64:4"
DEFAULT_ACCEL_CASES = "XL/16:512:32,XL/16:256:64"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  flags.add_common_flags(p)
  p.add_argument("--num-steps", default="1,10", help="comma-separated Euler step counts")
  p.set_defaults(warmup=1, steps=2)
  args = p.parse_args(argv)
  flags.host_allocation(args)
  if args.cases is None:
    args.cases = DEFAULT_CPU_CASES if jax.default_backend() == "cpu" else DEFAULT_ACCEL_CASES
  return args


class JaxSampler:
  """The evaluation sampler of one case and step count, compiled ahead of time."""

  def __init__(self, task, params, images, conds, mesh, num_steps: int):
    self.args = (params, images, conds)
    fn = inference.sample_fn(task, mesh, task.sampler_options(num_steps))
    self.matmul_flops = flops.jaxpr_matmul_flops(fn, *self.args)  # = steps x forward
    start = time.perf_counter()
    self.compiled = fn.lower(*self.args).compile()
    self.compile_s = time.perf_counter() - start
    self.memory = hardware.memory_summary(self.compiled)

  def run(self, n: int) -> None:
    out = None
    for _ in range(n):
      out = self.compiled(*self.args)
    jax.block_until_ready(out)


class TorchSampler:
  """Reference PixNerDiT, Euler steps on the same time grid, then nearest-centroid labels."""

  def __init__(
    self, setup: train_step.TrainSetup, images: np.ndarray, device, *, bf16: bool, num_steps: int
  ):
    import torch

    from tests.torch_reference import pixnerd as torch_pixnerd

    self.torch, self.device = torch, device
    torch.manual_seed(setup.config.seed)
    task = setup.task
    self.model = torch_pixnerd.PixNerDiT(**task.model.arch_config()).to(device).eval()
    self.x0 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    self.y = torch.full((images.shape[0],), task.cond_label, dtype=torch.long, device=device)
    centroids = task.decode_centroids
    self.centroids = torch.tensor(centroids, device=device)
    self.grid = sampling.time_grid(num_steps, shift=setup.config.eval.shift).tolist()
    self.bf16 = bf16

  def sample(self):
    torch = self.torch
    x = self.x0
    b = x.shape[0]
    with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
      for t0, t1 in zip(self.grid[:-1], self.grid[1:]):
        t = torch.full((b,), t0, device=self.device)
        x = x + (t1 - t0) * self.model(x, t, self.y).float()
      d = ((x[:, None] - self.centroids[None, :, :, None, None]) ** 2).sum(2)
      return x, d.argmin(1)

  def run(self, n: int) -> None:
    for _ in range(n):
      self.sample()
    hardware.torch_sync(self.device)


def init_params(setup: train_step.TrainSetup, mesh, rules):
  """Freshly initialised denoiser parameters (sampling speed does not depend on their values)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(lambda k: nn.unbox(setup.init_params(k)))(jax.random.key(0))
  return params["denoiser"]


def bench_case(case, base, args, dtype, peak, device) -> list[dict]:
  config = configs.case_config(
    base, case, dtype=dtype, remat="none", scan=args.scan, attention_impl=args.attention_impl
  )
  setup = train_step.TrainSetup(config)
  task = setup.task
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  rules = sharding.rules_from_config(config.sharding_rules)
  params = init_params(setup, mesh, rules)
  images_np = configs.random_batch(config, task.num_classes)["image"]
  conds = np.full((case.batch,), task.cond_label, np.int32)
  arrays = sharding.shard_batch({"image": images_np, "cond": conds}, mesh)
  forward = flops.pixnerd_forward_flops(
    task.model.arch_config(), case.batch, case.height, case.width
  )["total"]
  rows = []
  for n in (int(s) for s in args.num_steps.split(",")):
    # sample_fn compiles one sampler per (task, mesh, sampler options): one per step count.
    sampler = JaxSampler(task, params, arrays["image"], arrays["cond"], mesh, n)
    fns = {"jax": sampler.run}
    if args.torch:
      tsampler = TorchSampler(setup, images_np, device, bf16=dtype == "bfloat16", num_steps=n)
      fns["torch"] = tsampler.run
    times = timing.interleaved_rounds(fns, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    jt = timing.summarize(times["jax"])
    step_flops = n * forward
    row = {
      "case": case.label,
      "num_steps": n,
      "dtype": dtype,
      "jax_batch_s": jt,
      "jax_images_per_s": case.batch / jt["median"],
      "model_flops": step_flops,
      "jaxpr_matmul_flops": sampler.matmul_flops,
      "achieved_tflops": step_flops / jt["median"] / 1e12,
      "mfu": step_flops / jt["median"] / peak if peak else None,
      "compile_s": sampler.compile_s,
      "xla_memory": sampler.memory,
    }
    if args.torch:
      tt = timing.summarize(times["torch"])
      row.update(
        torch_batch_s=tt,
        torch_images_per_s=case.batch / tt["median"],
        speedup=tt["median"] / jt["median"],
        speedup_per_round=timing.summarize([t / j for t, j in zip(times["torch"], times["jax"])]),
      )
      del tsampler
    rows.append(row)
    del sampler
    gc.collect()
  return rows


def main(argv=None) -> dict:
  args = parse_args(argv)
  cases, dtype, threads = flags.setup_run(args)
  base = configs.load_config(args.config)
  peak, peak_source = flags.peak_flops(args, dtype)
  device = hardware.torch_device() if args.torch else None
  env = output.environment(threads if args.torch else None)
  print(
    f"sampling: JAX {env['jax']} on {env['backend']} ({env['device_kind']}), torch "
    f"{device.type if device else 'off'} ({threads} threads), {dtype}; peak "
    f"{output.fmt(peak, '.2f', 1e-12)} TFLOP/s ({peak_source}); load {env['load_average']}"
  )
  rows = []
  for case in cases:
    rows.extend(bench_case(case, base, args, dtype, peak, device))
    print(f"  done {case.label}", flush=True)
  table = [
    {
      "case": r["case"],
      "steps": str(r["num_steps"]),
      "jax_ms": f"{r['jax_batch_s']['median'] * 1e3:.1f}±{r['jax_batch_s']['spread'] * 100:.0f}%",
      "img_s": f"{r['jax_images_per_s']:.2f}",
      "tflops": f"{r['achieved_tflops']:.3f}",
      "mfu": output.fmt(r["mfu"], ".1%"),
      "mem": output.fmt(r["xla_memory"]["peak_bytes"], ".0f", 2**-20),
      "torch_img_s": output.fmt(r.get("torch_images_per_s"), ".2f"),
      "speedup": output.fmt(r.get("speedup"), ".2f"),
    }
    for r in rows
  ]
  output.print_table(
    table,
    [
      ("case", "case"),
      ("steps", "Euler steps"),
      ("jax_ms", "JAX ms/batch"),
      ("img_s", "JAX img/s"),
      ("tflops", "TFLOP/s"),
      ("mfu", "MFU"),
      ("mem", "XLA peak MiB"),
      ("torch_img_s", "torch img/s"),
      ("speedup", "JAX/torch"),
    ],
  )
  result = {
    "benchmark": "sampling",
    "args": vars(args),
    "environment": env,
    "peak_flops": peak,
    "peak_source": peak_source,
    "rows": rows,
  }
  output.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
