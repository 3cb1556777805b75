"""PixNerDiT forward and forward+backward: Flax vs the PyTorch reference, in one run.

Both sides run the same weights (the torch reference's random weights converted with
`flowseg_jax.convert.pixnerd`) on the same inputs. Prints median step times, their Flax/PyTorch
ratios (< 1: Flax faster), XLA's compiled memory (`memory_analysis()`), the compile times and
the forward-output agreement. PyTorch's peak memory is reported on CUDA only.

  python -m benchmarks.model_step                         # small CPU default (< 1 min)
  python -m benchmarks.model_step --variant XL/16 --batch 32 --res 256 --dtype bfloat16 \
      --remat full --attention-impl cudnn --json /tmp/xl.json    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import timing
from flowseg_jax.convert import pixnerd as convert
from flowseg_jax.models import pixnerd
from tests.torch_reference import pixnerd as torch_ref


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--variant", default="S/16", choices=sorted(pixnerd.VARIANTS))
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--res", default="64", help="image size: N or HxW (multiples of the patch)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--remat", default="none", help="'none', 'full' or a jax.checkpoint_policies name")
  p.add_argument("--attention-impl", default=None, choices=["xla", "cudnn"])
  p.add_argument("--no-torch", action="store_true", help="time Flax only")
  p.add_argument(
    "--torch-threads",
    type=int,
    default=None,
    help="torch.set_num_threads (CPU); its OpenMP pool degrades badly on an oversubscribed box",
  )
  p.add_argument("--json", default=None, help="write the results here")
  return p.parse_args(argv)


def bench_flax(model, params, x, t, y, args):
  def loss(p):
    return jnp.mean(model.apply({"params": p}, x, t, y) ** 2)

  results = {}
  for name, fn, fn_args in (
    ("forward", lambda p, x, t, y: model.apply({"params": p}, x, t, y), (params, x, t, y)),
    ("forward+backward", jax.value_and_grad(loss), (params,)),
  ):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*fn_args).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    run = lambda c=compiled, a=fn_args: jax.block_until_ready(c(*a))
    results[name] = dict(
      time_s=timing.median_time(run, args.steps, args.warmup),
      compile_s=compile_s,
      temp_bytes=int(mem.temp_size_in_bytes) if mem else None,
      argument_bytes=int(mem.argument_size_in_bytes) if mem else None,
      output_bytes=int(mem.output_size_in_bytes) if mem else None,
    )
  return results


def bench_torch(model, x, t, y, args, device):
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

  def forward():
    with torch.no_grad(), autocast:
      model(x, t, y)
    sync()

  def forward_backward():
    model.zero_grad(set_to_none=True)
    with autocast:
      loss = model(x, t, y).float().pow(2).mean()
    loss.backward()
    sync()

  results = {}
  for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
    peak = None
    if device.type == "cuda":
      torch.cuda.reset_peak_memory_stats()
      base = torch.cuda.memory_allocated()
    timed = timing.median_time(fn, args.steps, args.warmup)
    if device.type == "cuda":
      peak = torch.cuda.max_memory_allocated() - base
    results[name] = dict(time_s=timed, peak_bytes=peak)
  return results


def _mib(n):
  return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def main(argv=None) -> dict:
  args = parse_args(argv)
  h, w = (int(v) for v in (args.res.split("x") if "x" in args.res else (args.res, args.res)))
  cfg = pixnerd.VARIANTS[args.variant]
  jax_backend = jax.default_backend()
  device = torch.device("cuda" if jax_backend == "gpu" and torch.cuda.is_available() else "cpu")
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)

  tmodel = torch_ref.randomize_(torch_ref.PixNerDiT(**cfg), seed=0).to(device)
  state = {k: v.detach().cpu().numpy() for k, v in tmodel.state_dict().items()}
  model = pixnerd.PixNerDiT(
    **cfg,
    dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
    attention_impl=args.attention_impl,
    remat_policy=args.remat,
    scan_blocks=args.scan,
  )
  params = jax.device_put(convert.torch_to_flax(state, model))

  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (args.batch, h, w, 3)).astype(np.float32)
  t = rng.uniform(0, 1, (args.batch,)).astype(np.float32)
  y = rng.integers(0, cfg["num_classes"] + 1, (args.batch,)).astype(np.int32)
  xj, tj, yj = (jax.device_put(a) for a in (x, t, y))
  flax_res = bench_flax(model, params, xj, tj, yj, args)

  torch_res, max_diff = None, None
  if not args.no_torch:
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
    tt, yt = torch.from_numpy(t).to(device), torch.from_numpy(y).long().to(device)
    torch_res = bench_torch(tmodel, xt, tt, yt, args, device)
    with torch.no_grad():
      want = tmodel(xt, tt, yt).permute(0, 2, 3, 1).float().cpu().numpy()
    got = np.asarray(jax.jit(lambda p: model.apply({"params": p}, xj, tj, yj))(params))
    max_diff = float(np.abs(got - want).max())

  n_params = pixnerd.count_params(params)
  print(
    f"PixNerDiT {args.variant} ({n_params / 1e6:.1f}M params), batch {args.batch}, {h}x{w}, "
    f"{args.dtype}, scan={args.scan}, remat={args.remat}; JAX {jax_backend} "
    f"({jax.devices()[0].device_kind}), torch {device.type} ({torch.get_num_threads()} threads)"
  )
  print(
    f"{'measurement':<18} {'flax ms':>10} {'torch ms':>10} {'flax/torch':>11} "
    f"{'compile s':>10} {'XLA temp':>12} {'torch peak':>12}"
  )
  for name, fr in flax_res.items():
    tr = torch_res[name] if torch_res else None
    ratio = f"{fr['time_s'] / tr['time_s']:.2f}" if tr else "n/a"
    tms = f"{tr['time_s'] * 1e3:.1f}" if tr else "n/a"
    print(
      f"{name:<18} {fr['time_s'] * 1e3:>10.1f} {tms:>10} {ratio:>11} {fr['compile_s']:>10.1f} "
      f"{_mib(fr['temp_bytes']):>12} {_mib(tr['peak_bytes'] if tr else None):>12}"
    )
  if max_diff is not None:
    print(f"forward max |flax - torch| = {max_diff:.2e} (float32 weights; bf16 runs differ more)")

  result = dict(
    args=vars(args),
    num_params=n_params,
    jax_backend=jax_backend,
    device_kind=jax.devices()[0].device_kind,
    torch_device=device.type,
    torch_threads=torch.get_num_threads(),
    flax=flax_res,
    torch=torch_res,
    ratios={k: flax_res[k]["time_s"] / torch_res[k]["time_s"] for k in flax_res}
    if torch_res
    else None,
    forward_max_abs_diff=max_diff,
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
