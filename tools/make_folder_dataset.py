"""Writes a folder dataset as a user would bring one: JPEG images, PNG masks, classes.txt.

The pictures are the built-in synthetic set's (`flowseg_jax.data.synthetic`: textured shapes, about
a tenth of the pixels unlabelled = 255), so a run on them is a measured, reproducible demo of
`configs/folder.py` with no download:

  python -m tools.make_folder_dataset /tmp/my_data --classes 3 --num-train 400 --num-val 40
  flowseg train --config configs/folder.py --workdir /tmp/my_run --config.input.data_dir=/tmp/my_data

--layout mmseg (img_dir/ + ann_dir/, default) | images (images/ + masks/) | hf (a DatasetDict saved
with `datasets`, image and label columns); --masks index (grey PNGs, pixel = class id, default) |
rgb (colour PNGs; the colours go to classes.json's palette).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
from PIL import Image

from flowseg_jax.data import classes, synthetic

SPLITS = (("train", 0), ("val", synthetic.EVAL_INDEX_OFFSET))


def write_folder_dataset(
  out: str,
  *,
  num_classes: int = 3,
  num_train: int = 20,
  num_val: int = 8,
  size: tuple[int, int] = (64, 64),
  layout: str = "mmseg",
  masks: str = "index",
  seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
  """Writes the dataset under `out`; returns {split: {stem: the mask's class ids, uint8 (H, W)}}."""
  if layout not in ("mmseg", "images", "hf"):
    raise ValueError(f"layout must be mmseg, images or hf, got {layout!r}")
  if masks not in ("index", "rgb"):
    raise ValueError(f"masks must be index or rgb, got {masks!r}")
  # hf: the files are written to a scratch folder; save_to_disk embeds their bytes.
  scratch = tempfile.TemporaryDirectory() if layout == "hf" else None
  files = scratch.name if scratch else out
  image_root, mask_root = ("images", "masks") if layout == "images" else ("img_dir", "ann_dir")
  palette = classes.make_palette(num_classes)
  expected = {}
  for split, offset in SPLITS:
    os.makedirs(os.path.join(files, image_root, split), exist_ok=True)
    os.makedirs(os.path.join(files, mask_root, split), exist_ok=True)
    expected[split] = {}
    for i in range(num_train if split == "train" else num_val):
      image, label = synthetic.make_example(
        offset + i, num_classes=num_classes, size=size, seed=seed
      )
      stem = f"{split}_{i:04d}"
      Image.fromarray(image).save(os.path.join(files, image_root, split, stem + ".jpg"), quality=95)
      mask = Image.fromarray(label) if masks == "index" else Image.fromarray(_paint(label, palette))
      mask.save(os.path.join(files, mask_root, split, stem + ".png"))
      expected[split][stem] = label
  names = classes.synthetic_class_names(num_classes)
  os.makedirs(out, exist_ok=True)
  if masks == "rgb":
    with open(os.path.join(out, "classes.json"), "w") as f:
      json.dump(
        {"classes": names, "palette": palette.tolist(), "ignore_colours": [[255, 255, 255]]}, f
      )
  else:
    with open(os.path.join(out, "classes.txt"), "w") as f:
      f.write("\n".join(names) + "\n")
  if scratch:
    _save_hf(files, out, image_root, mask_root)
    scratch.cleanup()
  return expected


def _paint(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """Class ids -> colours; 255 (unlabelled) -> white (classes.json's 'ignore_colours')."""
  table = np.full((256, 3), 255, np.uint8)
  table[: len(palette)] = palette
  return table[label]


def _save_hf(files: str, out: str, image_root: str, mask_root: str) -> None:
  import datasets  # the `hf` extra

  splits = {}
  for split, _ in SPLITS:
    stems = sorted(
      os.path.splitext(n)[0] for n in os.listdir(os.path.join(files, image_root, split))
    )
    table = {
      "image": [os.path.join(files, image_root, split, s + ".jpg") for s in stems],
      "label": [os.path.join(files, mask_root, split, s + ".png") for s in stems],
    }
    ds = datasets.Dataset.from_dict(table)
    ds = ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image())
    splits["validation" if split == "val" else split] = ds
  datasets.DatasetDict(splits).save_to_disk(out)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("out", help="folder to write")
  p.add_argument("--classes", type=int, default=3, help="number of classes")
  p.add_argument("--num-train", type=int, default=400)
  p.add_argument("--num-val", type=int, default=40)
  p.add_argument("--size", type=int, default=64, help="images are SIZE x SIZE")
  p.add_argument("--layout", default="mmseg", choices=("mmseg", "images", "hf"))
  p.add_argument("--masks", default="index", choices=("index", "rgb"))
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  write_folder_dataset(
    a.out,
    num_classes=a.classes,
    num_train=a.num_train,
    num_val=a.num_val,
    size=(a.size, a.size),
    layout=a.layout,
    masks=a.masks,
    seed=a.seed,
  )
  print(f"wrote {a.num_train} + {a.num_val} examples ({a.layout}, {a.masks} masks) to {a.out}")


if __name__ == "__main__":
  main()
