"""Training loop: sharding, resume, preemption, non-finite updates, evaluation, config errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import (
  checkpointing,
  defaults,
  evaluate,
  inference,
  sharding,
  train,
  train_state,
  train_step,
)
from flowseg_jax.data import pipeline, transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg="smoke"):
  return defaults.load_config_file(os.path.join(REPO, "configs", "demo.py"), arg)


def tiny_config(**overrides):
  config = load_config()
  config.async_checkpointing = False
  config.eval_every_steps = 0
  config.log_every_steps = 1
  config.optim.warmup_steps = 0  # step 0 must move the parameters
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def read_jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def one_step(config, mesh, batch):
  setup = train_step.TrainSetup(config)
  rules = sharding.rules_from_config(config.sharding_rules)
  state, shardings = train_state.create_train_state(setup, mesh, rules, config.seed)
  step_fn = train_step.compile_train_step(setup, mesh, shardings)
  before = jax.device_get(state)  # the step donates `state`
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    new_state, metrics = step_fn(state, sharding.shard_batch(batch, mesh), setup.teacher_params)
  return before, new_state, metrics, shardings


@pytest.fixture(scope="module")
def batch():
  config = tiny_config()
  it = pipeline.create_train_iterator(config.input, seed=0)
  b = next(it)
  b.pop("num_skipped")
  return b


def test_sharded_step_equals_single_device_step(batch):
  """(data=2, fsdp=4) over 8 devices vs 1 device: same arithmetic, reductions in another order, so
  float32 agreement to ~1e-6 relative; 1e-5 leaves room for the reduction order."""
  config = tiny_config()
  single = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  _, s1, m1, _ = one_step(config, single, batch)
  config.mesh.data, config.mesh.fsdp = 2, 4
  multi = sharding.make_mesh(2, 4)
  _, s8, m8, shardings = one_step(config, multi, batch)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
    s1.params,
    s8.params,
  )
  # Parameters (and Adam moments) really are split over 'fsdp' where a rule says so.
  qkv = shardings.params["denoiser"]["cond_blocks"]["attn"]["qkv"]["kernel"]
  assert "fsdp" in jax.tree.leaves(tuple(qkv.spec)), qkv.spec
  leaf = s8.params["denoiser"]["cond_blocks"]["attn"]["qkv"]["kernel"]
  assert len({str(s.index) for s in leaf.addressable_shards}) == 4  # 4 distinct pieces over fsdp
  mu = s8.opt_state[1][0].mu["denoiser"]["cond_blocks"]["attn"]["qkv"]["kernel"]
  assert mu.sharding.spec == leaf.sharding.spec


def test_grad_accumulation_matches_full_batch(batch):
  """Micro-batches weighted by their share of valid pixels give the global-batch gradient."""
  config = tiny_config()
  config.objective.t_std = 1e-9  # the same t for every row, so the split does not change the t draw
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  _, full, m_full, _ = one_step(config, mesh, batch)
  config.optim.grad_accum_steps = 2
  _, acc, m_acc, _ = one_step(config, mesh, batch)
  np.testing.assert_allclose(m_full["loss"], m_acc["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_full["grad_norm"], m_acc["grad_norm"], rtol=1e-5)


def test_uint8_batch_steps_as_the_host_normalised_one(batch):
  """The pipeline's uint8 images, normalised in the step, give the step of the same images
  normalised on the host, to the bit; a padded region (image_hw) is set to IMAGE_PAD_VALUE."""
  config = tiny_config()
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  assert batch["image"].dtype == np.uint8
  floats = {"image": transforms.normalize_image(batch["image"]), "label": batch["label"]}
  _, a, m_a, _ = one_step(config, mesh, batch)
  _, b, m_b, _ = one_step(config, mesh, floats)
  assert float(m_a["loss"]) == float(m_b["loss"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params), jax.device_get(b.params))
  padded = dict(batch, image_hw=batch["image_hw"].copy())
  padded["image_hw"][0] = (8, 5)  # example 0: only its top-left 8x5 is image
  floats["image"][0, 8:], floats["image"][0, :, 5:] = 0.0, 0.0
  _, _, m_p, _ = one_step(config, mesh, padded)
  _, _, m_f, _ = one_step(config, mesh, floats)
  assert float(m_p["loss"]) == float(m_f["loss"]) != float(m_a["loss"])


def test_non_finite_batch_is_skipped_and_counted(batch):
  config = tiny_config()
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  bad = dict(batch)
  bad["image"] = transforms.normalize_image(batch["image"])  # float images pass through: NaN fits
  bad["image"][0, 0, 0, 0] = np.nan
  before, after, metrics, _ = one_step(config, mesh, bad)
  assert int(metrics["skipped"]) == 1
  assert int(after.num_skipped) == 1 and int(after.step) == 1
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
    before.params,
    after.params,
  )
  _, good, metrics, _ = one_step(config, mesh, batch)
  assert int(metrics["skipped"]) == 0 and int(good.num_skipped) == 0
  moved = jax.tree.map(
    lambda a, b: np.any(np.asarray(a) != np.asarray(b)), before.params, good.params
  )
  assert any(jax.tree.leaves(moved))


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
  """SIGKILL a `flowseg train` process after step 4 (its checkpoint at step 3 survives, step 4's work is
  lost; its LOCK is left behind), rerun the same command: it takes the stale lock over, and the losses
  of steps 4..6 and the final parameters equal those of an uninterrupted run, bit for bit."""
  overrides = dict(ckpt_every_steps=3)
  full_dir, cut_dir = str(tmp_path / "full"), str(tmp_path / "cut")
  train.train_and_evaluate(tiny_config(**overrides), full_dir)
  command = [
    sys.executable, "-m", "flowseg_jax.main", "train", "--config", os.path.join(REPO, "configs/demo.py:smoke"),
    f"--workdir={cut_dir}", "--config.async_checkpointing=False", "--config.eval_every_steps=0",
    "--config.log_every_steps=1", "--config.ckpt_every_steps=3", "--config.optim.warmup_steps=0",
  ]  # fmt: skip
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics_file = os.path.join(cut_dir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics_file) and any(r["step"] >= 4 for r in read_jsonl(cut_dir)):
      break
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  logged = [r["step"] for r in read_jsonl(cut_dir)]
  assert 4 in logged and max(logged) < 6, logged
  subprocess.run(
    command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  # The resume dropped the killed run's line of step 4 (it repeats that step): each step once.
  records, full = read_jsonl(cut_dir), read_jsonl(full_dir)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(records, full, strict=True):
    assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])
  assert _final_params(tiny_config(), full_dir) == _final_params(tiny_config(), cut_dir)


def _final_params(config, workdir):
  _, _, state, step = train_state.restore_train_state(config, workdir)
  return step, [np.asarray(x).tobytes() for x in jax.tree.leaves(state.params)]


@pytest.mark.parametrize(
  "signum, status", [(signal.SIGTERM, "preempted"), (signal.SIGINT, "interrupted")]
)
def test_sigterm_checkpoints_and_exits(tmp_path, monkeypatch, signum, status):
  """SIGTERM during step 2 (as a preemption notice would arrive), or Ctrl-C: step 2 finishes, is
  checkpointed, and training returns early with a restorable checkpoint and its status."""
  config = tiny_config(ckpt_every_steps=100)
  real = sharding.shard_batch
  calls = []

  def shard_and_signal(batch, mesh):
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signum)
    return real(batch, mesh)

  monkeypatch.setattr(sharding, "shard_batch", shard_and_signal)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 2 and result["status"] == status  # stopped early, cleanly
  with open(tmp_path / "train_result.json") as f:
    assert json.load(f)["status"] == status
  step, _ = _final_params(config, str(tmp_path))
  assert step == 2


def test_a_run_stopped_after_an_evaluation_reports_where_it_stopped(tmp_path, monkeypatch):
  """Evaluated at step 2, stopped at step 3: train_result.json's step is 3 (where a rerun resumes),
  and the evaluation's metrics keep their own step as eval_step."""
  config = tiny_config(ckpt_every_steps=100, eval_every_steps=2, total_steps=6)
  real = sharding.shard_batch
  calls = []

  def shard_and_signal(batch, mesh):
    if "label" in batch:  # training batches (the evaluation shards {"x", "c"})
      calls.append(1)
      if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(batch, mesh)

  monkeypatch.setattr(sharding, "shard_batch", shard_and_signal)
  result = train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "train_result.json") as f:
    saved = json.load(f)
  assert saved["status"] == result["status"] == "preempted"
  assert saved["step"] == result["step"] == 3 and saved["eval_step"] == 2 and "mIoU" in saved
  assert _final_params(config, str(tmp_path))[0] == 3


