"""Peak memory of `flowseg convert pixnerd` on a random checkpoint of the official shape and layout.

Writes a randomly filled PixNerd checkpoint in the official Lightning layout (`state_dict` with the online
`denoiser.*`, the `ema_denoiser.*` copy and the REPA projector, plus AdamW's `exp_avg` / `exp_avg_sq` for
every trained tensor, unless --no-optimizer), then runs the converter in a fresh subprocess and reports
its peak resident memory (`ru_maxrss`) against the size of the copy it converts. The file is written
from a memory-mapped pool of random numbers, so writing it needs little memory; XL/16 with the
optimizer state is ~11 GB on disk.

  python -m benchmarks.convert_memory                      # XL/16, online + EMA + Adam moments
  python -m benchmarks.convert_memory --no-optimizer       # online + EMA only (~5.6 GB)
  python -m benchmarks.convert_memory --model B/16 --baseline /path/to/other/checkout

--baseline runs the same conversion with the converter of another checkout (PYTHONPATH), e.g. the
code before a change, on the same file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from flowseg_jax.convert import pixnerd as convert
from flowseg_jax.models import pixnerd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # "this checkout"

# Offsets (in floats) between the copies' views of the random pool, so that the copies differ.
_COPY_SHIFT = 1 << 20
_REPA_DIM = 768


def _official_tensors(variant: str) -> dict[str, tuple[int, ...]]:
  """Every tensor of the Lightning `state_dict`: online denoiser, EMA denoiser, REPA projector."""
  denoiser = convert.expected_torch_shapes(pixnerd.make_model(variant))
  d = pixnerd.VARIANTS[variant]["hidden_size"]
  repa = {
    "diffusion_trainer.proj.0.0.weight": (d, d),
    "diffusion_trainer.proj.0.0.bias": (d,),
    "diffusion_trainer.proj.0.2.weight": (d, d),
    "diffusion_trainer.proj.0.2.bias": (d,),
    "diffusion_trainer.proj.0.4.weight": (_REPA_DIM, d),
    "diffusion_trainer.proj.0.4.bias": (_REPA_DIM,),
  }
  return {
    **{f"denoiser.{k}": s for k, s in denoiser.items()},
    **{f"ema_denoiser.{k}": s for k, s in denoiser.items()},
    **repa,
  }


def write_random_checkpoint(path: str, variant: str, *, optimizer: bool, seed: int = 0) -> int:
  """Writes a random `variant` checkpoint in PixNerd's Lightning layout; returns its size in bytes."""
  import torch

  tensors = _official_tensors(variant)
  largest = sum(int(np.prod(s)) for k, s in tensors.items() if k.startswith("denoiser."))
  pool_path = path + ".pool"
  pool = np.memmap(pool_path, np.float32, "w+", shape=(largest + 4 * _COPY_SHIFT,))
  rng = np.random.default_rng(seed)
  chunk = 1 << 24
  for start in range(0, pool.size, chunk):
    n = min(chunk, pool.size - start)
    pool[start : start + n] = 0.02 * rng.standard_normal(n, dtype=np.float32)
  pool.flush()

  def views(copy: int, names, pool=pool):
    # One tensor per name over the pool (no memory of its own), shifted per copy.
    out, offset = {}, copy * _COPY_SHIFT
    for name in names:
      n = int(np.prod(tensors[name]))
      if offset + n > pool.size:
        offset = copy * _COPY_SHIFT
      out[name] = torch.frombuffer(pool, dtype=torch.float32, count=n, offset=4 * offset).view(
        tensors[name]
      )
      offset += n
    return out

  online = [k for k in tensors if k.startswith("denoiser.")]
  ema = [k for k in tensors if k.startswith("ema_denoiser.")]
  repa = [k for k in tensors if k.startswith("diffusion_trainer.")]
  state_dict = {**views(0, online), **views(1, ema), **views(0, repa)}
  ckpt = {
    "epoch": 319,
    "global_step": 1_600_000,
    "pytorch-lightning_version": "2.5.0",
    "state_dict": state_dict,
    "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 319}}}},
    "lr_schedulers": [],
  }
  if optimizer:
    # AdamW with the denoiser (group 0), the REPA projector (group 1) and the empty sampler group.
    trained = online + repa
    avg, avg_sq = views(2, trained), views(3, trained)
    state = {
      i: {"step": torch.tensor(1_600_000.0), "exp_avg": avg[k], "exp_avg_sq": avg_sq[k]}
      for i, k in enumerate(trained)
    }
    group = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False)
    ckpt["optimizer_states"] = [
      {
        "state": state,
        "param_groups": [
          {**group, "params": list(range(len(online)))},
          {**group, "params": list(range(len(online), len(trained)))},
          {**group, "lr": 1e-3, "params": []},
        ],
      }
    ]
  torch.save(ckpt, path)
  os.remove(pool_path)  # the views keep the mapping alive until they go
  return os.path.getsize(path)


