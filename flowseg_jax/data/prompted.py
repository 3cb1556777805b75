"""Prompted (image, prompt, binary mask) examples from a semantic dataset.

`PromptedSource` wraps any source of this package (synthetic, ADE20K, COCO-Stuff, TFDS): every
(example, class) pair in which the class covers at least `min_pixels` pixels becomes one prompted
example, with the prompt `template.format(class name)` and the mask 1 on that class, 0 on every
other annotated pixel and 255 where the annotation is 255. Prompt ids are class ids (the prompt
list holds every class of the dataset, train and eval splits share it), so `classes` restricts
which classes a split uses: a zero-shot split trains on some classes and evaluates on the others.

The (example, class) index is built once per source by reading every annotation (a few seconds
for the synthetic data; one pass over the label PNGs for ADE20K / COCO-Stuff).

`config.input.prompted` (None for semantic runs):
  template      prompt template, '{}' is the class name ("a photo of {}")
  train_classes class ids used for training (None: all)
  eval_classes  class ids used for evaluation (None: all)
  min_pixels    least pixels of a class in an (original-size) annotation to make an example
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from flowseg_jax.data import sources

IGNORE = sources.IGNORE_LABEL
BINARY_LABEL_MAP = sources.train_id_label_map("prompted", 2)


def default_prompted_input_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.template = "a photo of {}"
  c.train_classes = ml_collections.FieldReference(None, field_type=list)
  c.eval_classes = ml_collections.FieldReference(None, field_type=list)
  c.min_pixels = 16
  return c


def prompt_list(template: str, class_names: Sequence[str]) -> list[str]:
  if "{}" not in template:
    raise ValueError(f"config.input.prompted.template must contain '{{}}', got {template!r}")
  return [template.format(name) for name in class_names]


def binary_mask(label: np.ndarray, cls: int) -> np.ndarray:
  """uint8 (H, W): 1 where label == cls, 255 where label == 255, else 0."""
  out = (label == cls).astype(np.uint8)
  out[label == IGNORE] = IGNORE
  return out


@dataclasses.dataclass
class PromptedSource:
  """grain random-access source of prompted examples over a semantic `base` source.

  Records: {'image': the base image (path, bytes or array), 'label': uint8 (H, W) binary mask,
  'prompt': int32 class id, 'name': '<base name>:<class id>'}.
  """

  base: Any
  label_map: sources.LabelMap
  num_classes: int
  classes: Sequence[int] | None = None
  min_pixels: int = 16

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

  def __getitem__(self, index: int) -> dict:
    i, c = (int(v) for v in self.index[int(index)])
    record = self.base[i]
    label = sources.read_label(record["label"], record["name"], self.label_map)
    return {
      "image": record["image"],
      "label": binary_mask(label, c),
      "prompt": np.int32(c),
      "name": f"{record['name']}:{c}",
    }
