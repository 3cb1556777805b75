"""Random-access sources over the official on-disk layouts, label tables and checked decoding.

A source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`, picklable). Its records
are cheap dicts `{'image': path | bytes | uint8 array, 'label': path | bytes | array | None,
'name': str}`; reading and decoding happen later, in the pipeline's (possibly multi-process) map,
through `open_image` / `finish_image` / `read_label`, which turn every kind of bad input (missing,
corrupt or truncated file, wrong mode, size mismatch, label value outside the dataset's range)
into one `BadExampleError` that names the file.

Label encodings (see shared/reference/datasets_and_metrics.md):
  * ADE20K (ADEChallengeData2016): PNG values 0..150; 0 = other -> 255, k -> k - 1.
  * COCO-Stuff-164k raw stuffthingmaps: 0-based ids 0..181 with 11 unused ids, 255 = unlabeled;
    the 171 used ids map by rank to train ids 0..170.
  * COCO-Stuff `*_labelTrainIds.png` (mmseg converter output): 0..170 and 255, kept as they are.
"""

import dataclasses
import functools
import io
import os
from typing import Any

import numpy as np
from PIL import Image

from flowseg_jax.centroids import IGNORE_LABEL
from flowseg_jax.data import classes, listing

# Raw COCO-Stuff ids (0-based PNG values) that belong to no class: 11 COCO thing classes that were
# never annotated (street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender,
# hair brush).
COCO_STUFF_UNUSED_RAW_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


class BadExampleError(ValueError):
  """An unusable example. The message names the offending file."""

  def __init__(self, name: str, message: str):
    super().__init__(message)
    self.name = name

  def __reduce__(self):  # Picklable, so that it crosses from grain worker processes intact.
    return (type(self), (self.name, str(self)))


@dataclasses.dataclass(frozen=True)
class LabelMap:
  """A 256-entry table from stored label values to train ids, with a validity mask.

  Attributes:
    dataset: human-readable dataset name, used in error messages.
    lut: uint8 (256,) stored value -> train id (255 = ignore).
    valid: bool (256,), False for values that must never occur in this encoding.
    expected: description of the allowed stored values, for error messages.
    hint: the likely fix, appended to the message of a value out of range ('' for none).
  """

  dataset: str
  lut: np.ndarray
  valid: np.ndarray
  expected: str
  hint: str = ""

  def decode(self, im: Image.Image, name: str, what: str) -> np.ndarray:
    """An opened annotation -> its stored values (H, W): the indices of a grey or palette PNG
    (a palette PNG's colours are not looked at). Subclasses may read colour masks."""
    if im.mode not in _LABEL_MODES:
      raise BadExampleError(
        name,
        f"annotation {what} has mode {im.mode}; expected a single-channel index map "
        f"(8-bit grey or palette PNG).",
      )
    return np.array(im)

  def apply(self, raw: np.ndarray, filename: str) -> np.ndarray:
    """Maps stored values to train ids.

    Args:
      raw: integer array (H, W) as decoded from the annotation file.
      filename: file or record name for the error message.

    Returns:
      uint8 (H, W) train ids with 255 = ignore (uint8 keeps full-size maps cheap; the
      transforms return int32).

    Raises:
      BadExampleError: if any value is outside this encoding's range.
    """
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
      if raw.size and (raw.min() < 0 or raw.max() > 255):
        raise BadExampleError(
          filename,
          f"{self.dataset} annotation {filename}: values span {raw.min()}..{raw.max()}, "
          f"expected {self.expected}.",
        )
      raw = raw.astype(np.uint8)
    if not self._all_valid(raw):
      ok = np.take(self.valid, raw)
      bad, counts = np.unique(raw[~ok], return_counts=True)
      raise BadExampleError(
        filename,
        f"{self.dataset} annotation {filename}: values {bad.tolist()[:10]} "
        f"({int(counts.sum())} pixels) outside the dataset's range; expected {self.expected}"
        + (f"; {self.hint}" if self.hint else "")
        + ".",
      )
    return raw if self._is_identity else np.take(self.lut, raw)

  @functools.cached_property
  def _valid_prefix(self) -> tuple[int, bool] | None:
    """(k, with_255) when the valid set is exactly {0..k-1} (+ {255}); else None."""
    k = int(np.argmin(self.valid)) if not self.valid.all() else 256
    rest = self.valid[k:]
    if not rest.any():
      return k, False
    if rest[-1] and not rest[:-1].any():
      return k, True
    return None

  @functools.cached_property
  def _is_identity(self) -> bool:
    return bool((self.lut[self.valid] == np.flatnonzero(self.valid)).all())

  def _all_valid(self, raw: np.ndarray) -> bool:
    if raw.size == 0:
      return True
    prefix = self._valid_prefix
    if prefix is None:
      return bool(np.take(self.valid, raw).all())
    k, with_255 = prefix
    if with_255:  # uint8 wrap-around sends 255 to 0, so the check is one max.
      return int((raw + np.uint8(1)).max()) <= k
    return int(raw.max()) < k


