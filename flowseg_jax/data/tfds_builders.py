"""TFDS builders for ADE20K-150 and COCO-Stuff-164k (manual download -> ArrayRecord), and reading.

The TFDS catalogue has neither benchmark: `scene_parse150` holds the Places 2017 *instance*
annotations (100 thing classes, no stuff) and its `test` split is ADE's validation set, and there
is no COCO-Stuff builder. These builders prepare the benchmarks from files the user downloaded
(TFDS `manual_dir`); nothing is ever downloaded. They need no TensorFlow: images are stored as
their original encoded bytes and labels are re-encoded with PIL, so TFDS never calls its TF
encoders.

Features: `image` Image(jpeg) (the original file bytes), `label` Image((None, None, 1), png)
holding TRAIN IDS (ADE: 0..149, COCO-Stuff: 0..170; 255 = ignore; the raw encodings are mapped at
preparation), `name` Text (file stem). Splits: 'train', 'validation'.

Prepare (once; from a shell or Python):
  python -m flowseg_jax.data.tfds_builders --dataset=ade20k150 \
      --manual_dir=~/downloads/ade --data_dir=~/tensorflow_datasets
  prepare("ade20k150", data_dir=..., manual_dir=...)
Read: `load_source(name, split, data_dir=...)` wraps `tfds.data_source(..., builder_kwargs=
{'file_format': 'array_record'}, download=False)` (random access) for the grain pipeline.
"""

import argparse
import dataclasses
import inspect
import io
import os
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from flowseg_jax.data import classes, sources

_FILE_FORMAT = "array_record"


class _Files:
  """A folder or a zip archive, listed by member prefix."""

  def __init__(self, path: str, prefix: str = ""):
    self.path = path
    self.prefix = prefix
    self._zip = zipfile.ZipFile(path) if path.endswith(".zip") else None

  def list(self, subdir: str, suffix: str) -> dict[str, str]:
    """{stem: member} of the files directly in `subdir` ending with `suffix`."""
    base = os.path.join(self.prefix, subdir).rstrip("/") + "/"
    if self._zip is not None:
      names = [n for n in self._zip.namelist() if n.startswith(base)]
      names = [n for n in names if "/" not in n[len(base) :]]
    else:
      folder = os.path.join(self.path, base)
      names = [base + n for n in os.listdir(folder)] if os.path.isdir(folder) else []
    return {os.path.basename(n)[: -len(suffix)]: n for n in names if n.endswith(suffix)}

  def has(self, subdir: str) -> bool:
    base = os.path.join(self.prefix, subdir).rstrip("/") + "/"
    if self._zip is not None:
      return any(n.startswith(base) for n in self._zip.namelist())
    return os.path.isdir(os.path.join(self.path, base))

  def read(self, member: str) -> bytes:
    if self._zip is not None:
      return self._zip.read(member)
    with open(os.path.join(self.path, member), "rb") as f:
      return f.read()

  def where(self, member: str) -> str:
    return os.path.join(self.path, member)


def _first(candidates: list[tuple[str, str]], subdir: str) -> _Files | None:
  """The first existing (path, prefix) candidate that contains `subdir`."""
  for path, prefix in candidates:
    if os.path.isdir(path) or (path.endswith(".zip") and os.path.isfile(path)):
      files = _Files(path, prefix)
      if files.has(subdir):
        return files
  return None


