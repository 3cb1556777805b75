"""The real FlowSeg train step (forward + backward + optimiser + EMA): JAX vs the PyTorch reference.

JAX side: `train_step.TrainSetup` -> `train_state.create_train_state` ->
`train_step.compile_train_step`, compiled ahead of time (`.lower(...).compile()`), state donated, timed over `--steps` steps per round with
`jax.block_until_ready`. PyTorch side, same process and shapes: `tests/torch_reference/pixnerd.py`
+ `tests/torch_reference/flowseg.py` loss + AdamW + global-norm clipping + EMA (bf16 autocast on
CUDA, float32 on CPU). Prints steps/s, images/s, model FLOPs per step (benchmarks/flops.py),
MFU, XLA's FLOP count and peak memory, the JAX/PyTorch throughput ratio (> 1: JAX faster) and the
input pipeline's images/s against what the step consumes (benchmarks/input_rate.py).

  python -m benchmarks.train_step                                   # CPU: S/16 at 64 and 128
  python -m benchmarks.train_step --cases XL/16:256:64,XL/16:512:16 --json xl.json   # one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import tempfile

import flax.linen as nn
import jax
import numpy as np

from benchmarks import compiled_step, configs, flags, flops, hardware, input_rate, output, timing
from flowseg_jax import train_step


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  flags.add_common_flags(p)
  p.add_argument(
    "--teacher-dir",
    default=None,
    help="converted DINOv2: time the JAX step with REPA on (the torch reference has no REPA)",
  )
  p.add_argument(
    "--interleave",
    default="auto",
    choices=["auto", "on", "off"],
    help="take turns JAX/torch each round (auto: on for CPU, off on accelerators, where torch "
    "runs first and frees its memory before JAX starts)",
  )
  p.add_argument(
    "--data",
    default="ade20k",
    choices=["ade20k", "synthetic", "none"],
    help="input pipeline compared with the step's consumption: fake ADE20K JPEG/PNG files "
    "(random scale, crop, flip), the built-in synthetic set, or none",
  )
  p.add_argument(
    "--official-src",
    default=None,
    help="a local checkout of github.com/MCG-NJU/PixNerd: also time the step with the official "
    "PixNerDiT (same initial weights as JAX, same loss, optimiser and EMA) in the same rounds",
  )
  p.add_argument(
    "--also-unrolled",
    action="store_true",
    help="with --scan: also time the unrolled-blocks step (config.model.scan_blocks=False) in the "
    "same rounds, to report what the scanned layout costs (scan/unrolled)",
  )
  p.add_argument("--data-workers", type=int, default=0, help="grain worker processes")
  p.add_argument("--data-batches", type=int, default=10)
  p.add_argument(
    "--profile-dir", default=None, help="write a jax.profiler trace of 3 steps per case here"
  )
  p.add_argument("--hlo-dir", default=None, help="write each case's compiled HLO text here")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# PyTorch reference.
# ------------------------------------------------------------------------------------------------


class TorchTrainStep:
  """Eager PyTorch: reference PixNerDiT + reference FlowSeg loss + AdamW + clipping + EMA."""

  def __init__(
    self,
    setup: train_step.TrainSetup,
    batch: dict[str, np.ndarray],
    device,
    *,
    bf16: bool,
    model=None,
  ):
    import torch

    from tests.torch_reference import pixnerd as torch_pixnerd

    cfg, task = setup.config, setup.task
    self.torch, self.device, self.cfg, self.objective = torch, device, cfg, task.objective
    torch.manual_seed(cfg.seed)
    if model is None:
      model = torch_pixnerd.PixNerDiT(**task.model.arch_config())
    self.model = model.to(device)
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.ema = [p.detach().clone() for p in self.params]
    self.opt = torch.optim.AdamW(
      self.params,
      lr=cfg.optim.learning_rate,
      betas=(cfg.optim.b1, cfg.optim.b2),
      eps=cfg.optim.eps,
      weight_decay=cfg.optim.weight_decay,
      fused=device.type == "cuda",
    )
    self.centroids = torch.tensor(np.asarray(task.centroids), device=device)
    self.x0 = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    self.labels = torch.from_numpy(batch["label"]).long().to(device)
    b = self.x0.shape[0]
    self.y = torch.full((b,), task.cond_label, dtype=torch.long, device=device)
    self.autocast = functools.partial(
      torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16
    )
    self.loss = None

  def _sample_t(self, b: int):
    torch, obj = self.torch, self.cfg.objective
    if obj.t_distribution == "uniform":
      t = torch.rand(b, device=self.device)
    else:
      t = torch.sigmoid(obj.t_mean + obj.t_std * torch.randn(b, device=self.device))
    return t if obj.t_shift == 1.0 else t / (t + (1 - t) * obj.t_shift)

  def step(self) -> None:
    from tests.torch_reference import flowseg as torch_flowseg

    torch, obj = self.torch, self.cfg.objective
    n = self.centroids.shape[0]
    ignored = self.labels == torch_flowseg.IGNORE
    lab = torch.where(
      ignored, torch.full_like(self.labels, 0 if obj.mask_ignored else n - 1), self.labels
    )
    t = self._sample_t(self.x0.shape[0])
    tb = t[:, None, None, None]
    x_t = (1 - tb) * self.x0 + tb * self.centroids[lab].permute(0, 3, 1, 2)
    with self.autocast():
      out = self.model(x_t, t, self.y)
    loss, *_ = torch_flowseg.flowseg_loss(
      out.float(),
      self.x0,
      self.labels,
      t,
      self.centroids,
      **self.objective.reference_options(),
    )
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.cfg.optim.grad_clip_norm:
      torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip_norm)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - self.cfg.optim.ema_decay)
    self.loss = loss

  def run(self, n: int) -> None:
    for _ in range(n):
      self.step()
    hardware.torch_sync(self.device)

  def peak_bytes(self) -> int | None:
    if self.device.type != "cuda":
      return None
    return int(self.torch.cuda.max_memory_allocated())


def official_source(src: str) -> str:
  """The official class-to-image model file inside a checkout of MCG-NJU/PixNerd."""
  path = os.path.join(src, "src", "models", "transformer", "pixnerd_c2i.py")
  if not os.path.isfile(path):
    raise ValueError(f"--official-src {src!r}: {path} not found (a checkout of MCG-NJU/PixNerd)")
  return path


def official_model(src: str, setup: train_step.TrainSetup):
  """The official PixNerd class-to-image network, from a local checkout, with JAX's initial weights.

  Imports `src/models/transformer/pixnerd_c2i.py` of the checkout by path (it needs only torch)
  and loads the parameters `train_state.create_train_state` starts from (the same seed), converted by
  `convert.pixnerd.flax_to_torch`, so both frameworks train the same network from the same point.
  """
  import importlib.util

  import torch

  from flowseg_jax.convert import pixnerd as pixnerd_convert

  path = official_source(src)
  spec = importlib.util.spec_from_file_location("pixnerd_official_c2i", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  arch = setup.task.model.arch_config()
  model = module.PixNerDiT(
    in_channels=arch["in_channels"],
    num_groups=arch["num_heads"],
    hidden_size=arch["hidden_size"],
    hidden_size_x=arch["nerf_hidden_size"],
    nerf_mlpratio=arch["nerf_mlp_ratio"],
    num_blocks=arch["num_blocks"],
    num_cond_blocks=arch["num_cond_blocks"],
    patch_size=arch["patch_size"],
    num_classes=arch["num_classes"],
  )
  params = nn.unbox(jax.jit(setup.init_params)(jax.random.key(setup.config.seed)))["denoiser"]
  state = pixnerd_convert.flax_to_torch(jax.device_get(params), setup.task.model)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  return model


# ------------------------------------------------------------------------------------------------
# Input pipeline.
# ------------------------------------------------------------------------------------------------


def measure_pipeline(
  kind: str, case: configs.Case, *, workers: int, batches: int, root: str | None
):
  """Images/s of `create_train_iterator` at the case's size (benchmarks/input_rate.py)."""
  from flowseg_jax.data import pipeline

  cfg = pipeline.default_input_config()
  cfg.update(num_workers=workers, batch_size=case.batch, image_size=(case.height, case.width))
  if kind == "ade20k":
    cfg.update(dataset="ade20k", data_dir=root, random_scale=(0.5, 2.0), random_flip=True)
  else:
    cfg.synthetic.size = (case.height, case.width)
  rate, _ = input_rate.measure(cfg, batches, warmup=2)
  return rate


