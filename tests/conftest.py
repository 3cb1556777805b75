"""Test-wide settings, applied before JAX is imported.

- 8 fake CPU devices, so mesh tests run anywhere.
- A persistent compilation cache shared by the whole session (and by the `flowseg` subprocesses that
  tests start): the same tiny train step is compiled by many tests.
- Most XLA optimisations off: the tiny test programs compile several times faster; numerics stay IEEE
  float32 (parity tolerances are justified per test).
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "flowseg_jax_test_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# TensorFlow (imported by tfds and clu) must never grab an accelerator or spam logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
