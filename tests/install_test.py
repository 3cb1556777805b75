"""The core install: a fresh environment with `pip install .` (no extras) trains and logs without
TensorFlow. Slow (it installs JAX and friends from the package index, ~1.5 min with a warm pip cache):
`.ci/run` runs it as its own step."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.train_test import REPO

_TRAIN = """
import importlib.util, sys
for name in ("tensorflow", "tensorflow_datasets", "torch", "chex", "gcsfs"):
  assert importlib.util.find_spec(name) is None, f"{name} is installed by the core install"
from flowseg_jax import defaults, train
config = defaults.load_config_file(sys.argv[1], "smoke")
config.total_steps = 2
config.log_every_steps = 1
config.eval_every_steps = 0
config.async_checkpointing = False
train.train_and_evaluate(config, sys.argv[2])
assert "tensorflow" not in sys.modules
print("imported from", train.__file__)
"""


@pytest.mark.slow
def test_core_install_trains_and_logs_without_tensorflow(tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  # Built from a copy: building in place would leave build/ and *.egg-info in the checkout.
  src = tmp_path / "src"
  shutil.copytree(
    REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", ".venv", "__pycache__")
  )
  subprocess.run([python, "-m", "pip", "install", "--quiet", str(src)], check=True, timeout=1200)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [python, "-c", _TRAIN, os.path.join(REPO, "configs", "demo.py"), str(workdir)],
    cwd=tmp_path,  # not the repository: the installed package must be the one imported
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"imported from {venv}" in proc.stdout
  with open(workdir / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