# ------------------------------------------------------------------------------------------------
# Main.
# ------------------------------------------------------------------------------------------------


def _case_slug(case: configs.Case) -> str:
  return f"{case.variant.replace('/', '_')}_{case.height}x{case.width}_b{case.batch}"


def _dump_diagnostics(jstep: compiled_step.JaxTrainStep, case: configs.Case, args) -> None:
  """The compiled HLO (fusions, copies, layouts) and a profiler trace, for the levers to pull."""
  if args.hlo_dir:
    os.makedirs(args.hlo_dir, exist_ok=True)
    with open(os.path.join(args.hlo_dir, _case_slug(case) + ".hlo.txt"), "w") as f:
      f.write(jstep.compiled.as_text())
  if args.profile_dir:
    with jax.profiler.trace(os.path.join(args.profile_dir, _case_slug(case))):
      jstep.run(3)


def bench_case(case, base, args, dtype, peak, device, interleave) -> dict:
  config = configs.case_config(
    base,
    case,
    dtype=dtype,
    remat=args.remat,
    scan=args.scan,
    attention_impl=args.attention_impl,
    teacher_dir=args.teacher_dir,
  )
  setup = train_step.TrainSetup(config)
  batch = configs.random_batch(config, setup.task.num_classes, seed=config.seed)
  fns, tstep = {}, None
  torch_times, torch_peak = None, None
  if args.torch and not interleave:  # torch first, then free its memory for JAX
    tstep = TorchTrainStep(setup, batch, device, bf16=dtype == "bfloat16")
    torch_times = timing.interleaved_rounds(
      {"torch": tstep.run}, rounds=args.rounds, steps=args.steps, warmup=args.warmup
    )["torch"]
    torch_peak = tstep.peak_bytes()
    del tstep
    tstep = None
    gc.collect()
    if device.type == "cuda":
      import torch

      torch.cuda.empty_cache()
  official_times, ostep = None, None
  if args.official_src and not interleave:
    ostep = TorchTrainStep(
      setup, batch, device, bf16=dtype == "bfloat16", model=official_model(args.official_src, setup)
    )
    official_times = timing.interleaved_rounds(
      {"official": ostep.run}, rounds=args.rounds, steps=args.steps, warmup=args.warmup
    )["official"]
    del ostep
    ostep = None
    gc.collect()
  jstep = compiled_step.JaxTrainStep(setup, batch)
  fns["jax"] = jstep.run
  ustep = None
  if args.also_unrolled and args.scan:
    uconfig = configs.case_config(
      base,
      case,
      dtype=dtype,
      remat=args.remat,
      scan=False,
      attention_impl=args.attention_impl,
      teacher_dir=args.teacher_dir,
    )
    ustep = compiled_step.JaxTrainStep(train_step.TrainSetup(uconfig), batch, count_flops=False)
    fns["unrolled"] = ustep.run
  if args.torch and interleave:
    tstep = TorchTrainStep(setup, batch, device, bf16=dtype == "bfloat16")
    fns["torch"] = tstep.run
  if args.official_src and interleave:
    ostep = TorchTrainStep(
      setup, batch, device, bf16=dtype == "bfloat16", model=official_model(args.official_src, setup)
    )
    fns["official"] = ostep.run
  times = timing.interleaved_rounds(fns, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
  if official_times is None and "official" in times:
    official_times = times["official"]
  if torch_times is None and "torch" in times:
    torch_times = times["torch"]
    torch_peak = tstep.peak_bytes()

  jt = timing.summarize(times["jax"])
  _dump_diagnostics(jstep, case, args)
  arch = jstep.setup.task.model.arch_config()
  model_flops = flops.train_step_flops(arch, case.batch, case.height, case.width)
  row = {
    "case": case.label,
    "variant": case.variant,
    "height": case.height,
    "width": case.width,
    "batch": case.batch,
    "dtype": dtype,
    "remat": args.remat,
    "scan": args.scan,
    "num_params": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(jstep.state.params)),
    "jax_step_s": jt,
    "jax_steps_per_s": 1.0 / jt["median"],
    "jax_images_per_s": case.batch / jt["median"],
    "model_flops": model_flops,
    "forward_flops": flops.pixnerd_forward_flops(arch, case.batch, case.height, case.width),
    "jaxpr_matmul_flops": jstep.matmul_flops,
    "xla_flops": jstep.xla_flops,
    "achieved_tflops": model_flops / jt["median"] / 1e12,
    "mfu": model_flops / jt["median"] / peak if peak else None,
    "compile_s": jstep.compile_s,
    "xla_memory": jstep.memory,
    "device_peak_bytes_in_use": hardware.device_peak_bytes_in_use(),
    "jax_loss": jstep.last_loss(),
  }
  if torch_times is not None:
    tt = timing.summarize(torch_times)
    row.update(
      torch_step_s=tt,
      torch_images_per_s=case.batch / tt["median"],
      torch_peak_bytes=torch_peak,
      speedup=tt["median"] / jt["median"],
    )
    if interleave:  # per-round ratios: each pair ran back to back under the same load
      ratios = [t / j for t, j in zip(times["torch"], times["jax"])]
      row["speedup_per_round"] = timing.summarize(ratios)
  if official_times is not None:
    ot = timing.summarize(official_times)
    row.update(
      official_step_s=ot,
      official_loss=None if ostep is None else float(ostep.loss.detach()),
      official_speedup=ot["median"] / jt["median"],
    )
    if interleave:
      ratios = [o / j for o, j in zip(times["official"], times["jax"])]
      row["official_speedup_per_round"] = timing.summarize(ratios)
  if ustep is not None:
    row.update(
      unrolled_step_s=timing.summarize(times["unrolled"]),
      scan_cost=jt["median"] / timing.summarize(times["unrolled"])["median"],
      scan_cost_per_round=timing.summarize(
        [j / u for j, u in zip(times["jax"], times["unrolled"])]
      ),
    )
  del jstep, tstep, ostep, ustep
  gc.collect()
  return row


