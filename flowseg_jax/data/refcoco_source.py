"""RefCOCO / RefCOCO+ / RefCOCOg as a grain source of (image, prompt, binary mask) examples.

Layout (`config.input.refcoco`):
  refs_json       the converted refs (`python -m flowseg_jax.data.refcoco 'refs(unc).p' refs.json`)
  instances_json  the dataset's `instances.json` (COCO train2014 images and instance masks)
  image_dir       the COCO `train2014/` folder
One example per referring sentence of the split: the image, the sentence as prompt and the
referred instance's mask (1 inside, 0 elsewhere). Instance masks are COCO polygons (rasterised
with PIL ImageDraw), uncompressed RLE or compressed RLE strings (decoded here in NumPy; no
pycocotools). Prompt ids index `prompts(refs)`: every sentence of the refs file in file order, so
train and eval splits share one prompt list.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from flowseg_jax.data import refcoco


def rle_string_counts(s: str) -> list[int]:
  """COCO's compressed RLE string -> run lengths (the inverse of the C API's rleToString)."""
  counts: list[int] = []
  p = 0
  while p < len(s):
    x, k, more = 0, 0, True
    while more:
      if p >= len(s):
        raise ValueError(f"truncated compressed RLE string {s[:40]!r}")
      c = ord(s[p]) - 48
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and c & 0x10:
        x |= -1 << (5 * k)
    if len(counts) > 2:
      x += counts[-2]
    counts.append(x)
  return counts


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
  """{'size': [h, w], 'counts': list or str} -> uint8 (h, w) mask (runs are column-major,
  starting with background)."""
  h, w = (int(v) for v in rle["size"])
  counts = rle["counts"]
  if isinstance(counts, bytes):
    counts = counts.decode("ascii")
  if isinstance(counts, str):
    counts = rle_string_counts(counts)
  counts = np.asarray(counts, np.int64)
  if (counts < 0).any() or counts.sum() != h * w:
    raise ValueError(
      f"RLE runs sum to {counts.sum()} (negative: {(counts < 0).any()}), not {h}x{w}"
    )
  values = np.arange(len(counts)) % 2
  return np.repeat(values.astype(np.uint8), counts).reshape(w, h).T.copy()


def polygons_mask(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
  """COCO polygons [[x0, y0, x1, y1, ...], ...] -> uint8 (h, w) mask, filled (PIL ImageDraw)."""
  img = Image.new("L", (w, h), 0)
  draw = ImageDraw.Draw(img)
  for poly in polygons:
    if len(poly) >= 6:
      draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly), 2)], fill=1)
  return np.asarray(img, np.uint8)


def annotation_mask(segmentation, h: int, w: int) -> np.ndarray:
  if isinstance(segmentation, list):
    return polygons_mask(segmentation, h, w)
  if isinstance(segmentation, dict) and "counts" in segmentation:
    mask = decode_rle(segmentation)
    if mask.shape != (h, w):
      raise ValueError(f"RLE of size {mask.shape} for an image of {h}x{w}")
    return mask
  raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")


def prompts(refs: list[dict]) -> list[str]:
  return [s["sent"] for ref in refs for s in ref["sentences"]]


@dataclasses.dataclass
class RefCocoSource:
  """Records {'image': path, 'label': uint8 (h, w) mask, 'prompt': int32, 'name': str}."""

  refs_json: str
  instances_json: str
  image_dir: str
  split: str

  def __post_init__(self):
    for field in ("refs_json", "instances_json", "image_dir"):
      if not os.path.exists(getattr(self, field)):
        raise FileNotFoundError(f"config.input.refcoco.{field}={getattr(self, field)!r} not found")
    refs = refcoco.load_refs_json(self.refs_json)
    with open(self.instances_json) as f:
      instances = json.load(f)
    self.images = {im["id"]: im for im in instances["images"]}
    self.anns = {a["id"]: a for a in instances["annotations"]}
    examples = []
    sid = 0
    for ref in refs:
      for _ in ref["sentences"]:
        if ref["split"] == self.split:
          examples.append((ref["ann_id"], ref["image_id"], sid, ref["ref_id"]))
        sid += 1
    # (ann_id, image_id, sentence id, ref_id) int64 rows: 32 bytes a sentence, not a tuple's ~150
    self.examples = np.asarray(examples, np.int64).reshape(-1, 4)
    if not len(self.examples):
      splits = sorted({r["split"] for r in refs})
      raise ValueError(f"{self.refs_json}: no sentences in split {self.split!r} (splits: {splits})")

  def __len__(self) -> int:
    return len(self.examples)

  def prompt_ids(self) -> np.ndarray:
    """int64 (len,): each record's 'prompt' (its sentence id: the index in `prompts(refs)`)."""
    return self.examples[:, 2].copy()

  def __getitem__(self, index: int) -> dict:
    ann_id, image_id, sid, ref_id = (int(v) for v in self.examples[int(index)])
    image = self.images[image_id]
    h, w = int(image["height"]), int(image["width"])
    mask = annotation_mask(self.anns[ann_id]["segmentation"], h, w)
    return {
      "image": os.path.join(self.image_dir, image["file_name"]),
      "label": mask,
      "prompt": np.int32(sid),
      "name": f"ref{ref_id}_sent{sid}",
    }
