"""A folder dataset saved by Hugging Face `datasets` (`save_to_disk`), read with `load_from_disk`.

The saved DatasetDict holds the splits ('train', 'validation' or 'val'); each row an image and a
mask column (`config.input.folder.image_column` / `label_column`), `datasets.Image` features (the
encoded file is handed on undecoded, so the pipeline decodes and checks it as it does files) or
arrays. The classes come from classes.txt / classes.json in the same folder (`data.folder`).
Needs the `hf` extra: `pip install 'flowseg-jax[hf]'`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

_SPLITS = {
  "train": ("train", "training"),
  "training": ("training", "train"),
  "validation": ("validation", "val"),
  "val": ("val", "validation"),
}


def _datasets():
  try:
    import datasets
  except ImportError as e:
    raise ValueError(
      f"a Hugging Face dataset needs the `datasets` package: pip install 'flowseg-jax[hf]' ({e})"
    ) from None
  return datasets


def load_split(path: str, split: str, columns: tuple[str, str]):
  """The split of the saved dataset at `path`, its Image columns left undecoded."""
  datasets = _datasets()
  loaded = datasets.load_from_disk(path)
  if isinstance(loaded, datasets.DatasetDict):
    names = [s for s in _SPLITS.get(split, (split,)) if s in loaded]
    if not names:
      raise ValueError(
        f"Hugging Face dataset {path} has no {split!r} split (it has {sorted(loaded)}); save a "
        "DatasetDict with 'train' and 'validation' splits"
      )
    ds = loaded[names[0]]
  else:
    raise ValueError(
      f"Hugging Face dataset {path} is a single Dataset; save a DatasetDict with 'train' and "
      "'validation' splits (DatasetDict({'train': ..., 'validation': ...}).save_to_disk(path))"
    )
  for column in columns:
    if column not in ds.column_names:
      raise ValueError(
        f"Hugging Face dataset {path} ({split}) has no column {column!r} (it has "
        f"{ds.column_names}); set config.input.folder.image_column / label_column"
      )
    if isinstance(ds.features[column], datasets.Image):
      ds = ds.cast_column(column, datasets.Image(decode=False))
  return ds


def _value(cell: Any) -> Any:
  """An undecoded Image cell -> its encoded bytes (or file path); an array cell -> an array."""
  if isinstance(cell, dict) and ("bytes" in cell or "path" in cell):
    return cell.get("bytes") or cell.get("path")
  return np.asarray(cell)


class HfSource:
  """grain random-access source over a saved `datasets` split.

  Records: {'image': encoded bytes | path | uint8 (H, W, 3), 'label': PNG bytes | path | integer
  (H, W) array, 'name': the image file's stem when the dataset kept it, else '<split>_<index>'}.
  Picklable: a grain worker loads the (memory-mapped) dataset again from `path`.
  """

  problems = ()

  def __init__(self, path: str, split: str, image_column: str, label_column: str):
    self.path, self.split = path, split
    self.columns = (image_column, label_column)
    self._ds = load_split(path, split, self.columns)
    self._len = len(self._ds)
    if not self._len:
      raise ValueError(f"Hugging Face dataset {path} ({split}) is empty")

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_ds"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._ds = load_split(self.path, self.split, self.columns)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    row = self._ds[int(index)]
    image_cell = row[self.columns[0]]
    path = image_cell.get("path") if isinstance(image_cell, dict) else None
    name = os.path.splitext(os.path.basename(path))[0] if path else f"{self.split}_{index:06d}"
    return {"image": _value(image_cell), "label": _value(row[self.columns[1]]), "name": name}

  def __repr__(self) -> str:
    return f"HfSource({self.path}, {self.split}, n={self._len})"
