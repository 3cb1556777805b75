"""The fault matrix (README "Fault tolerance"): each test drives the real trainer on a tiny config.

Most tests start from copies of one finished 4-step run (checkpoints at steps 2 and 4, an evaluation
at step 4), so each row costs a few steps of training, not a whole run.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax._src import array
from jax.sharding import PartitionSpec as P

from flowseg_jax import checkpoint_faults, checkpointing, evaluate, sharding, train, train_state
from flowseg_jax.data import synthetic
from flowseg_jax.run import lock as workdir_lock
from flowseg_jax.run import status as run_status
from tests.train_test import REPO, read_jsonl, tiny_config

# FSDP over 2 devices, so that parameters are really split (see no_host_gathers).
BASE = {
  "total_steps": 4, "ckpt_every_steps": 2, "eval_every_steps": 4, "keep_checkpoints": 3,
  "mesh.data": -1, "mesh.fsdp": 2,
}  # fmt: skip


def config(**overrides):
  return tiny_config(**{**BASE, **overrides})


def cli(workdir, *flags):
  return [
    sys.executable, "-m", "flowseg_jax.main", "train", "--config", os.path.join(REPO, "configs/demo.py:smoke"),
    f"--workdir={workdir}", "--config.eval_every_steps=0", "--config.log_every_steps=1",
    "--config.total_steps=4", "--config.optim.warmup_steps=0", "--config.mesh.fsdp=2", *flags,
  ]  # fmt: skip


def snapshot(workdir):
  """Every file of a workdir with its bytes (events files aside: TensorBoard appends per process)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      if not name.startswith("events.out"):
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          out[os.path.relpath(path, workdir)] = f.read()
  return out


