"""TFDS builders: prepare ArrayRecord from fake manual downloads (no TensorFlow), read back exactly
through the grain pipeline; clear errors when not prepared or when a file is bad."""

import glob
import os
import sys

import numpy as np
import pytest

from flowseg_jax.data import datasets, pipeline, sources, tfds_builders

from . import data_testutil as tu


def _ade_manual(manual_dir: str, seed: int = 0, n_train: int = 3, n_val: int = 2):
  """ADEChallengeData2016.zip as downloaded; returns the files written."""
  files = {
    "training": tu.ade20k_files(n_train, "training", seed),
    "validation": tu.ade20k_files(n_val, "validation", seed + 1),
  }
  members = {}
  for split, fs in files.items():
    for stem, (jpg, png, _) in fs.items():
      members[f"ADEChallengeData2016/images/{split}/{stem}.jpg"] = jpg
      members[f"ADEChallengeData2016/annotations/{split}/{stem}.png"] = png
  tu.write_zip(os.path.join(manual_dir, "ADEChallengeData2016.zip"), members)
  return files


def _cfg(dataset, data_dir, manual_dir=None, **kw):
  cfg = pipeline.default_input_config()
  cfg.update(dataset=dataset, data_dir=data_dir, manual_dir=manual_dir, **kw)
  return cfg


def test_ade20k150_prepares_from_zip_and_reads_back_exactly(tmp_path):
  files = _ade_manual(str(tmp_path / "manual"))
  cfg = _cfg("tfds_ade20k", str(tmp_path / "tfds"), str(tmp_path / "manual"), image_size=(8, 8))
  # Prepared on first use (single process, manual_dir set), as ArrayRecord, without TensorFlow (checked
  # when no earlier test in this process imported it: clu's writers do).
  tf_loaded_before = "tensorflow" in sys.modules
  examples = list(pipeline.create_eval_dataset(cfg, process_index=0, process_count=1))
  assert glob.glob(str(tmp_path / "tfds" / "ade20k150" / "1.0.0" / "*.array_record-*"))
  assert tf_loaded_before or "tensorflow" not in sys.modules
  assert sorted(e["name"] for e in examples) == sorted(files["validation"])
  for ex in examples:
    jpg, _, expected = files["validation"][ex["name"]]
    np.testing.assert_array_equal(ex["image_orig"], tu.decode_rgb(jpg))
    np.testing.assert_array_equal(ex["label"], expected)
  assert datasets.num_eval_examples(cfg) == 2 and datasets.num_train_examples(cfg) == 3
  batch = next(pipeline.create_train_iterator(cfg, seed=0, process_index=0, process_count=1))
  assert batch["image"].shape == (32, 8, 8, 3) and batch["label"].dtype == np.int32
  assert np.isin(batch["label"], np.append(np.arange(150), 255)).all()
  # Two processes: disjoint, complete halves of the validation split.
  halves = [
    [e["name"] for e in pipeline.create_eval_dataset(cfg, process_index=i, process_count=2)]
    for i in (0, 1)
  ]
  assert not set(halves[0]) & set(halves[1])
  assert sorted(halves[0] + halves[1]) == sorted(files["validation"])


@pytest.mark.parametrize("archives", [True, False])
def test_coco_stuff164k_prepares_from_archives_or_folders(tmp_path, archives):
  files = {"train2017": tu.coco_files(2, 11, 9), "val2017": tu.coco_files(3, 12, 139)}
  manual = tmp_path / "manual"
  if archives:  # train2017.zip, val2017.zip, stuffthingmaps_trainval2017.zip (raw maps)
    maps = {}
    for split, fs in files.items():
      tu.write_zip(str(manual / f"{split}.zip"), {f"{split}/{k}.jpg": v[0] for k, v in fs.items()})
      maps.update({f"{split}/{k}.png": v[1] for k, v in fs.items()})
    tu.write_zip(str(manual / "stuffthingmaps_trainval2017.zip"), maps)
  else:  # mmseg layout with only the converted *_labelTrainIds.png
    tu.write_coco_stuff(str(manual), files, raw=False, train_ids=True)
  if archives:
    tfds_builders.prepare("coco_stuff164k", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  else:  # the command line
    tfds_builders.main(
      ["--dataset=coco_stuff164k", f"--manual_dir={manual}", f"--data_dir={tmp_path / 'tfds'}"]
    )
  cfg = _cfg("tfds_coco_stuff", str(tmp_path / "tfds"))
  examples = list(pipeline.create_eval_dataset(cfg, process_index=0, process_count=1))
  assert sorted(e["name"] for e in examples) == sorted(files["val2017"])
  for ex in examples:
    jpg, _, _, expected = files["val2017"][ex["name"]]
    np.testing.assert_array_equal(ex["image_orig"], tu.decode_rgb(jpg))
    np.testing.assert_array_equal(ex["label"], expected)
  assert datasets.num_classes(cfg) == 171


def test_not_prepared_is_a_clear_error_and_nothing_is_downloaded(tmp_path):
  cfg = _cfg("tfds_ade20k", str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="not prepared") as info:
    pipeline.create_eval_dataset(cfg, process_index=0, process_count=1)
  assert "python -m flowseg_jax.data.tfds_builders --dataset=ade20k150" in str(info.value)
  # With a manual_dir but several processes: no implicit preparation either.
  _ade_manual(str(tmp_path / "manual"))
  cfg.manual_dir = str(tmp_path / "manual")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    pipeline.create_eval_dataset(cfg, process_index=0, process_count=2)
  assert not os.path.exists(tmp_path / "empty" / "downloads" / "ADEChallengeData2016.zip")


def test_bad_file_at_preparation(tmp_path):
  manual = tmp_path / "manual" / "ADEChallengeData2016"
  files = {"validation": tu.ade20k_files(3, "validation", 4)}
  tu.write_ade20k(str(tmp_path / "manual"), files)
  bad = manual / "annotations" / "validation" / "ADE_val_00000003.png"
  bad.write_bytes(tu.png_bytes(np.full((24, 32), 151, np.uint8)))  # 151 > 150
  with pytest.raises(sources.BadExampleError, match="ADE_val_00000003.png"):
    tfds_builders.prepare(
      "ade20k150", data_dir=str(tmp_path / "a"), manual_dir=str(tmp_path / "manual")
    )
  tfds_builders.prepare(
    "ade20k150", data_dir=str(tmp_path / "b"), manual_dir=str(tmp_path / "manual"),
    on_bad_example="skip",
  )  # fmt: skip
  src = tfds_builders.load_source("ade20k150", "validation", data_dir=str(tmp_path / "b"))
  assert len(src) == 2
  assert sorted(src[i]["name"] for i in range(2)) == ["ADE_val_00000001", "ADE_val_00000002"]
