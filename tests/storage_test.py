"""gs:// workdirs against a GCS API on localhost (the `gcs_bucket` fixture, tests/gcs_emulator.py):
the storage helpers, the workdir lock's create-if-absent, and the whole life of a run through the
CLI (train, SIGTERM, resume, rerun, evaluate, predict, Segmenter.from_workdir) plus the damaged-
checkpoint and second-trainer rows of the fault table. Every subprocess runs in a fresh cwd, and no
local `gs:` folder may appear there (a gs:// path joined onto the cwd used to make one)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import fsspec
import numpy as np
import pytest
from etils import epath
from PIL import Image

from flowseg_jax import storage
from flowseg_jax.data import datasets
from flowseg_jax.run import lock as workdir_lock
from flowseg_jax.run import status as run_status
from tests.train_test import REPO, load_config

SMOKE = os.path.join(REPO, "configs", "demo.py:smoke")


def _env():
  """This worktree's package first (the editable install may point at another checkout)."""
  return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def flowseg(cwd, command, *args, timeout=300, **popen):
  argv = [sys.executable, "-m", "flowseg_jax.main", command, *args]
  if popen:
    return subprocess.Popen(argv, cwd=cwd, env=_env(), text=True, **popen)
  return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def train_args(workdir, *flags):
  return [
    "--config", SMOKE, f"--workdir={workdir}", "--config.log_every_steps=1",
    "--config.optim.warmup_steps=0", "--config.mesh.fsdp=2", *flags,
  ]  # fmt: skip


def _unique(bucket: str) -> str:
  return f"{bucket}/{uuid.uuid4().hex[:8]}"


def _no_local_gs(cwd) -> None:
  assert not os.path.exists(os.path.join(cwd, "gs:")), "a gs:// path was joined onto the cwd"


def _steps_logged(workdir: str) -> list[int]:
  text = epath.Path(workdir, "metrics.jsonl").read_text()
  return [json.loads(line)["step"] for line in text.splitlines()]


# ------------------------------------------------------------------------------------------------
# The helpers.
# ------------------------------------------------------------------------------------------------


def test_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(storage.path("run")) == os.path.join(str(tmp_path), "run")
  assert os.fspath(storage.path("gs://b/run")) == "gs://b/run"
  assert storage.join("gs://b/run", "LOCK") == "gs://b/run/LOCK"
  assert storage.join("run", "LOCK") == os.path.join("run", "LOCK")  # as the user gave it


def test_raw_folders_refuse_gs_in_one_line():
  config = load_config()
  config.input.dataset = "ade20k"
  config.input.data_dir = "gs://b/ADEChallengeData2016"
  with pytest.raises(ValueError) as e:
    datasets.num_eval_examples(config.input)
  message = str(e.value)
  assert "'gs://b/ADEChallengeData2016'" in message and "tfds_ade20k" in message
  assert "\n" not in message


def test_files_on_gs(gcs_bucket):
  root = _unique(gcs_bucket)
  storage.append_text(f"{root}/m.jsonl", "a\n")
  storage.append_text(f"{root}/m.jsonl", "b\n")
  storage.write_atomic(f"{root}/r.json", "{}")
  storage.move(f"{root}/m.jsonl", f"{root}/aside/m.jsonl")
  assert epath.Path(root, "aside", "m.jsonl").read_text() == "a\nb\n"
  assert not epath.Path(root, "m.jsonl").exists()
  assert epath.Path(root, "r.json").read_text() == "{}"


def test_create_new_on_gs_is_create_if_absent(gcs_bucket):
  """The lock's atomic step: an upload with ifGenerationMatch=0, refused once the object exists."""
  path = f"{_unique(gcs_bucket)}/LOCK"
  assert storage.create_new(path, b"first")
  assert not storage.create_new(path, b"second")
  assert epath.Path(path).read_text() == "first"


