"""Host memory for XLA:CPU: keep each step's temporary block mapped instead of faulting it in again.

XLA:CPU allocates an executable's temporaries as one block per call, from one of its worker threads
(the S/16 128² batch-4 train step: 698 MB). glibc serves a block that large from a thread's arena
with `mmap` and gives it back with `munmap` on free, so every call first-touches fresh pages: ~170k
page faults and 0.28 s of kernel time in a 1.33 s step on the benchmark VM. With one arena, no
`mmap` for large blocks and a trim threshold above the block, the freed block stays in the heap and
the next call reuses it: no faults, 1.08 s (benchmarks/RESULTS.md, "host memory").

The settings are process-wide and only reach threads that have not allocated yet, so they must be
made before JAX starts its backend; `flowseg` does it first thing, for CPU runs only (accelerator
hosts keep glibc's defaults: their step's memory is the device's). FLOWSEG_HOST_MALLOC overrides
the choice: `reuse` (always), `system` (never), `auto` (the default).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform

ENV = "FLOWSEG_HOST_MALLOC"
CHOICES = ("auto", "reuse", "system")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt takes an int: freed heap tops below 2 GiB stay mapped; a larger one is still returned.
_TRIM_THRESHOLD = 2**31 - 1

_applied: str | None = None


def _accelerator_installed() -> bool:
  """Whether JAX would find a TPU or GPU runtime (libtpu, or a PJRT plugin under jax_plugins)."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  spec = importlib.util.find_spec("jax_plugins")
  return spec is not None and any(
    os.listdir(path) for path in (spec.submodule_search_locations or ()) if os.path.isdir(path)
  )


def runs_on_cpu() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS names cpu first, or no accelerator runtime is
  installed. Decided without importing JAX (importing it is what must come after)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not _accelerator_installed()


def applied() -> str | None:
  """The line `reuse_host_allocations` returned in this process, None before it ran."""
  return _applied


def reuse_host_allocations(choice: str | None = None) -> str:
  """Makes glibc keep large freed blocks for reuse when JAX runs on the CPU (see the module doc).

  Args:
    choice: 'auto' (CPU runs only), 'reuse' or 'system'; None reads FLOWSEG_HOST_MALLOC (default
      'auto').

  Returns:
    One line saying what was done, for the log. Calling it again returns the first call's line.
  """
  global _applied
  choice = (choice or os.environ.get(ENV) or "auto").strip().lower()
  if choice not in CHOICES:
    raise ValueError(f"{ENV}={choice!r} is not one of {', '.join(CHOICES)}")
  if _applied is not None:
    return _applied
  if choice == "system":
    _applied = f"host memory: the system's default allocation ({ENV}=system)"
    return _applied
  if choice == "auto" and not runs_on_cpu():
    _applied = "host memory: the system's default allocation (JAX runs on an accelerator)"
    return _applied
  if platform.libc_ver()[0] != "glibc":
    _applied = "host memory: the system allocator (not glibc: nothing to set)"
    return _applied
  mallopt = ctypes.CDLL(None).mallopt
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
  if not all(mallopt(param, value) == 1 for param, value in settings):
    _applied = "host memory: glibc refused the reuse settings; its defaults stay"
    return _applied
  _applied = (
    "host memory: XLA:CPU's temporary blocks are reused between steps (one malloc arena, no mmap "
    f"for large blocks; {ENV}=system turns this off)"
  )
  return _applied
