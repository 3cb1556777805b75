"""Elastic resume: a checkpoint written on one topology continues on another.

Parameters, EMA and optimiser state are restored into abstract arrays carrying the new run's
shardings (orbax reshards them); the data stream continues at the checkpoint's global example
position, so within an epoch no example is repeated or skipped. Examples are identified by the
bytes of their (augmented) image: the synthetic examples are all distinct, and the augmentation of
the example at global stream index i depends only on the data seed and i.

What is equal after such a resume: the restored arrays bit for bit (a reshard is a copy), and the
examples of every later step (the same global stream). What is equal only to float tolerance: the
losses, gradients and parameters of later steps, because another device count sums the batch and
the FSDP all-reduces in another order (float32, about 1e-6 relative per step; tests use 1e-5).
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from flowseg_jax import sharding, train
from flowseg_jax.data import pipeline
from tests.fault_test import config as fault_config
from tests.train_test import REPO, _final_params, read_jsonl, tiny_config

EPOCH = 64  # configs/demo.py:smoke has 64 training examples, global batch 8


def ids(batch) -> list[str]:
  return [hashlib.sha1(image.tobytes()).hexdigest()[:12] for image in batch["image"]]


def reference_stream(n: int) -> list[str]:
  it = pipeline.create_train_iterator(tiny_config().input, seed=0, process_index=0, process_count=1)
  out = []
  while len(out) < n:
    out += ids(next(it))
  return out[:n]


def test_global_stream_continues_on_another_process_count():
  """2 processes for 3 steps, then 1 process, then 4: every example of the epoch exactly once, in
  the order of the one-process stream (per step, the union over processes)."""
  cfg = tiny_config().input
  reference = reference_stream(EPOCH)
  seen, position = [], 0
  for processes, steps in [(2, 3), (1, 2), (4, 3)]:
    its = [
      pipeline.create_train_iterator(
        cfg, seed=0, process_index=i, process_count=processes, start=position
      )
      for i in range(processes)
    ]
    for _ in range(steps):
      local = [ids(next(it)) for it in its]
      seen.append(sorted(sum(local, [])))
      position += cfg.batch_size
  assert position == EPOCH
  assert seen == [sorted(reference[i : i + 8]) for i in range(0, EPOCH, 8)]
  assert len(set(sum(seen, []))) == EPOCH  # no repeats, no skips within the epoch


def _recording(monkeypatch, log: list):
  real = sharding.shard_batch

  def record(batch, mesh):
    if "label" in batch:
      log.append(ids(batch))
    return real(batch, mesh)

  monkeypatch.setattr(sharding, "shard_batch", record)


def test_checkpoint_of_another_process_count_continues_the_global_stream(tmp_path, monkeypatch):
  """A checkpoint whose meta says it was written by 2 processes (the iterator state is then not
  used) resumes at its global data position: steps 3 and 4 see the examples of the one-process
  stream, and the run continues bit for bit like an ordinary resume (same device count here)."""
  cfg = fault_config(eval_every_steps=0)  # the fault matrix's compiled step
  workdir, ordinary = str(tmp_path / "elastic"), str(tmp_path / "ordinary")
  train.train_and_evaluate(cfg, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # back to step 2
  shutil.copytree(workdir, ordinary)
  meta_path = os.path.join(workdir, "checkpoints", "2", "meta", "metadata")
  with open(meta_path) as f:
    meta = json.load(f)
  assert meta["data_position"] == 16 and meta["data_start"] == 0
  with open(meta_path, "w") as f:
    json.dump({**meta, "process_count": 2}, f)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "2", "data_iter"))  # no process_0-of-1 state
  log = []
  _recording(monkeypatch, log)
  train.train_and_evaluate(cfg, workdir)
  assert log == _chunks(reference_stream(32)[16:], 8)
  monkeypatch.undo()
  train.train_and_evaluate(cfg, ordinary)
  assert read_jsonl(workdir) == read_jsonl(ordinary)  # every logged number, bit for bit
  assert [r["step"] for r in read_jsonl(workdir)] == [1, 2, 3, 4]
  with open(os.path.join(workdir, "checkpoints", "4", "meta", "metadata")) as f:
    assert json.load(f)["data_start"] == 16  # the stream was rebuilt at the saved position


def _chunks(items, n):
  return [items[i : i + n] for i in range(0, len(items), n)]


def _cli(workdir, devices, *flags):
  command = [
    sys.executable, "-m", "flowseg_jax.main", "train", "--config", os.path.join(REPO, "configs/demo.py:smoke"),
    f"--workdir={workdir}", "--config.async_checkpointing=False", "--config.eval_every_steps=0",
    "--config.log_every_steps=1", "--config.optim.warmup_steps=0", *flags,
  ]  # fmt: skip
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_resume_on_fewer_devices(tmp_path):
  """8 devices (FSDP 4) -> 4 devices (FSDP 4, data 1): the optimiser state is resharded by orbax
  and steps 5..6 match an uninterrupted 8-device run to float32 tolerance."""
  overrides = {"total_steps": 4, "ckpt_every_steps": 2, "mesh.data": -1, "mesh.fsdp": 4}
  overrides["objective.t_std"] = 1e-9  # t equal for all rows: the row split does not change t
  overrides["optim.schedule"] = "constant"  # the cut run's first part must not decay to step 4
  cut, full = str(tmp_path / "cut"), str(tmp_path / "full")
  train.train_and_evaluate(tiny_config(**overrides), cut)
  flags = [
    "--config.mesh.fsdp=4",
    "--config.objective.t_std=1e-9",
    "--config.optim.schedule=constant",
  ]
  _cli(cut, 4, "--config.total_steps=6", *flags)
  train.train_and_evaluate(tiny_config(**{**overrides, "total_steps": 6}), full)
  a, b = read_jsonl(cut), read_jsonl(full)
  assert [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
  for x, y in zip(a, b, strict=True):
    np.testing.assert_allclose(x["loss"], y["loss"], rtol=1e-5)
    assert x["num_valid"] == y["num_valid"]  # the same examples
  cfg = tiny_config(**{**overrides, "total_steps": 6})
  (s1, p1), (s2, p2) = _final_params(cfg, cut), _final_params(cfg, full)
  assert s1 == s2 == 6
  for x, y in zip(p1, p2, strict=True):
    np.testing.assert_allclose(
      np.frombuffer(x, np.float32), np.frombuffer(y, np.float32), rtol=1e-4, atol=1e-6
    )


_WORKER = """
import hashlib, json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[4])
from tests.train_test import tiny_config
from tests.elastic_test import ids
from flowseg_jax import sharding, train
config = tiny_config(**json.loads(sys.argv[5]))
real = sharding.shard_batch
log = []
def record(batch, mesh):
  if "label" in batch:
    log.append(ids(batch))
  return real(batch, mesh)
