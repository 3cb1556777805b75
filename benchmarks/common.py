"""Shared helpers of the benchmark scripts: timing, FLOP counting, device peaks, configs, output.

FLOPs. `pixnerd_forward_flops` counts the matrix-multiply FLOPs of one PixNerDiT forward pass from
the architecture (2 FLOPs per multiply-add; norms, activations, RoPE, softmax and the FlowSeg
potential are not counted). For B images of H x W, patch p, L = HW / p^2 tokens, P = p^2 pixels
per patch, width D, F = int(2 int(4D) / 3) SwiGLU width, NeRF widths hx and hr = hx * ratio:

  patch embedding          2 B L (3 P) D
  timestep embedding       2 B (256 D + D^2)
  per trunk block          2 B D (6 D)                         adaLN (one vector per image)
                           2 B L D (3 D) + 2 B L D^2           qkv and output projections
                           4 B L^2 D                           QK^T and AV
                           6 B L D F                           SwiGLU (three projections)
  pixel embedding          2 B L P (3 + 64) hx
  per NeRF block           2 B L D (2 hx hr)                   weight generator
                           4 B L P hx hr                       the two generated per-patch MLPs
  final layer              2 B L P hx 3

A train step counts 3x the forward (the backward computes two products per forward product), the
usual "model FLOPs" convention; MFU = model FLOPs per second / the device's peak, so recomputation
(remat) costs time but is not credited. `jaxpr_matmul_flops` counts the dot products of a traced
function exactly (scans multiplied by their length) and cross-checks the formula.

Peaks. `DEVICE_PEAKS` holds dense (no sparsity) vendor peaks. On a CPU the peak is an estimate:
cores x clock (from /proc/cpuinfo) x FLOPs per cycle per core from the ISA (AVX-512: 64, AVX2 with
FMA: 32, AVX: 16, otherwise 8 float32 FLOPs, i.e. two vector FMA units), so CPU MFU is indicative.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `tests.torch_reference` and `benchmarks.*` import from the repo root
  sys.path.insert(0, REPO)

# Both frameworks may share one accelerator in a run: JAX takes memory as it needs it instead of
# reserving 75% of the device up front (steady-state speed is the same; set the variable to override).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from flowseg_jax import defaults  # noqa: E402

DEFAULT_CONFIG = "configs/flowseg_ade20k.py:stage=1"

# ------------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------------


def median_time(fn: Callable[[], Any], steps: int, warmup: int) -> float:
  """Median wall-clock seconds of `steps` calls of `fn` after `warmup` calls (fn must block)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved_rounds(
  fns: dict[str, Callable[[int], None]], *, rounds: int, steps: int, warmup: int
) -> dict[str, list[float]]:
  """Seconds per step of each fn, one measurement per round, the fns taking turns within a round.

  `fn(n)` must run n steps and block until they are done. Taking turns spreads slow drifts of the
  machine's load (a shared box) evenly over the contenders, so per-round ratios are meaningful.
  """
  for fn in fns.values():
    if warmup:
      fn(warmup)
  out: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn(steps)
      out[name].append((time.perf_counter() - start) / steps)
  return out


def summarize(times: Sequence[float]) -> dict[str, float]:
  """Median, min, max and the relative half-spread (max - min) / (2 median) of a list of timings."""
  if not times:
    raise ValueError("summarize: no timings")
  med = statistics.median(times)
  return {
    "median": med,
    "min": min(times),
    "max": max(times),
    "spread": (max(times) - min(times)) / (2 * med) if med > 0 else 0.0,
    "n": len(times),
  }


# ------------------------------------------------------------------------------------------------
# FLOPs.
# ------------------------------------------------------------------------------------------------


def swiglu_width(hidden: int) -> int:
  return int(2 * int(4.0 * hidden) / 3)