@contextlib.contextmanager
def no_host_gathers():
  """Records every fetch to the host of an array split over several devices (a gather)."""
  real_get, real_array = jax.device_get, array.ArrayImpl.__array__
  gathered = []

  def check(x):
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1 and not x.is_fully_replicated:
      gathered.append(x.shape)

  def device_get(tree):
    jax.tree.map(check, tree)
    return real_get(tree)

  def to_numpy(self, *args, **kwargs):
    check(self)
    return real_array(self, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax, "device_get", device_get)
    patch.setattr(array.ArrayImpl, "__array__", to_numpy)
    yield gathered


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """Also checks that training, checkpointing and evaluation never gather FSDP-split arrays."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  with no_host_gathers() as gathered:
    result = train.train_and_evaluate(config(), workdir)
  assert gathered == []
  assert result["status"] == run_status.FINISHED and "mIoU" in result
  return workdir


def test_no_host_gathers_guard_sees_a_gather():
  mesh = sharding.make_mesh(-1, 2)
  x = jax.device_put(np.ones((4, 4), np.float32), jax.sharding.NamedSharding(mesh, P(None, "fsdp")))
  for fetch in (jax.device_get, np.asarray):
    with no_host_gathers() as gathered:
      fetch(x)
    assert gathered and set(gathered) == {(4, 4)}
  with no_host_gathers() as gathered:
    jax.device_get(jax.device_put(x, jax.sharding.NamedSharding(mesh, P())))  # replicated: fine
  assert gathered == []


@pytest.fixture
def run(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  return workdir


def steps_logged(workdir):
  return [r["step"] for r in read_jsonl(workdir)]


# ------------------------------------------------------------------------------------------------
# Reruns, metrics.jsonl, the workdir lock.
# ------------------------------------------------------------------------------------------------


def test_rerun_of_finished_run_changes_nothing_and_takes_over_a_stale_lock(run, caplog):
  """A LOCK left by a dead trainer on this host is taken over with a warning; the finished run is
  then a no-op: train_result.json keeps its final mIoU, no file changes, the lock is released, and
  the log says so without the parameter table."""
  caplog.set_level(logging.INFO)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock = os.path.join(run, workdir_lock.LOCK_FILE)
  with open(lock, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": dead.pid, "start_time": "yesterday"}, f)
  before = snapshot(run)
  with open(os.path.join(run, "train_result.json")) as f:
    saved = json.load(f)
  start = time.time()
  result = train.train_and_evaluate(config(), run)
  assert time.time() - start < 30
  assert result == saved and saved["status"] == "finished" and saved["mIoU"] > 0
  del before["LOCK"]
  assert snapshot(run) == before
  assert any("stale lock" in r.getMessage() for r in caplog.records)
  assert not any("Total:" in r.getMessage() for r in caplog.records)  # no parameter table
  assert any("already finished" in r.getMessage() for r in caplog.records)


def test_second_trainer_on_a_workdir_in_use_exits_naming_the_holder(run):
  """This test process holds the lock (as a running trainer would): `flowseg train` on the same
  workdir stops before any work with exit status 1 and one line naming host, pid and start time."""
  before = snapshot(run)
  with workdir_lock.WorkdirLock(run):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
      train.train_and_evaluate(config(total_steps=6), run)
    start = time.time()
    proc = subprocess.run(
      cli(run, "--config.total_steps=6"), cwd=REPO, capture_output=True, text=True, timeout=120
    )
    elapsed = time.time() - start
    after = snapshot(run)
  assert not os.path.exists(os.path.join(run, workdir_lock.LOCK_FILE))  # released by its holder
  assert proc.returncode == run_status.EXIT_STATUS[run_status.FAILED], proc.stderr[-2000:]
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("flowseg train: workdir") and f"pid {os.getpid()}" in line, line
  assert f"host {socket.gethostname()}" in line and "started 20" in line
  assert elapsed < 60  # python + jax start-up on a loaded 2-core machine; no compilation
  assert json.loads(after.pop("LOCK"))["pid"] == os.getpid()
  assert after == before  # the refused trainer changed nothing


def test_job_processes_share_the_lock(tmp_path, monkeypatch):
  """In a multi-process job only process 0 takes the lock; the others follow its answer."""
  monkeypatch.setattr(workdir_lock.jax, "process_index", lambda: 1)
  with workdir_lock.WorkdirLock(str(tmp_path)):
    assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)


# ------------------------------------------------------------------------------------------------
# Damaged and foreign checkpoints.
# ------------------------------------------------------------------------------------------------


def _largest_data_file(step_dir):
  files = [
    os.path.join(root, f) for root, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
  ]
  return max((f for f in files if "/d/" in f), key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


DAMAGES = {
  "truncated_data_file": _truncate,
  "missing_data_file": lambda d: os.remove(_largest_data_file(d)),
  "missing_metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
}


@pytest.mark.parametrize(
  "damage",
  [
    "truncated_data_file",
    "missing_metadata",
    pytest.param("missing_data_file", marks=pytest.mark.slow),
  ],
)
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_completes(run, damage):
  DAMAGES[damage](os.path.join(run, "checkpoints", "4"))
  os.remove(os.path.join(run, "train_result.json"))  # as if killed during the final evaluation
  result = train.train_and_evaluate(config(), run)
  assert result["status"] == "finished" and result["step"] == 4 and "mIoU" in result
  damaged = os.listdir(os.path.join(run, "checkpoints", checkpointing.DAMAGED_DIR))
  assert len(damaged) == 1 and damaged[0].startswith("4-"), damaged
  assert steps_logged(run) == [1, 2, 3, 4]  # steps 3 and 4 retrained, each logged once
  _, _, _, step = train_state.restore_train_state(config(), run)
  assert step == 4
  before = snapshot(run)
  assert train.train_and_evaluate(config(), run) == json.loads(before["train_result.json"])
  assert snapshot(run) == before  # the rerun of the completed run is a no-op


def test_damage_is_told_apart_from_other_errors():
  assert checkpoint_faults.is_read_error(FileNotFoundError(2, "No such file"))
  assert checkpoint_faults.is_read_error(ValueError("DATA_LOSS: Error reading chunk"))
  assert checkpoint_faults.is_read_error(json.JSONDecodeError("Expecting value", "", 0))
  assert not checkpoint_faults.is_read_error(
    ValueError("Requested shape (3, 16) is not compatible")
  )
  assert not checkpoint_faults.is_read_error(TypeError("unsupported operand"))
  assert not checkpoint_faults.is_read_error(KeyError("params"))


def test_checkpoint_of_another_model_is_refused_before_any_work(run):
  before = snapshot(run)
  with pytest.raises(checkpoint_faults.CheckpointMismatchError) as info:
    train.train_and_evaluate(config(**{"model.hidden_size": 32}), run)
  message = str(info.value)
  assert "ema_params/denoiser/cond_blocks/adaLN_modulation/bias" in message
  assert "checkpoint (3, 384) vs this config (3, 192)" in message
  assert "model.hidden_size: None -> 32" in message  # None: the variant's size
  assert "new --workdir" in message and f"--config.init_from={run}" in message
  assert len(message.splitlines()) <= 5
  # Another optimiser structure (no clipping state): the first path missing on one side.
  with pytest.raises(checkpoint_faults.CheckpointMismatchError, match="absent"):
    train.train_and_evaluate(config(**{"optim.grad_clip_norm": 0.0}), run)
  assert snapshot(run) == before  # config.json, checkpoints and metrics untouched


# ------------------------------------------------------------------------------------------------
# Evaluation data, checkpoint-before-evaluation.
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def bad_eval_label(monkeypatch):
  """Validation example 5 carries label 200 (12 classes): out of range."""
  real = synthetic.SyntheticSource.__getitem__

  def getitem(self, index):
    record = real(self, index)
    if self.split == "validation" and index == 5:
      record = {**record, "label": np.full_like(record["label"], 200)}
    return record

  monkeypatch.setattr(synthetic.SyntheticSource, "__getitem__", getitem)


def test_bad_eval_example_stops_the_run_before_step_1(tmp_path, bad_eval_label):
  workdir = str(tmp_path / "run")
  with pytest.raises(train.EvalDataError, match="synthetic_validation_000005.*out|out.*000005"):
    train.train_and_evaluate(config(), workdir)
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]


def test_bad_eval_example_is_skipped_and_counted(tmp_path, bad_eval_label):
  cfg = config()
  cfg.input.on_bad_example = "skip"
  result = train.train_and_evaluate(cfg, str(tmp_path))
  assert result["num_examples"] == 7 and result["num_skipped_examples"] == 1


def test_checkpoint_is_on_disk_before_its_evaluation_starts(tmp_path, monkeypatch):
  """The evaluation of step 4 crashes (async saves on): step 4's checkpoint was complete when it
  started, so the rerun does not retrain: it only runs the missing final evaluation."""
  seen = []

  def crash(cfg, task, params, mesh, *, workdir, step, writer=None):
    steps = os.listdir(os.path.join(workdir, "checkpoints"))
    seen.append((step, sorted(int(s) for s in steps if s.isdigit())))
    assert os.path.exists(os.path.join(workdir, "checkpoints", str(step), "commit_success.txt"))
    raise RuntimeError("evaluation crashed")

  monkeypatch.setattr(evaluate, "evaluate_params", crash)
  workdir = str(tmp_path / "run")
  cfg = config(async_checkpointing=True)
  with pytest.raises(RuntimeError, match="evaluation crashed"):
    train.train_and_evaluate(cfg, workdir)
  assert seen == [(4, [2, 4])]
  monkeypatch.undo()
  result = train.train_and_evaluate(cfg, workdir)
  assert result["status"] == "finished" and result["step"] == 4 and "mIoU" in result
  assert steps_logged(workdir) == [1, 2, 3, 4]  # nothing retrained
  assert os.path.exists(os.path.join(workdir, "eval", "step_4.json"))


# ------------------------------------------------------------------------------------------------
# Failed writes, non-finite updates, preemption.
# ------------------------------------------------------------------------------------------------


# Runs the command with a 1 MiB file-size limit: a full disk as the writer sees it (EFBIG rather
# than ENOSPC), portable and effective as root, unlike a read-only directory.
_LIMITED = """
import os, resource, signal, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.parametrize("async_save", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_failed_checkpoint_write_stops_the_run_with_one_line(tmp_path, async_save):
  workdir = str(tmp_path / "run")
  command = cli(
    workdir, "--config.ckpt_every_steps=2", f"--config.async_checkpointing={async_save}"
  )
  proc = subprocess.run(
    [sys.executable, "-c", _LIMITED, *command],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  # orbax's writer threads may still print while the line is written: find it, not the last line
  lines = re.findall(r"flowseg train: [^\n]*", proc.stderr)
  # The limit is per file: how tensorstore batches a checkpoint's arrays into data files depends on
  # the timing of its writes, so under load step 2's files may all stay under 1 MiB and step 4's
  # write is the first to fail. Either way: one line naming the step, the folder and the OS error.
  want = (
    rf"checkpoint of step (2|4) could not be written to {re.escape(workdir)}/checkpoints: "
    r"\[Errno 27\] File too large"
  )
  assert len(lines) == 1 and re.fullmatch(f"flowseg train: {want}", lines[0]), proc.stderr[-3000:]
  failed_step = int(re.search(r"step (\d+)", lines[0]).group(1))
  # tensorstore's callbacks into orbax's closed event loop print tracebacks: none reaches the user
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  with open(os.path.join(workdir, "train_result.json")) as f:
    assert json.load(f)["status"] == "failed"
  # stopped at the failing save (an asynchronous one is noticed at the next step's check)
  assert max(steps_logged(workdir)) <= failed_step + (2 if async_save else 0)
  # Space freed (no limit): the same command resumes and finishes.
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "train_result.json")) as f:
    assert json.load(f)["status"] == "finished"