def test_damaged_latest_checkpoint_falls_back(tmp_path):
  config = tiny_config(ckpt_every_steps=2)
  config.total_steps = 4
  train.train_and_evaluate(config, str(tmp_path))
  latest = tmp_path / "checkpoints" / "4" / "state"
  for f in latest.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  step, _ = _final_params(config, str(tmp_path))
  assert step == 2


def test_evaluate_matches_hand_computed_metrics():
  """A network that outputs exactly 0 with 'x' prediction flows every image to colour 0 in two Euler
  steps, so every pixel is predicted as the centroid nearest the origin: mIoU follows from the labels."""
  config = tiny_config()
  config.objective.prediction = "x"
  config.eval.num_steps = 2
  config.eval.max_examples = 6
  setup = train_step.TrainSetup(config)
  mesh = sharding.make_mesh(-1, 1)
  params = jax.tree.map(jnp.zeros_like, nn.unbox(setup.init_params(jax.random.key(0)))["denoiser"])
  seg = inference.Segmenter(config, params, task=setup.task, mesh=mesh)
  result, _ = evaluate.score(seg)
  n = setup.task.num_classes
  c0 = int(np.argmin(np.linalg.norm(np.asarray(setup.task.centroids[:n]), axis=1)))
  labels = [ex["label"] for _, ex in zip(range(6), pipeline.create_eval_dataset(config.input))]
  counts = np.bincount(np.concatenate([lab[lab != 255].ravel() for lab in labels]), minlength=n)
  total = counts.sum()
  assert result["num_examples"] == 6
  assert result["aAcc"] == pytest.approx(counts[c0] / total)
  iou = np.full(n, np.nan)
  iou[counts > 0] = 0.0
  iou[c0] = counts[c0] / total
  np.testing.assert_allclose(result["IoU"], iou)
  assert result["mIoU"] == pytest.approx(np.nanmean(iou))