def pixnerd_forward_flops(arch: dict[str, int], batch: int, height: int, width: int) -> dict:
  """Matmul FLOPs of one PixNerDiT forward pass, by part (see the module docstring).

  Args:
    arch: architecture fields (`PixNerDiT.arch_config()` or `pixnerd.VARIANTS[name]`).
    batch: images B.
    height: image height H (a multiple of the patch).
    width: image width W.

  Returns:
    {part: FLOPs} for 'embed', 'trunk', 'attention' (QK^T and AV, part of the trunk), 'decoder'
    and 'total' (Python ints).
  """
  p, d = arch["patch_size"], arch["hidden_size"]
  if height % p or width % p:
    raise ValueError(f"image {height}x{width} is not divisible by patch_size={p}")
  c = arch.get("in_channels", 3)
  n_cond = arch["num_cond_blocks"]
  n_nerf = arch["num_blocks"] - n_cond
  hx = arch["nerf_hidden_size"]
  hr = hx * arch["nerf_mlp_ratio"]
  b, L, P = batch, (height // p) * (width // p), p * p
  f = swiglu_width(d)
  embed = 2 * b * L * (c * P) * d + 2 * b * (256 * d + d * d)
  attention = n_cond * 4 * b * L * L * d
  per_block = 2 * b * d * 6 * d + 2 * b * L * d * 3 * d + 2 * b * L * d * d + 6 * b * L * d * f
  trunk = n_cond * per_block + attention
  decoder = (
    2 * b * L * P * (c + 64) * hx
    + n_nerf * (2 * b * L * d * 2 * hx * hr + 4 * b * L * P * hx * hr)
    + 2 * b * L * P * hx * c
  )
  return {
    "embed": embed,
    "trunk": trunk,
    "attention": attention,
    "decoder": decoder,
    "total": embed + trunk + decoder,
  }


def train_step_flops(arch: dict[str, int], batch: int, height: int, width: int) -> int:
  """Model FLOPs of one training step: 3x the forward's matmul FLOPs."""
  return 3 * pixnerd_forward_flops(arch, batch, height, width)["total"]


def _sub_jaxprs(value):
  """Jaxprs held in an equation parameter (a Jaxpr, a ClosedJaxpr, or tuples of them)."""
  if hasattr(value, "eqns"):
    return [value]
  if hasattr(value, "jaxpr") and hasattr(value, "consts"):
    return [value.jaxpr]
  if isinstance(value, tuple | list):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _count_jaxpr(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      contract = math.prod(lhs[i] for i in lhs_contract)
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * contract
    elif name == "while":
      if any(_count_jaxpr(j) for j in _sub_jaxprs(eqn.params["body_jaxpr"])):
        raise ValueError("jaxpr_matmul_flops: a while loop with matmuls has no static trip count")
    elif name == "cond":
      total += max(_count_jaxpr(j) for j in _sub_jaxprs(eqn.params["branches"]))
    else:
      inner = sum(_count_jaxpr(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def jaxpr_matmul_flops(fn: Callable, *args, **kwargs) -> int:
  """Exact dot_general FLOPs (2 per multiply-add) of `fn(*args)`, looking into jit, scan, remat, cond.

  Args are arrays or `jax.ShapeDtypeStruct`s; nothing runs. Recomputation inside remat'ed
  backward passes is counted (these are executed FLOPs). Custom calls (cuDNN attention) are not.
  """
  return _count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def xla_flops(compiled) -> float | None:
  """FLOPs XLA's cost model assigns to a compiled program (dots plus elementwise), if available."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


# ------------------------------------------------------------------------------------------------
# Device peaks and memory.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Peak:
  """Dense peak throughput of one device, TFLOP/s."""

  name: str
  bf16: float
  fp32: float  # what a float32 matmul gets: TF32 tensor cores on NVIDIA, bf16 passes on TPU


# Vendor datasheet figures without sparsity. Matched in order against jax's `device_kind`
# (lower case); the first key contained in it wins.
DEVICE_PEAKS: tuple[tuple[str, Peak], ...] = (
  ("h100 pcie", Peak("NVIDIA H100 PCIe", 756.0, 378.0)),
  ("h100 nvl", Peak("NVIDIA H100 NVL", 835.0, 418.0)),
  ("h100", Peak("NVIDIA H100 SXM", 989.4, 494.7)),
  ("h200", Peak("NVIDIA H200", 989.4, 494.7)),
  ("a100", Peak("NVIDIA A100", 312.0, 156.0)),
  ("tpu v4", Peak("TPU v4", 275.0, 275.0)),
  ("tpu v5 lite", Peak("TPU v5e", 197.0, 197.0)),
  ("tpu v5e", Peak("TPU v5e", 197.0, 197.0)),
  ("tpu v5", Peak("TPU v5p", 459.0, 459.0)),
  ("tpu v6 lite", Peak("TPU v6e", 918.0, 918.0)),
  ("tpu v6e", Peak("TPU v6e", 918.0, 918.0)),
)


def cpu_flops_per_cycle(flags: set[str]) -> int:
  """float32 FLOPs per cycle per core from the ISA flags (two FMA pipes of the widest vector)."""
  if "avx512f" in flags:
    return 64
  if "avx2" in flags and "fma" in flags:
    return 32
  if "avx" in flags:
    return 16
  return 8


def cpu_info() -> dict[str, Any]:
  """Model name, usable cores (affinity), clock (GHz) and ISA flags of this machine (Linux)."""
  model, mhz, flags = platform.processor() or platform.machine(), None, set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
          model = value
        elif key == "cpu MHz" and mhz is None:
          mhz = float(value)
        elif key == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"model": model, "cores": cores, "ghz": mhz / 1e3 if mhz else None, "flags": flags}


def cpu_peak_flops(dtype: str = "float32") -> tuple[float | None, str]:
  """(estimated peak FLOP/s of the usable cores, how it was derived); bfloat16 counts as float32."""
  info = cpu_info()
  if not info["ghz"]:
    return None, "no clock in /proc/cpuinfo"
  per_cycle = cpu_flops_per_cycle(info["flags"])
  peak = info["cores"] * info["ghz"] * 1e9 * per_cycle
  return peak, (
    f"estimate: {info['cores']} cores x {info['ghz']:.2f} GHz x {per_cycle} FLOP/cycle ({dtype})"
  )


def device_peak_flops(device=None, dtype: str = "bfloat16") -> tuple[float | None, str]:
  """(peak FLOP/s, source) for a jax device and compute dtype; None when unknown."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return cpu_peak_flops(dtype)
  kind = device.device_kind.lower()
  for key, peak in DEVICE_PEAKS:
    if key in kind:
      tflops = peak.bf16 if dtype == "bfloat16" else peak.fp32
      return tflops * 1e12, f"{peak.name} datasheet, {dtype}, dense"
  return None, f"unknown device kind {device.device_kind!r}"


def memory_summary(compiled) -> dict[str, int | None]:
  """XLA's memory analysis of a compiled program, in bytes (None where the backend gives none).

  `peak_bytes` = arguments + outputs not aliased to them + temporaries: what the program needs
  live at once at most (XLA's own `peak_memory_in_bytes`, which XLA:CPU reports without the
  temporaries, is kept as `xla_peak_bytes`).
  """
  try:
    m = compiled.memory_analysis()
  except Exception:
    m = None
  fields = ("argument", "output", "alias", "temp", "generated_code")
  out = {f"{k}_bytes": int(getattr(m, f"{k}_size_in_bytes")) if m else None for k in fields}
  xla_peak = getattr(m, "peak_memory_in_bytes", None) if m else None
  out["xla_peak_bytes"] = int(xla_peak) if xla_peak is not None else None
  out["peak_bytes"] = None
  if m is not None:
    out["peak_bytes"] = int(
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
      + m.temp_size_in_bytes
    )
  return out


def device_peak_bytes_in_use(device=None) -> int | None:
  """The runtime's high-water mark of device memory (GPU/TPU), None on CPU."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


# ------------------------------------------------------------------------------------------------
# Configs and cases.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark size: a PixNerd variant, image size and global batch."""

  variant: str
  height: int
  width: int
  batch: int

  @property
  def label(self) -> str:
    return f"{self.variant} {self.height}x{self.width} b{self.batch}"


def parse_cases(text: str) -> list[Case]:
  """'S/16:64:2,XL/16:256x512:8' (variant:res:batch, res = N or HxW) -> [Case, ...]."""
  from flowseg_jax.models import pixnerd

  cases = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    parts = item.split(":")
    if len(parts) != 3:
      raise ValueError(f"case {item!r} must look like VARIANT:RES:BATCH, e.g. S/16:64:2")
    variant, res, batch = parts
    if variant not in pixnerd.VARIANTS:
      raise ValueError(
        f"case {item!r}: unknown variant {variant!r}; known {sorted(pixnerd.VARIANTS)}"
      )
    try:
      h, w = (int(v) for v in (res.split("x") if "x" in res else (res, res)))
      b = int(batch)
    except ValueError as e:
      raise ValueError(f"case {item!r}: RES must be N or HxW and BATCH an int") from e
    if min(h, w, b) <= 0:
      raise ValueError(f"case {item!r}: sizes must be positive")
    cases.append(Case(variant, h, w, b))
  if not cases:
    raise ValueError(f"no benchmark case in {text!r}")
  return cases


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A config file by path with an optional ':arg' ('configs/demo.py:smoke'), relative to the repo."""
  path, _, arg = spec.partition(":")
  return defaults.load_config_file(os.path.join(REPO, path), arg)


def resolve_dtype(dtype: str) -> str:
  """'auto' -> float32 on CPU (as the PyTorch reference there), bfloat16 on accelerators."""
  if dtype == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
  return dtype


def case_config(
  base: ml_collections.ConfigDict,
  case: Case,
  *,
  dtype: str,
  remat: str | None = None,
  scan: bool | None = None,
  attention_impl: str | None = None,
  reshape: bool | None = None,
  teacher_dir: str | None = None,
) -> ml_collections.ConfigDict:
  """A copy of `base` set to one case; REPA only when a converted teacher is given."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.input.image_size = (case.height, case.width)
  config.input.batch_size = case.batch
  config.model.variant = case.variant
  config.model.num_classes = None  # the variant's label table (the conditioning is the null class)
  config.model.dtype = dtype
  if remat is not None:
    config.model.remat_policy = remat
  if scan is not None:
    config.model.scan_blocks = scan
  if attention_impl is not None:
    config.model.attention_impl = attention_impl
  if reshape is not None:
    config.objective.reshape = reshape
  config.optim.grad_accum_steps = 1
  config.repa.enabled = bool(teacher_dir)
  if teacher_dir:
    config.repa.teacher_dir = teacher_dir
  return config


def random_batch(config, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch as the pipeline yields it: image float32 in [-1, 1], int32 labels, 5% ignored."""
  rng = np.random.default_rng(seed)
  b, (h, w) = config.input.batch_size, config.input.image_size
  image = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
  label = rng.integers(0, num_classes, (b, h, w)).astype(np.int32)
  label[rng.random((b, h, w)) < 0.05] = 255
  return {"image": image, "label": label}


# ------------------------------------------------------------------------------------------------
# PyTorch.
# ------------------------------------------------------------------------------------------------


def torch_device():
  """CUDA when JAX runs on a GPU and torch sees one, else CPU."""
  import torch

  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    return torch.device("cuda")
  return torch.device("cpu")


def torch_sync(device) -> None:
  import torch

  if device.type == "cuda":
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# Environment and output.
# ------------------------------------------------------------------------------------------------


def environment(torch_threads: int | None = None) -> dict[str, Any]:
  """Machine, date and versions, for RESULTS.md and the JSON files."""
  import flax

  info = cpu_info()
  env = {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "host_cpu": info["model"],
    "host_cores": info["cores"],
    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    "python": platform.python_version(),
    "jax": jax.__version__,
    "flax": flax.__version__,
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    import torch

    env["torch"] = torch.__version__
    env["torch_threads"] = torch.get_num_threads() if torch_threads is None else torch_threads
    env["torch_cuda"] = torch.cuda.is_available()
  except ImportError:
    env["torch"] = None
  return env


def fmt(value: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
  return "n/a" if value is None else format(value * scale, spec)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
  """Prints rows as an aligned table; columns are (key, header) pairs, values already strings."""
  widths = [max(len(h), *(len(str(r.get(k, ""))) for r in rows)) for k, h in columns]
  print("  ".join(h.rjust(w) for (_, h), w in zip(columns, widths)))
  for r in rows:
    print("  ".join(str(r.get(k, "")).rjust(w) for (k, _), w in zip(columns, widths)))


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, set):
    return sorted(value)
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, jnp.ndarray | np.ndarray):
    return np.asarray(value).tolist()
  return value


def write_json(path: str | None, result: dict) -> None:
  if path:
    with open(path, "w") as f:
      json.dump(_jsonable(result), f, indent=2)
    print(f"wrote {path}")
