"""The real FlowSeg train step (forward + backward + optimiser + EMA): JAX vs PyTorch.

JAX side: `train_step.TrainSetup` -> `train_state.create_train_state` ->
`train_step.compile_train_step`, compiled ahead of time (`.lower(...).compile()`), state donated, timed
over `--steps` steps per round with `jax.block_until_ready`; the block layout is the config's
(`--scan` / `--no-scan` to force one, `--also-unrolled` / `--also-scanned` to time the other too).
PyTorch side, same process and shapes (benchmarks/torch_peer.py): our reference PixNerDiT
(`--torch`) and, with `--official-src`, the official one, each with an efficient FlowSeg loss + AdamW
+ global-norm clipping + EMA (bf16 autocast on CUDA, float32 on CPU); the official network also
with an MSE loss (network + optimiser alone) and its FlowSeg loss alone. On CPU all take turns in
every round and the ratios are per-round. Prints steps/s, images/s, model FLOPs per step
(benchmarks/flops.py), MFU, XLA's FLOP count and peak memory, the ratios (> 1: JAX faster) and the
input pipeline's images/s against what the step consumes (benchmarks/input_rate.py).

  python -m benchmarks.train_step                                   # CPU: S/16 at 64 and 128
  python -m benchmarks.train_step --cases S/16:128:4 --official-src ~/PixNerd --no-torch
  python -m benchmarks.train_step --cases XL/16:256:64,XL/16:512:16 --json xl.json   # one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import tempfile

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
    help="a local checkout of github.com/MCG-NJU/PixNerd: also time the official PixNerDiT (same "
    "initial weights as JAX) in the same rounds: its full step (FlowSeg loss, AdamW, clipping, "
    "EMA), its network + AdamW with an MSE loss, and the FlowSeg loss alone",
  )
  p.add_argument(
    "--also-unrolled",
    action="store_true",
    help="when the default step scans its blocks: also time the unrolled-blocks step "
    "(config.model.scan_blocks=False) in the same rounds (scan/unrolled: what the scan costs)",
  )
  p.add_argument(
    "--also-scanned",
    action="store_true",
    help="when the default step unrolls its blocks: also time the scanned step in the same rounds",
  )
  p.add_argument(
    "--peer-loss",
    default="flowseg",
    choices=["flowseg", "reference"],
    help="the PyTorch full steps' loss: benchmarks/torch_peer.py's efficient FlowSeg loss, or the "
    "parity reference tests/torch_reference/flowseg.py (slow: written for clarity)",
  )
  p.add_argument("--data-workers", type=int, default=0, help="grain worker processes")
  p.add_argument("--data-batches", type=int, default=10)
  p.add_argument(
    "--profile-dir", default=None, help="write a jax.profiler trace of 3 steps per case here"
  )
  p.add_argument("--hlo-dir", default=None, help="write each case's compiled HLO text here")
  return p.parse_args(argv)


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


def _torch_contenders(setup, batch, device, dtype, args, fns) -> dict:
  """The PyTorch steps (benchmarks/torch_peer.py), added to `fns` by name; returns them by name.

  torch: our reference network, the full step. official: the official network, the full step
  (FlowSeg loss). official_net: the official network + AdamW with an MSE loss, the network and
  optimiser alone. loss: the FlowSeg loss's forward + backward alone on an output of the step's
  shape, to show what it adds.
  """
  from benchmarks import torch_peer

  bf16, steps = dtype == "bfloat16", {}
  if args.torch:
    steps["torch"] = torch_peer.TorchTrainStep(setup, batch, device, bf16=bf16, loss=args.peer_loss)
  if args.official_src:
    model = torch_peer.official_model(args.official_src, setup)
    steps["official"] = torch_peer.TorchTrainStep(
      setup, batch, device, bf16=bf16, model=model, loss=args.peer_loss
    )
    net = torch_peer.official_model(args.official_src, setup)
    steps["official_net"] = torch_peer.TorchTrainStep(
      setup, batch, device, bf16=bf16, model=net, loss="mse"
    )
    steps["loss"] = torch_peer.LossStep(steps["official"])
  for name, step in steps.items():
    fns[name] = step.run
  return steps


def _jax_contenders(case, base, args, dtype, batch, fns) -> tuple[compiled_step.JaxTrainStep, str]:
  """The default JAX step as 'jax', and with --also-unrolled / --also-scanned the other block
  layout as 'unrolled' / 'scanned' when it differs from the default. Returns (default, other name)."""
  kw = dict(
    dtype=dtype, remat=args.remat, attention_impl=args.attention_impl, teacher_dir=args.teacher_dir
  )
  config = configs.case_config(base, case, scan=args.scan, **kw)
  jstep = compiled_step.JaxTrainStep(train_step.TrainSetup(config), batch)
  fns["jax"] = jstep.run
  scanned = jstep.setup.task.model.scan_blocks
  other = "unrolled" if scanned else "scanned"
  if (args.also_unrolled and scanned) or (args.also_scanned and not scanned):
    oconfig = configs.case_config(base, case, scan=not scanned, **kw)
    ostep = compiled_step.JaxTrainStep(train_step.TrainSetup(oconfig), batch, count_flops=False)
    fns[other] = ostep.run
  return jstep, other


def _per_round(times: dict, num: str, den: str) -> dict | None:
  """Per-round ratios num/den: each pair ran back to back under the same load."""
  if num not in times or den not in times:
    return None
  return timing.summarize([a / b for a, b in zip(times[num], times[den])])


def bench_case(case, base, args, dtype, peak, device, interleave) -> dict:
  config = configs.case_config(base, case, dtype=dtype, scan=args.scan)
  setup = train_step.TrainSetup(config)
  batch = configs.random_batch(config, setup.task.num_classes, seed=config.seed)
  fns, times, tsteps = {}, {}, {}
  if not interleave:  # accelerators: torch first, then free its memory for JAX
    tsteps = _torch_contenders(setup, batch, device, dtype, args, fns)
    times = timing.interleaved_rounds(fns, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    torch_peak = {n: s.peak_bytes() for n, s in tsteps.items() if hasattr(s, "peak_bytes")}
    losses = {n: s.loss for n, s in tsteps.items()}
    fns, tsteps = {}, {}
    gc.collect()
    if device is not None and device.type == "cuda":
      import torch

      torch.cuda.empty_cache()
  jstep, other = _jax_contenders(case, base, args, dtype, batch, fns)
  if interleave:
    tsteps = _torch_contenders(setup, batch, device, dtype, args, fns)
  times.update(
    timing.interleaved_rounds(fns, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
  )
  if interleave:
    torch_peak = {n: s.peak_bytes() for n, s in tsteps.items() if hasattr(s, "peak_bytes")}
    losses = {n: s.loss for n, s in tsteps.items()}

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
    "scan": jstep.setup.task.model.scan_blocks,
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
  if "torch" in times:
    tt = timing.summarize(times["torch"])
    row.update(
      torch_step_s=tt,
      torch_images_per_s=case.batch / tt["median"],
      torch_peak_bytes=torch_peak.get("torch"),
      speedup=tt["median"] / jt["median"],
      speedup_per_round=_per_round(times, "torch", "jax") if interleave else None,
    )
  for name in ("official", "official_net"):  # the full step and the network + optimiser alone
    if name in times:
      ot = timing.summarize(times[name])
      row[f"{name}_step_s"] = ot
      row[f"{name}_loss"] = float(losses[name].detach())
      row[f"{name}_speedup"] = ot["median"] / jt["median"]
      for jname, suffix in (("jax", ""), (other, "_" + other)):
        if interleave and jname in times:
          row[f"{name}_speedup{suffix}_per_round"] = _per_round(times, name, jname)
  if "loss" in times:  # the peer's FlowSeg loss against its full step
    row["official_loss_fn_s"] = timing.summarize(times["loss"])
    row["official_loss_share"] = (
      row["official_loss_fn_s"]["median"] / row["official_step_s"]["median"]
    )
    row["official_loss_share_per_round"] = _per_round(times, "loss", "official")
  if other in times:
    row[f"{other}_step_s"] = timing.summarize(times[other])
    row["scan_cost_per_round"] = (
      _per_round(times, "jax", "unrolled")
      if other == "unrolled"
      else _per_round(times, "scanned", "jax")
    )
    row["scan_cost"] = row["scan_cost_per_round"]["median"]
  del jstep, tsteps
  gc.collect()
  return row


def _ratio_text(row: dict, key: str) -> str:
  """'1.07 (1.02-1.10)': the median of the per-round ratios and their range (else the ratio of the
  medians)."""
  if row.get(key) is None:
    return "n/a"
  rounds = row.get(key + "_per_round")
  if rounds:  # the median of the per-round ratios, and their range
    return f"{rounds['median']:.2f} ({rounds['min']:.2f}-{rounds['max']:.2f})"
  return f"{row[key]:.2f}"


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.official_src:
    from benchmarks import torch_peer

    torch_peer.official_source(args.official_src)  # fail before compiling anything
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
    f"{dtype}, remat={args.remat}, scan={args.scan} (None: the config's); peak {output.fmt(peak, '.2f', 1e-12)} "
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
        "net_ms": output.fmt(r.get("official_net_step_s", {}).get("median"), ".1f", 1e3),
        "net": _ratio_text(r, "official_net_speedup"),
        "loss_share": output.fmt(r.get("official_loss_share"), ".1%"),
        "other_ms": output.fmt(
          r.get("unrolled_step_s", r.get("scanned_step_s", {})).get("median"), ".1f", 1e3
        ),
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
      ("official_ms", "official full ms/step"),
      ("official", "official full/JAX (rounds)"),
      ("net_ms", "official net+AdamW ms/step"),
      ("net", "official net+AdamW/JAX (rounds)"),
      ("loss_share", "FlowSeg loss/official step"),
      ("other_ms", "other layout ms/step"),
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
