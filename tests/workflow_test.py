"""The programs a user runs: REPA training, `flowseg evaluate` (whole and slide), `flowseg predict`."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from flowseg_jax import evaluate, inference, inference_host, predict, sharding, train, train_step
from flowseg_jax.convert import dinov2 as dinov2_convert
from flowseg_jax.data import pipeline
from flowseg_jax.models import dinov2
from tests.train_test import REPO, one_step, tiny_config


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained"))
  train.train_and_evaluate(tiny_config(), workdir)
  return workdir


def test_repa_step_trains_the_projector(tmp_path):
  teacher = dinov2.make_model("tiny/14")
  params = nn.unbox(teacher.init(jax.random.key(3), np.zeros((1, 28, 28, 3), np.float32))["params"])
  dinov2_convert.save_orbax(params, teacher.arch_config, str(tmp_path / "teacher"))
  config = tiny_config()
  config.repa.enabled = True
  config.repa.align_layer = 2
  config.repa.teacher_dir = str(tmp_path / "teacher")
  it = pipeline.create_train_iterator(config.input, seed=0)
  batch = next(it)
  batch.pop("num_skipped")
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  setup_check = train_step.TrainSetup(config)
  assert setup_check.projector.out_dim == teacher.embed_dim
  before, after, metrics, _ = one_step(config, mesh, batch)
  repa_loss = float(metrics["repa_loss"])
  assert 0.0 < repa_loss < 2.0  # 1 - cosine similarity
  np.testing.assert_allclose(
    metrics["loss"], metrics["flow_loss"] + config.repa.loss_weight * repa_loss, rtol=1e-6
  )
  moved = jax.tree.map(
    lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
    before.params["projector"],
    after.params["projector"],
  )
  assert all(v > 0 for v in jax.tree.leaves(moved))


def test_evaluate_command_writes_results(trained_workdir):
  config = tiny_config()
  result = evaluate.evaluate(config, trained_workdir)
  assert result["num_examples"] == config.input.synthetic.num_eval
  name = "step_6_steps2_whole"  # keyed by the settings: training's step_6.json is never overwritten
  assert result["path"] == os.path.join(trained_workdir, "eval", f"{name}.json")
  with open(result["path"]) as f:
    saved = json.load(f)
  assert saved["mIoU"] == pytest.approx(result["mIoU"])
  assert (saved["num_steps"], saved["mode"]) == (2, "whole")
  assert len(saved["per_class_IoU"]) == config.input.synthetic.num_classes
  pictures = os.listdir(os.path.join(trained_workdir, "pictures", name))
  assert len(pictures) == config.eval.num_pictures
  panel = np.asarray(Image.open(os.path.join(trained_workdir, "pictures", name, pictures[0])))
  assert panel.shape == (32, 4 * 32, 3)  # image | raw colours | mask | ground truth


def test_slide_windows_follow_mmseg_grid():
  windows = list(inference_host.slide_windows(48, 70, (32, 32), (16, 20)))
  # rows: (48 - 32 + 15) // 16 + 1 = 2; cols: (70 - 32 + 19) // 20 + 1 = 3, the last shifted to the border.
  assert windows == [(0, 0), (0, 20), (0, 38), (16, 0), (16, 20), (16, 38)]


def test_slide_with_one_window_equals_whole(trained_workdir):
  """When the window covers the (unresized) image, sliding-window inference is whole-image inference."""
  config = tiny_config()
  config.eval.max_examples = 4
  seg = inference.Segmenter.from_workdir(trained_workdir, config)
  whole = evaluate.score(seg)[0]
  config.eval.mode = "slide"  # the window, short side and stride follow the model's 32² size
  assert inference_host.slide_settings(config) == ((32, 32), (21, 21), 32)
  slide = evaluate.score(seg)[0]
  np.testing.assert_array_equal(whole["intersection"], slide["intersection"])
  np.testing.assert_array_equal(whole["union"], slide["union"])
  config.eval.slide_short_side, config.eval.slide_stride = 48, (16, 16)  # four overlapping windows
  overlapped = evaluate.score(seg)[0]
  assert overlapped["num_examples"] == 4 and np.isfinite(overlapped["aAcc"])


def test_slide_from_the_cli_and_an_impossible_one_in_one_line(trained_workdir, capsys):
  """`flowseg evaluate --config.eval.mode=slide` on a demo-sized workdir scores as whole does; a
  stride past the window (mmseg's ADE20K 341 on a 32² model) is one line, exit 2, nothing written."""
  from flowseg_jax import main

  base = ["evaluate", f"--workdir={trained_workdir}", "--config.eval.max_examples=4"]
  assert main.run([*base, "--config.eval.mode=whole"]) == 0
  whole = capsys.readouterr().out
  assert main.run([*base, "--config.eval.mode=slide"]) == 0
  slide = capsys.readouterr().out
  assert whole.split(":", 1)[1].split("->")[0] == slide.split(":", 1)[1].split("->")[0]
  assert main.run([*base, "--config.eval.tta=flip"]) == 0  # its own file: _flip
  flipped = capsys.readouterr().out
  assert flipped.strip().endswith("_whole_flip.json"), flipped
  with open(flipped.strip().split("-> ")[-1]) as f:
    assert json.load(f)["tta"] == "flip"
  assert main.run([*base, "--config.eval.tta=ms_flip", "--config.eval.tta_scales=(1.0,2.0)"]) == 0
  ms = capsys.readouterr().out.strip()  # other than mmseg's scales: a file of their own
  assert ms.endswith("_whole_ms_flip_x1-2.json"), ms
  with open(ms.split("-> ")[-1]) as f:
    assert json.load(f)["tta_scales"] == [1.0, 2.0]
  before = sorted(os.listdir(os.path.join(trained_workdir, "eval")))
  assert main.run([*base, "--config.eval.mode=slide", "--config.eval.slide_stride=341,341"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "slide_stride=(341, 341) must be positive and at most" in err
  assert sorted(os.listdir(os.path.join(trained_workdir, "eval"))) == before


def test_predict_folder_of_any_size(trained_workdir, tmp_path):
  src = tmp_path / "images"
  src.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(src / "a.png")
  Image.fromarray(rng.integers(0, 255, (17, 23, 3), dtype=np.uint8)).save(src / "b.jpg")
  (src / "notes.txt").write_text("not an image")
  out = tmp_path / "out"
  result = predict.predict(tiny_config(), trained_workdir, str(src), str(out))
  assert sorted(result.written) == ["a", "b"] and not result.failed
  label = np.asarray(Image.open(out / "a_label.png"))
  assert label.shape == (40, 52) and label.max() < tiny_config().input.synthetic.num_classes
  assert np.asarray(Image.open(out / "b_mask.png")).shape == (17, 23, 3)
  assert np.asarray(Image.open(out / "b_overlay.png")).shape == (17, 23, 3)
  with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
    predict.predict(tiny_config(), trained_workdir, str(tmp_path / "missing"), str(out))


def test_cli_help_and_unknown_command(capsys):
  from flowseg_jax import main

  assert main.run(["--help"]) == 0
  assert "flowseg train" in capsys.readouterr().out
  assert main.run([]) == 2  # no command: usage on stderr, the status of a usage error
  assert "flowseg train" in capsys.readouterr().err
  assert main.run(["fly"]) == 2
  assert main.run(["convert", "nothing"]) == 2
  assert os.path.exists(os.path.join(REPO, "configs", "demo.py"))
