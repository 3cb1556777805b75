"""The grain input pipeline: config, train iterator, eval dataset.

Train (`create_train_iterator`), per process:

  source -> seeded global shuffle (reshuffled every epoch) -> repeat forever
    (prompted `group_by_image`: images shuffled instead, each image's examples kept together,
    `prompted.ImageGroupedOrder`)
  -> random_map(read + check + decode + scale/crop/flip + normalise)   [seed: (data seed, position)]
  -> [start + process_index::process_count] (this process's elements of the global stream)
  -> to_iter_dataset (reader threads) -> batch(B_local), skipping bad examples in 'skip' mode
  -> mp_prefetch(num_workers)              (when num_workers > 0)

The global stream (shuffle + augmentation) depends only on the data seed, so the union of the
processes' batches at a step is the same set of examples for any process count; each process
reads and decodes only its own elements. After n batches (no skipped examples, `num_workers` 0) the
processes have consumed exactly the global examples [start, start + n * global_batch): the global
position from which an iterator for another process count continues (elastic resume). Batches are dicts of NumPy arrays:
  image        float32 (B_local, H, W, 3) in [-1, 1]
  label        int32   (B_local, H, W), 255 = ignore
  prompt       int32   (B_local,) prompted datasets: each example's sentence (prompt) id
  text         float32 (B_local, T, D) with `text_features`: those sentences' encoder features,
               read per example from the split's cache on disk (`data.text_cache`)
  num_skipped  int32   () bad examples this process skipped while filling this batch (always 0
               in 'raise' mode). It travels with the batch, so it reaches the main process also
               from grain worker processes. Pop it before turning the batch into global arrays;
               sum it over steps (and over processes) for the training log.
The iterator is a `grain.DatasetIterator` (`get_state`/`set_state`; orbax via
`grain.checkpoint.CheckpointSave/CheckpointRestore`). Its state is per process; it records the
input setup (dataset, split size, global batch, process index/count, workers, data seed) and
restoring under another setup raises a ValueError that says what differs.

Eval (`create_eval_dataset`): no shuffle; process i gets examples i, i + n, i + 2n, ... (strided),
so the shards are disjoint, complete, and differ in length by at most one.
"""

import os
import signal
import sys
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags, logging

