"""The device: peak FLOP/s (datasheets, or an estimate on CPU), memory of programs, the torch device.

Peaks. `DEVICE_PEAKS` holds dense (no sparsity) vendor peaks. On a CPU the peak is an estimate:
cores x clock (from /proc/cpuinfo) x FLOPs per cycle per core from the ISA (AVX-512: 64, AVX2 with
FMA: 32, AVX: 16, otherwise 8 float32 FLOPs, i.e. two vector FMA units), so CPU MFU is indicative.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any

import jax


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
