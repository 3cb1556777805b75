"""Compile-only devices of the real TPU and GPU compilers on a CPU machine, for tools/scale.py.

A target is a string:
- an int-like string "8": N XLA:CPU host devices (the process must own them);
- "tpu:<topology>", e.g. "tpu:v5e:2x4": `get_topology_desc(topology_name=..., platform="tpu")`,
  any name libtpu accepts (v4:2x2x2, v5e:8x8, v5p:2x2x2, v6e:2x4). Needs libtpu
  (`pip install "jax[tpu]==<jax version>"`; no TPU is needed or used). v4 and v5p chips are
  compiled as megacore devices (one device per chip, both TensorCores), as they run;
- "gpu:<name>:<count>", e.g. "gpu:h100:8": `get_topology_desc(<name>, "cuda", target_config=...)`
  with the XLA GpuTargetConfig text proto benchmarks/gpu_targets/<name>.txtpb (written from the
  chip's public specifications), `count` GPUs on one host (8 per host beyond 8). Needs the CUDA
  plugin (`pip install "jax[cuda12]==<jax version>"`) and JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (no
  driver or GPU here); see `worker_env`.
"""

from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TARGETS_DIR = os.path.join(REPO, "benchmarks", "gpu_targets")
GIB = 2**30

# HBM per device, GiB, by jax `device_kind` (lower case, first contained key wins): v5e 16 GB,
# v6e 32 GB, v5p 95 GB and v4 32 GB per chip (megacore: one device per chip).
TPU_MEMORY_GIB = (("tpu v5 lite", 16.0), ("tpu v6 lite", 32.0), ("tpu v5", 95.0), ("tpu v4", 32.0))
MEGACORE = ("v4", "v5p")  # chips with two TensorCores that JAX drives as one device


class TargetError(ValueError):
  """A target string that names no compiler target, or whose compiler is not installed."""


def parse(target: str) -> tuple[str, str]:
  """('cpu' | 'tpu' | 'gpu', the rest) of a target string; checks the form only."""
  if target.isdigit():
    return "cpu", target
  kind, _, rest = target.partition(":")
  if kind not in ("tpu", "gpu") or not rest:
    raise TargetError(f"target {target!r}: expected N, tpu:<topology> or gpu:<name>:<count>")
  if kind == "gpu" and not re.fullmatch(r"[\w.-]+:\d+", rest):
    raise TargetError(f"target {target!r}: expected gpu:<name>:<count>, e.g. gpu:h100:8")
  return kind, rest


def gpu_target_config(name: str) -> str:
  """The GpuTargetConfig text proto of benchmarks/gpu_targets/<name>.txtpb."""
  path = os.path.join(GPU_TARGETS_DIR, f"{name}.txtpb")
  if not os.path.exists(path):
    known = sorted(f[: -len(".txtpb")] for f in os.listdir(GPU_TARGETS_DIR) if f.endswith(".txtpb"))
    raise TargetError(f"no GPU target config {path}; known: {', '.join(known)}")
  with open(path) as f:
    return f.read()


def gpu_topology(count: int) -> str:
  """XLA's '<slices>x<hosts per slice>x<devices per host>' for `count` GPUs, 8 per host."""
  per_host = min(count, 8)
  if count % per_host:
    raise TargetError(f"{count} GPUs: beyond 8 the count must be a multiple of 8 (GPUs per host)")
  return f"1x{count // per_host}x{per_host}"


def devices(target: str) -> list:
  """The devices of a target: host CPU devices, or compile-only TPU / GPU devices."""
  import jax
  from jax.experimental import topologies

  kind, rest = parse(target)
  if kind == "cpu":
    n = int(rest)
    if jax.device_count() < n:
      raise TargetError(f"this process has {jax.device_count()} devices, the plan needs {n}")
    return jax.devices()[:n]
  if kind == "tpu":
    options = {"chip_config_name": "megacore"} if rest.split(":")[0] in MEGACORE else {}
    try:
      return list(topologies.get_topology_desc(rest, "tpu", **options).devices)
    except Exception as e:  # libtpu missing or the topology unknown to it
      raise TargetError(
        f"tpu:{rest}: {e} (libtpu: pip install 'jax[tpu]=={jax.__version__}')"
      ) from e
  name, count = rest.rsplit(":", 1)
  config = gpu_target_config(name)
  try:
    topo = topologies.get_topology_desc(
      name, "cuda", target_config=config, topology=gpu_topology(int(count))
    )
  except Exception as e:  # the CUDA plugin missing
    raise TargetError(
      f"gpu:{rest}: {e} (pip install 'jax[cuda12]=={jax.__version__}' and set "
      "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1)"
    ) from e
  return list(topo.devices)


def device_memory_gib(device, target: str) -> float | None:
  """Memory of one device of the target, GiB (None for host CPU devices)."""
  kind, rest = parse(target)
  if kind == "gpu":
    text = gpu_target_config(rest.rsplit(":", 1)[0])
    return int(re.search(r"^\s*device_memory_size:\s*(\d+)", text, re.M).group(1)) / GIB
  if kind == "tpu":
    device_kind = device.device_kind.lower()
    for key, gib in TPU_MEMORY_GIB:
      if key in device_kind:
        return gib
  return None


def worker_env(target: str, env: dict) -> dict:
  """The environment of a planner process for the target (JAX reads it when it starts)."""
  env = dict(env)
  kind, rest = parse(target)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  # The devices are compile-only: JAX's own backend stays the CPU (no TPU / GPU runtime probed).
  env["JAX_PLATFORMS"] = "cpu"
  if kind == "cpu":
    flags += f" --xla_force_host_platform_device_count={rest}"
  elif kind == "tpu":
    env.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata server to ask
    # libtpu locks /tmp/libtpu_lockfile to own the TPU; compile-only planners own none, and
    # several may run at once (parallel plans, tests).
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  else:
    env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"  # no driver / GPU to check versions against
    # Without a GPU XLA cannot autotune, and its untuned Triton GEMM tiling fails on some bf16
    # dots ("Couldn't find output tile sizes"); cuBLAS GEMMs compile.
    if "xla_gpu_enable_triton_gemm" not in flags:
      flags += " --xla_gpu_enable_triton_gemm=false"
  env["XLA_FLAGS"] = flags.strip()
  return env
