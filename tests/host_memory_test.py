"""flowseg_jax/run/host_memory.py: when the reuse settings apply, and that they remove the page
faults of XLA:CPU's per-call temporary block (measured in a fresh process: the settings must come
before JAX starts its threads)."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from flowseg_jax import main
from flowseg_jax.run import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted call whose (2048, 16384) float32 intermediate (128 MiB, 32768 pages of 4 KiB) lives in
# XLA's temporary block: it is a matmul operand, so it cannot be fused away.
_PROBE = textwrap.dedent(
  """
  import json, resource, sys
  from flowseg_jax.run import host_memory
  line = host_memory.reuse_host_allocations(sys.argv[1])
  import jax, jax.numpy as jnp
  x = jnp.ones((2048, 16), jnp.float32)
  w1 = jnp.full((16, 16384), 0.01, jnp.float32)
  w2 = jnp.full((16384, 8), 0.01, jnp.float32)
  f = jax.jit(lambda x, w1, w2: jnp.tanh(x @ w1) @ w2)
  for _ in range(10):
    f(x, w1, w2).block_until_ready()
  windows = []  # mean faults per call in windows of 5 calls
  for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      f(x, w1, w2).block_until_ready()
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
  faults = min(windows)
  print(json.dumps({"line": line, "faults_per_call": faults, "windows": windows}))
  """
)


def _probe(choice: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop(host_memory.ENV, None)
  out = subprocess.run(
    [sys.executable, "-c", _PROBE, choice], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
  platform.libc_ver()[0] != "glibc",
  reason="the settings are glibc's mallopt (nothing to set elsewhere)",
)
def test_reuse_keeps_the_temporary_block_mapped_between_calls():
  reused, system = _probe("reuse"), _probe("system")
  assert "reused between steps" in reused["line"], reused
  assert "default allocation (FLOWSEG_HOST_MALLOC=system)" in system["line"], system
  # Reused: the freed block stays mapped for the next call. The heap first grows by a few blocks
  # (a call can start before the last one's block is freed, and small allocations split freed
  # blocks), then stops; the quietest window of 5 calls faults in no block again.
  assert reused["faults_per_call"] < 0.2 * 32768, reused
  # Without it glibc maps and unmaps the block every call (unless the kernel backs it with huge
  # pages anyway, transparent_hugepage=always, where both are low and there is nothing to compare).
  if system["faults_per_call"] > 16000:
    assert reused["faults_per_call"] < system["faults_per_call"] / 10, (reused, system)


def test_auto_applies_on_cpu_runs_only(monkeypatch):
  monkeypatch.setattr(host_memory, "_accelerator_installed", lambda: False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.runs_on_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert not host_memory.runs_on_cpu()
  monkeypatch.delenv("JAX_PLATFORMS")
  assert host_memory.runs_on_cpu()
  monkeypatch.setattr(host_memory, "_accelerator_installed", lambda: True)
  assert not host_memory.runs_on_cpu()


def test_a_bad_setting_is_a_usage_error_that_names_it(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv(host_memory.ENV, "resue")
  with pytest.raises(ValueError, match="FLOWSEG_HOST_MALLOC='resue' is not one of auto, reuse"):
    host_memory.reuse_host_allocations()
  code = main.run(["train", "--config", "configs/demo.py", "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err
  assert code == 2
  assert err.strip().splitlines() == [
    "flowseg train: error: FLOWSEG_HOST_MALLOC='resue' is not one of auto, reuse, system"
  ]
  assert not (tmp_path / "w").exists()