def _encode_label_png(label: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(label, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _check_image(data: bytes, name: str, where: str) -> tuple[int, int]:
  """Fully decodes once (corrupt/truncated files fail here); returns (H, W)."""
  img = sources.open_image(data, name)
  try:
    img.load()
  except (OSError, ValueError, SyntaxError) as e:
    raise sources.BadExampleError(name, f"image {where} is corrupt or truncated: {e}") from e
  return int(img.size[1]), int(img.size[0])


class _SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared feature spec and example generation."""

  VERSION = tfds.core.Version("1.0.0")
  NUM_CLASSES = 0
  HOMEPAGE = ""
  DESCRIPTION = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 derives this through `importlib_resources`, a package it only declares for
    # Python < 3.9, so the lookup fails on a clean install; this file is the answer anyway.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, on_bad_example: str = "raise", **kwargs):
    if on_bad_example not in ("raise", "skip"):
      raise ValueError(f"on_bad_example must be 'raise' or 'skip', got {on_bad_example!r}.")
    self._on_bad_example = on_bad_example
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "name": tfds.features.Text(),
        }
      ),
      supervised_keys=("image", "label"),
      homepage=self.HOMEPAGE,
    )

  def _pairs(
    self, images: _Files, labels: _Files, image_dir: str, label_dir: str, suffix: str
  ) -> list[tuple[str, str, str | None]]:
    found_images = images.list(image_dir, ".jpg")
    found_labels = labels.list(label_dir, suffix)
    if not found_images:
      raise FileNotFoundError(f"{self.name}: no .jpg images in {images.where(image_dir)}.")
    return [(k, found_images[k], found_labels.get(k)) for k in sorted(found_images)]

  def _generate_examples(
    self, pairs, images: _Files, labels: _Files, label_map: sources.LabelMap
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Checks every example (decodes the image, maps and validates the label) and yields it."""
    skipped = 0
    for name, image_member, label_member in pairs:
      try:
        if label_member is None:
          raise sources.BadExampleError(
            name, f"{self.name}: image {images.where(image_member)} has no annotation."
          )
        data = images.read(image_member)
        hw = _check_image(data, name, images.where(image_member))
        label = sources.read_label(
          labels.read(label_member), name, label_map, labels.where(label_member)
        )
        sources.check_same_size(
          hw, label, name, images.where(image_member), labels.where(label_member)
        )
      except sources.BadExampleError as e:
        if self._on_bad_example == "raise":
          raise
        skipped += 1
        logging.warning("%s: skipping %s: %s", self.name, name, e)
        continue
      yield name, {"image": data, "label": _encode_label_png(label), "name": name}
    if skipped:
      logging.warning("%s: skipped %d bad example(s) in this split.", self.name, skipped)


class Ade20k150(_SegmentationBuilder):
  """ADE20K-150 semantic segmentation (ADEChallengeData2016 / SceneParse150 benchmark)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "ADEChallengeData2016; labels as train ids 0..149, 255 = ignore."}
  NUM_CLASSES = len(classes.ADE20K_CLASSES)
  HOMEPAGE = "http://sceneparsing.csail.mit.edu/"
  DESCRIPTION = (
    "ADE20K SceneParse150 benchmark: 20,210 train / 2,000 validation images, 150 classes. "
    "Label = train id (raw 1..150 -> 0..149; raw 0 'other' -> 255 ignore)."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download ADEChallengeData2016.zip (http://data.csail.mit.edu/places/ADEchallenge/
  ADEChallengeData2016.zip) into `manual_dir`. Either leave the zip there, or extract it so that
  `manual_dir/ADEChallengeData2016/images/{training,validation}` and
  `manual_dir/ADEChallengeData2016/annotations/{training,validation}` exist (`manual_dir` may
  also be the ADEChallengeData2016 folder itself).
  """

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    candidates = [
      (os.path.join(manual, "ADEChallengeData2016.zip"), "ADEChallengeData2016"),
      (os.path.join(manual, "ADEChallengeData2016"), ""),
      (manual, ""),
    ]
    label_map = sources.ade20k_label_map()
    splits = {}
    for split, folder in (("train", "training"), ("validation", "validation")):
      files = _first(candidates, f"images/{folder}")
      if files is None:
        logging.warning(
          "%s: no images/%s under %s; split %s skipped.", self.name, folder, manual, split
        )
        continue
      pairs = self._pairs(files, files, f"images/{folder}", f"annotations/{folder}", ".png")
      splits[split] = self._generate_examples(pairs, files, files, label_map)
    if not splits:
      raise FileNotFoundError(
        f"{self.name}: nothing to prepare in {manual}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    return splits


class CocoStuff164k(_SegmentationBuilder):
  """COCO-Stuff-164k semantic segmentation (171 classes: 80 things + 91 stuff)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "COCO 2017 images + stuffthingmaps; train ids 0..170, 255 = ignore."}
  NUM_CLASSES = len(classes.COCO_STUFF_CLASSES)
  HOMEPAGE = "https://github.com/nightrome/cocostuff"
  DESCRIPTION = (
    "COCO-Stuff-164k: 118,287 train / 5,000 validation images, 171 classes. Label = train id "
    "(raw stuffthingmaps ids mapped by rank of the 171 used ids; 255 = unlabeled/ignore)."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put into `manual_dir` the COCO 2017 images and the COCO-Stuff maps, either as the archives
  `train2017.zip`, `val2017.zip` (http://images.cocodataset.org/zips/) and
  `stuffthingmaps_trainval2017.zip` (https://github.com/nightrome/cocostuff), or extracted in
  the mmseg layout `manual_dir/images/{train2017,val2017}/*.jpg`,
  `manual_dir/annotations/{train2017,val2017}/*.png`. Raw `<id>.png` stuffthingmaps are mapped to
  train ids; if only mmseg's `<id>_labelTrainIds.png` files are present, those are used.
  """

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    raw_map = sources.coco_stuff_raw_label_map()
    ids_map = sources.train_id_label_map("COCO-Stuff (labelTrainIds)", self.NUM_CLASSES)
    splits = {}
    for split, folder in (("train", "train2017"), ("validation", "val2017")):
      images = _first(
        [
          (os.path.join(manual, "images"), ""),
          (manual, ""),
          (os.path.join(manual, f"{folder}.zip"), ""),
        ],
        folder,
      )
      labels = _first(
        [
          (os.path.join(manual, "annotations"), ""),
          (os.path.join(manual, "stuffthingmaps_trainval2017"), ""),
          (os.path.join(manual, "stuffthingmaps_trainval2017.zip"), ""),
        ],
        folder,
      )
      if images is None or labels is None:
        logging.warning(
          "%s: no %s images or maps under %s; split %s skipped.", self.name, folder, manual, split
        )
        continue
      raw = {k for k in labels.list(folder, ".png") if not k.endswith("_labelTrainIds")}
      if raw:
        pairs = self._pairs(images, labels, folder, folder, ".png")
        label_map = raw_map
      else:
        pairs = self._pairs(images, labels, folder, folder, "_labelTrainIds.png")
        label_map = ids_map
      splits[split] = self._generate_examples(pairs, images, labels, label_map)
    if not splits:
      raise FileNotFoundError(
        f"{self.name}: nothing to prepare in {manual}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    return splits


BUILDERS = {"ade20k150": Ade20k150, "coco_stuff164k": CocoStuff164k}


def _builder(name: str, data_dir: str | None, **kwargs) -> _SegmentationBuilder:
  if name not in BUILDERS:
    raise ValueError(f"unknown TFDS dataset {name!r}; expected one of {sorted(BUILDERS)}.")
  return BUILDERS[name](data_dir=data_dir, file_format=_FILE_FORMAT, **kwargs)


def prepare(
  name: str, *, data_dir: str | None, manual_dir: str, on_bad_example: str = "raise"
) -> None:
  """Prepares `name` ('ade20k150' | 'coco_stuff164k') from local files into ArrayRecord.

  Args:
    name: builder name.
    data_dir: TFDS data_dir to write to (None = TFDS default, ~/tensorflow_datasets).
    manual_dir: folder with the downloaded archives or extracted folders.
    on_bad_example: 'raise' stops at the first bad file (naming it); 'skip' leaves it out.
  """
  manual_dir = os.path.expanduser(manual_dir)
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(
      f"{name}: manual_dir {manual_dir} does not exist.\n"
      f"{BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )
  builder = _builder(name, data_dir, on_bad_example=on_bad_example)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    ),
    file_format=_FILE_FORMAT,
  )


@dataclasses.dataclass
class TfdsSource:
  """grain source over a prepared split; records carry encoded bytes, decoded in the pipeline."""

  data_source: Any
  label_map: sources.LabelMap

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    rec = self.data_source[int(index)]
    name = rec["name"]
    return {
      "image": rec["image"],
      "label": rec["label"],
      "name": name.decode() if isinstance(name, bytes) else str(name),
    }

  def __repr__(self) -> str:
    return f"TfdsSource({self.data_source!r})"


def load_source(
  name: str,
  split: str,
  *,
  data_dir: str | None,
  manual_dir: str | None = None,
  prepare_if_missing: bool = False,
  on_bad_example: str = "raise",
) -> TfdsSource:
  """Random-access source over a prepared split, for grain.

  Args:
    name: 'ade20k150' | 'coco_stuff164k'.
    split: 'train' | 'validation'.
    data_dir: TFDS data_dir holding the prepared dataset.
    manual_dir: local files to prepare from when missing and `prepare_if_missing`.
    prepare_if_missing: prepare from `manual_dir` when not prepared yet (never downloads).
    on_bad_example: for that preparation, as in `prepare`.

  Raises:
    FileNotFoundError: not prepared (and not preparable here), with the command to prepare it.
  """
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    if prepare_if_missing and manual_dir:
      logging.info(
        "%s is not prepared in %s; preparing from %s.", name, builder.data_dir, manual_dir
      )
      prepare(name, data_dir=data_dir, manual_dir=manual_dir, on_bad_example=on_bad_example)
    else:
      raise FileNotFoundError(
        f"TFDS dataset {name} is not prepared in {builder.data_dir}. Nothing is downloaded "
        "automatically. Prepare it once from your downloaded files:\n"
        f"  python -m flowseg_jax.data.tfds_builders --dataset={name} "
        f"--manual_dir=<folder> --data_dir={data_dir or '<tfds data_dir>'}\n"
        f"(or set config.input.manual_dir in a single-process run). Expected files:"
        f"{BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
  if split not in ("train", "validation"):
    raise ValueError(f"{name}: unknown split {split!r}; expected 'train' or 'validation'.")
  data_source = tfds.data_source(
    name,
    split=split,
    data_dir=data_dir,
    builder_kwargs={"file_format": _FILE_FORMAT},
    download=False,
    decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()},
  )
  label_map = sources.train_id_label_map(f"TFDS {name}", BUILDERS[name].NUM_CLASSES)
  return TfdsSource(data_source, label_map)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", required=True, choices=sorted(BUILDERS))
  parser.add_argument("--manual_dir", required=True)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--on_bad_example", default="raise", choices=("raise", "skip"))
  args = parser.parse_args(argv)
  prepare(
    args.dataset,
    data_dir=args.data_dir,
    manual_dir=args.manual_dir,
    on_bad_example=args.on_bad_example,
  )


if __name__ == "__main__":
  main()
