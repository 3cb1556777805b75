"""Your own data: folder datasets (mmseg's layout, images/ + masks/, a saved Hugging Face dataset)
through the CLI, their mask encodings to the pixel, and the pre-flight's one-line messages."""

import json
import os
import pickle
import shutil
import types

import numpy as np
import pytest
from PIL import Image

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import defaults, main, pretrained, scoring, tasks
from flowseg_jax.data import datasets, folder, pipeline, preflight, sources
from flowseg_jax.evaluators import miou
from tools.make_folder_dataset import write_folder_dataset

from . import data_testutil as tu

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG, DEMO = os.path.join(CONFIGS, "folder.py"), os.path.join(CONFIGS, "demo.py")
SIZE = (24, 24)


def _cfg(data_dir, **folder_fields):
  cfg = pipeline.default_input_config()
  cfg.dataset = "folder"
  cfg.data_dir = str(data_dir)
  cfg.image_size = SIZE
  for k, v in folder_fields.items():
    if k in cfg.folder:
      cfg.folder[k] = v
    else:
      cfg[k] = v
  return cfg


def _eval_labels(cfg) -> dict[str, np.ndarray]:
  return {
    e["name"]: e["label"]
    for e in pipeline.create_eval_dataset(cfg, process_index=0, process_count=1)
  }


