"""The command line built on the Segmenter and the trainer: help, one-line usage errors, overrides,
commands that never overwrite results, unreadable inputs, and what a run logs (TensorBoard, the
applied learning rate, progress lines by time)."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from flowseg_jax import main, sharding, train_state, train_step
from flowseg_jax.data import pipeline, transforms
from flowseg_jax.run import progress
from tests.train_test import REPO, tiny_config


@pytest.fixture(scope="module")
def workdir(trained_workdir):
  return trained_workdir


def test_help_lists_flags_and_overrides(capsys):
  for command in ("train", "evaluate", "predict"):
    assert main.run([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "--config.FIELD=VALUE" in out, out
  assert "--input" in out and "--output" in out


def test_usage_errors_are_one_line_and_create_nothing(workdir, tmp_path, capsys):
  demo = os.path.join(REPO, "configs", "demo.py:smoke")
  new = tmp_path / "new_run"
  cases = [
    (["train", f"--config={demo}", f"--workdir={new}", "--config.optim.learning_rat=1e-3"],
     "did you mean --config.optim.learning_rate?"),
    (["train", "--config=configs/dmeo.py", f"--workdir={new}"], "configs/dmeo.py' does not exist"),
    (["train", f"--config={demo}", f"--workdir={new}", "--config.total_steps=many"], "total_steps"),
    # Configs that parse but cannot train: found before the workdir is created.
    (["train", f"--config={demo}", f"--workdir={new}", "--config.input.dataset=ade2k"],
     "config.input.dataset must be one of"),
    (["train", f"--config={demo}", f"--workdir={new}", "--config.total_steps=1"],
     "warmup_steps=2 must lie in [0, total_steps=1]"),
    (["train", f"--config={demo}", f"--workdir={new}", "--config.mesh.data=3"],
     "config.mesh: data=3 x fsdp=1 must equal the"),
    (["evaluate", f"--workdir={new}"], "does not exist"),
    (["predict", f"--workdir={tmp_path}", "--input=x.jpg", "--output=out"], "holds no checkpoint"),
    (["evaluate", f"--workdir={workdir}", "--config.eval.num_step=3"], "--config.eval.num_steps"),
    (["predict", f"--workdir={workdir}", f"--input={tmp_path / 'nope'}", f"--output={new}"],
     "neither an image file nor a folder"),
  ]  # fmt: skip
  for argv, message in cases:
    assert main.run(argv) == 2, argv
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, (argv, err)
    assert not new.exists() and not (tmp_path / "checkpoints").exists()
  assert main.run(["train", "--workdir=x"]) == 2  # argparse: --config missing
  assert "--config" in capsys.readouterr().err


def test_overrides_parse_as_the_field_type():
  config = tiny_config()
  main.apply_overrides(
    config,
    [
      ("input.image_size", "64,48"),
      ("eval.slide_stride", "(16, 8)"),
      ("input.random_flip", "false"),
      ("input.data_dir", "/data"),
      ("optim.learning_rate", "3e-4"),
      ("eval.max_examples", "5"),
    ],
  )
  assert config.input.image_size == (64, 48) and config.eval.slide_stride == (16, 8)
  assert config.input.random_flip is False and config.input.data_dir == "/data"
  assert config.optim.learning_rate == 3e-4 and config.eval.max_examples == 5


def test_evaluate_command_never_overwrites_training_results(workdir, capsys):
  training = os.path.join(workdir, "eval", "step_6.json")
  with open(training) as f:
    before = f.read()
  assert main.run(["evaluate", f"--workdir={workdir}", "--config.eval.num_steps=1"]) == 0
  assert "step_6_steps1_whole.json" in capsys.readouterr().out
  with open(training) as f:
    assert f.read() == before
  with open(os.path.join(workdir, "eval", "step_6_steps1_whole.json")) as f:
    saved = json.load(f)
  assert saved["num_steps"] == 1 and saved["step"] == 6
  assert os.listdir(os.path.join(workdir, "pictures", "step_6_steps1_whole"))
  assert os.listdir(os.path.join(workdir, "pictures", "step_6"))


def test_predict_skips_unreadable_files(workdir, tmp_path, capsys):
  src = tmp_path / "images"
  src.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(src / "a.png")
  (src / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  Image.fromarray(rng.integers(0, 255, (17, 23), dtype=np.uint8)).save(src / "c.png")
  out = tmp_path / "out"
  assert main.run(["predict", f"--workdir={workdir}", f"--input={src}", f"--output={out}"]) == 1
  captured = capsys.readouterr()
  assert "wrote 2 image(s)" in captured.out and "1 failed" in captured.out
  assert "broken.jpg" in captured.err
  assert sorted(os.listdir(out)) == sorted(
    f"{n}_{k}.png" for n in ("a", "c") for k in ("label", "mask", "overlay")
  )
  assert np.asarray(Image.open(out / "c_label.png")).shape == (17, 23)


# ------------------------------------------------------------------------------------------------
# Training's TensorBoard logs (written without TensorFlow).
# ------------------------------------------------------------------------------------------------


def _events(workdir):
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.plugins.hparams import plugin_data_pb2
  from tensorboard.util import tensor_util

  scalars, hparams = {}, {}
  for name in os.listdir(workdir):
    if not name.startswith("events.out.tfevents"):
      continue
    for event in event_file_loader.EventFileLoader(os.path.join(workdir, name)).Load():
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "hparams":
          data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
          if data.HasField("session_start_info"):
            hparams.update(data.session_start_info.hparams)
        elif value.HasField("simple_value"):
          scalars[(value.tag, event.step)] = value.simple_value
        elif value.HasField("tensor") and value.tensor.dtype == 1:  # DT_FLOAT scalars
          scalars[(value.tag, event.step)] = float(tensor_util.make_ndarray(value.tensor))
  return scalars, hparams


def test_tensorboard_gets_flat_hparams_per_class_iou_and_lr(workdir):
  scalars, hparams = _events(workdir)
  config = tiny_config()
  assert hparams["optim.learning_rate"].number_value == pytest.approx(config.optim.learning_rate)
  assert hparams["objective.transform"].string_value == "log"
  assert hparams["input.image_size"].string_value == "(32, 32)"
  with open(os.path.join(workdir, "eval", "step_6.json")) as f:
    ious = json.load(f)["per_class_IoU"]
  logged = {
    tag.split("/", 1)[1]: v for (tag, step), v in scalars.items() if tag.startswith("eval_IoU/")
  }
  assert logged == pytest.approx({k: v for k, v in ious.items() if v is not None}, abs=1e-6)
  assert ("eval/mIoU", 6) in scalars
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lrs = {r["step"]: r["learning_rate"] for r in map(json.loads, f)}
  for step, lr in lrs.items():
    assert scalars[("train/learning_rate", step)] == pytest.approx(lr, rel=1e-6)


def test_logged_learning_rate_is_the_applied_one():
  """After a skipped (non-finite) update the optimiser's count lags the step: the learning rate logged
  is the schedule at the count of applied updates."""
  config = tiny_config(**{"optim.warmup_steps": 4})  # lr(k) = k / 4 * peak for k < 4
  setup = train_step.TrainSetup(config)
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  rules = sharding.rules_from_config(config.sharding_rules)
  state, shardings = train_state.create_train_state(setup, mesh, rules, config.seed)
  step_fn = train_step.compile_train_step(setup, mesh, shardings)
  it = pipeline.create_train_iterator(config.input, seed=0)
  good = next(it)
  good.pop("num_skipped")
  bad = {**good, "image": transforms.normalize_image(good["image"])}  # float: NaN fits
  bad["image"][0, 0, 0, 0] = np.nan
  logged = []
  with jax.set_mesh(mesh):
    for batch in (good, bad, good, good):
      state, metrics = step_fn(state, sharding.shard_batch(batch, mesh), None)
      logged.append((int(metrics["skipped"]), float(metrics["learning_rate"])))
  peak = config.optim.learning_rate
  # steps 0..3; step 1 skipped, so steps 2 and 3 apply updates number 1 and 2.
  assert logged == [(0, 0.0), (1, pytest.approx(peak / 4)), (0, pytest.approx(peak / 4)),
                    (0, pytest.approx(peak / 2))]  # fmt: skip
  assert int(state.step) == 4 and int(state.num_skipped) == 1


def test_progress_lines_come_by_time_and_at_the_end(monkeypatch):
  """One line per interval whatever the item rate, one at the total; the rate and ETA from the clock."""
  lines, now = [], [0.0]
  monkeypatch.setattr(progress.logging, "info", lambda fmt, *args: lines.append(fmt % args))
  report = progress.Progress("evaluate", 100, interval=10.0, clock=lambda: now[0])
  for _ in range(100):  # 100 items over 25 s: lines at 10 s, 20 s and the end
    now[0] += 0.25
    report.update()
  assert lines == [
    "evaluate: 40/100 (4.0/s, ETA 0:00:15)",
    "evaluate: 80/100 (4.0/s, ETA 0:00:05)",
    "evaluate: 100/100 (4.0/s, ETA 0:00:00)",
  ]
  lines.clear()
  fast = progress.Progress("evaluate", 256, clock=lambda: 0.0)
  for _ in range(256):  # a fast job: the end line only
    fast.update()
  assert len(lines) == 1 and lines[0].startswith("evaluate: 256/256")