from flowseg_jax import storage
from flowseg_jax.data import (
  classes,
  folder,
  preflight,
  prompted,
  refcoco,
  refcoco_source,
  sources,
  synthetic,
  text_cache,
)
from flowseg_jax.data.grain_ops import (
  EvalDataset,
  LoadEvalExample,
  LoadTrainExample,
  SkippingBatchIterDataset,
  TrainIterator,
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


def default_input_config() -> ml_collections.ConfigDict:
  """Defaults of `config.input` (a runnable, download-free setup on the synthetic dataset)."""
  c = ml_collections.ConfigDict()
  # 'synthetic' | 'folder' | 'ade20k' | 'coco_stuff' | 'tfds_ade20k' | 'tfds_coco_stuff'.
  c.dataset = "synthetic"
  # Raw layout root (your folder dataset, ADEChallengeData2016 or its parent, coco_stuff164k) or
  # the TFDS data_dir.
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  # TFDS only: folder holding the manually downloaded archives/folders to prepare from.
  c.manual_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_split = "train"
  c.eval_split = "validation"
  # (H, W) of training images and of the whole-image eval input.
  c.image_size = (64, 64)
  # GLOBAL batch size (divided by the process count). Evaluation batches: config.eval.batch_per_device.
  c.batch_size = 32
  # Data-order and augmentation seed; None = the `seed` passed to create_train_iterator.
  c.shuffle_seed = ml_collections.FieldReference(None, field_type=int)
  # grain worker processes (0 = in-process) and batches buffered per worker.
  c.num_workers = 0
  c.prefetch_buffer = 2
  # (lo, hi): scale by r ~ U(lo, hi) (1 = image just covers image_size), then random crop to
  # image_size; None: resize the whole image to image_size.
  c.random_scale = ml_collections.FieldReference(None, field_type=tuple)
  c.random_flip = False
  # 'raise': one clear error naming the file; 'skip': warn, skip, count (batch['num_skipped']).
  c.on_bad_example = "raise"
  # Read every mask of the folder / ADE20K / COCO-Stuff splits before step 1 (data.preflight).
  c.preflight = True
  # COCO-Stuff raw folder: 'raw' stuffthingmaps <id>.png, or 'train_ids' <id>_labelTrainIds.png.
  c.coco_stuff_labels = "raw"
  # Prompted datasets: folder of per-split text-feature caches (`flowseg cache-text`, one
  # subfolder per split); each example then carries its sentence's features ('text'), read from
  # disk by the loader (data.text_cache). None: no features in the batch.
  c.text_features = ml_collections.FieldReference(None, field_type=str)
  c.folder = folder.default_folder_config()  # dataset 'folder' (data.folder)
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.num_classes = 150
  c.synthetic.num_train = 2048
  c.synthetic.num_eval = 256
  c.synthetic.size = (64, 64)
  c.synthetic.seed = 0
  c.synthetic.class_colours = False  # colour labelled objects by class (data.synthetic)
  # (colours, textures): class k = colour k // T, texture k % T (compositional data, data.synthetic)
  c.synthetic.compose = ml_collections.FieldReference(None, field_type=tuple)
  # classes the training images' objects are drawn from (None: all; eval images: always all)
  c.synthetic.train_classes = ml_collections.FieldReference(None, field_type=list)
  return c


# ----------------------------------------------------------------------------------------------
# Dataset metadata.
# ----------------------------------------------------------------------------------------------


def _ignore_interrupts(worker_index: int, worker_count: int) -> None:
  """In each data worker: a terminal's Ctrl-C reaches the whole process group, and the trainer
  checkpoints and stops the workers itself; a worker that died of the KeyboardInterrupt first would
  print its traceback and fail the batch the trainer is still fetching."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _check_dataset(cfg) -> str:
  if cfg.dataset not in DATASETS:
    raise ValueError(f"config.input.dataset must be one of {DATASETS}, got {cfg.dataset!r}.")
  return cfg.dataset


def num_classes(cfg: ml_collections.ConfigDict) -> int:
  """Number of classes N of the configured dataset (labels 0..N-1, 255 = ignore)."""
  name = _check_dataset(cfg)
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
  name = _check_dataset(cfg)
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
  if _check_dataset(cfg) == "folder":
    return folder.classes_of(cfg).palette
  return None


# ----------------------------------------------------------------------------------------------
# Sources and config checks.
# ----------------------------------------------------------------------------------------------


def _make_source(cfg, split: str, prepare: bool) -> tuple[Any, sources.LabelMap]:
  """Returns (random-access source, label map) for a split; prompted examples (binary masks, a
  'prompt' id) when `cfg.prompted` is set (see `data.prompted`), each with its text features
  when `cfg.text_features` names their caches."""
  src, label_map = _make_prompted_source(cfg, split, prepare)
  if cfg.get("text_features"):
    features = text_cache.SplitFeatures(text_cache.split_dir(cfg.text_features, split))
    features.check(*_sentences(cfg, src), split)
    src = text_cache.WithTextFeatures(src, features)
  return src, label_map


def split_sentences(cfg: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, list[str]]:
  """(distinct sentence ids int64 ascending, their sentences) of a prompted split: what its text
  feature cache holds (`flowseg cache-text`)."""
  return _sentences(cfg, _make_prompted_source(cfg, split, prepare=False)[0])


def _sentences(cfg, src) -> tuple[np.ndarray, list[str]]:
  if not hasattr(src, "prompt_ids"):
    raise ValueError(f"config.input.text_features: {cfg.dataset!r} examples carry no prompts")
  keys = np.unique(src.prompt_ids())
  texts = prompt_list(cfg)
  return keys, [texts[k] for k in keys]


def _make_prompted_source(cfg, split: str, prepare: bool) -> tuple[Any, sources.LabelMap]:
  if cfg.dataset == "refcoco":
    r = _refcoco_config(cfg)
    src = refcoco_source.RefCocoSource(r.refs_json, r.instances_json, r.image_dir, split)
    return src, prompted.BINARY_LABEL_MAP
  src, label_map = _make_semantic_source(cfg, split, prepare)
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


def _make_semantic_source(cfg, split: str, prepare: bool) -> tuple[Any, sources.LabelMap]:
  """Returns (random-access source, label map) for a split.

  `prepare`: for TFDS datasets, prepare a missing dataset from `cfg.manual_dir` (only ever from
  local files, never downloading; callers pass True only in single-process runs).
  """
  name = _check_dataset(cfg)
  on_bad = _on_bad(cfg)
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
      size=_hw(s.size, "synthetic.size"),
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


def _on_bad(cfg) -> str:
  if cfg.on_bad_example not in ("raise", "skip"):
    raise ValueError(
      f"config.input.on_bad_example must be 'raise' or 'skip', got {cfg.on_bad_example!r}."
    )
  return cfg.on_bad_example


def _hw(value, field: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.input.{field} must be (H, W), got {value!r}.") from e
  if h <= 0 or w <= 0:
    raise ValueError(f"config.input.{field} must be positive, got {value!r}.")
  return h, w


def _scale_range(value) -> tuple[float, float] | None:
  if value is None:
    return None
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.input.random_scale must be None or (lo, hi), got {value!r}.") from e
  if not 0 < lo <= hi:
    raise ValueError(f"config.input.random_scale needs 0 < lo <= hi, got {value!r}.")
  return lo, hi


# ----------------------------------------------------------------------------------------------
# Public constructors.
# ----------------------------------------------------------------------------------------------


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Only needed for the defaults.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count}).")
  return int(process_index), int(process_count)


def _local_batch(global_batch: int, process_count: int, field: str) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
      f"config.input.{field}={global_batch} must be a positive multiple of the process count "
      f"{process_count}."
    )
  return global_batch // process_count


def create_train_iterator(
  cfg: ml_collections.ConfigDict,
  *,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  start: int = 0,
) -> TrainIterator:
  """Infinite, deterministic, checkpointable iterator over this process's training batches.

  Args:
    cfg: `config.input` (see `default_input_config`).
    seed: run seed; the data seed is `cfg.shuffle_seed` if set, else this.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    start: global example index to start the stream at (elastic resume: the checkpoint's data
      position, so another process count continues where the old one stopped).

  Returns:
    A `TrainIterator` (a grain DatasetIterator) of dicts; see the module docstring for fields,
    shapes and dtypes.
  """
  pi, pc = _process(process_index, process_count)
  local_batch = _local_batch(int(cfg.batch_size), pc, "batch_size")
  data_seed = int(seed if cfg.shuffle_seed is None else cfg.shuffle_seed)
  src, label_map = _make_source(cfg, cfg.train_split, prepare=pc == 1)
  load = LoadTrainExample(
    label_map=label_map,
    image_size=_hw(cfg.image_size, "image_size"),
    random_scale=_scale_range(cfg.random_scale),
    random_flip=bool(cfg.random_flip),
    on_bad_example=_on_bad(cfg),
  )
  num_workers = int(cfg.num_workers)
  if cfg.get("prompted") is not None and cfg.prompted.get("group_by_image", False):
    if not hasattr(src, "image_ids"):
      raise ValueError(
        f"config.input.prompted.group_by_image: the {cfg.dataset!r} source cannot group by image"
      )
    order = prompted.ImageGroupedOrder(src, data_seed)
    ds = grain.MapDataset.range(sys.maxsize).seed(data_seed).map(order)
  else:
    ds = grain.MapDataset.source(src).seed(data_seed).shuffle().repeat()
  ds = ds.random_map(load)
  if start < 0:
    raise ValueError(f"start must be >= 0, got {start}")
  ds = ds[start + pi :: pc]  # the global stream from `start`; this process's elements
  threads = 2 if num_workers > 0 else min(8, os.cpu_count() or 1)
  buffer = max(1, int(cfg.prefetch_buffer)) * local_batch
  ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
  ids = SkippingBatchIterDataset(ids, local_batch)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's multiprocessing reads absl flags; outside an absl app (pytest, Colab) they are
      # unparsed and reading them raises. Parsing "no flags" keeps every default.
      flags.FLAGS.mark_as_parsed()
    ids = ids.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(1, int(cfg.prefetch_buffer))
      ),
      worker_init_fn=_ignore_interrupts,
    )
  setup = {
    "dataset": cfg.dataset,
    "split": cfg.train_split,
    "num_examples": len(src),
    "batch_size": int(cfg.batch_size),
    "process_index": pi,
    "process_count": pc,
    "num_workers": num_workers,
    "data_seed": data_seed,
    "start": int(start),
  }
  logging.info("Train input: %s, local batch %d.", setup, local_batch)
  return TrainIterator(iter(ids), setup)


def create_eval_dataset(
  cfg: ml_collections.ConfigDict,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> EvalDataset:
  """Eval examples of `cfg.eval_split` for this process (strided shard, no shuffle)."""
  pi, pc = _process(process_index, process_count)
  src, label_map = _make_source(cfg, cfg.eval_split, prepare=pc == 1)
  load = LoadEvalExample(
    label_map=label_map, image_size=_hw(cfg.image_size, "image_size"), on_bad_example=_on_bad(cfg)
  )
  ds = grain.MapDataset.source(src)[pi::pc]
  return EvalDataset(ds.map(load), len(ds))


def check_eval_examples(
  cfg: ml_collections.ConfigDict,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> int:
  """Reads every eval example of this process's shard once: decodable, image and annotation sizes
  equal, labels in range. Returns the number of bad examples ('skip' mode); in 'raise' mode the
  first bad one raises BadExampleError naming its file. Runs before training, so that a broken
  validation set stops the run at start-up rather than at its first evaluation."""
  dataset = create_eval_dataset(cfg, process_index=process_index, process_count=process_count)
  for _ in dataset:
    pass
  return dataset.num_skipped


def num_eval_examples(cfg: ml_collections.ConfigDict) -> int:
  """Total number of eval examples over all processes (before skipping bad ones)."""
  return len(_make_prompted_source(cfg, cfg.eval_split, prepare=False)[0])


def num_train_examples(cfg: ml_collections.ConfigDict) -> int:
  """Number of training examples (one epoch, all processes)."""
  return len(_make_prompted_source(cfg, cfg.train_split, prepare=False)[0])


def check_split(
  cfg: ml_collections.ConfigDict,
  split: str,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> preflight.Report | None:
  """The pre-flight of one split (`data.preflight.scan`) on this process's share: every mask read
  and checked, the listing's problems reported; None for datasets that are not read file by file
  (synthetic, TFDS, RefCOCO) or with `cfg.preflight` off. Raises sources.BadExampleError ('raise',
  or 0/255 masks), FileNotFoundError / ValueError for a folder that cannot be listed."""
  if not cfg.get("preflight", True) or _check_dataset(cfg) not in SCANNED:
    return None
  pi, pc = _process(process_index, process_count)
  src, label_map = _make_semantic_source(cfg, split, prepare=False)
  return preflight.scan(
    src,
    label_map,
    split=split,
    on_bad_example=_on_bad(cfg),
    num_classes=num_classes(cfg),
    process_index=pi,
    process_count=pc,
    binary_fix=(
      folder.binary_fix(num_classes(cfg))
      if cfg.dataset == "folder" and not cfg.folder.binary
      else ""
    ),
  )