sharding.shard_batch = record
result = train.train_and_evaluate(config, sys.argv[3])
with open(sys.argv[6], "w") as f:
  json.dump({"ids": log, "mIoU": result.get("mIoU")}, f)
"""


def run_two_processes(workdir, overrides, record):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-c",
        _WORKER,
        f"localhost:{port}",
        str(i),
        workdir,
        REPO,
        json.dumps(overrides),
        f"{record}.{i}",
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )  # fmt: skip
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]
  records = []
  for i in range(2):
    with open(f"{record}.{i}") as f:
      records.append(json.load(f))
  return records


@pytest.mark.slow
def test_two_processes_to_one_and_back(tmp_path, monkeypatch):
  """2 processes x 4 devices with FSDP over all 8 (spanning both processes) train 2 steps and
  evaluate; 1 process x 8 devices resumes to step 4; 2 processes resume to step 6 and evaluate.
  Every step sees the examples of the uninterrupted 1-process run (no repeat, no skip), losses and
  the final mIoU match it to float tolerance."""
  overrides = {
    "objective.t_std": 1e-9, "ckpt_every_steps": 2, "eval_every_steps": 2, "mesh.data": 1,
    "mesh.fsdp": 8, "eval.batch_per_device": 1, "optim.schedule": "constant",
  }  # fmt: skip
  elastic, full = str(tmp_path / "elastic"), str(tmp_path / "full")
  full_result = train.train_and_evaluate(tiny_config(**{**overrides, "total_steps": 6}), full)
  first = run_two_processes(elastic, {**overrides, "total_steps": 2}, tmp_path / "a")
  log = []
  _recording(monkeypatch, log)
  train.train_and_evaluate(tiny_config(**{**overrides, "total_steps": 4}), elastic)
  monkeypatch.undo()
  last = run_two_processes(elastic, {**overrides, "total_steps": 6}, tmp_path / "b")
  steps = [sorted(a + b) for a, b in zip(first[0]["ids"], first[1]["ids"], strict=True)]
  steps += [sorted(x) for x in log]
  steps += [sorted(a + b) for a, b in zip(last[0]["ids"], last[1]["ids"], strict=True)]
  assert steps == [sorted(c) for c in _chunks(reference_stream(48), 8)]
  a, b = read_jsonl(elastic), read_jsonl(full)
  assert [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
  for x, y in zip(a, b, strict=True):
    np.testing.assert_allclose(x["loss"], y["loss"], rtol=1e-5)
  assert last[0]["mIoU"] == pytest.approx(full_result["mIoU"], abs=1e-3)
  assert jax.device_count() == 8
