"""The flags the train-step, objective-overhead and sampling benchmarks share, and what they set up."""

from __future__ import annotations

import argparse

import jax

from benchmarks import configs, hardware
from flowseg_jax.run import host_memory

DEFAULT_CPU_CASES = "tiny/4:32:16,S/16:64:2,S/16:128:8"
DEFAULT_ACCEL_CASES = "XL/16:256:64,XL/16:512:16,B/16:256:64,S/16:256:64"


def add_common_flags(p: argparse.ArgumentParser, *, torch: bool = True) -> None:
  """Flags shared by train_step.py, objective_overhead.py and sampling.py."""
  p.add_argument("--config", default=configs.DEFAULT_CONFIG, help="config file[:arg] to start from")
  p.add_argument(
    "--cases",
    default=None,
    help="VARIANT:RES:BATCH list, e.g. 'S/16:64:2,XL/16:256:64' (default depends on the backend)",
  )
  p.add_argument(
    "--dtype", default="auto", help="auto (CPU float32, else bfloat16) | float32 | bfloat16"
  )
  p.add_argument("--remat", default="none", help="'none', 'full' or a jax.checkpoint_policies name")
  p.add_argument(
    "--scan",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="scan the blocks (nn.scan) or unroll them; default: the config's (models.default_scan_blocks)",
  )
  p.add_argument("--attention-impl", default=None, choices=["xla", "cudnn"])
  p.add_argument("--steps", type=int, default=3, help="steps per timed round")
  p.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
  p.add_argument("--warmup", type=int, default=2, help="steps before timing")
  if torch:
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
      "--torch-threads",
      type=int,
      default=None,
      help="torch.set_num_threads (default: the cores this process may use, as XLA:CPU uses)",
    )
  else:
    p.set_defaults(torch=False, torch_threads=None)
  p.add_argument(
    "--host-malloc",
    default=None,
    choices=host_memory.CHOICES,
    help="glibc's handling of XLA:CPU's per-step temporary block, process-wide (both frameworks): "
    "reuse it (as `flowseg` does on CPU) or the system default; default: $FLOWSEG_HOST_MALLOC or auto",
  )
  p.add_argument("--peak-tflops", type=float, default=None, help="override the device peak")
  p.add_argument("--json", default=None, help="write the results here")


def host_allocation(args) -> None:
  """Applies --host-malloc (must come before the first use of JAX's backend) and prints what it
  did, once; output.environment records it."""
  if host_memory.applied() is None:
    print(host_memory.reuse_host_allocations(args.host_malloc))


def setup_run(args) -> tuple[list[configs.Case], str, int]:
  """Cases, compute dtype and torch threads from the flags; applies the host allocation setting
  (before the first use of JAX's backend, see flowseg_jax/run/host_memory.py) and the torch thread
  count."""
  host_allocation(args)
  cases = configs.parse_cases(
    args.cases or (DEFAULT_CPU_CASES if jax.default_backend() == "cpu" else DEFAULT_ACCEL_CASES)
  )
  dtype = configs.resolve_dtype(args.dtype)
  threads = args.torch_threads or hardware.cpu_info()["cores"]
  if args.torch or getattr(args, "official_src", None):
    import torch

    torch.set_num_threads(threads)
  return cases, dtype, threads


def peak_flops(args, dtype: str) -> tuple[float | None, str]:
  if args.peak_tflops:
    return args.peak_tflops * 1e12, "--peak-tflops"
  return hardware.device_peak_flops(jax.devices()[0], dtype)