def _write(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


# ---------------------------------------------------------------------------------------------
# Training and evaluation from the command line.
# ---------------------------------------------------------------------------------------------


def test_folder_config_is_the_demo_on_a_folder():
  config, demo = defaults.load_config_file(CONFIG), defaults.load_config_file(DEMO)
  assert config.input.dataset == "folder" and tuple(config.input.image_size) == (64, 64)
  assert config.model.variant == "tiny/8" and config.total_steps == 1500
  assert config.optim.to_dict() == demo.optim.to_dict()
  smoke, demo_smoke = (
    defaults.load_config_file(CONFIG, "smoke"),
    defaults.load_config_file(DEMO, "smoke"),
  )
  demo_smoke.input.dataset = "folder"
  assert smoke.to_dict() == demo_smoke.to_dict()


@pytest.mark.parametrize("layout", ["mmseg", "images"])
def test_folder_trains_and_evaluates_from_the_cli(tmp_path, layout):
  data, workdir = tmp_path / "data", str(tmp_path / "run")
  write_folder_dataset(str(data), num_train=8, num_val=3, size=SIZE, layout=layout)
  argv = ["--workdir", workdir, f"--config.input.data_dir={data}"]
  assert main.run(["train", "--config", f"{CONFIG}:smoke", *argv]) == 0
  names = ["step_6.json"]
  if layout == "mmseg":  # once is enough: evaluate reads the run's config.json, classes and all
    assert main.run(["evaluate", *argv, "--config.eval.num_steps=1"]) == 0
    names.append("step_6_steps1_whole.json")
  for name in names:
    result = json.loads(open(os.path.join(workdir, "eval", name)).read())
    assert list(result["per_class_IoU"]) == ["texture_000", "texture_001", "texture_002"]
    assert result["num_examples"] == 3 and 0.0 <= result["mIoU"] <= 1.0
  assert sorted(os.listdir(os.path.join(workdir, "pictures", "step_6"))) == [
    "val_0000.png",
    "val_0001.png",
  ]


def test_hugging_face_dataset_reads_as_the_folder_does(tmp_path):
  pytest.importorskip("datasets")
  expected = write_folder_dataset(str(tmp_path / "files"), num_train=6, num_val=3, size=SIZE)
  write_folder_dataset(str(tmp_path / "hf"), num_train=6, num_val=3, size=SIZE, layout="hf")
  files, hf = _cfg(tmp_path / "files"), _cfg(tmp_path / "hf")
  assert folder.resolve_layout(hf.data_dir, "auto") == "hf"
  assert (
    datasets.class_names(hf)
    == datasets.class_names(files)
    == list(f"texture_00{k}" for k in range(3))
  )
  got, want = _eval_labels(hf), _eval_labels(files)
  assert list(got) == list(want) == ["val_0000", "val_0001", "val_0002"]  # names: the file stems
  for name, label in got.items():
    np.testing.assert_array_equal(label, want[name])
    np.testing.assert_array_equal(label, expected["val"][name])
  for cfg in (hf, files):
    cfg.batch_size = 3
  a = next(pipeline.create_train_iterator(files, seed=1, process_index=0, process_count=1))
  b = next(pipeline.create_train_iterator(hf, seed=1, process_index=0, process_count=1))
  np.testing.assert_array_equal(a["label"], b["label"])
  np.testing.assert_array_equal(a["image"], b["image"])
  src, _ = folder.folder_source(hf, "validation")  # grain workers get a pickled copy
  copy = pickle.loads(pickle.dumps(src))
  assert copy[1]["name"] == "val_0001" and copy[1]["label"] == src[1]["label"]
  report = pipeline.check_split(hf, "train", process_index=0, process_count=1)
  assert report.num_examples == 6 and not report.bad
  with pytest.raises(ValueError, match="has no column 'mask'.*label_column"):
    datasets.num_train_examples(_cfg(tmp_path / "hf", label_column="mask"))


# ---------------------------------------------------------------------------------------------
# Mask encodings, to the pixel.
# ---------------------------------------------------------------------------------------------


def _one_mask_dataset(root, raw, *, classes="a\nb\nc\n", classes_json=None, mode=None):
  """An images/ + masks/ dataset of one val example whose mask is `raw` (saved in `mode`)."""
  h, w = np.asarray(raw).shape[:2]
  _write(
    os.path.join(root, "images", "val", "x.jpg"), tu.smooth_image(np.random.default_rng(0), h, w)
  )
  if isinstance(raw, Image.Image):
    os.makedirs(os.path.join(root, "masks", "val"), exist_ok=True)
    raw.save(os.path.join(root, "masks", "val", "x.png"))
  else:
    _write(os.path.join(root, "masks", "val", "x.png"), raw, mode)
  if classes_json is not None:
    with open(os.path.join(root, "classes.json"), "w") as f:
      json.dump(classes_json, f)
  elif classes is not None:
    with open(os.path.join(root, "classes.txt"), "w") as f:
      f.write(classes)
  return root


def test_colour_masks_map_through_the_palette(tmp_path):
  palette = [[200, 0, 0], [0, 180, 0], [10, 10, 250]]
  ids = np.array([[0, 1, 2, 255], [2, 2, 1, 0]], np.uint8)
  table = np.array([*palette, *[[0, 0, 0]] * 252, [255, 255, 255]], np.uint8)
  meta = {"classes": ["a", "b", "c"], "palette": palette, "ignore_colours": [[255, 255, 255]]}
  rgb = _one_mask_dataset(str(tmp_path / "rgb"), table[ids], classes_json=meta)
  np.testing.assert_array_equal(_eval_labels(_cfg(rgb))["x"], ids)
  np.testing.assert_array_equal(datasets.dataset_palette(_cfg(rgb)), palette)
  # A palette-mode PNG whose indices are NOT the classes (index 7 is drawn in class 0's colour...):
  # mask_format='palette' reads the colours; 'auto' reads the indices, as mmseg does.
  order = np.array([7, 3, 5], np.uint8)
  p_mode = Image.frombytes("P", (4, 2), np.where(ids == 255, 9, order[ids % 3]).tobytes())
  pal = np.zeros((256, 3), np.uint8)
  pal[order] = palette
  pal[9] = (255, 255, 255)
  p_mode.putpalette(pal.tobytes())
  p_root = _one_mask_dataset(str(tmp_path / "p"), p_mode, classes_json=meta)
  np.testing.assert_array_equal(_eval_labels(_cfg(p_root, mask_format="palette"))["x"], ids)
  with pytest.raises(sources.BadExampleError, match=r"values \[3, 5, 7, 9\]"):
    _eval_labels(_cfg(p_root))
  # A colour outside the palette: the file, the colour, the fix.
  bad = table[ids].copy()
  bad[0, 0] = (1, 2, 3)
  root = _one_mask_dataset(str(tmp_path / "bad"), bad, classes_json=meta)
  mask = os.path.join(root, "masks", "val", "x.png")
  with pytest.raises(sources.BadExampleError) as info:
    _eval_labels(_cfg(root))
  assert str(info.value) == (
    f"mask {mask}: 1 colour(s) are no class's colour in {root}/classes.json, e.g. (1, 2, 3) "
    "(1 pixels); fix: add them to 'palette' (or to 'ignore_colours'), or repaint those pixels "
    "(anti-aliased edges and JPEG masks make new colours: save masks as PNG)."
  )


def test_reduce_zero_label_and_binary(tmp_path):
  raw = np.array([[0, 1, 2, 3], [255, 3, 0, 1]], np.uint8)
  root = _one_mask_dataset(str(tmp_path / "reduce"), raw)
  np.testing.assert_array_equal(
    _eval_labels(_cfg(root, reduce_zero_label=True))["x"], [[255, 0, 1, 2], [255, 2, 255, 0]]
  )
  with pytest.raises(sources.BadExampleError, match=r"values \[3\] \(2 pixels\)"):
    _eval_labels(_cfg(root))  # 3 classes without reduce_zero_label: 3 is out of range
  # 0/255 object masks: binary=True reads 255 as class 1 of ('background', 'foreground').
  binary = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)
  root = _one_mask_dataset(str(tmp_path / "binary"), binary, classes=None)
  cfg = _cfg(root, binary=True)
  assert datasets.class_names(cfg) == ["background", "foreground"]
  np.testing.assert_array_equal(_eval_labels(cfg)["x"], [[0, 1, 1], [0, 0, 1]])
  with pytest.raises(ValueError, match="names no classes: write .*classes.txt"):
    datasets.num_classes(_cfg(root))


