"""Writers of tiny datasets in the real on-disk formats, for the data tests."""

import io
import os
import zipfile

import numpy as np
from PIL import Image

from flowseg_jax.data import sources


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A JPEG-friendly uint8 (h, w, 3) image: a random gradient plus a few blocks."""
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  a = rng.uniform(0, 255, size=(3, 3))
  img = a[0] + (a[1] - a[0]) * yy[..., None] + (a[2] - a[0]) * xx[..., None] * 0.5
  return np.clip(img, 0, 255).astype(np.uint8)


def block_label(rng: np.random.Generator, h: int, w: int, values: np.ndarray) -> np.ndarray:
  """uint8 (h, w) of 4x4-pixel blocks with values drawn from `values`."""
  small = rng.choice(values, size=((h + 3) // 4, (w + 3) // 4))
  return np.kron(small, np.ones((4, 4), np.int64))[:h, :w].astype(np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def png_bytes(label: np.ndarray, palette: bool = False) -> bytes:
  """8-bit grey PNG, or (palette=True) an indexed PNG whose colours are NOT the indices."""
  if palette:
    im = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
    im.putpalette(np.random.default_rng(1).integers(0, 256, 768).astype(np.uint8).tobytes())
  else:
    im = Image.fromarray(np.ascontiguousarray(label, np.uint8))
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()


def decode_rgb(data_or_path) -> np.ndarray:
  src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
  with Image.open(src) as im:
    return np.array(im.convert("RGB"))


def _write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def ade20k_files(
  n: int, split: str, seed: int, sizes=((24, 32), (32, 20))
) -> dict[str, tuple[bytes, bytes, np.ndarray]]:
  """{stem: (jpg bytes, png bytes, expected train ids int32)} in ADE20K's naming and encoding."""
  rng = np.random.default_rng(seed)
  tag = {"training": "train", "validation": "val"}[split]
  out = {}
  for i in range(n):
    h, w = sizes[i % len(sizes)]
    raw = block_label(rng, h, w, np.arange(151))
    expected = np.where(raw == 0, 255, raw.astype(np.int32) - 1)
    out[f"ADE_{tag}_{i + 1:08d}"] = (
      jpeg_bytes(smooth_image(rng, h, w)),
      png_bytes(raw, palette=i % 2 == 1),
      expected,
    )
  return out


def write_ade20k(root: str, files_by_split: dict[str, dict]) -> str:
  """Writes ADEChallengeData2016/{images,annotations}/<split>/ under root; returns the dataset dir."""
  base = os.path.join(root, "ADEChallengeData2016")
  for split, files in files_by_split.items():
    for stem, (jpg, png, _) in files.items():
      _write(os.path.join(base, "images", split, stem + ".jpg"), jpg)
      _write(os.path.join(base, "annotations", split, stem + ".png"), png)
  return base


def coco_files(
  n: int, seed: int, start_id: int
) -> dict[str, tuple[bytes, bytes, bytes, np.ndarray]]:
  """{12-digit id: (jpg, raw png, labelTrainIds png, expected train ids)} in COCO-Stuff encoding."""
  rng = np.random.default_rng(seed)
  used = np.setdiff1d(np.arange(182), sources.COCO_STUFF_UNUSED_RAW_IDS)
  lut = np.full(256, 255, np.int32)
  lut[used] = np.arange(171)
  out = {}
  for i in range(n):
    h, w = (20, 28) if i % 2 else (28, 16)
    raw = block_label(rng, h, w, np.append(used, 255))
    expected = lut[raw]
    out[f"{start_id + i:012d}"] = (
      jpeg_bytes(smooth_image(rng, h, w)),
      png_bytes(raw),
      png_bytes(expected.astype(np.uint8)),
      expected,
    )
  return out


def write_coco_stuff(root: str, files_by_split: dict[str, dict], *, raw=True, train_ids=True):
  """mmseg layout: images/<split>/<id>.jpg, annotations/<split>/<id>.png and _labelTrainIds.png."""
  for split, files in files_by_split.items():
    for stem, (jpg, raw_png, ids_png, _) in files.items():
      _write(os.path.join(root, "images", split, stem + ".jpg"), jpg)
      if raw:
        _write(os.path.join(root, "annotations", split, stem + ".png"), raw_png)
      if train_ids:
        _write(os.path.join(root, "annotations", split, stem + "_labelTrainIds.png"), ids_png)
  return root


def write_zip(path: str, members: dict[str, bytes]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in members.items():
      zf.writestr(name, data)