def test_consecutive_skipped_updates_stop_the_run(tmp_path, monkeypatch):
  real = sharding.shard_batch

  def poisoned(batch, mesh):
    if "label" in batch:
      nan = np.full(batch["image"].shape, np.nan, np.float32)  # float images pass through
      batch = {**batch, "image": nan}
    return real(batch, mesh)

  monkeypatch.setattr(sharding, "shard_batch", poisoned)
  cfg = config(eval_every_steps=0, max_consecutive_skipped=3)
  with pytest.raises(train.NonFiniteError, match="stopped at step 3: the last 3 updates"):
    train.train_and_evaluate(cfg, str(tmp_path))
  with open(tmp_path / "train_result.json") as f:
    assert json.load(f)["status"] == "failed"


def test_cli_exit_status_follows_the_run_status(monkeypatch, capsys):
  from flowseg_jax import main

  for status, code in [("finished", 0), ("preempted", 75), ("interrupted", 130)]:
    monkeypatch.setattr(
      train, "train_and_evaluate", lambda config, workdir, s=status: {"status": s}
    )
    assert main.train_command(None, "/nowhere") == code

  def fail(config, workdir):
    raise checkpoint_faults.CheckpointWriteError(
      "checkpoint of step 2 could not be written to /x: disk"
    )

  monkeypatch.setattr(train, "train_and_evaluate", fail)
  assert main.train_command(None, "/nowhere") == 1
  assert (
    capsys.readouterr().err
    == "flowseg train: checkpoint of step 2 could not be written to /x: disk\n"
  )

  def interrupt(config, workdir):  # Ctrl-C before the loop, or a second one inside it
    raise KeyboardInterrupt

  monkeypatch.setattr(train, "train_and_evaluate", interrupt)
  assert main.train_command(None, "/nowhere") == 130
  assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_preempted_and_finished_runs_exit_differently(tmp_path):
  """SIGTERM: checkpoint, train_result.json says "preempted", exit 75; the rerun finishes (exit 0)
  and metrics.jsonl holds every step once."""
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(
    cli(workdir, "--config.ckpt_every_steps=100"),
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 240
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline and not (os.path.exists(path) and read_jsonl(workdir)):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == run_status.EXIT_STATUS[run_status.PREEMPTED] == 75, err[-3000:]
  with open(os.path.join(workdir, "train_result.json")) as f:
    preempted = json.load(f)
  assert preempted["status"] == "preempted" and preempted["step"] < 4
  manager = checkpointing.create_manager(os.path.join(workdir, "checkpoints"))
  assert manager.latest_step() == preempted["step"]
  manager.close()
  result = train.train_and_evaluate(config(eval_every_steps=0), workdir)
  assert result["status"] == "finished"
  assert steps_logged(workdir) == [1, 2, 3, 4]
