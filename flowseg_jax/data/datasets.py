"""What a configured dataset is: its name, classes, palette and prompts, and the random-access
sources of its splits (synthetic, a folder, raw ADE20K / COCO-Stuff, their TFDS ArrayRecord
builds, RefCOCO), prompted and with text features where the config asks. The grain pipeline
(`data.pipeline`) reads these sources; the tasks and evaluators take the metadata from here.
"""

from typing import Any

import ml_collections
import numpy as np

from flowseg_jax import storage
from flowseg_jax.data import (
  classes,
  folder,
  prompted,
  refcoco,
  refcoco_source,
  sources,
  synthetic,
  text_cache,
)

DATASETS = (
  "synthetic",
  "folder",
  "ade20k",
  "coco_stuff",
  "tfds_ade20k",
  "tfds_coco_stuff",
  "refcoco",
)
# Datasets read file by file, whose masks the pre-flight reads before step 1.
SCANNED = ("folder", "ade20k", "coco_stuff")
_TFDS_NAMES = {"tfds_ade20k": "ade20k150", "tfds_coco_stuff": "coco_stuff164k"}


def check_dataset(cfg) -> str:
  if cfg.dataset not in DATASETS:
    raise ValueError(f"config.input.dataset must be one of {DATASETS}, got {cfg.dataset!r}.")
  return cfg.dataset


def num_classes(cfg: ml_collections.ConfigDict) -> int:
  """Number of classes N of the configured dataset (labels 0..N-1, 255 = ignore)."""
  name = check_dataset(cfg)
  if name == "synthetic":
    return int(cfg.synthetic.num_classes)
  if name == "refcoco":
    return 2
  if name == "folder":
    return len(folder.classes_of(cfg).names)
  if name in ("ade20k", "tfds_ade20k"):
    return len(classes.ADE20K_CLASSES)
  return len(classes.COCO_STUFF_CLASSES)


def class_names(cfg: ml_collections.ConfigDict) -> list[str]:
  """Class names, index = train id."""
  name = check_dataset(cfg)
  if name == "synthetic":
    return classes.synthetic_class_names(num_classes(cfg))
  if name == "refcoco":
    return ["background", "referred"]
  if name == "folder":
    return list(folder.classes_of(cfg).names)
  if name in ("ade20k", "tfds_ade20k"):
    return list(classes.ADE20K_CLASSES)
  return list(classes.COCO_STUFF_CLASSES)