# ---------------------------------------------------------------------------------------------
# The pre-flight: every bad case in one line naming the file and the fix, or skipped and counted.
# ---------------------------------------------------------------------------------------------

_BAD = ("value", "binary", "size", "no_mask", "no_image", "rgb")


def _bad_dataset(root: str, case: str) -> None:
  write_folder_dataset(root, num_train=4, num_val=2, size=SIZE)
  ann = os.path.join(root, "ann_dir", "train", "train_0001.png")
  img = os.path.join(root, "img_dir", "train", "train_0001.jpg")
  if case == "value":
    _write(ann, np.full(SIZE, 5))
  elif case == "size":
    _write(ann, np.zeros((20, 24)))
  elif case == "no_mask":
    os.remove(ann)
  elif case == "no_image":
    os.remove(img)
  elif case == "rgb":
    _write(ann, np.zeros((*SIZE, 3)))
  elif case == "binary":  # every mask 0/255, as object masks are often saved
    for split in ("train", "val"):
      d = os.path.join(root, "ann_dir", split)
      for n in os.listdir(d):
        label = np.array(Image.open(os.path.join(d, n)))
        _write(os.path.join(d, n), np.where(label == 1, 255, 0))


def _messages(d: str) -> dict[str, str]:
  ann, img = f"{d}/ann_dir/train/train_0001.png", f"{d}/img_dir/train/train_0001.jpg"
  skip = " (config.input.on_bad_example='skip' would leave bad examples out)"
  return {
    "value": f"folder annotation {ann}: values [5] (576 pixels) outside the dataset's range; "
    f"expected 0..2 (the 3 classes of {d}/classes.txt) or 255 (ignore); fix: name every class in "
    f"{d}/classes.txt, or set config.input.folder.reduce_zero_label=True if 0 marks unlabelled "
    "pixels and the classes start at 1." + skip,
    "binary": f"every mask of the train split holds only 0 and 255, e.g. "
    f"{d}/ann_dir/train/train_0000.png: read as class 0 and ignore, nothing else would be learnt. "
    "Binary 0/255 masks? Set config.input.folder.binary=True (255 -> class 1 of 2), or store "
    "class ids 0..2 with 255 = ignore.",
    "size": f"annotation {ann} is 20x24 but its image {img} is 24x24 (HxW); a mask must have its "
    "image's size (re-export it, or resize it with nearest-neighbour)." + skip,
    "no_mask": f"folder: image {img} has no mask {ann}; add it, or remove the image." + skip,
    "no_image": f"folder: mask {ann} has no image train_0001.* in {d}/img_dir/train; add the "
    "image, or remove the mask." + skip,
    "rgb": f"mask {ann} has mode RGB (colours), and {d}/classes.txt gives no class colours; fix: "
    "save index masks (grey or palette PNG, pixel = class id), or give one [r, g, b] per class as "
    "'palette' in classes.json and leave mask_format='auto'." + skip,
  }