def test_bad_config_values_fail_clearly():
  for key, value, match in [
    ("objective.transform", "cube", "config.objective.transform"),
    ("objective.tau", 0.0, "config.objective.tau"),
    ("optim.ema_decay", 1.5, "config.optim.ema_decay"),
    ("total_steps", 0, "config.total_steps"),
    ("optim.grad_accum_steps", 3, "divisible by config.optim.grad_accum_steps"),
    ("optim.schedule", "step", "config.optim.schedule"),
    ("model.variant", "XXL/2", "Unknown PixNerd variant"),
  ]:
    with pytest.raises(ValueError, match=match):
      train_step.TrainSetup(tiny_config(**{key: value}))
  config = tiny_config()
  config.repa.enabled = True
  with pytest.raises(ValueError, match="config.repa.teacher_dir"):
    train_step.TrainSetup(config)
  config = tiny_config()
  config.input.batch_size = 6
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    train_step.check_batch_fits_mesh(config, sharding.make_mesh(-1, 1))
  with pytest.raises(ValueError, match="fsdp=3 does not divide"):
    sharding.make_mesh(-1, 3)


def test_centroid_table_follows_mask_ignored():
  config = tiny_config()
  config.objective.mask_ignored = False
  setup = train_step.TrainSetup(config)
  n = config.input.synthetic.num_classes
  np.testing.assert_array_equal(setup.task.centroids, centroids_lib.kronecker_centroids(n + 1))


_WORKER = """
import os, sys, json
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[4])
from tests.train_test import tiny_config
from flowseg_jax import train
config = tiny_config(**json.loads(sys.argv[5]))
train.train_and_evaluate(config, sys.argv[3])
"""


