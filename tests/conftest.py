"""Test-wide settings, applied before JAX is imported.

- 8 fake CPU devices, so mesh tests run anywhere.
- A persistent compilation cache shared by the whole session (and by the `flowseg` subprocesses that
  tests start): the same tiny train step is compiled by many tests.
- Most XLA optimisations off: the tiny test programs compile several times faster; numerics stay IEEE
  float32 (parity tolerances are justified per test).
- `gcs_bucket`: a GCS API on localhost for the gs:// tests, started once per session when asked for.
- `trained_workdir`: a tiny model trained for 6 steps, once per test module that asks for it.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

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


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """configs/demo.py:smoke trained for 6 steps; training evaluates at step 6 (eval/step_6.json) and
  draws one picture."""
  from flowseg_jax import train
  from tests.train_test import tiny_config

  workdir = str(tmp_path_factory.mktemp("trained"))
  config = tiny_config(eval_every_steps=6)
  config.eval.num_pictures = 1
  train.train_and_evaluate(config, workdir)
  return workdir


# ------------------------------------------------------------------------------------------------
# A GCS API on localhost (tests/gcs_emulator.py) for the gs:// tests.
# ------------------------------------------------------------------------------------------------

GCS_BUCKET = "flowseg-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_bucket():
  """`gs://flowseg-test`, served by the patched gcp-storage-emulator for the whole session.

  Sets the variables every client reads, in this process (restored afterwards) and so in the
  subprocesses tests start: STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage for tensorboardX),
  TENSORSTORE_GCS_HTTP_URL (orbax's arrays), a project id, and gcsfs's zonal-bucket probe off (it
  needs real credentials and logs a warning per call without them).
  """
  missing = [m for m in ("gcp_storage_emulator", "gcsfs") if importlib.util.find_spec(m) is None]
  if missing:
    message = f"{', '.join(missing)} not installed: pip install -e '.[dev]'"
    if os.environ.get("CI"):  # CI installs the dev extra: a missing emulator there is a failure
      pytest.fail(message)
    pytest.skip(message)
  port = _free_port()
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py")
  proc = subprocess.Popen(
    [sys.executable, script, str(port), GCS_BUCKET],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  url = f"http://localhost:{port}"
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/{GCS_BUCKET}", timeout=1).close()
      break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        raise RuntimeError(f"the GCS emulator did not start on port {port}") from None
      time.sleep(0.1)
  env = {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_CLOUD_PROJECT": "flowseg-test",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield f"gs://{GCS_BUCKET}"
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)
