"""Prompted (image, prompt, binary mask) examples from a semantic dataset.

`PromptedSource` wraps any source of this package (synthetic, ADE20K, COCO-Stuff, TFDS): every
(example, class) pair in which the class covers at least `min_pixels` pixels becomes one prompted
example, with the prompt `template.format(class name)` and the mask 1 on that class, 0 on every
other annotated pixel and 255 where the annotation is 255. `classes` restricts which classes a
split uses: a zero-shot split trains on some classes and evaluates on the others.

Phrasings: with `templates` (several training sentences per class) and `eval_templates` (held-out
sentences the evaluation uses instead), the prompt list is every template over every class name,
training templates first: prompt id = j * num_classes + class for template j (`prompt_list`). A
record's template is fixed by its (image, class) pair, (image + class) mod the split's number of
templates, so every class is seen under every training phrasing. Without them there is one
template and the prompt id is the class id; train and eval splits share the prompt list.

The (example, class) index is built once per source by reading every annotation (a few seconds
for the synthetic data; one pass over the label PNGs for ADE20K / COCO-Stuff).

`config.input.prompted` (None for semantic runs):
  template      prompt template, '{}' is the class name ("a photo of {}")
  templates     training templates (None: [template])
  eval_templates  held-out templates the eval split uses (None: the training ones)
  names         class names to put in the prompts (None: the dataset's)
  train_classes class ids used for training (None: all)
  eval_classes  class ids used for evaluation (None: all)
  min_pixels    least pixels of a class in an (original-size) annotation to make an example
  mask_noise    training masks dilated / eroded by up to this many pixels, outlines jittered
                (`data.mask_noise`; 0: clean); evaluation masks are always clean
  mask_noise_seed  seed of that noise (with the image and class it fixes each example's noise)
  group_by_image  training order: shuffle images, not examples, and keep each image's prompted
                examples together (`ImageGroupedOrder`), so a batch holds the same image under
                several prompts
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from flowseg_jax.centroids import IGNORE_LABEL
from flowseg_jax.data import mask_noise as mask_noise_lib
from flowseg_jax.data import sources

BINARY_LABEL_MAP = sources.train_id_label_map("prompted", 2)


def default_prompted_input_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.template = "a photo of {}"
  c.templates = ml_collections.FieldReference(None, field_type=list)
  c.eval_templates = ml_collections.FieldReference(None, field_type=list)
  c.names = ml_collections.FieldReference(None, field_type=list)
  c.train_classes = ml_collections.FieldReference(None, field_type=list)
  c.eval_classes = ml_collections.FieldReference(None, field_type=list)
  c.min_pixels = 16
  c.mask_noise = 0
  c.mask_noise_seed = 0
  c.group_by_image = False
  return c


def split_templates(cfg) -> tuple[list[str], list[str]]:
  """(training templates, held-out eval templates) of `config.input.prompted` (older configs
  without the fields: [template], [])."""
  train = list(cfg.get("templates") or [cfg.template])
  held_out = list(cfg.get("eval_templates") or [])
  for field, templates in (("templates", train), ("eval_templates", held_out)):
    for t in templates:
      if "{}" not in t:
        raise ValueError(f"config.input.prompted.{field} must contain '{{}}', got {t!r}")
  return train, held_out


def prompt_list(cfg, class_names: Sequence[str]) -> list[str]:
  """Every template (training, then held-out) over every class name (`names` when set)."""
  names = list(cfg.get("names") or class_names)
  if len(names) != len(class_names):
    raise ValueError(
      f"config.input.prompted.names has {len(names)} names for {len(class_names)} classes"
    )
  train, held_out = split_templates(cfg)
  return [t.format(name) for t in train + held_out for name in names]


def split_phrasings(cfg, train: bool) -> tuple[int, ...]:
  """The template indices (into `prompt_list`'s templates) a split's records use."""
  train_templates, held_out = split_templates(cfg)
  if train or not held_out:
    return tuple(range(len(train_templates)))
  return tuple(range(len(train_templates), len(train_templates) + len(held_out)))


def binary_mask(label: np.ndarray, cls: int) -> np.ndarray:
  """uint8 (H, W): 1 where label == cls, 255 where label == 255, else 0."""
  out = (label == cls).astype(np.uint8)
  out[label == IGNORE_LABEL] = IGNORE_LABEL
  return out


@dataclasses.dataclass
class PromptedSource:
  """grain random-access source of prompted examples over a semantic `base` source.

  Records: {'image': the base image (path, bytes or array), 'label': uint8 (H, W) binary mask,
  'prompt': int32 prompt id (template j * num_classes + class id, j from `phrasings`), 'name':
  '<base name>:<class id>'}. With `mask_noise` > 0 the mask is `mask_noise.perturb_mask`'s noisy
  copy, drawn from (noise_seed, image, class).
  """

  base: Any
  label_map: sources.LabelMap
  num_classes: int
  classes: Sequence[int] | None = None
  min_pixels: int = 16
  phrasings: Sequence[int] = (0,)
  mask_noise: int = 0
  noise_seed: int = 0

  def __post_init__(self):
    allowed = np.zeros(self.num_classes, bool)
    if self.classes is None:
      allowed[:] = True
    else:
      bad = [c for c in self.classes if not 0 <= int(c) < self.num_classes]
      if bad:
        raise ValueError(f"prompted classes {bad} are not in [0, {self.num_classes})")
      allowed[np.asarray(list(self.classes), np.int64)] = True
    index = []
    for i in range(len(self.base)):
      record = self.base[i]
      label = sources.read_label(record["label"], record["name"], self.label_map)
      counts = np.bincount(label.ravel(), minlength=256)[: self.num_classes]
      for c in np.flatnonzero((counts >= self.min_pixels) & allowed):
        index.append((i, int(c)))
    if not index:
      raise ValueError(
        f"no prompted examples: no class of {sorted(np.flatnonzero(allowed).tolist())} covers "
        f">= {self.min_pixels} pixels in any of the {len(self.base)} examples"
      )
    self.index = np.asarray(index, np.int64)

  def __len__(self) -> int:
    return len(self.index)

  def image_ids(self) -> np.ndarray:
    """int64 (len,): the base example of every record (records of one image are contiguous)."""
    return self.index[:, 0]

  def prompt_ids(self) -> np.ndarray:
    """int64 (len,): each record's 'prompt' id, without reading an annotation."""
    i, c = self.index[:, 0], self.index[:, 1]
    templates = np.asarray(self.phrasings, np.int64)[(i + c) % len(self.phrasings)]
    return templates * self.num_classes + c

  def __getitem__(self, index: int) -> dict:
    i, c = (int(v) for v in self.index[int(index)])
    record = self.base[i]
    label = sources.read_label(record["label"], record["name"], self.label_map)
    template = self.phrasings[(i + c) % len(self.phrasings)]
    mask = binary_mask(label, c)
    if self.mask_noise:
      rng = np.random.default_rng([self.noise_seed, i, c])
      mask = mask_noise_lib.perturb_mask(mask, rng, self.mask_noise)
    return {
      "image": record["image"],
      "label": mask,
      "prompt": np.int32(template * self.num_classes + c),
      "name": f"{record['name']}:{c}",
    }


class ImageGroupedOrder:
  """Global example index -> record of `source`, shuffled by image (grain `Map` over a range).

  Epoch e (indices [e n, (e + 1) n), n = len(source)) lists every record once: the images in a
  random order seeded by (seed, e), each image's records together in their source order. Batches
  then hold one image under several prompts with disjoint targets, whose difference only the
  prompt can explain: without it, a small model settles on a prompt-blind "segment some object"
  (see configs/rlfseg/demo.py). Deterministic in the index, so resuming at any index is exact.
  """

  def __init__(self, source, seed: int):
    self.source = source
    self.seed = int(seed)
    images = np.asarray(source.image_ids(), np.int64)
    if len(images) == 0:
      raise ValueError("ImageGroupedOrder: the source is empty")
    if np.any(np.diff(images) < 0):
      raise ValueError("ImageGroupedOrder: the source's records must be sorted by image")
    starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
    self._groups = np.split(np.arange(len(images)), starts[1:])
    self._epoch, self._order = -1, None

  def order(self, epoch: int) -> np.ndarray:
    """Record indices of epoch `epoch`, int64 (len(source),)."""
    if epoch != self._epoch:
      perm = np.random.default_rng([self.seed, epoch]).permutation(len(self._groups))
      self._epoch, self._order = epoch, np.concatenate([self._groups[g] for g in perm])
    return self._order

  def __call__(self, index) -> dict:
    epoch, i = divmod(int(index), len(self.source))
    return self.source[int(self.order(epoch)[i])]