def palette(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """A visual palette, uint8 (N, 3), injective; for pictures only (not the flow's centroids)."""
  given = dataset_palette(cfg)
  return classes.make_palette(num_classes(cfg)) if given is None else given


def dataset_palette(cfg: ml_collections.ConfigDict) -> np.ndarray | None:
  """The dataset's own class colours, uint8 (N, 3) (a folder's classes.json), else None."""
  if check_dataset(cfg) == "folder":
    return folder.classes_of(cfg).palette
  return None


# ----------------------------------------------------------------------------------------------
# Sources and config checks.
# ----------------------------------------------------------------------------------------------


def make_source(cfg, split: str, prepare: bool) -> tuple[Any, sources.LabelMap]:
  """Returns (random-access source, label map) for a split; prompted examples (binary masks, a
  'prompt' id) when `cfg.prompted` is set (see `data.prompted`), each with its text features
  when `cfg.text_features` names their caches."""
  src, label_map = make_prompted_source(cfg, split, prepare)
  if cfg.get("text_features"):
    features = text_cache.SplitFeatures(text_cache.split_dir(cfg.text_features, split))
    features.check(*_sentences(cfg, src), split)
    src = text_cache.WithTextFeatures(src, features)
  return src, label_map


def split_sentences(cfg: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, list[str]]:
  """(distinct sentence ids int64 ascending, their sentences) of a prompted split: what its text
  feature cache holds (`flowseg cache-text`)."""
  return _sentences(cfg, make_prompted_source(cfg, split, prepare=False)[0])


def _sentences(cfg, src) -> tuple[np.ndarray, list[str]]:
  if not hasattr(src, "prompt_ids"):
    raise ValueError(f"config.input.text_features: {cfg.dataset!r} examples carry no prompts")
  keys = np.unique(src.prompt_ids())
  texts = prompt_list(cfg)
  return keys, [texts[k] for k in keys]


def make_prompted_source(cfg, split: str, prepare: bool) -> tuple[Any, sources.LabelMap]:
  if cfg.dataset == "refcoco":
    r = _refcoco_config(cfg)
    src = refcoco_source.RefCocoSource(r.refs_json, r.instances_json, r.image_dir, split)
    return src, prompted.BINARY_LABEL_MAP
  src, label_map = make_semantic_source(cfg, split, prepare)
  if cfg.get("prompted") is None:
    return src, label_map
  p = cfg.prompted
  train = split == cfg.train_split
  src = prompted.PromptedSource(
    src,
    label_map,
    num_classes(cfg),
    classes=p.train_classes if train else p.eval_classes,
    min_pixels=int(p.min_pixels),
    phrasings=prompted.split_phrasings(p, train),
    mask_noise=int(p.get("mask_noise", 0)) if train else 0,  # evaluation masks stay clean
    noise_seed=int(p.get("mask_noise_seed", 0)),
  )
  return src, prompted.BINARY_LABEL_MAP


def prompt_list(cfg: ml_collections.ConfigDict) -> list[str]:
  """The prompts of a prompted input config, index = the examples' 'prompt' id."""
  if cfg.dataset == "refcoco":
    return refcoco_source.prompts(refcoco.load_refs_json(_refcoco_config(cfg).refs_json))
  if cfg.get("prompted") is None:
    raise ValueError("config.input.prompted is not set: this is not a prompted dataset")
  return prompted.prompt_list(cfg.prompted, class_names(cfg))


def _refcoco_config(cfg):
  r = cfg.get("refcoco")
  if r is None or not all(r.get(k) for k in ("refs_json", "instances_json", "image_dir")):
    raise ValueError(
      "config.input.dataset='refcoco' needs config.input.refcoco.refs_json, .instances_json and "
      ".image_dir (see configs/rlfseg/refcoco.py)"
    )
  for key in ("refs_json", "instances_json", "image_dir"):
    storage.local_only(r[key], f"config.input.refcoco.{key}", "RefCOCO is read from a local disk")
  return r


def make_semantic_source(cfg, split: str, prepare: bool) -> tuple[Any, sources.LabelMap]:
  """Returns (random-access source, label map) for a split.

  `prepare`: for TFDS datasets, prepare a missing dataset from `cfg.manual_dir` (only ever from
  local files, never downloading; callers pass True only in single-process runs).
  """
  name = check_dataset(cfg)
  on_bad = on_bad_mode(cfg)
  if name == "synthetic":
    s = cfg.synthetic
    splits = {
      "train": "train",
      "training": "train",
      "validation": "validation",
      "val": "validation",
    }
    if split not in splits:
      raise ValueError(f"synthetic: unknown split {split!r}; expected one of {sorted(splits)}.")
    split = splits[split]
    n = s.num_train if split == "train" else s.num_eval
    src = synthetic.SyntheticSource(
      num_examples=int(n),
      num_classes=int(s.num_classes),
      size=check_hw(s.size, "synthetic.size"),
      seed=int(s.seed),
      split=split,
      class_colours=bool(s.get("class_colours", False)),
      compose=None if s.get("compose") is None else tuple(int(v) for v in s.compose),
      classes=(
        tuple(int(c) for c in s.train_classes)
        if split == "train" and s.get("train_classes") is not None
        else None
      ),
    )
    return src, sources.train_id_label_map("synthetic", int(s.num_classes))
  if name == "folder":
    return folder.folder_source(cfg, split)  # checks data_dir as it reads the classes
  if name in ("ade20k", "coco_stuff"):
    if not cfg.data_dir:
      raise ValueError(f"config.input.data_dir must point at the {name} dataset root.")
    storage.local_only(
      cfg.data_dir,
      "config.input.data_dir",
      f"raw {name} folders are read file by file; for object storage prepare the dataset as "
      f"config.input.dataset='tfds_{name}' (ArrayRecord)",
    )
    if name == "ade20k":
      src = sources.ade20k_source(cfg.data_dir, split)
    else:
      src = sources.coco_stuff_source(cfg.data_dir, split, labels=cfg.coco_stuff_labels)
    return src, src.label_map
  try:
    from flowseg_jax.data import tfds_builders  # Imported here: tfds is slow to import.
  except ImportError as e:
    raise ImportError(
      f"config.input.dataset={name!r} needs TensorFlow Datasets: pip install 'flowseg-jax[tfds]' "
      f"({e})"
    ) from e

  src = tfds_builders.load_source(
    _TFDS_NAMES[name],
    split,
    data_dir=cfg.data_dir,
    manual_dir=cfg.manual_dir,
    prepare_if_missing=prepare,
    on_bad_example=on_bad,
  )
  return src, src.label_map


def on_bad_mode(cfg) -> str:
  if cfg.on_bad_example not in ("raise", "skip"):
    raise ValueError(
      f"config.input.on_bad_example must be 'raise' or 'skip', got {cfg.on_bad_example!r}."
    )
  return cfg.on_bad_example


def check_hw(value, field: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.input.{field} must be (H, W), got {value!r}.") from e
  if h <= 0 or w <= 0:
    raise ValueError(f"config.input.{field} must be positive, got {value!r}.")
  return h, w


def num_eval_examples(cfg: ml_collections.ConfigDict) -> int:
  """Total number of eval examples over all processes (before skipping bad ones)."""
  return len(make_prompted_source(cfg, cfg.eval_split, prepare=False)[0])


def num_train_examples(cfg: ml_collections.ConfigDict) -> int:
  """Number of training examples (one epoch, all processes)."""
  return len(make_prompted_source(cfg, cfg.train_split, prepare=False)[0])
