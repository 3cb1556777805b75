"""`flowseg export`: model folders (safetensors + config.json + card) that `Segmenter.from_pretrained`
loads with the labels `from_workdir` gives, from a path or a Hub id (offline cache), converted
PixNerd weights as folders training starts from, and the StableHLO image -> labels function run by
a process that imports jax and numpy only."""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image

from flowseg_jax import inference, main, pretrained, serving, tasks
from flowseg_jax.run import files
from tests.train_test import REPO, tiny_config

PHOTO = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


@pytest.fixture(scope="module")
def workdir(trained_workdir):
  return trained_workdir


@pytest.fixture(scope="module")
def folder(workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export_folder") / "model")
  assert main.run(["export", f"--workdir={workdir}", f"--out={out}"]) == 0
  return out


@pytest.fixture(scope="module")
def from_workdir(workdir):
  return inference.Segmenter.from_workdir(workdir)


def _images():
  photo = np.asarray(Image.open(PHOTO).convert("RGB"))
  rng = np.random.default_rng(0)
  return [photo, photo[::9, ::7], rng.integers(0, 256, (32, 32, 3), np.uint8)]


def test_from_pretrained_gives_the_labels_of_from_workdir(folder, from_workdir):
  assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
  seg = inference.Segmenter.from_pretrained(folder)
  assert seg.step == from_workdir.step == 6
  assert seg.class_names == from_workdir.class_names and len(seg.class_names) == 12
  np.testing.assert_array_equal(seg.palette, from_workdir.palette)
  same = jax.tree.map(lambda a, b: np.array_equal(a, b), seg.params, from_workdir.params)
  assert all(jax.tree.leaves(same))
  for mode in ("whole", "slide"):
    a = seg.segment_batch(_images(), mode=mode)
    b = from_workdir.segment_batch(_images(), mode=mode)
    for x, y in zip(a, b, strict=True):
      np.testing.assert_array_equal(x, y)
    assert len(np.unique(a[0])) > 1  # a real prediction, not a constant map


def test_config_json_rebuilds_the_training_config(folder, workdir):
  meta = json.load(open(os.path.join(folder, "config.json")))
  trained = files.load_config(workdir)
  config = pretrained.model_config(meta)
  assert meta["format_version"] == 1 and meta["kind"] == "segmenter" and meta["task"] == "semantic"
  assert config.model.variant == trained.model.variant == "tiny/4"
  assert config.model.scan_blocks == trained.model.scan_blocks
  assert config.objective.to_dict() == trained.objective.to_dict()
  assert tuple(config.input.image_size) == tuple(trained.input.image_size) == (32, 32)
  for key in ("num_steps", "shift", "method", "mode", "tta", "batch_per_device"):
    assert config.eval[key] == trained.eval[key], key
  assert config.cond_label == trained.cond_label
  # What config.json describes is what loading it builds: a fixed point.
  task = tasks.create_task(config, tasks.Vocabulary(tuple(meta["classes"]["names"])))
  again = pretrained.describe(config, task, source=meta["source"])
  assert again == {k: v for k, v in meta.items() if k not in ("num_params", "evaluation")}
  assert meta["num_params"] == 314_323
  assert meta["classes"]["palette"][0] == [0, 0, 0] and len(meta["classes"]["centroids"]) == 12
  assert meta["evaluation"][0]["file"] == "step_6.json" and "mIoU" in meta["evaluation"][0]
  card = open(os.path.join(folder, "README.md")).read()
  assert card.startswith("---\nlibrary_name: flowseg_jax\n")
  mIoU = json.load(open(os.path.join(workdir, "eval", "step_6.json")))["percent"]["mIoU"]
  assert f"| {mIoU} |" in card and "| 11 | texture_011 |" in card


def _copy(folder, tmp_path):
  out = str(tmp_path / "copy")
  shutil.copytree(folder, out)
  return out


def test_unknown_format_version_is_refused(folder, tmp_path):
  out = _copy(folder, tmp_path)
  path = os.path.join(out, "config.json")
  meta = json.load(open(path))
  meta["format_version"] = 2
  json.dump(meta, open(path, "w"))
  with pytest.raises(pretrained.ModelFolderError, match=r"format_version 2 is not one .* \(1\)"):
    inference.Segmenter.from_pretrained(out)


def test_missing_and_mismatched_weights_are_named(folder, tmp_path):
  out = _copy(folder, tmp_path)
  os.remove(os.path.join(out, "model.safetensors"))
  with pytest.raises(pretrained.ModelFolderError, match="has no model.safetensors"):
    inference.Segmenter.from_pretrained(out)
  shutil.copy(os.path.join(folder, "model.safetensors"), out)
  path = os.path.join(out, "config.json")
  meta = json.load(open(path))
  meta["model"]["hidden_size"] = 32  # the config no longer fits the weights
  meta["architecture"]["hidden_size"] = 32
  json.dump(meta, open(path, "w"))
  with pytest.raises(
    pretrained.ModelFolderError,
    match=r"cond_blocks\.attn\.proj\.kernel: float32\[3, 64, 64\], the model wants float32\[3, 32, 32\]",
  ):
    inference.Segmenter.from_pretrained(out)
  with pytest.raises(pretrained.ModelFolderError, match="neither a model folder nor"):
    inference.Segmenter.from_pretrained(str(tmp_path / "nowhere" / "a" / "b"))


_HUB_LOAD = """
import json, sys
import numpy as np
from flowseg_jax import inference, pretrained
seg = inference.Segmenter.from_pretrained("someone/flowseg-demo")
np.save(sys.argv[1], seg(sys.argv[2]))
try:
  inference.Segmenter.from_pretrained("someone/not-cached")
except pretrained.ModelFolderError as e:
  print("REFUSED", e)
"""


def test_hub_id_loads_from_the_offline_cache(folder, from_workdir, tmp_path):
  # huggingface_hub's cache: models--{user}--{name}/snapshots/{revision}/files, refs/main -> revision.
  revision = "0123456789abcdef0123456789abcdef01234567"
  repo = tmp_path / "hub" / "models--someone--flowseg-demo"
  shutil.copytree(folder, repo / "snapshots" / revision)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(revision)
  env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
  out = str(tmp_path / "labels.npy")
  proc = subprocess.run(
    [sys.executable, "-c", _HUB_LOAD, out, PHOTO],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_array_equal(np.load(out), from_workdir(PHOTO))
  assert "REFUSED cannot get 'someone/not-cached' from the Hugging Face Hub" in proc.stdout


_SERVE = """
import sys
import jax
import numpy as np
exported = jax.export.deserialize(bytearray(open(sys.argv[1] + "/model.jax_exported", "rb").read()))
weights = dict(np.load(sys.argv[1] + "/weights.npz"))
images = np.load(sys.argv[2])
labels = [np.asarray(exported.call(weights, images[:1])), np.asarray(exported.call(weights, images))]
assert not [m for m in sys.modules if m.startswith(("flowseg_jax", "flax"))], "model code imported"
np.save(sys.argv[3], np.concatenate(labels))
"""


def test_stablehlo_runs_with_jax_alone_and_matches_the_segmenter(workdir, from_workdir, tmp_path):
  out = str(tmp_path / "serving")
  argv = ["export", f"--workdir={workdir}", f"--out={out}", "--format=stablehlo"]
  assert main.run(argv) == 0
  info = json.load(open(os.path.join(out, "serving.json")))
  assert info["inputs"]["images"] == {
    "shape": ["b", 32, 32, 3],
    "dtype": "uint8",
    "range": "[0, 255] RGB",
  }
  assert info["num_steps"] == from_workdir.config.eval.num_steps
  photo = np.asarray(Image.open(PHOTO).convert("RGB"))
  rng = np.random.default_rng(1)
  images = np.stack([photo[200:232, 200:232], *rng.integers(0, 256, (2, 32, 32, 3), np.uint8)])
  np.save(tmp_path / "images.npy", images)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(
    [sys.executable, "-c", _SERVE, out, str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
    env=env,
    cwd=tmp_path,  # not the repository: flowseg_jax is not importable by accident
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  labels = np.load(tmp_path / "out.npy")
  want = np.stack(from_workdir.segment_batch(list(images)))
  assert labels.dtype == np.int32 and labels.shape == (4, 32, 32)
  np.testing.assert_array_equal(labels[1:], want)  # batch 3
  np.testing.assert_array_equal(labels[0], want[0])  # batch 1, the same program
  # A model folder exports the same function; a fixed batch is a fixed shape.
  exported, _ = serving.export_segmenter(inference.Segmenter.from_workdir(workdir), batch=2)
  assert exported.in_avals[-1].shape == (2, 32, 32, 3)


def test_export_command_refuses_bad_input_in_one_line(workdir, folder, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  cases = [
    ([f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'o1'}"], "does not exist"),
    ([f"--workdir={empty}", f"--out={tmp_path / 'o2'}"], "holds no checkpoint"),
    ([f"--workdir={workdir}", f"--out={folder}"], "already holds files"),
    ([f"--workdir={workdir}", f"--out={tmp_path / 'o3'}", "--format=onnx"], "invalid choice"),
    ([f"--workdir={workdir}", f"--out={tmp_path / 'o4'}", "--batch=many"], "--batch"),
  ]
  for argv, message in cases:
    capsys.readouterr()
    assert main.run(["export", *argv]) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], (argv, err)
    assert err[-1].startswith(("flowseg export: error:", "usage:")) or "error:" in err[-1]
  assert not (tmp_path / "o2").exists() and not (tmp_path / "o4").exists()


def test_push_to_hub_uploads_the_folder(workdir, tmp_path, monkeypatch, capsys):
  import huggingface_hub

  calls = []

  class FakeApi:
    def create_repo(self, repo_id, private, exist_ok):
      calls.append(("create", repo_id, private, exist_ok))

    def upload_folder(self, folder_path, repo_id, commit_message):
      calls.append(("upload", repo_id, sorted(os.listdir(folder_path))))
      return "https://huggingface.co/someone/demo/commit/abc"

  monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
  out = tmp_path / "model"
  argv = ["export", f"--workdir={workdir}", f"--out={out}", "--push_to_hub=someone/demo"]
  assert main.run(argv) == 0
  assert calls == [
    ("create", "someone/demo", False, True),
    ("upload", "someone/demo", ["README.md", "config.json", "model.safetensors"]),
  ]
  assert 'Segmenter.from_pretrained("someone/demo")' in (out / "README.md").read_text()
  assert "pushed to https://huggingface.co/someone/demo/commit/abc" in capsys.readouterr().out


def test_converted_pixnerd_weights_export_as_a_model_init_folder(tmp_path):
  from safetensors import numpy as st

  from flowseg_jax.convert import dinov2 as dinov2_convert
  from flowseg_jax.convert import pixnerd as convert
  from flowseg_jax.models import pixnerd

  model = pixnerd.make_model("tiny/4", num_classes=3, scan_blocks=False)
  x = np.zeros((1, 32, 32, 3), np.float32)
  params = model.init(jax.random.key(3), x, np.zeros((1,), np.float32), np.zeros((1,), np.int32))
  rng = np.random.default_rng(0)
  dims = [(64, 32), (32, 32), (32, 16)]
  projector = {
    f"layers_{i}": {
      "kernel": rng.normal(size=d).astype(np.float32),
      "bias": np.ones(d[1], np.float32),
    }
    for i, d in zip((0, 2, 4), dims)
  }
  official = {
    **{
      f"ema_denoiser.{k}": v
      for k, v in convert.flax_to_torch(nn.unbox(params["params"]), model).items()
    },
    **dinov2_convert.projector_to_torch(projector),
  }
  st.save_file(official, str(tmp_path / "official.safetensors"))
  convert.convert_to_orbax(tmp_path / "official.safetensors", tmp_path / "converted")
  out = tmp_path / "exported"
  assert main.run(["export", f"--workdir={tmp_path / 'converted'}", f"--out={out}"]) == 0
  meta = json.load(open(out / "config.json"))
  assert meta["kind"] == "pixnerd" and meta["architecture"] == model.arch_config()
  a_model, a = convert.load_converted(tmp_path / "converted")
  b_model, b = convert.load_converted(out)
  assert a_model == b_model
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
  assert meta["projector"] == "projector.safetensors"
  exported_projector = convert.load_converted_projector(out)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, exported_projector, projector)))
  # A backbone folder is what training starts from, not a segmenter.
  with pytest.raises(pretrained.ModelFolderError, match="--config.model_init"):
    inference.Segmenter.from_pretrained(str(out))
  config = tiny_config()
  config.model.num_classes = 3
  config.model.variant = "tiny/4"
  task = tasks.create_task(config)
  started = task.pretrained_params(str(out))
  assert all(
    jax.tree.leaves(
      jax.tree.map(np.array_equal, started, task.pretrained_params(str(tmp_path / "converted")))
    )
  )


@pytest.fixture(scope="module")
def prompted_workdir(tmp_path_factory):
  from flowseg_jax import defaults, train

  workdir = str(tmp_path_factory.mktemp("export_rlfseg"))
  train.train_and_evaluate(defaults.load_config_file("configs/rlfseg/demo.py", "smoke"), workdir)
  return workdir


def test_prompted_model_folder_and_stablehlo_keep_the_prompts(prompted_workdir, tmp_path):
  out, hlo = str(tmp_path / "model"), str(tmp_path / "serving")
  assert main.run(["export", f"--workdir={prompted_workdir}", f"--out={out}"]) == 0
  assert main.run(["export", f"--workdir={out}", f"--out={hlo}", "--format=stablehlo"]) == 0
  meta = json.load(open(os.path.join(out, "config.json")))
  ref = inference.Segmenter.from_workdir(prompted_workdir)
  seg = inference.Segmenter.from_pretrained(out)
  assert meta["task"] == "prompted" and meta["prompted"]["prompts"] == ref.prompts == seg.prompts
  assert meta["prompted"]["prompt_features"] is None  # 'table': the prompts are learned weights
  assert meta["architecture"]["num_prompts"] == len(ref.prompts)
  rng = np.random.default_rng(2)
  size = tuple(ref.config.input.image_size)
  images = rng.integers(0, 256, (3, *size, 3), np.uint8)
  prompts = [0, 2, len(ref.prompts) - 1]
  want = np.stack(ref.segment_batch(list(images), prompts=prompts))
  np.testing.assert_array_equal(np.stack(seg.segment_batch(list(images), prompts=prompts)), want)
  exported = jax.export.deserialize(
    bytearray(open(os.path.join(hlo, "model.jax_exported"), "rb").read())
  )
  weights = dict(np.load(os.path.join(hlo, "weights.npz")))
  labels = exported.call(weights, images, np.asarray(prompts, np.int32))
  np.testing.assert_array_equal(np.asarray(labels), want)
  info = json.load(open(os.path.join(hlo, "serving.json")))
  assert info["inputs"]["prompt_ids"]["prompts"] == ref.prompts


def test_cached_prompt_features_come_from_the_vocabulary():
  from flowseg_jax import defaults

  config = defaults.load_config_file("configs/rlfseg/demo.py", "smoke")
  config.prompted.condition = "cache"  # no encoder_dir: the features must come from the folder
  t2i = tasks.create_task(defaults.load_config_file("configs/rlfseg/demo.py", "smoke")).model.t2i
  features = np.random.default_rng(0).normal(size=(3, t2i.text_length, t2i.text_dim))
  vocab = tasks.Vocabulary(
    ("background", "foreground"), ("a", "b", "c"), features.astype(np.float32)
  )
  task = tasks.create_task(config, vocab)
  assert task.prompts == ["a", "b", "c"] and task.model.num_prompts == 0
  np.testing.assert_array_equal(np.asarray(task.features), features.astype(np.float32))
  meta = pretrained.describe(config, task)
  assert meta["prompted"]["prompt_features"] == "prompt_features.safetensors"
  assert meta["prompted"]["text_encoder"] is None and meta["classes"]["names"] == [
    "background",
    "foreground",
  ]
  np.testing.assert_array_equal(task.vocabulary().prompt_features, features.astype(np.float32))


def test_model_folder_on_gcs(folder, from_workdir, workdir, gcs_bucket):
  out = f"{gcs_bucket}/export/model"
  assert main.run(["export", f"--workdir={workdir}", f"--out={out}"]) == 0
  seg = inference.Segmenter.from_pretrained(out)
  np.testing.assert_array_equal(seg(PHOTO), from_workdir(PHOTO))
  assert main.run(["export", f"--workdir={workdir}", f"--out={out}"]) == 2  # already holds files
