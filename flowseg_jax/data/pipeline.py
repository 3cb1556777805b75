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
from multiprocessing import resource_tracker

import grain
import ml_collections
from absl import flags, logging

from flowseg_jax.data import datasets, folder, preflight, prompted
from flowseg_jax.data.grain_ops import (
  EvalDataset,
  LoadEvalExample,
  LoadTrainExample,
  SkippingBatchIterDataset,
  TrainIterator,
)


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


def _ignore_interrupts(worker_index: int, worker_count: int) -> None:
  """In each data worker: a terminal's Ctrl-C reaches the whole process group, and the trainer
  checkpoints and stops the workers itself; a worker that died of the KeyboardInterrupt first would
  print its traceback and fail the batch the trainer is still fetching. Until this runs, a worker
  holds SIGINT blocked, inherited from the thread that started it (grain_ops.TrainIterator)."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


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
  src, label_map = datasets.make_source(cfg, cfg.train_split, prepare=pc == 1)
  load = LoadTrainExample(
    label_map=label_map,
    image_size=datasets.check_hw(cfg.image_size, "image_size"),
    random_scale=_scale_range(cfg.random_scale),
    random_flip=bool(cfg.random_flip),
    on_bad_example=datasets.on_bad_mode(cfg),
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
    # multiprocessing's resource tracker, started by the first shared memory, unblocks SIGINT in
    # the thread that starts it (SIG_UNBLOCK, not a restore). Started here, in the caller, it
    # cannot undo the Ctrl-C hold of grain's threads (grain_ops._InterruptsHeldThread).
    resource_tracker.ensure_running()
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
  return TrainIterator(ids, setup)


def create_eval_dataset(
  cfg: ml_collections.ConfigDict,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> EvalDataset:
  """Eval examples of `cfg.eval_split` for this process (strided shard, no shuffle)."""
  pi, pc = _process(process_index, process_count)
  src, label_map = datasets.make_source(cfg, cfg.eval_split, prepare=pc == 1)
  load = LoadEvalExample(
    label_map=label_map,
    image_size=datasets.check_hw(cfg.image_size, "image_size"),
    on_bad_example=datasets.on_bad_mode(cfg),
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
  if not cfg.get("preflight", True) or datasets.check_dataset(cfg) not in datasets.SCANNED:
    return None
  pi, pc = _process(process_index, process_count)
  src, label_map = datasets.make_semantic_source(cfg, split, prepare=False)
  return preflight.scan(
    src,
    label_map,
    split=split,
    on_bad_example=datasets.on_bad_mode(cfg),
    num_classes=datasets.num_classes(cfg),
    process_index=pi,
    process_count=pc,
    binary_fix=(
      folder.binary_fix(datasets.num_classes(cfg))
      if cfg.dataset == "folder" and not cfg.folder.binary
      else ""
    ),
  )