@pytest.fixture(scope="module")
def bad_datasets(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad")
  for case in _BAD:
    _bad_dataset(str(root / case), case)
  return root


@pytest.mark.parametrize("case", _BAD)
def test_bad_mask_stops_training_in_one_line(bad_datasets, tmp_path, capfd, case):
  data = str(bad_datasets / case)
  argv = ["train", "--config", f"{CONFIG}:smoke", "--workdir", str(tmp_path / "run")]
  assert main.run([*argv, f"--config.input.data_dir={data}"]) == 1
  err = capfd.readouterr().err.strip().splitlines()[-1]
  assert err == f"flowseg train: training data (train split, pre-flight): {_messages(data)[case]}"
  assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.parametrize("case", [c for c in _BAD if c != "binary"])
def test_bad_mask_is_skipped_and_counted(bad_datasets, case):
  cfg = _cfg(bad_datasets / case, on_bad_example="skip", batch_size=3)
  report = pipeline.check_split(cfg, "train", process_index=0, process_count=1)
  assert len(report.bad) == 1 and report.bad[0][0] == "train_0001"
  assert report.bad[0][1] == _messages(str(bad_datasets / case))[case].split(" (config.")[0]
  assert report.num_examples == (3 if case == "no_image" else 4)
  # Training skips it too, and counts it: one epoch of 3 good examples.
  batch = next(pipeline.create_train_iterator(cfg, seed=0, process_index=0, process_count=1))
  assert batch["image"].shape[0] == 3 and int(batch["num_skipped"]) in (0, 1)


def test_binary_masks_are_refused_even_when_skipping(bad_datasets, tmp_path):
  cfg = _cfg(bad_datasets / "binary", on_bad_example="skip")
  with pytest.raises(preflight.SplitError, match="holds only 0 and 255"):
    pipeline.check_split(cfg, "train", process_index=0, process_count=1)
  data = shutil.copytree(bad_datasets / "binary", tmp_path / "binary")
  (data / "classes.txt").write_text("background\nobject\n")
  report = pipeline.check_split(_cfg(data, binary=True), "train")
  assert report.histogram[1] > 0 and report.histogram[255] == 0 and not report.bad


def test_preflight_shares_the_split_out_over_processes(bad_datasets):
  cfg = _cfg(bad_datasets / "value", on_bad_example="skip")
  reports = [pipeline.check_split(cfg, "train", process_index=i, process_count=2) for i in (0, 1)]
  assert [r.num_examples for r in reports] == [2, 2]  # examples 0, 2 and 1, 3
  assert [len(r.bad) for r in reports] == [0, 1]
  whole = pipeline.check_split(cfg, "train", process_index=0, process_count=1)
  np.testing.assert_array_equal(reports[0].histogram + reports[1].histogram, whole.histogram)
  assert whole.histogram.sum() == 3 * SIZE[0] * SIZE[1]


def test_classes_file_errors_are_config_errors(tmp_path, capfd):
  data = tmp_path / "data"
  write_folder_dataset(str(data), num_train=2, num_val=1, size=SIZE)
  (data / "classes.txt").write_text("cat\ndog\ncat\n")
  argv = ["train", "--config", f"{CONFIG}:smoke", "--workdir", str(tmp_path / "run")]
  assert main.run([*argv, f"--config.input.data_dir={data}"]) == 2
  assert capfd.readouterr().err.strip().endswith(f"{data}/classes.txt: class names repeat: ['cat']")
  os.remove(data / "classes.txt")
  (data / "classes.json").write_text(json.dumps({"classes": ["a", "b"], "palette": [[0, 0, 0]]}))
  with pytest.raises(ValueError, match=r"'palette' must hold \[r, g, b\] colours \(0..255\), 2 in"):
    datasets.palette(_cfg(data))


# ---------------------------------------------------------------------------------------------
# The raw ADE20K source gets the same pre-flight.
# ---------------------------------------------------------------------------------------------


def test_ade20k_names_the_empty_folder_and_reports_a_png_image(tmp_path):
  base = tu.write_ade20k(str(tmp_path), {"validation": tu.ade20k_files(3, "validation", 0)})
  cfg = pipeline.default_input_config()
  cfg.dataset, cfg.data_dir, cfg.eval_split = "ade20k", str(tmp_path), "validation"
  folder_ = os.path.join(base, "images", "validation")
  png = os.path.join(folder_, "ADE_val_00000002.png")
  Image.open(os.path.join(folder_, "ADE_val_00000002.jpg")).save(png)
  os.remove(os.path.join(folder_, "ADE_val_00000002.jpg"))
  with pytest.raises(sources.BadExampleError) as info:
    pipeline.check_split(cfg, "validation", process_index=0, process_count=1)
  assert str(info.value) == (
    f"ADE20K: image {png} is not a .jpg file, which this layout holds; convert it (or remove it)."
  )
  cfg.on_bad_example = "skip"
  report = pipeline.check_split(cfg, "validation", process_index=0, process_count=1)
  assert report.num_examples == 2 and len(report.bad) == 2  # the PNG, and its mask left alone
  assert "ADE_val_00000002.png has no image" in report.bad[1][1]
  shutil.rmtree(folder_)
  os.makedirs(folder_)
  with pytest.raises(FileNotFoundError) as info:
    pipeline.check_split(cfg, "validation", process_index=0, process_count=1)
  assert str(info.value) == f"ADE20K: no images found in {folder_} (looked for .jpg files)."


PALETTE = [[200, 0, 0], [0, 180, 0], [10, 10, 250]]


def _palette_config(tmp_path):
  """The folder smoke config on a dataset whose classes.json gives names and colours."""
  root = _one_mask_dataset(
    str(tmp_path / "data"),
    np.zeros((2, 2)),
    classes_json={"classes": ["sky", "sea", "boat"], "palette": PALETTE},
  )
  config = defaults.load_config_file(CONFIG, "smoke")
  config.input.data_dir = root
  return config


def test_class_names_and_palette_reach_the_eval_json_pictures_and_writer(tmp_path):
  palette = PALETTE
  config = _palette_config(tmp_path)
  segmenter = types.SimpleNamespace(config=config, palette=tasks.create_task(config).palette)
  evaluator = miou.MiouEvaluator(segmenter)
  label, pred = np.array([[0, 1], [2, 255]]), np.array([[0, 1], [1, 0]])
  evaluator.pictures = [
    ("x", np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 3), np.float32), pred, label)
  ]
  result = miou.compute_metrics(scoring.confusion_matrix(pred, label, 3))
  result.update(num_examples=1, num_skipped_examples=0)

  class Writer:
    def write_scalars(self, step, scalars):
      self.scalars = scalars

    def write_images(self, step, images):
      self.images = images

  writer = Writer()
  path = evaluator.write(str(tmp_path / "run"), "step_1", 1, result, {"tta": "none"}, writer)
  assert json.loads(open(path).read())["per_class_IoU"] == {"sky": 1.0, "sea": 0.5, "boat": 0.0}
  assert {k for k in writer.scalars if k.startswith("eval_IoU/")} == {
    "eval_IoU/sky", "eval_IoU/sea", "eval_IoU/boat"
  }  # fmt: skip
  panel = np.array(Image.open(tmp_path / "run" / "pictures" / "step_1" / "x.png"))
  np.testing.assert_array_equal(
    panel[:, 4:6].reshape(-1, 3)[:3], [palette[0], palette[1], palette[1]]
  )
  np.testing.assert_array_equal(
    panel[:, 6:8].reshape(-1, 3)[:3], [palette[0], palette[1], palette[2]]
  )
  np.testing.assert_array_equal(writer.images["eval/x"][0], panel)


def test_classes_json_palette_colours_predictions_and_travels_with_the_model(tmp_path):
  palette = PALETTE
  config = _palette_config(tmp_path)
  task = tasks.create_task(config)
  np.testing.assert_array_equal(task.palette, palette)
  # The model folder's config.json records it, and a task rebuilt from the folder (no dataset)
  # draws in it: predict's masks and overlays use the user's colours, not the centroids'.
  folder = tmp_path / "model"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(pretrained.describe(config, task)))
  _, _, loaded_config, vocab = pretrained.read_segmenter(str(folder))
  loaded_config.input.data_dir = str(tmp_path / "gone")
  rebuilt = tasks.create_task(loaded_config, vocab)
  np.testing.assert_array_equal(rebuilt.palette, palette)
  assert rebuilt.palette.dtype == np.uint8
  # Without classes.json colours: the centroid colours, as before.
  plain = _one_mask_dataset(str(tmp_path / "plain"), np.zeros((2, 2)), classes="a\nb\nc\n")
  config.input.data_dir = plain
  np.testing.assert_array_equal(
    tasks.create_task(config).palette,
    centroids_lib.palette(tasks.create_task(config).decode_centroids),
  )