def _frozen(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


def ade20k_label_map() -> LabelMap:
  """ADEChallengeData2016 PNGs: 0 -> 255 (ignore), 1..150 -> 0..149; other values invalid."""
  lut = np.full(256, IGNORE_LABEL, np.uint8)
  lut[1:151] = np.arange(150, dtype=np.uint8)
  valid = np.zeros(256, bool)
  valid[:151] = True
  return LabelMap("ADE20K", _frozen(lut), _frozen(valid), "0..150 (0 = other)")


def coco_stuff_raw_label_map() -> LabelMap:
  """COCO-Stuff stuffthingmaps PNGs: the 171 used raw ids -> 0..170 by rank, 255 -> 255."""
  used = np.setdiff1d(np.arange(182), COCO_STUFF_UNUSED_RAW_IDS)
  assert used.size == 171
  lut = np.full(256, IGNORE_LABEL, np.uint8)
  lut[used] = np.arange(171, dtype=np.uint8)
  valid = np.zeros(256, bool)
  valid[used] = True
  valid[IGNORE_LABEL] = True
  return LabelMap(
    "COCO-Stuff (raw stuffthingmaps)",
    _frozen(lut),
    _frozen(valid),
    "the 171 used ids in 0..181 or 255 (unused ids: "
    f"{', '.join(map(str, COCO_STUFF_UNUSED_RAW_IDS))})",
  )


def train_id_label_map(dataset: str, num_classes: int) -> LabelMap:
  """Labels already stored as train ids: 0..num_classes-1 and 255, kept unchanged."""
  if not 1 <= num_classes <= 255:
    raise ValueError(f"num_classes must be in 1..255, got {num_classes}.")
  lut = np.arange(256, dtype=np.uint8)
  lut[num_classes:] = IGNORE_LABEL
  valid = np.zeros(256, bool)
  valid[:num_classes] = True
  valid[IGNORE_LABEL] = True
  return LabelMap(
    dataset, _frozen(lut), _frozen(valid), f"train ids 0..{num_classes - 1} or 255 (ignore)"
  )


# ----------------------------------------------------------------------------------------------
# Checked decoding.
# ----------------------------------------------------------------------------------------------


def _describe(src: Any, name: str) -> str:
  return os.fspath(src) if isinstance(src, str | os.PathLike) else f"record '{name}'"


def open_image(src: Any, name: str) -> Image.Image | np.ndarray:
  """Opens an image lazily (header only), so that callers may still `draft` a JPEG.

  Args:
    src: a path, encoded bytes, or an already decoded uint8 (H, W, 3) array (returned as is).
    name: example name for error messages.

  Returns:
    An unloaded PIL image, or the array.

  Raises:
    BadExampleError: missing or unreadable file.
  """
  if isinstance(src, np.ndarray):
    return src
  what = _describe(src, name)
  try:
    if isinstance(src, bytes):
      return Image.open(io.BytesIO(src))
    return Image.open(src)
  except FileNotFoundError as e:
    raise BadExampleError(name, f"image {what} is missing.") from e
  except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError.
    raise BadExampleError(name, f"image {what} cannot be read: {e}") from e


def finish_image(img: Image.Image | np.ndarray, name: str, src: Any = None) -> Image.Image:
  """Fully decodes an opened image to an RGB PIL image; truncation or corruption raise.

  Args:
    img: result of `open_image`.
    name: example name for error messages.
    src: the original source (for the message).

  Returns:
    A loaded PIL image in mode 'RGB'.
  """
  if isinstance(img, np.ndarray):
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
      raise BadExampleError(
        name, f"image of '{name}' must be uint8 (H, W, 3), got {img.dtype} {img.shape}."
      )
    return Image.fromarray(img)
  try:
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")
  except (OSError, ValueError, SyntaxError) as e:
    raise BadExampleError(name, f"image {_describe(src, name)} is corrupt or truncated: {e}") from e


def image_size_hw(img: Image.Image | np.ndarray) -> tuple[int, int]:
  """(height, width) of an opened image (from its header for PIL images)."""
  if isinstance(img, np.ndarray):
    return int(img.shape[0]), int(img.shape[1])
  return int(img.size[1]), int(img.size[0])


_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def read_label(src: Any, name: str, label_map: LabelMap, where: str | None = None) -> np.ndarray:
  """Reads an annotation as indices (PIL; palette PNGs give indices) and maps it to train ids.

  Args:
    src: a path, PNG bytes, an integer (H, W) or (H, W, 1) array, or None when missing.
    name: example name for error messages.
    label_map: the dataset's table.
    where: how to name the file in messages (default: the path, or the record name).

  Returns:
    uint8 (H, W) train ids, 255 = ignore.

  Raises:
    BadExampleError: missing, unreadable, not single-channel, or values out of range.
  """
  if src is None:
    raise BadExampleError(name, f"annotation for '{name}' is missing.")
  what = where or _describe(src, name)
  if isinstance(src, np.ndarray):
    raw = src[..., 0] if src.ndim == 3 and src.shape[-1] == 1 else src
  else:
    try:
      with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        raw = label_map.decode(im, name, what)
    except FileNotFoundError as e:
      raise BadExampleError(name, f"annotation {what} is missing.") from e
    except BadExampleError:
      raise
    except (OSError, ValueError, SyntaxError) as e:
      raise BadExampleError(name, f"annotation {what} is corrupt or truncated: {e}") from e
  if raw.ndim != 2:
    raise BadExampleError(name, f"annotation {what} must be (H, W), got shape {raw.shape}.")
  return label_map.apply(raw, what)


def check_same_size(
  image_hw: tuple[int, int],
  label: np.ndarray,
  name: str,
  image_src: Any = None,
  label_src: Any = None,
) -> None:
  """Raises BadExampleError unless the annotation has the image's (H, W)."""
  if tuple(label.shape[:2]) != tuple(image_hw):
    raise BadExampleError(
      name,
      f"annotation {_describe(label_src, name)} is {label.shape[0]}x{label.shape[1]} but its "
      f"image {_describe(image_src, name)} is {image_hw[0]}x{image_hw[1]} (HxW); a mask must "
      "have its image's size (re-export it, or resize it with nearest-neighbour).",
    )


# ----------------------------------------------------------------------------------------------
# Raw folder sources.
# ----------------------------------------------------------------------------------------------

ADE20K_SPLITS = {
  "train": "training",
  "training": "training",
  "validation": "validation",
  "val": "validation",
}
COCO_STUFF_SPLITS = {
  "train": "train2017",
  "train2017": "train2017",
  "validation": "val2017",
  "val": "val2017",
  "val2017": "val2017",
}


def _resolve_split(split: str, table: dict[str, str], dataset: str) -> str:
  if split not in table:
    raise ValueError(f"{dataset}: unknown split {split!r}; expected one of {sorted(table)}.")
  return table[split]


@dataclasses.dataclass(frozen=True)
class FileListSource:
  """A sorted list of (image path, annotation path, name) triples.

  Attributes:
    dataset: dataset name for messages.
    items: tuple of (image_path, label_path, name), sorted by name; an image without annotation
      keeps the path its annotation should have (reading it fails, naming that path).
    label_map: how stored label values become train ids.
    problems: (name, message) of what the listing found besides pairs (`data.listing`), which
      the pre-flight (`data.preflight`) reports or counts.
  """

  dataset: str
  items: tuple[tuple[str, str, str], ...]
  label_map: LabelMap
  problems: tuple[tuple[str, str], ...] = ()

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    image, label, name = self.items[index]
    return {"image": image, "label": label, "name": name}

  def __repr__(self) -> str:
    first = self.items[0][0] if self.items else "-"
    return f"FileListSource({self.dataset}, n={len(self.items)}, first={first})"


def file_list_source(
  dataset: str,
  image_dir: str,
  label_dir: str,
  label_map: LabelMap,
  *,
  image_suffixes: tuple[str, ...],
  label_suffix: str,
  labels: dict[str, str] | None = None,
) -> FileListSource:
  """Lists `image_dir` and `label_dir` and pairs them by stem (`labels`: a listing of `label_dir`
  already filtered by the caller)."""
  images, problems = listing.list_images(image_dir, image_suffixes, dataset)
  if labels is None:
    labels = listing.list_masks(label_dir, label_suffix, dataset)
  items, unpaired = listing.pair(
    images,
    labels,
    dataset=dataset,
    image_dir=image_dir,
    mask_dir=label_dir,
    mask_suffix=label_suffix,
  )
  return FileListSource(dataset, items, label_map, tuple(problems + unpaired))


def ade20k_source(data_dir: str, split: str) -> FileListSource:
  """ADEChallengeData2016 in its release layout.

  Layout: `data_dir` is `ADEChallengeData2016/` or its parent, with
  `images/{training,validation}/ADE_*.jpg` and `annotations/{training,validation}/ADE_*.png`.

  Args:
    data_dir: the dataset root.
    split: 'train' | 'validation' (or the folder names 'training' | 'validation').

  Returns:
    A FileListSource sorted by file name, labels mapped by `ade20k_label_map()`; images of
    another format and unpaired files are its `problems`.
  """
  root = os.path.join(data_dir, "ADEChallengeData2016")
  root = root if os.path.isdir(root) else data_dir
  folder = _resolve_split(split, ADE20K_SPLITS, "ADE20K")
  return file_list_source(
    "ADE20K",
    os.path.join(root, "images", folder),
    os.path.join(root, "annotations", folder),
    ade20k_label_map(),
    image_suffixes=(".jpg",),
    label_suffix=".png",
  )


def coco_stuff_source(data_dir: str, split: str, *, labels: str = "raw") -> FileListSource:
  """COCO-Stuff-164k in the stuffthingmaps / mmseg layout.

  Layout: `data_dir/images/{train2017,val2017}/<12-digit id>.jpg` and
  `data_dir/annotations/{train2017,val2017}/<id>.png` (raw stuffthingmaps) and/or
  `<id>_labelTrainIds.png` (already converted).

  Args:
    data_dir: the dataset root (mmseg's `data/coco_stuff164k`).
    split: 'train' | 'validation' (or 'train2017' | 'val2017').
    labels: 'raw' reads `<id>.png` through the 182->171 table; 'train_ids' reads
      `<id>_labelTrainIds.png` and only checks the range.

  Returns:
    A FileListSource sorted by image id.
  """
  folder = _resolve_split(split, COCO_STUFF_SPLITS, "COCO-Stuff")
  image_dir = os.path.join(data_dir, "images", folder)
  label_dir = os.path.join(data_dir, "annotations", folder)
  if labels == "raw":
    found = listing.list_masks(label_dir, ".png", "COCO-Stuff")
    found = {k: v for k, v in found.items() if not k.endswith("_labelTrainIds")}
    label_map, suffix = coco_stuff_raw_label_map(), ".png"
  elif labels == "train_ids":
    found = None
    label_map = train_id_label_map("COCO-Stuff (labelTrainIds)", len(classes.COCO_STUFF_CLASSES))
    suffix = "_labelTrainIds.png"
  else:
    raise ValueError(f"coco_stuff_labels must be 'raw' or 'train_ids', got {labels!r}.")
  src = file_list_source(
    "COCO-Stuff",
    image_dir,
    label_dir,
    label_map,
    image_suffixes=(".jpg",),
    label_suffix=suffix,
    labels=found,
  )
  return dataclasses.replace(src, dataset=f"COCO-Stuff ({labels})")
