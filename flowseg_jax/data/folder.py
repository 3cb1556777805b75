"""Your own dataset from a folder: images and PNG masks, the class names beside them.

Layouts of `config.input.data_dir` (`config.input.folder.layout`, 'auto' tells them apart):
  mmseg    img_dir/{train,val}/NAME.jpg + ann_dir/{train,val}/NAME.png  (mmseg's custom dataset)
  images   images/{train,val}/NAME.jpg + masks/{train,val}/NAME.png
  hf       a Hugging Face `datasets` DatasetDict saved with `save_to_disk` (`data.hf`), with an
           image column and a mask column (`image_column`, `label_column`)
Images and masks pair by stem: the image suffix is any of `listing.IMAGE_SUFFIXES` unless
`image_suffix` names one, the mask suffix is `mask_suffix` ('.png'; '_labelTrainIds.png' for an
mmseg export). Split folders 'train' / 'val' (or 'training' / 'validation') serve the splits
'train' / 'validation'; another split name is a folder name.

Classes, in data_dir: `classes.txt` (one name per line) or `classes.json` (a list of names, or
{"classes": [...], "palette": [[r, g, b], ...]} as mmseg's METAINFO, optionally with
"ignore_colours": [[r, g, b], ...] for colour masks' unlabelled pixels). N names give train ids
0..N-1; 255 is ignored. The palette, when given, paints the evaluation pictures and reads colour
masks.

Masks (`mask_format`):
  index PNGs (grey or palette mode: the pixel's index is its class; 255 = ignore);
  with `reduce_zero_label`: 0 = unlabelled -> 255, k -> k-1 (mmseg's, for masks whose classes
  start at 1); with `binary`: two classes, 0 -> 0 and 255 (or 1) -> 1, for 0/255 object masks;
  colour PNGs (RGB, RGBA; and palette-mode PNGs when mask_format='palette'): each pixel's colour
  is looked up in the palette and read as the index mask it stands for.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
import numpy as np
from PIL import Image

from flowseg_jax import storage
from flowseg_jax.centroids import IGNORE_LABEL
from flowseg_jax.data import listing, sources

LAYOUTS = {"mmseg": ("img_dir", "ann_dir"), "images": ("images", "masks")}
MASK_FORMATS = ("auto", "index", "palette")
HF_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes
_SPLIT_FOLDERS = {
  "train": ("train", "training"),
  "training": ("training", "train"),
  "validation": ("val", "validation"),
  "val": ("val", "validation"),
}


def default_folder_config() -> ml_collections.ConfigDict:
  """`config.input.folder`: how a folder dataset (config.input.dataset='folder') is read."""
  c = ml_collections.ConfigDict()
  c.layout = "auto"  # 'auto' | 'mmseg' (img_dir/ann_dir) | 'images' (images/masks) | 'hf'
  c.image_suffix = ""  # '' = any of .jpg .jpeg .png .bmp .webp .tif .tiff; else only this one
  c.mask_suffix = ".png"
  c.mask_format = "auto"  # 'auto': grey/palette PNG = index, RGB = colour | 'index' | 'palette'
  c.reduce_zero_label = False  # 0 = unlabelled (-> 255), k -> k - 1
  c.binary = False  # 0/255 (or 0/1) masks of two classes: 255 -> 1
  c.image_column = "image"  # layout 'hf': the image and mask columns
  c.label_column = "label"
  return c


# ----------------------------------------------------------------------------------------------
# Classes.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FolderClasses:
  """Class names (index = train id), the palette if given (uint8 (N, 3)), the colours of ignored
  pixels in colour masks (uint8 (M, 3), M >= 0), the file they came from."""

  names: tuple[str, ...]
  palette: np.ndarray | None
  origin: str
  ignore_colours: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.uint8))


def _colours(value, n: int | None, origin: str, key: str) -> np.ndarray:
  """[[r, g, b], ...] -> uint8 (n, 3) of distinct colours (any count when n is None)."""
  try:
    colours = np.asarray(value, np.int64).reshape(-1, 3) if value else np.zeros((0, 3), np.int64)
  except (TypeError, ValueError):
    colours = np.full((0, 2), -1)
  if (
    colours.ndim != 2
    or colours.shape[1] != 3
    or (n is not None and len(colours) != n)
    or (colours.size and (colours.min() < 0 or colours.max() > 255))
  ):
    count = f", {n} in all" if n is not None else ""
    raise ValueError(
      f"{origin}: {key!r} must hold [r, g, b] colours (0..255){count}; got {json.dumps(value)[:80]}"
    )
  if len({tuple(c) for c in colours.tolist()}) != len(colours):
    raise ValueError(f"{origin}: a colour repeats in {key!r}")
  colours = colours.astype(np.uint8)
  colours.setflags(write=False)
  return colours


def read_classes(data_dir: str, *, binary: bool = False) -> FolderClasses:
  """The classes of a folder dataset from data_dir/classes.json or data_dir/classes.txt.

  Without either file a binary dataset is ('background', 'foreground'); otherwise a ValueError
  names the files to write.
  """
  json_path = os.path.join(data_dir, "classes.json")
  txt_path = os.path.join(data_dir, "classes.txt")
  palette, ignore = None, None
  if os.path.isfile(json_path):
    origin = json_path
    try:
      with open(json_path) as f:
        data = json.load(f)
    except ValueError as e:
      raise ValueError(f"{json_path} is not valid JSON: {e}") from None
    names = data.get("classes", data.get("names")) if isinstance(data, dict) else data
    if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
      raise ValueError(
        f"{json_path}: expected a list of class names, or an object with 'classes' (a list of "
        "names) and optionally 'palette' (one [r, g, b] per class)"
      )
    if isinstance(data, dict):
      palette, ignore = data.get("palette"), data.get("ignore_colours")
  elif os.path.isfile(txt_path):
    origin = txt_path
    with open(txt_path) as f:
      names = [line.strip() for line in f if line.strip()]
  elif binary:
    return FolderClasses(("background", "foreground"), None, "binary=True")
  else:
    raise ValueError(
      f"folder dataset {data_dir} names no classes: write {txt_path} (one class name per line, "
      f'line k = train id k) or {json_path} ({{"classes": [...], "palette": [[r, g, b], ...]}})'
    )
  names = [s.strip() for s in names]
  if not 1 <= len(names) <= 255 or not all(names):
    raise ValueError(f"{origin}: needs 1..255 non-empty class names, got {len(names)}")
  seen = {n for n in names if names.count(n) > 1}
  if seen:
    raise ValueError(f"{origin}: class names repeat: {sorted(seen)}")
  if binary and len(names) != 2:
    raise ValueError(
      f"config.input.folder.binary=True reads two classes (0 and 255 -> 1), but {origin} names "
      f"{len(names)}"
    )
  if palette is not None:
    palette = _colours(palette, len(names), origin, "palette")
  ignore = _colours(ignore, None, origin, "ignore_colours")
  if palette is not None and set(map(tuple, ignore.tolist())) & set(map(tuple, palette.tolist())):
    raise ValueError(f"{origin}: an 'ignore_colours' colour is also a class's colour")
  if binary and len(ignore):
    raise ValueError(f"{origin}: binary masks have no ignored pixels, so no 'ignore_colours'")
  return FolderClasses(tuple(names), palette, origin, ignore)


def classes_of(cfg) -> FolderClasses:
  """The classes of `config.input` (dataset 'folder')."""
  if not cfg.data_dir:
    raise ValueError("config.input.data_dir must point at the folder dataset (configs/folder.py).")
  storage.local_only(
    cfg.data_dir, "config.input.data_dir", "folder datasets are read file by file; copy it locally"
  )
  return read_classes(cfg.data_dir, binary=bool(cfg.folder.binary))


# ----------------------------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FolderLabelMap(sources.LabelMap):
  """A LabelMap that also reads colour masks: a colour in `colours` (row k) stands for the stored
  value `colour_values[k]`, which the table then maps as it maps an index mask."""

  colours: np.ndarray | None = None  # uint8 (N, 3)
  colour_values: np.ndarray | None = None  # uint8 (N,)
  mask_format: str = "auto"
  classes_file: str = ""

  def decode(self, im: Image.Image, name: str, what: str) -> np.ndarray:
    by_colour = im.mode in ("RGB", "RGBA") or (im.mode == "P" and self.mask_format == "palette")
    if not by_colour:
      return super().decode(im, name, what)
    if self.mask_format == "index" or self.colours is None:
      raise sources.BadExampleError(
        name,
        f"mask {what} has mode {im.mode} (colours), and "
        + (
          "config.input.folder.mask_format='index'"
          if self.colours is not None
          else f"{self.classes_file} gives no class colours"
        )
        + "; fix: save index masks (grey or palette PNG, pixel = class id), or give one "
        "[r, g, b] per class as 'palette' in classes.json and leave mask_format='auto'.",
      )
    return self._by_colour(np.asarray(im.convert("RGB")), name, what)

  def _by_colour(self, rgb: np.ndarray, name: str, what: str) -> np.ndarray:
    def pack(c):
      c = np.asarray(c, np.int32)
      return (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]

    keys, table = pack(rgb), pack(self.colours)
    order = np.argsort(table)
    pos = np.searchsorted(table[order], keys).clip(0, len(table) - 1)
    hit = table[order][pos] == keys
    if not hit.all():
      unknown, counts = np.unique(keys[~hit], return_counts=True)
      top = unknown[np.argsort(-counts)][:5]
      shown = ", ".join(str((int(k) >> 16, int(k) >> 8 & 255, int(k) & 255)) for k in top)
      raise sources.BadExampleError(
        name,
        f"mask {what}: {len(unknown)} colour(s) are no class's colour in {self.classes_file}, "
        f"e.g. {shown} ({int(counts.sum())} pixels); fix: add them to 'palette' (or to "
        "'ignore_colours'), or repaint those pixels (anti-aliased edges and JPEG masks make new "
        "colours: save masks as PNG).",
      )
    return self.colour_values[order[pos]]


def folder_label_map(classes: FolderClasses, folder_cfg) -> FolderLabelMap:
  """The table of a folder dataset's masks (index or colour) under its reduce_zero_label/binary."""
  n, origin = len(classes.names), classes.origin
  if folder_cfg.mask_format not in MASK_FORMATS:
    raise ValueError(
      f"config.input.folder.mask_format must be one of {MASK_FORMATS}, got "
      f"{folder_cfg.mask_format!r}"
    )
  reduce, binary = bool(folder_cfg.reduce_zero_label), bool(folder_cfg.binary)
  if reduce and binary:
    raise ValueError("config.input.folder: reduce_zero_label and binary exclude each other")
  lut = np.full(256, IGNORE_LABEL, np.uint8)
  valid = np.zeros(256, bool)
  valid[IGNORE_LABEL] = True
  if binary:  # 0/255 object masks; 0/1 ones read the same
    valid[:2] = True
    lut[:2] = (0, 1)
    lut[IGNORE_LABEL] = 1
    values = np.array([0, 255], np.uint8)
    expected = "0 (background) and 255 or 1 (foreground) in a binary mask"
    hint = "fix: other values come from JPEG or smoothed edges: save masks as PNG, unsmoothed"
  elif reduce:
    valid[: n + 1] = True
    lut[1 : n + 1] = np.arange(n)
    values = np.arange(1, n + 1, dtype=np.uint8)
    expected = f"0 (unlabelled, reduce_zero_label) and 1..{n} (the {n} classes of {origin})"
    hint = f"fix: name every class in {origin}"
  else:
    valid[:n] = True
    lut[:n] = np.arange(n)
    values = np.arange(n, dtype=np.uint8)
    expected = f"0..{n - 1} (the {n} classes of {origin}) or 255 (ignore)"
    hint = (
      f"fix: name every class in {origin}, or set config.input.folder.reduce_zero_label=True if "
      "0 marks unlabelled pixels and the classes start at 1"
    )
  colours = None
  if classes.palette is not None:  # colour masks: the classes' colours, then the ignored ones
    colours = np.concatenate([classes.palette, classes.ignore_colours])
    values = np.concatenate([values, np.full(len(classes.ignore_colours), 255, np.uint8)])
  for a in (lut, valid, values):
    a.setflags(write=False)
  return FolderLabelMap(
    "folder",
    lut,
    valid,
    expected,
    hint,
    colours=colours,
    colour_values=values,
    mask_format=folder_cfg.mask_format,
    classes_file=origin,
  )