def _ratio_text(row: dict, key: str) -> str:
  """'1.07 (1.02-1.10)': the median ratio and the range of the per-round ratios."""
  if row.get(key) is None:
    return "n/a"
  rounds = row.get(key + "_per_round")
  spread = f" ({rounds['min']:.2f}-{rounds['max']:.2f})" if rounds else ""
  return f"{row[key]:.2f}{spread}"


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.official_src:
    official_source(args.official_src)  # fail before compiling anything
  cases, dtype, threads = flags.setup_run(args)
  base = configs.load_config(args.config)
  peak, peak_source = flags.peak_flops(args, dtype)
  device = hardware.torch_device() if args.torch or args.official_src else None
  interleave = args.interleave == "on" or (
    args.interleave == "auto" and (device is None or device.type == "cpu")
  )
  env = output.environment(threads if args.torch else None)
  print(
    f"train step: JAX {env['jax']} on {env['backend']} ({env['device_kind']}), "
    f"torch {env.get('torch')} on {device.type if device else 'off'} ({threads} threads), "
    f"{dtype}, remat={args.remat}, scan={args.scan}; peak {output.fmt(peak, '.2f', 1e-12)} "
    f"TFLOP/s ({peak_source}); {args.rounds} rounds x {args.steps} steps, load {env['load_average']}"
  )
  rows = []
  with contextlib.ExitStack() as stack:
    root = None
    if args.data == "ade20k":
      root = stack.enter_context(tempfile.TemporaryDirectory())
      input_rate.write_fake_ade20k(root, num_images=16)
    for case in cases:
      row = bench_case(case, base, args, dtype, peak, device, interleave)
      if args.data != "none":
        rate = measure_pipeline(
          args.data, case, workers=args.data_workers, batches=args.data_batches, root=root
        )
        row.update(data_images_per_s=rate, data_over_consumption=rate / row["jax_images_per_s"])
      rows.append(row)
      print(f"  done {case.label}", flush=True)

  table = []
  for r in rows:
    table.append(
      {
        "case": r["case"],
        "jax_ms": f"{r['jax_step_s']['median'] * 1e3:.1f}±{r['jax_step_s']['spread'] * 100:.0f}%",
        "steps_s": f"{r['jax_steps_per_s']:.2f}",
        "img_s": f"{r['jax_images_per_s']:.1f}",
        "gflop": f"{r['model_flops'] / 1e9:.1f}",
        "tflops": f"{r['achieved_tflops']:.3f}",
        "mfu": output.fmt(r["mfu"], ".1%"),
        "xla_vs_model": output.fmt(r["xla_flops"] and r["xla_flops"] / r["model_flops"], ".2f"),
        "mem": output.fmt(r["xla_memory"]["peak_bytes"], ".0f", 2**-20),
        "compile": f"{r['compile_s']:.1f}",
        "torch_ms": output.fmt(r.get("torch_step_s", {}).get("median"), ".1f", 1e3),
        "speedup": output.fmt(r.get("speedup"), ".2f"),
        "official_ms": output.fmt(r.get("official_step_s", {}).get("median"), ".1f", 1e3),
        "official": _ratio_text(r, "official_speedup"),
        "unrolled_ms": output.fmt(r.get("unrolled_step_s", {}).get("median"), ".1f", 1e3),
        "scan_cost": _ratio_text(r, "scan_cost"),
        "data_img_s": output.fmt(r.get("data_images_per_s"), ".0f"),
        "data_ratio": output.fmt(r.get("data_over_consumption"), ".1f"),
      }
    )
  output.print_table(
    table,
    [
      ("case", "case"),
      ("jax_ms", "JAX ms/step"),
      ("steps_s", "steps/s"),
      ("img_s", "img/s"),
      ("gflop", "GFLOP/step"),
      ("tflops", "TFLOP/s"),
      ("mfu", "MFU"),
      ("xla_vs_model", "XLA/model FLOPs"),
      ("mem", "XLA peak MiB"),
      ("compile", "compile s"),
      ("torch_ms", "torch ms/step"),
      ("speedup", "JAX/torch"),
      ("official_ms", "official ms/step"),
      ("official", "official/JAX (rounds)"),
      ("unrolled_ms", "unrolled ms/step"),
      ("scan_cost", "scan/unrolled (rounds)"),
      ("data_img_s", "data img/s"),
      ("data_ratio", "data/consumed"),
    ],
  )
  result = {
    "benchmark": "train_step",
    "args": vars(args),
    "environment": env,
    "peak_flops": peak,
    "peak_source": peak_source,
    "interleaved": interleave,
    "rows": rows,
  }
  output.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