def measure_conversion(ckpt: str, out: str, weights: str, pythonpath: str) -> tuple[float, float]:
  """Runs `flowseg convert pixnerd` in a fresh process; returns (peak RSS in bytes, seconds)."""
  code = (
    "import sys, resource; from flowseg_jax import main; status = main.run(sys.argv[1:]); "
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(status)"
  )
  argv = ["convert", "pixnerd", "--ckpt", ckpt, "--out", out, "--weights", weights, "--overwrite"]
  env = {**os.environ, "PYTHONPATH": pythonpath, "JAX_PLATFORMS": "cpu"}
  start = time.time()
  proc = subprocess.run(  # cwd: `python -c` puts it first on sys.path, before PYTHONPATH
    [sys.executable, "-c", code, *argv],
    env=env,
    cwd=pythonpath,
    capture_output=True,
    text=True,
    check=False,
  )
  seconds = time.time() - start
  if proc.returncode != 0:
    raise RuntimeError(f"conversion failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("peak_rss_kib")]
  print("  " + next(ln for ln in proc.stdout.splitlines() if ln.startswith("Converted")))
  return 1024.0 * float(lines[-1].split()[1]), seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="XL/16", choices=sorted(pixnerd.VARIANTS))
  parser.add_argument("--weights", default="ema", choices=sorted(convert.WEIGHT_PREFIXES))
  parser.add_argument("--no-optimizer", dest="optimizer", action="store_false")
  parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
  parser.add_argument("--baseline", default=None, help="another checkout to measure too")
  parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
  args = parser.parse_args(argv)

  scratch = tempfile.mkdtemp(prefix="convert_memory_", dir=args.dir)
  try:
    ckpt = os.path.join(scratch, "random.ckpt")
    start = time.time()
    size = write_random_checkpoint(ckpt, args.model, optimizer=args.optimizer)
    model = pixnerd.make_model(args.model)
    chosen = 4 * pixnerd.count_params(pixnerd.abstract_params(model))
    print(
      f"{args.model} random checkpoint ({'online + EMA + Adam moments' if args.optimizer else 'online + EMA'}): "
      f"{size / 1e9:.2f} GB written in {time.time() - start:.0f} s; one copy ({args.weights}) "
      f"= {chosen / 1e9:.2f} GB of float32"
    )
    runs = [("this checkout", REPO)] + ([("baseline", args.baseline)] if args.baseline else [])
    for name, path in runs:
      peak, seconds = measure_conversion(ckpt, os.path.join(scratch, "out"), args.weights, path)
      print(
        f"{name:14s} peak RSS {peak / 1e9:5.2f} GB = {peak / chosen:4.2f}x the converted copy, "
        f"= {peak / size:4.2f}x the file; {seconds:.0f} s  ({path})"
      )
  finally:
    if not args.keep:
      shutil.rmtree(scratch, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