def test_lock_on_gs_names_its_holder_and_takes_over_a_dead_one(gcs_bucket, caplog):
  workdir = _unique(gcs_bucket)
  with workdir_lock.WorkdirLock(workdir):
    with pytest.raises(workdir_lock.WorkdirLockedError) as e:
      workdir_lock.WorkdirLock(workdir).__enter__()
  message = str(e.value)
  assert f"pid {os.getpid()}" in message and f"host {socket.gethostname()}" in message
  assert f"gcloud storage rm {workdir}/LOCK" in message
  assert not epath.Path(workdir, "LOCK").exists()  # released by its holder
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  epath.Path(workdir, "LOCK").write_text(
    json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start_time": "yesterday"})
  )
  with workdir_lock.WorkdirLock(workdir):
    assert json.loads(epath.Path(workdir, "LOCK").read_text())["pid"] == os.getpid()
  assert any("stale lock" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# A run's life on gs://, through the CLI.
# ------------------------------------------------------------------------------------------------


def test_a_run_on_gs_through_the_cli(gcs_bucket, tmp_path):
  """train -> SIGTERM (exit 75, a checkpoint) -> resume (exit 0) -> rerun (no-op) -> evaluate ->
  predict into gs:// -> Segmenter.from_workdir(gs://...) equals the same from a local copy."""
  workdir = _unique(gcs_bucket)
  flags = ("--config.total_steps=6", "--config.ckpt_every_steps=100", "--config.eval_every_steps=0")
  proc = flowseg(
    tmp_path,
    "train",
    *train_args(workdir, *flags),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  metrics = epath.Path(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not metrics.exists():
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=180)
  assert proc.returncode == run_status.EXIT_STATUS[run_status.PREEMPTED] == 75, err[-3000:]
  preempted = json.loads(epath.Path(workdir, "train_result.json").read_text())
  assert preempted["status"] == "preempted" and preempted["step"] < 6
  assert [p.name for p in epath.Path(workdir, "checkpoints").iterdir()] == [str(preempted["step"])]

  resumed = flowseg(tmp_path, "train", *train_args(workdir, *flags))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert _steps_logged(workdir) == [1, 2, 3, 4, 5, 6]
  result = epath.Path(workdir, "train_result.json").read_text()
  assert json.loads(result)["status"] == "finished"

  rerun = flowseg(tmp_path, "train", *train_args(workdir, *flags))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "already finished at step 6" in rerun.stderr
  assert epath.Path(workdir, "train_result.json").read_text() == result
  assert not epath.Path(workdir, "LOCK").exists()

  evaluated = flowseg(tmp_path, "evaluate", f"--workdir={workdir}", "--config.eval.max_examples=4")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  line = evaluated.stdout.strip().splitlines()[-1]
  assert line.startswith("step 6: mIoU") and f"{workdir}/eval/" in line, line
  assert json.loads(epath.Path(line.split(" -> ")[-1]).read_text())["step"] == 6

  image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / "photo.png")
  output = f"{workdir}-predictions"
  predicted = flowseg(
    tmp_path, "predict", f"--workdir={workdir}", "--input=photo.png", f"--output={output}"
  )
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  names = sorted(p.name for p in epath.Path(output).iterdir())
  assert names == ["photo_label.png", "photo_mask.png", "photo_overlay.png"]

  from flowseg_jax import inference

  labels = inference.Segmenter.from_workdir(workdir)(image)
  assert labels.shape == (24, 40) and labels.dtype == np.int32
  with storage.open_image(f"{output}/photo_label.png") as saved:
    np.testing.assert_array_equal(np.asarray(saved), labels)
  local = tmp_path / "copy"
  _download(workdir, local)
  np.testing.assert_array_equal(inference.Segmenter.from_workdir(str(local))(image), labels)
  _no_local_gs(tmp_path)


def _download(url: str, local) -> None:
  fs, root = fsspec.core.url_to_fs(url)
  for key in fs.find(root):
    target = local / os.path.relpath(key, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(fs.cat_file(key))


# ------------------------------------------------------------------------------------------------
# Fault-table rows on gs://.
# ------------------------------------------------------------------------------------------------


def test_damaged_newest_checkpoint_on_gs_is_moved_aside_and_the_run_completes(gcs_bucket, tmp_path):
  workdir = _unique(gcs_bucket)
  flags = ("--config.total_steps=4", "--config.ckpt_every_steps=2", "--config.eval_every_steps=0")
  first = flowseg(tmp_path, "train", *train_args(workdir, *flags))
  assert first.returncode == 0, first.stderr[-3000:]
  epath.Path(workdir, "checkpoints", "4", "state", "_METADATA").unlink()
  epath.Path(workdir, "train_result.json").unlink()  # as if killed during the final evaluation
  again = flowseg(tmp_path, "train", *train_args(workdir, *flags))
  assert again.returncode == 0, again.stderr[-3000:]
  assert "is unreadable" in again.stderr and "moved to" in again.stderr
  damaged = [p.name for p in epath.Path(workdir, "checkpoints", "damaged").iterdir()]
  assert len(damaged) == 1 and damaged[0].startswith("4-"), damaged
  steps = sorted(p.name for p in epath.Path(workdir, "checkpoints").iterdir())
  assert steps == ["2", "4", "damaged"]
  assert _steps_logged(workdir) == [1, 2, 3, 4]  # steps 3 and 4 retrained, each logged once
  result = json.loads(epath.Path(workdir, "train_result.json").read_text())
  assert result["status"] == "finished" and result["step"] == 4
  _no_local_gs(tmp_path)


def test_second_trainer_on_a_gs_workdir_in_use_exits_naming_the_holder(gcs_bucket, tmp_path):
  workdir = _unique(gcs_bucket)
  with workdir_lock.WorkdirLock(workdir):
    proc = flowseg(tmp_path, "train", *train_args(workdir, "--config.total_steps=2"), timeout=120)
    assert json.loads(epath.Path(workdir, "LOCK").read_text())["pid"] == os.getpid()
  assert proc.returncode == run_status.EXIT_STATUS[run_status.FAILED], proc.stderr[-2000:]
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith(f"flowseg train: workdir {workdir} is in use"), line
  assert f"pid {os.getpid()}" in line and f"gcloud storage rm {workdir}/LOCK" in line
  assert not epath.Path(workdir).exists()  # the refused trainer wrote nothing
  _no_local_gs(tmp_path)
