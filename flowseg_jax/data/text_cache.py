"""Per-split text-feature caches on disk, read per example (RLFSeg's 'cache' condition).

A frozen text encoder's features of every sentence of a split are computed once (`build`, the
`flowseg cache-text` command) into `<config.input.text_features>/<split>/`, then each example's
features are read from there by the data loader and travel with the batch (`batch['text']`): no
table of the dataset's sentences lives on a device or in host memory. RefCOCO's ~142k sentences at
(128, 2048) are ~139 GiB in float32 (~70 GiB in bfloat16), far beyond one device.

Layout of one split:
  manifest.json    what the cache was built for: format, split, encoder identity, max_length,
                   embed_dim, storage dtype, chunk size, number of rows, and a sha256 fingerprint
                   of the split's (sentence id, sentence) pairs
  keys.npy         int64 (N,): the sentence id of each row, ascending (the examples' 'prompt' id:
                   for RefCOCO the sentence's index in the refs file)
  chunk-00000.npy  (<= chunk_size, T, D) rows [k * chunk_size, (k + 1) * chunk_size), storage
  ...              dtype (bfloat16 kept as its uint16 bits: .npy has no bfloat16)
The cache is complete when every chunk exists.

Why .npy chunks read row by row, not ArrayRecord: every row has the same shape, so a row is one
`pread` at a computed offset: no serialisation or decoding, random access by arithmetic, NumPy
writes and reads the format (no dependency), and grain's worker processes share the OS page cache.
Rows are read with `os.pread` rather than through a memory map: on a kernel whose page cache holds
large folios (ext4 here) every row touched through a map maps ~2 MiB of the file into the process
(measured: 40 rows, 56 MiB of RSS), while a read copies just the row. The files must be local,
which RefCOCO already requires (`storage.local_only`). One file per chunk makes each write atomic
(a temporary file renamed into place) and a killed build resumable: a rerun encodes only the
missing chunks.

A cache made for other sentences (other refs, another split), another encoder or tokenizer
(`encoder` identity: a hash of the encoder's config and tokenizer files and weight sizes), another
max_length or feature width is refused in one line (`StaleFeatureCacheError`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np

from flowseg_jax import storage
from flowseg_jax.run.status import ConfigError

FORMAT = 1
MANIFEST = "manifest.json"
KEYS = "keys.npy"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
# Fields a rebuild must agree on (the rest describe progress or how rows are chunked).
BUILT_FOR = ("format", "split", "encoder", "max_length", "embed_dim", "num_rows", "sentences")


class StaleFeatureCacheError(ConfigError):
  """A feature cache built for other sentences, another encoder or other shapes, or unfinished."""


def fingerprint(keys: Sequence[int], sentences: Sequence[str]) -> str:
  """sha256 of the (sentence id, sentence) pairs, in order."""
  h = hashlib.sha256()
  for key, sentence in zip(keys, sentences, strict=True):
    h.update(f"{int(key)}\0{sentence}\0".encode())
  return h.hexdigest()


def split_dir(root: str | os.PathLike, split: str) -> str:
  return os.path.join(os.fspath(root), split)


def _chunk_name(k: int) -> str:
  return f"chunk-{k:05d}.npy"


def _num_chunks(num_rows: int, chunk_size: int) -> int:
  return -(-num_rows // chunk_size)


def read_manifest(directory: str | os.PathLike) -> dict:
  path = os.path.join(os.fspath(directory), MANIFEST)
  if not os.path.isfile(path):
    raise StaleFeatureCacheError(
      f"{directory}: no text-feature cache ({MANIFEST} missing); build it with `flowseg "
      "cache-text --config ... --split SPLIT`"
    )
  with open(path) as f:
    return json.load(f)


def check_manifest(manifest: dict, expect: dict, where: str = "") -> None:
  """Raises StaleFeatureCacheError naming every field of `expect` the manifest differs in."""
  diffs = [
    f"{k} {str(manifest.get(k))[:16]} != expected {str(v)[:16]}"
    for k, v in expect.items()
    if manifest.get(k) != v
  ]
  if diffs:
    where = where or manifest.get("directory", "text-feature cache")
    raise StaleFeatureCacheError(
      f"{where}: built for other inputs ({'; '.join(diffs)}); rebuild it (`flowseg cache-text`) "
      "or point config.input.text_features elsewhere"
    )


def check_caches(root: str | None, splits: Sequence[str], expect: dict) -> None:
  """Every split's cache under `root` exists, is complete and agrees with `expect` (a model's
  encoder identity and shapes); else one line."""
  if not root:
    raise StaleFeatureCacheError(
      "config.prompted.condition='cache' trains on streamed text features: build them with "
      "`flowseg cache-text` and set config.input.text_features"
    )
  for split in dict.fromkeys(splits):
    features = SplitFeatures(split_dir(root, split))
    check_manifest(features.manifest, expect, features.directory)


def _encode_rows(encoder, texts: Sequence[str], storage_dtype: str) -> np.ndarray:
  features, _ = encoder(list(texts))
  features = np.asarray(features, np.float32)
  if storage_dtype == "bfloat16":
    return features.astype(ml_dtypes.bfloat16).view(np.uint16)
  return features.astype(storage_dtype)


def build(
  directory: str | os.PathLike,
  keys: Sequence[int],
  sentences: Sequence[str],
  encoder,
  *,
  split: str,
  chunk_size: int = 1024,
  storage_dtype: str = "bfloat16",
  log: Callable[[str], None] | None = print,
  after_chunk: Callable[[int], None] | None = None,
) -> dict:
  """Encodes `sentences` (one per distinct sentence id in `keys`) in chunks into `directory`;
  resumes a build that was stopped (existing chunks are kept). Returns the manifest.

  Args:
    encoder: a `tasks.prompts.TextEncoder` (or alike: `identity`, `max_length`, `embed_dim`,
      `__call__(texts) -> (features (n, max_length, embed_dim), mask)`).
    log: progress lines (one per chunk: rows done, sentences/s, time left); None: silent.
    after_chunk: called with the chunk index after each chunk is on disk (tests stop builds).
  Raises:
    StaleFeatureCacheError: `directory` holds a cache built for other sentences or encoder.
  """
  storage.local_only(directory, "text-feature cache", "rows are read by offset")
  if storage_dtype not in STORAGE_DTYPES:
    raise ValueError(f"storage_dtype={storage_dtype!r}; expected one of {STORAGE_DTYPES}")
  keys = np.asarray(keys, np.int64)
  if len(keys) != len(sentences) or len(keys) == 0:
    raise ValueError(f"{len(keys)} sentence ids for {len(sentences)} sentences (need >= 1)")
  if np.any(np.diff(keys) <= 0):
    raise ValueError("sentence ids must be distinct and ascending")
  directory = os.fspath(directory)
  manifest = dict(
    format=FORMAT,
    split=split,
    encoder=encoder.identity,
    max_length=int(encoder.max_length),
    embed_dim=int(encoder.embed_dim),
    num_rows=len(keys),
    sentences=fingerprint(keys, sentences),
    storage_dtype=storage_dtype,
    chunk_size=int(chunk_size),
  )
  os.makedirs(directory, exist_ok=True)
  if os.path.isfile(os.path.join(directory, MANIFEST)):  # resuming: same inputs or refused
    old = read_manifest(directory)
    check_manifest(old, {k: manifest[k] for k in BUILT_FOR}, directory)
    manifest = {**manifest, "storage_dtype": old["storage_dtype"], "chunk_size": old["chunk_size"]}
  else:
    buffer = io.BytesIO()
    np.save(buffer, keys)
    storage.write_atomic(os.path.join(directory, KEYS), buffer.getvalue())
    storage.write_atomic(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1))
  size = manifest["chunk_size"]
  total = _num_chunks(len(keys), size)
  todo = [k for k in range(total) if not os.path.isfile(os.path.join(directory, _chunk_name(k)))]
  start, done_rows = time.perf_counter(), 0
  if log and len(todo) < total:
    log(f"{split}: resuming, {total - len(todo)}/{total} chunks already built")
  for k in todo:
    rows = slice(k * size, min((k + 1) * size, len(keys)))
    block = _encode_rows(encoder, sentences[rows], manifest["storage_dtype"])
    buffer = io.BytesIO()
    np.save(buffer, block)
    storage.write_atomic(os.path.join(directory, _chunk_name(k)), buffer.getvalue())
    done_rows += rows.stop - rows.start
    if log:
      rate = done_rows / max(time.perf_counter() - start, 1e-9)
      left = sum(min(size, len(keys) - j * size) for j in todo if j > k) / rate
      log(
        f"{split}: chunk {k + 1}/{total} ({rows.stop}/{len(keys)} sentences, {rate:.0f} "
        f"sentences/s, {left:.0f} s left)"
      )
    if after_chunk is not None:
      after_chunk(k)
  return manifest


@dataclasses.dataclass
class SplitFeatures:
  """A complete split cache, read by sentence id: `features(key)` -> float32 (T, D).

  A chunk file is opened when first read, in each process (a pickled copy, e.g. in a grain
  worker, opens its own); each row is one `os.pread`.
  """

  directory: str

  def __post_init__(self):
    self.directory = os.fspath(self.directory)
    storage.local_only(self.directory, "config.input.text_features", "rows are read by offset")
    self.manifest = read_manifest(self.directory)
    check_manifest(self.manifest, {"format": FORMAT}, self.directory)
    self.keys = np.load(os.path.join(self.directory, KEYS))
    n, size = self.manifest["num_rows"], self.manifest["chunk_size"]
    missing = [
      k
      for k in range(_num_chunks(n, size))
      if not os.path.isfile(os.path.join(self.directory, _chunk_name(k)))
    ]
    if missing or len(self.keys) != n:
      raise StaleFeatureCacheError(
        f"{self.directory}: unfinished text-feature cache ({len(missing)} of "
        f"{_num_chunks(n, size)} chunks missing); rerun `flowseg cache-text` to finish it"
      )
    self._files: dict[int, tuple] = {}  # chunk -> (open file, offset of its data)

  def __getstate__(self):
    return {**self.__dict__, "_files": {}}

  def _chunk(self, k: int) -> tuple:
    if k not in self._files:
      f = open(os.path.join(self.directory, _chunk_name(k)), "rb", buffering=0)  # noqa: SIM115
      version = np.lib.format.read_magic(f)
      getattr(np.lib.format, f"read_array_header_{version[0]}_0")(f)
      self._files[k] = (f, f.tell())
    return self._files[k]

  @property
  def shape(self) -> tuple[int, int]:
    """(T, D) of one sentence's features."""
    return self.manifest["max_length"], self.manifest["embed_dim"]

  def check(self, keys: Sequence[int], sentences: Sequence[str], split: str) -> None:
    """Refuses a cache built for other sentences or another split than (keys, sentences)."""
    expect = {"split": split, "num_rows": len(keys), "sentences": fingerprint(keys, sentences)}
    check_manifest(self.manifest, expect, self.directory)

  def features(self, key: int) -> np.ndarray:
    row = int(np.searchsorted(self.keys, key))
    if row >= len(self.keys) or self.keys[row] != key:
      raise KeyError(f"{self.directory}: sentence id {key} is not in this cache")
    size = self.manifest["chunk_size"]
    k = row // size
    f, offset = self._chunk(k)
    bf16 = self.manifest["storage_dtype"] == "bfloat16"
    dtype = np.dtype(np.uint16 if bf16 else self.manifest["storage_dtype"])
    nbytes = int(np.prod(self.shape)) * dtype.itemsize
    data = os.pread(f.fileno(), nbytes, offset + (row - k * size) * nbytes)
    if len(data) != nbytes:
      raise StaleFeatureCacheError(f"{self.directory}: {_chunk_name(k)} is truncated")
    stored = np.frombuffer(data, dtype).reshape(self.shape)
    if bf16:
      stored = stored.view(ml_dtypes.bfloat16)
    return stored.astype(np.float32)


@dataclasses.dataclass
class WithTextFeatures:
  """A grain source whose records (with a 'prompt' sentence id) also carry 'text': that
  sentence's features float32 (T, D), read from `cache` when the record is read."""

  base: object
  cache: SplitFeatures

  def __len__(self) -> int:
    return len(self.base)

  def __getattr__(self, name):  # image_ids, prompt_ids, ... of the wrapped source
    if name in ("base", "cache"):
      raise AttributeError(name)
    return getattr(self.base, name)

  def __getitem__(self, index: int) -> dict:
    record = dict(self.base[index])
    record["text"] = self.cache.features(int(record["prompt"]))
    return record