def tiny_teacher(directory) -> dict:
  """Saves a random tiny DINOv2 as a converted REPA teacher; returns the overrides that use it."""
  from flowseg_jax.convert import dinov2 as dinov2_convert
  from flowseg_jax.models import dinov2

  teacher = dinov2.make_model("tiny/14")
  params = nn.unbox(teacher.init(jax.random.key(3), np.zeros((1, 28, 28, 3), np.float32))["params"])
  dinov2_convert.save_orbax(params, teacher.arch_config, str(directory))
  return {"repa.enabled": True, "repa.align_layer": 2, "repa.teacher_dir": str(directory)}


def test_two_processes_match_one(tmp_path):
  """Two `jax.distributed` processes on localhost (4 CPU devices each, gloo collectives), each reading its
  own half of every batch, with parameters split over all 8 devices (FSDP spanning both processes),
  train like one process with 8 devices: the paper's recipe, REPA on (a tiny random DINOv2 teacher,
  placed on the mesh from each process's own copy). t is made the same for every row, so the only
  difference is the order of reductions: float32 agreement to 1e-5 relative. (tests/elastic_test.py
  adds evaluation and resuming on another process count.)"""
  overrides = {"objective.t_std": 1e-9, "total_steps": 3, "ckpt_every_steps": 3}
  overrides.update({"mesh.data": 1, "mesh.fsdp": 8, **tiny_teacher(tmp_path / "teacher")})
  one_dir, two_dir = str(tmp_path / "one"), str(tmp_path / "two")
  train.train_and_evaluate(tiny_config(**overrides), one_dir)
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
        two_dir,
        REPO,
        json.dumps(overrides),
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=400)[0].decode(errors="replace") for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]
  one = read_jsonl(one_dir)
  two = read_jsonl(two_dir)
  assert [r["step"] for r in two] == [1, 2, 3]
  for a, b in zip(one, two, strict=True):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(b["repa_loss"], a["repa_loss"], rtol=1e-5)
    assert b["num_valid"] == a["num_valid"]  # the same pixels, split over two readers


def test_manager_keeps_last_n_and_best_miou(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), keep=2, async_save=False)
  state = {"w": np.arange(3, dtype=np.float32)}
  miou = {2: 0.9, 4: 0.5}
  for step in range(1, 7):
    metrics = {checkpointing.BEST_METRIC: miou[step]} if step in miou else None
    checkpointing.save(manager, step, state, None, metrics=metrics)
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [2, 5, 6]  # the best (step 2) and the last two
  manager.close()


def test_model_init_starts_from_converted_pixnerd(tmp_path):
  """config.model_init: the denoiser (online and EMA) starts from a converted PixNerd checkpoint, and
  the donated train step runs on it. With warm-up, step 0 has learning rate 0, so after one step the
  online weights are still the converted ones bit for bit (a scratch init would differ everywhere)."""
  import torch

  from flowseg_jax.convert import pixnerd as pixnerd_convert
  from flowseg_jax.models import pixnerd

  config = tiny_config(total_steps=1, **{"optim.warmup_steps": 1})
  model = train_step.TrainSetup(config).task.model
  rng = np.random.default_rng(7)
  params = jax.tree.map(
    lambda a: rng.normal(0.0, 0.05, a.shape).astype(np.float32), pixnerd.abstract_params(model)
  )
  state_dict = pixnerd_convert.flax_to_torch(params, model)
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / "pixnerd.pth")
  pixnerd_convert.convert_to_orbax(tmp_path / "pixnerd.pth", tmp_path / "converted")
  config.model_init = str(tmp_path / "converted")

  train.train_and_evaluate(config, str(tmp_path / "run"))
  _, _, state, step = train_state.restore_train_state(config, str(tmp_path / "run"))
  assert step == 1
  want = params  # model_init re-lays the converted (unscanned) weights out for this scanned model
  got_online, got_ema = jax.device_get((state.params["denoiser"], state.ema_params["denoiser"]))
  jax.tree.map(np.testing.assert_array_equal, got_online, want)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), got_ema, want)
