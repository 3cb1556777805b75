"""The input pipeline's throughput: a fake ADE20K to read, and images/s of the training iterator.

`write_fake_ade20k` writes the ADEChallengeData2016 layout (512x683 / 683x512 JPEGs at quality 90
with texture-rich content, 8-bit PNG annotations with values 0..150); `measure` times
`pipeline.create_train_iterator` on a config. Used by data_pipeline.py and train_step.py.
"""

import os
import time

import numpy as np
from PIL import Image

from flowseg_jax.data import pipeline


def write_fake_ade20k(root: str, num_images: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  base = os.path.join(root, "ADEChallengeData2016")
  os.makedirs(os.path.join(base, "images", "training"), exist_ok=True)
  os.makedirs(os.path.join(base, "annotations", "training"), exist_ok=True)
  for i in range(num_images):
    h, w = (512, 683) if i % 2 == 0 else (683, 512)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):  # smooth colour field + fine texture + noise: JPEG-realistic entropy
      f = rng.uniform(0.005, 0.05, 2)
      img[..., c] = 128 + 60 * np.sin(f[0] * xx + f[1] * yy + rng.uniform(0, 6))
    img += (25 * np.sin(0.9 * xx) * np.cos(0.7 * yy) + rng.normal(0, 12, (h, w)))[..., None]
    image = np.clip(img, 0, 255).astype(np.uint8)
    small = rng.integers(0, 151, size=(h // 32 + 1, w // 32 + 1)).astype(np.uint8)
    label = np.kron(small, np.ones((32, 32), np.uint8))[:h, :w]
    stem = f"ADE_train_{i + 1:08d}"
    Image.fromarray(image).save(os.path.join(base, "images", "training", stem + ".jpg"), quality=90)
    Image.fromarray(label).save(os.path.join(base, "annotations", "training", stem + ".png"))


def measure(cfg, batches: int, warmup: int) -> tuple[float, float]:
  """(images/s wall-clock, CPU ms per image of this process) after `warmup` batches.

  The CPU time covers this process and its threads only (not grain worker processes), so it is
  the per-image cost for num_workers=0 and is robust to other load on the machine.
  """
  it = pipeline.create_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  for _ in range(warmup):
    next(it)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    batch = next(it)
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
  assert batch["image"].shape[1:3] == tuple(cfg.image_size)
  it.close()
  n = batches * cfg.batch_size
  return n / elapsed, 1e3 * cpu / n
