"""The RefCOCO source on a tiny fake layout: polygons, RLE (both kinds), prompts, pipeline."""

import json

import ml_collections
import numpy as np
from PIL import Image

from flowseg_jax.data import datasets, pipeline, refcoco_source


def _encode_counts(counts):
  """COCO's rleToString, written from its description: the test's independent encoder."""
  out = []
  for i, x in enumerate(counts):
    if i > 2:
      x -= counts[i - 2]
    more = True
    while more:
      c = x & 0x1F
      x >>= 5
      more = (x != -1) if (c & 0x10) else (x != 0)
      if more:
        c |= 0x20
      out.append(chr(c + 48))
  return "".join(out)


def _runs(mask):
  flat = mask.T.ravel()  # column-major
  runs, value, n = [], 0, 0
  for v in flat:
    if v == value:
      n += 1
    else:
      runs.append(n)
      value, n = v, 1
  runs.append(n)
  return runs


def _fake_mask(h, w, seed):
  rng = np.random.default_rng(seed)
  return (rng.uniform(size=(h, w)) > 0.6).astype(np.uint8)


def test_rle_decodes_both_encodings():
  m = _fake_mask(7, 5, 0)
  runs = _runs(m)
  np.testing.assert_array_equal(refcoco_source.decode_rle({"size": [7, 5], "counts": runs}), m)
  s = _encode_counts(runs)
  assert refcoco_source.rle_string_counts(s) == runs
  np.testing.assert_array_equal(refcoco_source.decode_rle({"size": [7, 5], "counts": s}), m)


def test_polygon_is_filled():
  m = refcoco_source.polygons_mask([[1, 1, 5, 1, 5, 3, 1, 3]], 6, 8)
  assert m[2, 3] == 1 and m[0, 0] == 0 and m[5, 7] == 0
  assert m.sum() == 15  # PIL fills the closed rectangle x 1..5, y 1..3


def _layout(tmp_path):
  img_dir = tmp_path / "train2014"
  img_dir.mkdir()
  images, anns = [], []
  for i, (h, w) in enumerate([(12, 16), (10, 8)]):
    name = f"COCO_train2014_{i:012d}.jpg"
    Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(img_dir / name)
    images.append({"id": i, "file_name": name, "height": h, "width": w})
  rle = _fake_mask(10, 8, 1)
  anns.append({"id": 100, "image_id": 0, "segmentation": [[2, 2, 10, 2, 10, 6, 2, 6]]})
  anns.append({"id": 101, "image_id": 1, "segmentation": {"size": [10, 8], "counts": _runs(rle)}})
  anns.append(
    {
      "id": 102,
      "image_id": 1,
      "segmentation": {"size": [10, 8], "counts": _encode_counts(_runs(rle))},
    }
  )
  (tmp_path / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
  sent = lambda s: {"sent": s, "sent_id": 0}
  refs = [
    {"ref_id": 0, "ann_id": 100, "image_id": 0, "split": "train",
     "sentences": [sent("left box"), sent("the box")]},
    {"ref_id": 1, "ann_id": 101, "image_id": 1, "split": "val", "sentences": [sent("noise")]},
    {"ref_id": 2, "ann_id": 102, "image_id": 1, "split": "val", "sentences": [sent("same noise")]},
  ]  # fmt: skip
  (tmp_path / "refs.json").write_text(json.dumps(refs))
  return rle


def _input_config(tmp_path):
  cfg = pipeline.default_input_config()
  cfg.dataset = "refcoco"
  cfg.eval_split = "val"
  cfg.image_size = (8, 8)
  cfg.refcoco = ml_collections.ConfigDict(
    dict(
      refs_json=str(tmp_path / "refs.json"),
      instances_json=str(tmp_path / "instances.json"),
      image_dir=str(tmp_path / "train2014"),
    )
  )
  return cfg


def test_source_and_pipeline(tmp_path):
  rle = _layout(tmp_path)
  cfg = _input_config(tmp_path)
  assert datasets.prompt_list(cfg) == ["left box", "the box", "noise", "same noise"]
  train = refcoco_source.RefCocoSource(
    cfg.refcoco.refs_json, cfg.refcoco.instances_json, cfg.refcoco.image_dir, "train"
  )
  assert len(train) == 2
  rec = train[1]
  assert int(rec["prompt"]) == 1 and rec["label"].shape == (12, 16)
  assert rec["label"][4, 6] == 1 and rec["label"][0, 0] == 0
  examples = list(pipeline.create_eval_dataset(cfg))
  assert [int(ex["prompt"]) for ex in examples] == [2, 3]
  for ex in examples:
    np.testing.assert_array_equal(ex["label"], rle)
    assert ex["image"].shape == (8, 8, 3)