def binary_fix(num_classes: int) -> str:
  """The fix the pre-flight names for masks of 0 and 255 only."""
  return (
    "Binary 0/255 masks? Set config.input.folder.binary=True (255 -> class 1 of 2), or store "
    f"class ids 0..{num_classes - 1} with 255 = ignore."
  )


# ----------------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------------


def resolve_layout(data_dir: str, layout: str) -> str:
  """'mmseg' | 'images' | 'hf': the given layout, or the one data_dir holds ('auto')."""
  if layout != "auto":
    if layout not in (*LAYOUTS, "hf"):
      raise ValueError(
        f"config.input.folder.layout must be 'auto', 'mmseg', 'images' or 'hf', got {layout!r}"
      )
    return layout
  if any(os.path.isfile(os.path.join(data_dir, m)) for m in HF_MARKERS):
    return "hf"
  for name, (image_root, _) in LAYOUTS.items():
    if os.path.isdir(os.path.join(data_dir, image_root)):
      return name
  raise ValueError(
    f"folder dataset {data_dir} holds none of the layouts: img_dir/ + ann_dir/ (mmseg), "
    "images/ + masks/, or a Hugging Face dataset saved with save_to_disk (dataset_dict.json)"
  )


def split_folder(parent: str, split: str) -> str:
  """The folder of `split` under `parent` ('validation' is val/ or validation/)."""
  candidates = _SPLIT_FOLDERS.get(split, (split,))
  for name in candidates:
    if os.path.isdir(os.path.join(parent, name)):
      return name
  raise FileNotFoundError(
    f"folder: no {split!r} split in {parent} (looked for {', '.join(c + '/' for c in candidates)}; "
    "config.input.train_split / eval_split name the split folders, config.eval_every_steps=0 "
    "trains without evaluation)"
  )


def folder_source(cfg, split: str):
  """(source, label map) of a folder dataset's split; `cfg` is `config.input`."""
  fcfg = cfg.folder
  classes = classes_of(cfg)
  label_map = folder_label_map(classes, fcfg)
  layout = resolve_layout(cfg.data_dir, fcfg.layout)
  if layout == "hf":
    from flowseg_jax.data import hf  # the optional `datasets` package

    return hf.HfSource(cfg.data_dir, split, fcfg.image_column, fcfg.label_column), label_map
  image_root, mask_root = (os.path.join(cfg.data_dir, d) for d in LAYOUTS[layout])
  listing.require_dir(image_root, "folder")
  folder = split_folder(image_root, split)
  suffixes = (fcfg.image_suffix,) if fcfg.image_suffix else listing.IMAGE_SUFFIXES
  src = sources.file_list_source(
    "folder",
    os.path.join(image_root, folder),
    os.path.join(mask_root, folder),
    label_map,
    image_suffixes=suffixes,
    label_suffix=fcfg.mask_suffix,
  )
  return src, label_map
